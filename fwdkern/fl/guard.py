"""The body guard: a body step is taken only when the clients measure that it does not raise their loss.

The server proposes each round's body step without applying it; the next round's clients evaluate
their batches once more with the proposed step (one extra forward each) and report that loss beside
their ordinary one. The step is taken when the sample-weighted mean loss with it is no higher than
without it (up to ``tolerance``, relative); otherwise it is dropped and the next proposal's learning
rate is halved (down to ``min_scale``), while accepted steps double it back toward 1. The head's
exact step is never held back. When the body has not paid (fewer than `min_accepted` of the last
`window` proposals taken), it stops training for the rest of the run: the clients stop computing its
tangents. Each round's decision ("accepted", "rejected", "stopped"), the measured relative change and
the scale are in metrics.jsonl (guard, guard_delta, guard_scale).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

__all__ = ["Guard", "GuardDecision"]


@dataclass
class GuardDecision:
    """accepted: the proposal is taken; delta: the measured relative change of the clients' mean loss
    with it (None: no client measured it); scale: the lr scale the proposal was made with."""

    accepted: bool
    delta: Optional[float]
    scale: float
    measured: int = 0


@dataclass
class Guard:
    """tolerance: the relative loss rise a step may cause and still be taken; min_scale: the smallest lr
    scale a proposal is made with; window / min_accepted: when fewer than `min_accepted` of the last
    `window` proposals were taken, the body stops training for the rest of the run (it does not pay
    for its tangents; 0: never)."""

    tolerance: float = 0.0
    min_scale: float = 1.0 / 16
    scale: float = 1.0  # the lr scale of the next proposal
    history: list = field(default_factory=list)
    window: int = 10
    min_accepted: int = 2

    def gives_up(self) -> bool:
        """Whether the body has not paid: fewer than min_accepted of the last `window` proposals taken."""
        return bool(self.window) and len(self.history) >= self.window and \
            sum(self.history[-self.window:]) < self.min_accepted

    def decide(self, losses: Sequence[tuple]) -> GuardDecision:
        """Decide on the pending proposal from [(sample weight, loss without it, loss with it)] of the
        clients that measured it (entries with a non-finite loss are ignored); update the scale."""
        pairs = [(w, a, b) for w, a, b in losses
                 if w > 0 and a is not None and b is not None and math.isfinite(a) and math.isfinite(b)]
        used = self.scale
        if not pairs:
            decision = GuardDecision(False, None, used, 0)
        else:
            wsum = sum(w for w, _, _ in pairs)
            base = sum(w * a for w, a, _ in pairs) / wsum
            probe = sum(w * b for w, _, b in pairs) / wsum
            delta = (probe - base) / max(abs(base), 1e-12)
            decision = GuardDecision(delta <= self.tolerance, delta, used, len(pairs))
        self.scale = min(1.0, used * 2) if decision.accepted else max(self.min_scale, used / 2)
        self.history.append(decision.accepted)
        del self.history[:-1000]
        return decision

    def state_dict(self) -> dict:
        return {"tolerance": self.tolerance, "min_scale": self.min_scale, "scale": self.scale,
                "history": list(self.history), "window": self.window, "min_accepted": self.min_accepted}

    def load_state_dict(self, sd: dict):
        self.tolerance, self.min_scale = sd["tolerance"], sd["min_scale"]
        self.scale, self.history = sd["scale"], list(sd["history"])
        self.window, self.min_accepted = sd.get("window", self.window), sd.get("min_accepted", self.min_accepted)
