"""What a client applies to bring its copy of the trainable tensors to the round's model version."""
from __future__ import annotations

import torch

from ..ops import seeded_axpy_

__all__ = ["apply_replay"]


@torch.no_grad()
def apply_replay(params: dict, names_by_id: dict, record, dist: str = "rademacher"):
    """Reproduce a server SGD step from its ReplayRecord (``Server.replay_chain``) on `params`."""
    for op in record.ops:
        seeded_axpy_(params[names_by_id[op.pid]], op.seed, op.pid, list(op.ks), list(op.coeffs), dist)
