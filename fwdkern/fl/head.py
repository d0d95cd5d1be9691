"""The exact head: a client trains the classifier head exactly on its own captured features (the
head's inputs, recorded during its forward passes: no pass through the body, no activation kept)
and uploads its update as projections on seeded directions (the plan's head block).

NOTE (what the recipe's head settings rest on): bench/results/fl_bbc_cpu/, fl_rt_cpu/ and
fl_smollm2_cpu/ hold the head-lr, calibration and centring sweeps; bench/results/README.md the table.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..engine.head import trainable_head
from ..ops import seeded_dot
from .methods import exact_head_methods

__all__ = ["ExactHead", "find_head", "label_prior"]


def label_prior(labels, C: int):
    """Laplace-smoothed frequencies of the labels in [0, C) (padding and other ids are ignored)."""
    ys = torch.as_tensor(labels).reshape(-1).long()
    ys = ys[(ys >= 0) & (ys < C)]
    return (torch.bincount(ys, minlength=C).float() + 1) / (ys.numel() + C)


def find_head(cfg, model, task: str, method) -> Optional[tuple]:
    """(module path, tensor names) of the head the clients train exactly, or None.

    ``cfg.head``: "perturb" never trains it exactly, "exact" requires it, "auto" takes it when the
    task is a classification, the model has a trainable head and `method` (a Method row) trains one."""
    if cfg.head == "perturb" or task not in ("classification", "prompt"):
        return None
    path, names = trainable_head(model)
    if not names:
        if cfg.head == "exact":
            raise ValueError("--head exact: the model has no trainable classifier head (modules_to_save)")
        return None
    if not method.exact_head:
        if cfg.head == "exact":
            raise ValueError(f"--head exact needs --method {' or '.join(exact_head_methods())} (got {method.name})")
        return None
    return path, names


class ExactHead:
    """Client-side exact training of the head at `path` (tensors `names` of `params`).

    lr: the step per unit of the features' mean squared norm (scale-free); epochs: local passes;
    calibration: tau of the label-skew logit adjustment; centering: "on" trains in centred coordinates;
    train_prior: the training split's label mix the calibration corrects toward (None: uniform)."""

    def __init__(self, model, params: dict, names_by_id: dict, path: str, names, *, lr: float, epochs: int,
                 calibration: float, centering: str, train_prior=None):
        self.model, self.params, self.names_by_id = model, params, names_by_id
        self.path, self.names = path, list(names)
        self.lr, self.epochs, self.calibration, self.centering = lr, epochs, calibration, centering
        self.train_prior = train_prior

    @classmethod
    def from_config(cls, cfg, model, params, names_by_id, path, names, train_labels, label_names):
        prior = label_prior(train_labels, len(label_names)) if train_labels and label_names else None
        return cls(model, params, names_by_id, path, names, lr=cfg.head_lr, epochs=cfg.head_epochs,
                   calibration=cfg.head_calibration, centering=cfg.head_centering, train_prior=prior)

    @property
    def module(self):
        return self.model.get_submodule(self.path)

    def project(self, plan, feats) -> tuple:
        """Train the head exactly on the captured features [(x, labels), ...], then project its
        pseudo-gradient (minus the local update) on the plan's head directions."""
        head = self.module
        prefix = self.path + "."
        start = {n[len(prefix):]: self.params[n].detach() for n in self.names}
        local = {k: v.clone().float().requires_grad_(True) for k, v in start.items()}
        # The step is divided by the features' mean squared norm (the curvature scale of a linear
        # head's cross-entropy), so one lr fits any encoder: sentence-transformers embeddings are
        # unit-norm, a causal LM's last hidden state has a squared norm in the thousands.
        rows = torch.cat([x.float().reshape(-1, x.shape[-1]) for x, _ in feats])
        center = self._center(rows, local)
        if center is not None:
            # Train W and c = b + W mean on centred features: the same head (b = c - W mean), but
            # the step along the classes' differences is no longer scaled down by a common mode.
            rows = rows - center
            local = {"weight": local["weight"],
                     "c": (local["bias"] + local["weight"] @ center).detach().requires_grad_(True)}
        scale = max(1.0, float(rows.pow(2).sum(-1).mean()))
        lr = self.lr / scale
        shift = None

        def as_head(p):
            return p if center is None else {"weight": p["weight"], "bias": p["c"] - p["weight"] @ center}

        for _ in range(self.epochs):
            for x, y in feats:
                keep = y != -100
                with torch.enable_grad():
                    logits = torch.func.functional_call(head, as_head(local), (x.float(),))
                    if shift is None:
                        shift = self._label_shift(feats, logits.shape[-1])
                    loss = torch.nn.functional.cross_entropy(logits.float()[keep] + shift, y[keep])
                    grads = torch.autograd.grad(loss, list(local.values()))
                with torch.no_grad():
                    for t, g in zip(local.values(), grads):
                        t.sub_(lr * g)
        with torch.no_grad():
            local = {k: v.detach() for k, v in as_head(local).items()}
        vals = torch.zeros(len(plan.head_ks), dtype=torch.float64)
        for pid in plan.head_ids:
            n = self.names_by_id[pid][len(prefix):]
            pg = (start[n].float() - local[n]).contiguous()
            vals += seeded_dot(pg, plan.seed, pid, list(plan.head_ks), plan.dist).double()
        return tuple(float(v) for v in vals)

    def _center(self, rows, local):
        """The client's mean feature when the local training centres its inputs (centering on, a linear
        head with a bias: the bias absorbs the mean), else None.

        NOTE (why it is opt-in; bench/results/fl_smollm2_cpu/centering_probe/ and the stop notes of the
        calibration work): it fixes a feature set dominated by a common mode (a random HF pooler), is
        neutral on all-MiniLM-L6-v2, and diverges on SmolLM2-135M's hidden states at head lr 8 -- our
        reading (not measured separately) is that the bias's update, minus the weight's update times a
        large mean, then dominates the projections, whose sketch noise lands on the weight."""
        if self.centering != "on" or set(local) != {"weight", "bias"}:
            return None
        return rows.mean(0)

    def _label_shift(self, feats, C: int):
        """tau * (log of the client's label prior - log of the training split's), over C classes
        (both Laplace-smoothed), or 0 (calibration off).

        Logit adjustment for label shift: the client fits logits + this shift, so the raw logits it
        learns are those of the global label mix, not its own (at tau 1 exactly: the Bayes correction
        from the client's prior to the global one; FedLC's local-prior-only form aims at balanced
        error instead, which costs accuracy on globally imbalanced labels). Evaluation adds nothing.
        The global prior is the label mix of the training split that every client of this runner
        loads (its partitions are a split of it)."""
        if not self.calibration:
            return 0.0
        ys = torch.cat([y.reshape(-1) for _, y in feats])
        client = label_prior(ys, C)
        train = self.train_prior
        if train is None or train.numel() != C:
            train = torch.full((C,), 1.0 / C)
        return self.calibration * (client.log() - train.log())
