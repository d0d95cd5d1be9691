"""LoRALinear: a drop-in nn.Linear with a LoRA adapter and seeded dual / perturbed forwards.

State-dict names and shapes follow peft's ``lora.Linear`` with the adapter name
stripped (as in peft's saved adapters): ``base_layer.weight`` [out, in],
``base_layer.bias`` [out], ``lora_A.weight`` [r, in] (kaiming-uniform, a=√5),
``lora_B.weight`` [out, r] (zeros); ``scaling = alpha / r``.

Param ids: every trainable tensor's perturbation stream is keyed by
``param_id(qualified_name)`` (:func:`param_id`), so a server and its clients that
build the same model agree on every perturbation from the seed alone.
"""
from __future__ import annotations

import hashlib
import math
from typing import Optional

import torch
from torch import nn

from ..ops.lora import lora_linear_dual, lora_linear_perturbed
from .quant import QuantLinear


def param_id(qualified_name: str) -> int:
    """Stable 32-bit id of a parameter: the first 4 bytes (little-endian) of
    ``blake2b(qualified_name.encode("utf-8"), digest_size=4)``.

    E.g. ``param_id("model.layers.0.self_attn.q_proj.lora_A.weight")``. Independent of
    Python's hash seed, the process and the platform.
    """
    if not isinstance(qualified_name, str):
        raise TypeError(f"qualified_name: expected a str, got {type(qualified_name).__name__}")
    return int.from_bytes(hashlib.blake2b(qualified_name.encode("utf-8"), digest_size=4).digest(), "little")


def assign_param_ids(model: nn.Module, prefix: str = "") -> dict[str, int]:
    """Give every :class:`LoRALinear` in `model` the ids of its trainable tensors.

    A LoRALinear at path ``p`` gets ``param_id(prefix + p + ".lora_A.weight")``,
    ``... ".lora_B.weight"`` and ``... ".base_layer.bias"`` (the names in
    ``model.state_dict()``). Returns {qualified name: id}; raises ValueError if two
    names collide (probability ~ n² / 2^33).
    """
    ids: dict[str, int] = {}
    for path, mod in model.named_modules():
        if isinstance(mod, LoRALinear):
            base = prefix + path + ("." if path else "")
            names = {"A": base + "lora_A.weight", "B": base + "lora_B.weight", "bias": base + "base_layer.bias"}
            mod.param_ids = {k: param_id(v) for k, v in names.items()}
            mod.qualified_name = prefix + path
            for k, v in names.items():
                ids[v] = mod.param_ids[k]
    seen: dict[int, str] = {}
    for name, pid in ids.items():
        if pid in seen:
            raise ValueError(f"param ids collide: {seen[pid]!r} and {name!r} both map to {pid}; rename one")
        seen[pid] = name
    return ids


class LoRALinear(nn.Module):
    """``y = base_layer(x) + scaling · lora_B(lora_A(dropout(x)))``.

    Args:
        in_features, out_features, bias: as nn.Linear (ignored when `base_layer` is given).
        r: rank (≥ 1). alpha: LoRA alpha; ``scaling = alpha / r``.
        dropout: dropout on the adapter input (plain forward only; see :meth:`forward_dual`).
        train_bias: the base bias is trainable and perturbed by default (BitFit).
        base_layer: an existing nn.Linear to wrap (its weight is frozen, any float dtype), or a
            :class:`fwdkern.nn.QuantLinear` (an int8 / int4 base: the seeded forwards run the quantized ops).
        adapter_dtype: dtype of lora_A / lora_B (default float32, like peft's autocast_adapter_dtype).
    """

    def __init__(self, in_features: int, out_features: int, r: int = 8, alpha: float = 8.0, dropout: float = 0.0,
                 bias: bool = True, train_bias: bool = False, base_layer: Optional[nn.Linear] = None,
                 device=None, dtype=None, adapter_dtype: Optional[torch.dtype] = None):
        super().__init__()
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r: expected a positive int, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
        if base_layer is None:
            base_layer = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        elif not isinstance(base_layer, (nn.Linear, QuantLinear)):
            raise TypeError(f"base_layer: expected an nn.Linear (or fwdkern.nn.QuantLinear), got "
                            f"{type(base_layer).__name__}")
        self.base_layer = base_layer
        if isinstance(base_layer, nn.Linear):
            self.base_layer.weight.requires_grad_(False)
        if self.base_layer.bias is not None:
            self.base_layer.bias.requires_grad_(bool(train_bias))
        elif train_bias:
            raise ValueError("train_bias: the base layer has no bias")
        dev = self.frozen_weight().device
        adt = adapter_dtype or torch.float32
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=dev, dtype=adt)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=dev, dtype=adt)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r, self.lora_alpha, self.scaling = r, alpha, alpha / r
        self.train_bias = bool(train_bias)
        self.merged = False
        # Set by assign_param_ids(); None until then (the ops need explicit ids).
        self.param_ids: Optional[dict] = None
        self.qualified_name: Optional[str] = None
        self.reset_lora_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, alpha: float, dropout: float = 0.0, train_bias: bool = False,
                    adapter_dtype: Optional[torch.dtype] = None) -> "LoRALinear":
        """Wrap `linear` (kept as ``base_layer``, weight frozen) with a fresh adapter (B = 0: same outputs)."""
        return cls(linear.in_features, linear.out_features, r=r, alpha=alpha, dropout=dropout, train_bias=train_bias,
                   base_layer=linear, adapter_dtype=adapter_dtype)

    def reset_lora_parameters(self):
        """peft's init: A kaiming-uniform (a=√5, nn.Linear's default), B zeros."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    # nn.Linear look-alike attributes (drop-in).
    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def quantized(self) -> bool:
        """Whether the frozen base is kept quantized (a :class:`fwdkern.nn.QuantLinear`)."""
        return isinstance(self.base_layer, QuantLinear)

    def frozen_weight(self, dtype: Optional[torch.dtype] = None):
        """The frozen base weight as the ops take it (``weight`` of :func:`fwdkern.lora_linear_dual`): a
        quantized base's :class:`fwdkern.ops.quant.QuantizedWeight` (the ops compute in any dtype), else
        ``base_layer.weight`` detached (the seeded forwards are not differentiated by autograd), in
        `dtype` when given."""
        if self.quantized:
            return self.base_layer.quantized_weight()
        w = self.base_layer.weight.detach()
        return w if dtype is None else w.to(dtype)

    def _base_dtype(self) -> torch.dtype:
        return self.base_layer.dtype if self.quantized else self.base_layer.weight.dtype

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.lora_alpha}, merged={self.merged}")

    # ------------------------------------------------------------------ inference

    def _delta_weight(self) -> torch.Tensor:
        """fp32 [out, in]: scaling · B A."""
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    @torch.no_grad()
    def merge(self):
        """W += s·BA in place (rounded once to W's dtype; a low-precision W makes unmerge inexact)."""
        if not self.merged:
            self._refuse_quantized("merge")
            W = self.base_layer.weight
            W.copy_((W.float() + self._delta_weight()).to(W.dtype))
            self.merged = True
        return self

    @torch.no_grad()
    def unmerge(self):
        """W -= s·BA in place (inverse of :meth:`merge`)."""
        if self.merged:
            self._refuse_quantized("unmerge")
            W = self.base_layer.weight
            W.copy_((W.float() - self._delta_weight()).to(W.dtype))
            self.merged = False
        return self

    def _refuse_quantized(self, op):
        if self.quantized:
            raise RuntimeError(f"{op}: the base is quantized ({self.base_layer.extra_repr()}); merging s·BA into it "
                               "would need a requantization (not done: it would change the frozen base)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Plain inference, x [..., in] -> [..., out] in x's dtype."""
        y = self.base_layer(x.to(self._base_dtype()))
        if not self.merged:
            a = self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype)))
            y = y + (self.scaling * self.lora_B(a)).to(y.dtype)
        return y.to(x.dtype)

    # ------------------------------------------------------------------ seeded forwards

    def effective_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The dense weight this layer applies, ``W + scaling * B @ A`` [out, in], detached, in `dtype`
        (default: the adapter's dtype): a quantized base is dequantized, a merged adapter is already in
        W. For products the seeded ops do not cover, e.g. an input tangent through the whole layer."""
        dt = dtype or self.lora_A.weight.dtype
        W = self.frozen_weight()
        W = W.dequantize(dt) if self.quantized else W.to(dt)
        if self.merged:
            return W
        return torch.addmm(W, self.lora_B.weight.detach().to(dt), self.lora_A.weight.detach().to(dt),
                           alpha=self.scaling)

    def _operands(self, x: torch.Tensor, op: str):
        if self.merged:
            raise RuntimeError(f"{op}: the adapter is merged into base_layer.weight; call unmerge() first")
        if self.training and isinstance(self.lora_dropout, nn.Dropout):
            raise NotImplementedError(f"{op}: adapter dropout is not supported in seeded forwards; call eval() or "
                                      "use dropout=0")
        dt = x.dtype
        b = self.base_layer.bias
        # The ops take one dtype; detach: the seeded forwards are not differentiated by autograd.
        return (self.frozen_weight(dt), b.detach().to(dt) if b is not None else None,
                self.lora_A.weight.detach().to(dt), self.lora_B.weight.detach().to(dt))

    def _ids(self, param_ids):
        ids = param_ids if param_ids is not None else self.param_ids
        if ids is None:
            raise ValueError("param_ids: none assigned; call fwdkern.nn.assign_param_ids(model) (or pass param_ids)")
        return ids

    def _default_perturb(self):
        return ("A", "B", "bias") if (self.train_bias and self.base_layer.bias is not None) else ("A", "B")

    def perturbed(self, selected_ids) -> tuple:
        """Which of this layer's tensors ("A", "B", "bias") get tangents when the ids in
        `selected_ids` are perturbed: the one rule the engine and the seeded forwards share."""
        ids = self._ids(None)
        return tuple(n for n in self._default_perturb() if ids.get(n) in selected_ids)

    def forward_dual(self, x: torch.Tensor, x_tangents: Optional[torch.Tensor], seed: int, ks,
                     dist: str = "rademacher", perturb=None, param_ids=None, backend: Optional[str] = None):
        """(y [..., out], y_tangents [K, ..., out]): see :func:`fwdkern.lora_linear_dual`.

        perturb defaults to ("A", "B") (+ "bias" when train_bias). param_ids default to
        those from :func:`assign_param_ids`.
        """
        W, b, A, B = self._operands(x, "forward_dual")
        perturb = self._default_perturb() if perturb is None else perturb
        return lora_linear_dual(x, x_tangents, W, b, A, B, self.scaling, seed, self._ids(param_ids), ks, dist=dist,
                                perturb=perturb, backend=backend)

    def forward_perturbed(self, x: torch.Tensor, seed: int, ks, eps: float, dist: str = "rademacher", perturb=None,
                          param_ids=None, backend: Optional[str] = None):
        """(y_plus, y_minus), each [K, ..., out]: see :func:`fwdkern.lora_linear_perturbed`."""
        W, b, A, B = self._operands(x, "forward_perturbed")
        perturb = self._default_perturb() if perturb is None else perturb
        return lora_linear_perturbed(x, W, b, A, B, self.scaling, seed, self._ids(param_ids), ks, eps, dist=dist,
                                     perturb=perturb, backend=backend)
