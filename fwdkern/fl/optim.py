"""Server optimizers on dicts of tensors: SGD (momentum, warm-up + decay), FedAdam, FedYogi.

The gradient estimate arrives as a dict name -> tensor (built with seeded_axpy_).
State is plain tensors/floats so it checkpoints with torch.save.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class LRSchedule:
    """lr(t) = base * warm-up ramp * decay; decay in {"constant", "linear", "cosine"} over total steps."""

    base: float
    warmup: int = 0
    total: int = 0
    decay: str = "constant"
    final_frac: float = 0.0

    def __call__(self, step: int) -> float:
        lr = self.base
        if self.warmup and step < self.warmup:
            return lr * (step + 1) / self.warmup
        if self.total and self.decay != "constant":
            frac = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
            if self.decay == "linear":
                mult = 1.0 - (1.0 - self.final_frac) * frac
            elif self.decay == "cosine":
                mult = self.final_frac + (1.0 - self.final_frac) * 0.5 * (1 + math.cos(math.pi * frac))
            else:
                raise ValueError(f"decay: unknown schedule {self.decay!r}")
            lr *= mult
        return lr


class _Opt:
    linear = False  # True when an update is a linear combination of gradient estimates

    def __init__(self, lr):
        self.schedule = lr if isinstance(lr, LRSchedule) else LRSchedule(float(lr))
        self.t = 0
        self.state: dict = {}

    def state_dict(self):
        return {"t": self.t, "state": {k: {kk: vv.clone() for kk, vv in v.items()} for k, v in self.state.items()}}

    def load_state_dict(self, sd):
        self.t = sd["t"]
        self.state = {k: {kk: vv.clone() for kk, vv in v.items()} for k, v in sd["state"].items()}

    def finite(self) -> bool:
        """Whether every state tensor is finite (the server rolls a step back otherwise)."""
        return all(bool(torch.isfinite(t).all()) for st in self.state.values() for t in st.values())

    @torch.no_grad()
    def step(self, params: dict, grads: dict, lr_scale: float = 1.0):
        """One server step: every named tensor moves by _delta (computed in float32) at the schedule's lr
        times `lr_scale` (the body guard's shrink factor; 1 otherwise)."""
        lr = self.schedule(self.t) * lr_scale
        for name, g in grads.items():
            p = params[name]
            p.copy_((p.float() - self._delta(name, p, g.float(), lr)).to(p.dtype))
        self.t += 1

    def _delta(self, name, p, g, lr):
        raise NotImplementedError


class SGD(_Opt):
    linear = True

    def __init__(self, lr, momentum: float = 0.0, weight_decay: float = 0.0):
        super().__init__(lr)
        self.momentum, self.weight_decay = momentum, weight_decay

    def _delta(self, name, p, g, lr):
        if self.weight_decay:
            g = g + self.weight_decay * p.float()
        if self.momentum:
            buf = self.state.setdefault(name, {}).get("m")
            buf = g.clone() if buf is None else buf.mul_(self.momentum).add_(g)
            self.state[name]["m"] = buf
            g = buf
        return lr * g


class _Adaptive(_Opt):
    """FedOpt family (Reddi et al.): server-side Adam/Yogi on the pseudo-gradient.

    With ``bias_correction`` (default) the moments are divided by 1 - beta^t as in Adam, so the
    first steps are not shrunk (m) or inflated (v) by the zero initialisation; FedOpt as published
    (and Flower's strategies) omit it: ``bias_correction=False``.
    """

    def __init__(self, lr=1e-2, betas=(0.9, 0.99), tau=1e-3, bias_correction: bool = True):
        super().__init__(lr)
        self.b1, self.b2 = betas
        self.tau = tau
        self.bias_correction = bool(bias_correction)

    def _second(self, v, g2):
        raise NotImplementedError

    def _delta(self, name, p, g, lr):
        st = self.state.setdefault(name, {})
        m = st.get("m", torch.zeros_like(g))
        v = st.get("v", torch.full_like(g, self.tau**2))
        m.mul_(self.b1).add_((1 - self.b1) * g)
        v = self._second(v, g * g)
        st["m"], st["v"] = m, v
        if self.bias_correction:
            t = self.t + 1
            return lr * (m / (1 - self.b1 ** t)) / ((v / (1 - self.b2 ** t)).sqrt() + self.tau)
        return lr * m / (v.sqrt() + self.tau)


class FedAdam(_Adaptive):
    def _second(self, v, g2):
        return v.mul_(self.b2).add_((1 - self.b2) * g2)


class FedYogi(_Adaptive):
    def _second(self, v, g2):
        return v.sub_((1 - self.b2) * g2 * torch.sign(v - g2))


# ---------------------------------------------------------------------- the step rule on the wire
OPTIMIZER_KINDS = {"sgd": SGD, "fedadam": FedAdam, "fedyogi": FedYogi}


def optimizer_spec(opt) -> dict:
    """The settings that define `opt`'s step (what a client needs to redo it): kind, schedule and the
    kind's hyperparameters (plain numbers and strings: JSON on the wire)."""
    kind = next(k for k, c in OPTIMIZER_KINDS.items() if type(opt) is c)
    s = opt.schedule
    spec = {"kind": kind, "lr": [s.base, s.warmup, s.total, s.decay, s.final_frac]}
    if isinstance(opt, SGD):
        spec.update(momentum=opt.momentum, weight_decay=opt.weight_decay)
    else:
        spec.update(betas=[opt.b1, opt.b2], tau=opt.tau, bias_correction=opt.bias_correction)
    return spec


def optimizer_from_spec(spec) -> _Opt:
    """A fresh optimizer (t = 0, no state) from :func:`optimizer_spec`'s dict; ValueError when malformed."""
    def num(x, what):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            raise ValueError(f"optimizer spec: {what} is not a finite number ({x!r})")
        return x

    if not isinstance(spec, dict) or spec.get("kind") not in OPTIMIZER_KINDS:
        raise ValueError(f"optimizer spec: unknown kind in {str(spec)[:80]!r}")
    lr = spec.get("lr")
    if not (isinstance(lr, list) and len(lr) == 5 and lr[3] in ("constant", "linear", "cosine")):
        raise ValueError("optimizer spec: lr must be [base, warmup, total, decay, final_frac]")
    sched = LRSchedule(num(lr[0], "lr"), int(num(lr[1], "warmup")), int(num(lr[2], "total")), lr[3],
                       num(lr[4], "final_frac"))
    if spec["kind"] == "sgd":
        return SGD(sched, momentum=num(spec.get("momentum", 0.0), "momentum"),
                   weight_decay=num(spec.get("weight_decay", 0.0), "weight_decay"))
    betas = spec.get("betas")
    if not (isinstance(betas, list) and len(betas) == 2):
        raise ValueError("optimizer spec: betas must be [beta1, beta2]")
    return OPTIMIZER_KINDS[spec["kind"]](sched, betas=(num(betas[0], "beta1"), num(betas[1], "beta2")),
                                         tau=num(spec.get("tau", 1e-3), "tau"),
                                         bias_correction=bool(spec.get("bias_correction", True)))


def stateful(opt) -> bool:
    """Whether `opt` keeps per-tensor state (moments): a client that rolls a tensor forward needs it."""
    return not (isinstance(opt, SGD) and not opt.momentum)
