"""FwdLLM's variance-controlled pacing: when a round's gradient estimate is too noisy, the
server keeps it and asks for more perturbations at the same model version."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class VariancePacing:
    """Variance-controlled pacing.

    The round's updates are split by client into two halves (alternating in client order),
    each half gives its own (sample-weighted, per-tensor normalised) gradient estimate m1, m2,
    so the spread between them holds the client-to-client noise as well as the perturbation
    noise. Two measures are recorded every round:

    * ``variance`` = ``||m1 - m2||^2 / (4 n)``: FwdLLM's element-wise variance of the half
      means (absolute, model dependent: FwdLLM hand-tunes 0.1-0.2 per model);
    * ``noise_ratio`` = ``||m1 - m2||^2 / ||m1 + m2||^2``: the estimate's noise energy over its
      signal energy (scale-free: it follows the gradient's size as training moves).

    ``threshold=None`` (``--pacing auto``) compares ``noise_ratio`` with ``relative``; a number
    (``--pacing 0.1``) compares FwdLLM's ``variance`` with it. Above the threshold the server
    does not step: it keeps the round's updates and asks for another attempt (a fresh seed, a
    client round) at the same model version, then estimates from cached + new, up to
    ``max_attempts`` client rounds per step.
    """

    threshold: Optional[float] = None
    relative: float = 1.0
    max_attempts: int = 4
    history: list = field(default_factory=list)

    def exceeded(self, variance: Optional[float], noise_ratio: Optional[float]) -> Optional[bool]:
        """Whether the estimate is too noisy (None when the round gives no measure)."""
        if self.threshold is not None:
            return None if variance is None else variance > self.threshold
        return None if noise_ratio is None else noise_ratio > self.relative

    def current_threshold(self) -> float:
        return self.threshold if self.threshold is not None else self.relative

    def state_dict(self):
        return {"threshold": self.threshold, "relative": self.relative, "history": list(self.history)}

    def load_state_dict(self, sd):
        self.threshold, self.history = sd["threshold"], list(sd["history"])
        self.relative = sd.get("relative", self.relative)
