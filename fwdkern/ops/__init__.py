"""Ops layer: custom ops + backend dispatch (kernels live in csrc/ and fwdkern/triton)."""
from .seeded import perturbation, seeded_axpy_, seeded_dot  # noqa: F401
