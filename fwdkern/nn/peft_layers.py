"""More adapters for the forward-gradient engine: IA3 (peft's layout), and FwdLLM's bottleneck adapter.

* :class:`IA3Linear` scales a frozen linear layer's output (or, for feed-forward layers, its
  input) by a learned vector ``ia3_l`` (peft's ``IA3`` ``Linear``: same state-dict names and shapes,
  ones at initialisation). The vector is small, so its tangents are stacked perturbations.
* :class:`BottleneckAdapter` adds ``up(relu(down(y)))`` to a module's output ``y`` (the residual
  adapter FwdLLM uses for DistilBERT: reduction 16, ReLU; ``up`` starts at zero so the model is
  unchanged at initialisation). Its two matrices are perturbed on the fly: ``y dW_downᵀ`` and
  ``h dW_upᵀ`` come from :func:`fwdkern.seeded_matmul`, never from a materialized perturbation.

BitFit (biases only) needs no layer: :func:`fwdkern.patch` with ``peft="bitfit"`` makes the biases
trainable.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import perturbation
from ..ops.lora import seeded_matmul


class IA3Linear(nn.Module):
    """``y = base_layer(x) * l`` (``l`` [out, 1]) or, with ``feedforward``, ``y = base_layer(x * l)`` (``l`` [1, in])."""

    def __init__(self, base_layer: nn.Module, feedforward: bool = False):
        super().__init__()
        if not hasattr(base_layer, "weight"):
            raise TypeError(f"base_layer: expected a linear layer, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.feedforward = bool(feedforward)
        w = base_layer.weight
        conv1d = type(base_layer).__name__ == "Conv1D"  # weight [in, out]
        in_f, out_f = (w.shape[0], w.shape[1]) if conv1d else (w.shape[1], w.shape[0])
        self.in_features, self.out_features = in_f, out_f
        shape = (1, in_f) if self.feedforward else (out_f, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, device=w.device, dtype=torch.float32))
        for p in self.base_layer.parameters():
            p.requires_grad_(False)

    def forward(self, x):
        scale = self.ia3_l.flatten()
        if self.feedforward:
            return self.base_layer((x * scale.to(x.dtype)).to(x.dtype))
        y = self.base_layer(x)
        return (y * scale.to(y.dtype)).to(y.dtype)


class BottleneckAdapter(nn.Module):
    """``module(x) + up(relu(down(module(x))))`` with ``down``: [dim // reduction, dim], ``up``: [dim, r]."""

    def __init__(self, module: nn.Module, dim: int, reduction: int = 16):
        super().__init__()
        if reduction < 1 or dim // reduction < 1:
            raise ValueError(f"reduction: {reduction} leaves no hidden units for dim {dim}")
        self.module = module
        hidden = dim // reduction
        ref = next(module.parameters(), None)
        dev = ref.device if ref is not None else None
        self.adapter_down = nn.Linear(dim, hidden, device=dev)
        self.adapter_up = nn.Linear(hidden, dim, device=dev)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)
        self.dim, self.hidden, self.reduction = dim, hidden, reduction
        self.param_ids: Optional[dict] = None  # {"down", "down_bias", "up", "up_bias"}: set by the engine

    def forward(self, x, *args, **kwargs):
        return self.adapt(self.module(x, *args, **kwargs))

    def adapt(self, y):
        """The adapter applied to the wrapped module's output."""
        h = torch.relu(F.linear(y.to(self.adapter_down.weight.dtype), self.adapter_down.weight,
                                self.adapter_down.bias))
        return y + F.linear(h, self.adapter_up.weight, self.adapter_up.bias).to(y.dtype)

    def forward_dual(self, y, y_t, seed: int, ks, dist: str, perturb: tuple, extra_t: dict):
        """(out, out tangents [K, ...]) for the wrapped module's output y (tangent y_t or None).

        perturb: which of "down", "down_bias", "up", "up_bias" get seeded tangents; extra_t: name ->
        stacked tangent of an adapter tensor that is perturbed as a full tensor elsewhere (unused
        unless tied)."""
        ids = self.param_ids
        K = len(ks)
        Wd, bd, Wu, bu = (self.adapter_down.weight, self.adapter_down.bias, self.adapter_up.weight,
                          self.adapter_up.bias)
        yf = y.to(Wd.dtype)
        pre = F.linear(yf, Wd, bd)
        pre_t = torch.zeros((K, *pre.shape), dtype=torch.float32, device=pre.device)
        if y_t is not None:
            pre_t += torch.matmul(y_t.to(Wd.dtype), Wd.t()).float()
        if "down" in perturb:
            pre_t += seeded_matmul(yf, seed, ids["down"], ks, self.hidden, dist)
        if "down_bias" in perturb:
            pre_t += _bias_tangents(self.hidden, seed, ids["down_bias"], ks, dist, pre.device, pre.dim())
        h = torch.relu(pre)
        h_t = pre_t * (pre > 0).to(pre_t.dtype)
        out = F.linear(h, Wu, bu)
        out_t = torch.matmul(h_t.to(Wu.dtype), Wu.t()).float()
        if "up" in perturb:
            out_t += seeded_matmul(h, seed, ids["up"], ks, self.dim, dist)
        if "up_bias" in perturb:
            out_t += _bias_tangents(self.dim, seed, ids["up_bias"], ks, dist, out.device, out.dim())
        if y_t is not None:
            out_t += y_t.float()
        return (y + out.to(y.dtype)), out_t.to(y.dtype)


def _bias_tangents(n, seed, pid, ks, dist, device, ndim):
    t = torch.stack([perturbation((n,), seed, pid, int(k), dist, device=device) for k in ks])
    return t.view(t.shape[0], *([1] * (ndim - 1)), n)
