"""FwdLLM's variance-controlled pacing: when a round's gradient estimate is too noisy, the
server keeps it and asks for more perturbations at the same model version."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class VariancePacing:
    """FwdLLM's variance-controlled pacing.

    The per-perturbation gradient estimates of a round are split into two halves;
    the element-wise variance of the two half-means, averaged over all trainable
    elements, is ``||m1 - m2||^2 / (4 n)``. Above ``threshold`` the server does not
    step: it keeps the round's estimates and asks for more perturbations at the
    same model version (a fresh seed), then averages cached + new.

    ``threshold=None`` is automatic: during the first ``calibrate`` steps it
    records the variance and then uses ``auto_factor`` x their median, so no
    per-model hand tuning is needed (FwdLLM hand-tunes 0.1-0.2 per model).
    """

    threshold: Optional[float] = None
    auto_factor: float = 1.0
    calibrate: int = 3
    max_attempts: int = 4
    history: list = field(default_factory=list)

    def current_threshold(self) -> Optional[float]:
        if self.threshold is not None:
            return self.threshold
        if len(self.history) < self.calibrate:
            return None
        calib = sorted(self.history[: self.calibrate])
        return self.auto_factor * calib[len(calib) // 2]

    def state_dict(self):
        return {"threshold": self.threshold, "history": list(self.history)}

    def load_state_dict(self, sd):
        self.threshold, self.history = sd["threshold"], list(sd["history"])
