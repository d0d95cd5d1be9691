"""Messages of the seed-and-scalar protocol and their validation."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

from .._seed import join_seed, split_seed


class UpdateRejected(ValueError):
    """A client update that must not be applied (the reason names the problem)."""


@dataclass(frozen=True)
class RoundPlan:
    """What one client must compute in one round.

    round / model_version: the server state the client must evaluate at.
    seed: uint64 perturbation seed. ks: perturbation indices to evaluate.
    param_ids: ids of the tensors to perturb (SPRY splitting; all trainable
    tensors when the split is off). num_batches: local batches to average over.
    """

    client_id: str
    round: int
    model_version: int
    seed: int
    ks: tuple
    param_ids: tuple
    num_batches: int = 1
    dist: str = "rademacher"

    def to_config(self) -> dict:
        """Flat dict of ints/strings/int lists (fits a Flower ConfigRecord)."""
        d = asdict(self)
        d["ks"] = list(self.ks)
        d["param_ids"] = list(self.param_ids)
        # ConfigRecord ints are signed 64-bit: ship the seed as two 32-bit halves.
        d["seed_lo"], d["seed_hi"] = split_seed(self.seed)
        del d["seed"]
        return d

    @classmethod
    def from_config(cls, d: dict) -> "RoundPlan":
        return cls(client_id=str(d["client_id"]), round=int(d["round"]), model_version=int(d["model_version"]),
                   seed=join_seed(d["seed_lo"], d["seed_hi"]), ks=tuple(int(k) for k in d["ks"]),
                   param_ids=tuple(int(p) for p in d["param_ids"]), num_batches=int(d["num_batches"]),
                   dist=str(d["dist"]))


@dataclass(frozen=True)
class Update:
    """A client's answer: one directional derivative per planned perturbation."""

    client_id: str
    round: int
    model_version: int
    ks: tuple
    jvps: tuple
    num_samples: int
    loss: float
    extra: dict = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, b: bytes) -> "Update":
        try:
            d = json.loads(b.decode())
            return cls(client_id=str(d["client_id"]), round=int(d["round"]), model_version=int(d["model_version"]),
                       ks=tuple(int(k) for k in d["ks"]), jvps=tuple(float(j) for j in d["jvps"]),
                       num_samples=int(d["num_samples"]), loss=float(d["loss"]), extra=dict(d.get("extra", {})))
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
            raise UpdateRejected(f"malformed update: {e}") from None

    @property
    def nbytes(self) -> int:
        return len(self.to_bytes())


MAX_UPDATE_BYTES = 64 * 1024


def validate_update(update: Update, plan: Optional[RoundPlan], *, current_round: int, model_version: int,
                    jvp_bound: Optional[float] = None) -> None:
    """Raise UpdateRejected unless `update` answers `plan` exactly and sanely."""
    if not isinstance(update, Update):
        raise UpdateRejected(f"not an Update: {type(update).__name__}")
    if plan is None:
        raise UpdateRejected(f"client {update.client_id!r} was not sampled this round")
    if update.client_id != plan.client_id:
        raise UpdateRejected(f"client id {update.client_id!r} does not match the plan's {plan.client_id!r}")
    if update.round != current_round:
        raise UpdateRejected(f"late or early update: round {update.round}, current round {current_round}")
    if update.model_version != model_version or plan.model_version != model_version:
        raise UpdateRejected(f"stale model version {update.model_version} (current {model_version})")
    if tuple(update.ks) != tuple(plan.ks):
        raise UpdateRejected("ks differ from the plan")
    if len(update.jvps) != len(plan.ks):
        raise UpdateRejected(f"{len(update.jvps)} jvps for {len(plan.ks)} planned perturbations")
    if update.nbytes > MAX_UPDATE_BYTES:
        raise UpdateRejected(f"oversized update ({update.nbytes} bytes > {MAX_UPDATE_BYTES})")
    if not all(isinstance(j, float) and math.isfinite(j) for j in update.jvps):
        raise UpdateRejected("non-finite jvp (NaN/Inf)")
    if not (isinstance(update.loss, float) and math.isfinite(update.loss)):
        raise UpdateRejected("non-finite loss")
    if not isinstance(update.num_samples, int) or update.num_samples <= 0:
        raise UpdateRejected(f"num_samples must be a positive int, got {update.num_samples!r}")
    if jvp_bound is not None and any(abs(j) > jvp_bound for j in update.jvps):
        raise UpdateRejected(f"jvp magnitude above the robust bound {jvp_bound:.3g}")


def robust_bound(values: Sequence[float], factor: float = 10.0, floor: float = 1e-12,
                 min_count: int = 8) -> Optional[float]:
    """|x| bound: median + factor * max(MAD, median / 2) of |values| (None below min_count values)."""
    vals = sorted(abs(v) for v in values)
    if len(vals) < min_count:
        return None
    med = vals[len(vals) // 2]
    mad = sorted(abs(v - med) for v in vals)[len(vals) // 2]
    return med + factor * max(mad, floor, 0.5 * med)
