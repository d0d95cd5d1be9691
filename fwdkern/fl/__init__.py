"""Federated forward-gradient fine-tuning: pure protocol logic, no transport.

A round: the server sends each sampled client a :class:`RoundPlan` (seed,
perturbation indices, tensors to perturb); the client returns an :class:`Update`
holding one jvp scalar per perturbation; the server validates, rebuilds the
gradient estimate with ``seeded_axpy_`` and steps its optimizer. Nothing but
seeds and scalars crosses the wire.
"""
from .protocol import RoundPlan, Update, UpdateRejected, validate_update  # noqa: F401
from .optim import SGD, FedAdam, FedYogi, LRSchedule  # noqa: F401
from .server import Server  # noqa: F401
from .config import RunConfig  # noqa: F401
from .splitting import split_groups  # noqa: F401
