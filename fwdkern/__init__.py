"""fwdkern: forward-gradient fine-tuning kernels.

Seeded perturbations (counter-based Philox, never materialized) and the ops built
on them. See docs/perturbations.md for the stream definition.
"""
from . import backends  # noqa: F401
from .backends import BackendUnavailable  # noqa: F401
from .ops import perturbation, seeded_axpy_, seeded_dot  # noqa: F401

__version__ = "0.1.0"
__all__ = ["perturbation", "seeded_axpy_", "seeded_dot", "BackendUnavailable", "backends"]
