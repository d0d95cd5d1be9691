"""A frozen base kept quantized: :class:`QuantLinear` and :class:`QuantEmbedding`.

Formats: int8 per output channel, int4 group-wise (``fwdkern/ops/_qformat.py``, docs/quantization.md).
The quantized tensors are buffers (``qweight``, ``scales``, ``offsets``; they move with ``.to(device)``
and appear in ``state_dict``); a bias stays a float parameter (trainable with BitFit / ``train_bias``).

* ``QuantLinear(x)`` = ``x Wqᵀ + b`` (:func:`fwdkern.ops.quant.quant_linear`): autograd reaches x and b
  (backprop LoRA on a quantized base, QLoRA-style: only the int tensors are kept for backward), and
  in the dual forward the rule in fwdkern/dual.py computes ``ẏ_k = ẋ_k Wqᵀ`` over the stacked rows.
* A :class:`fwdkern.LoRALinear` whose ``base_layer`` is a QuantLinear runs the quantized LoRA ops.
* ``QuantEmbedding`` dequantizes only the rows it looks up; a tied LM head shares its tensors
  (one quantized copy of the matrix) and dequantizes row blocks when applied.

Putting them into a model (and taking them out again) changes its structure, so those walks live
beside :func:`fwdkern.patch`: :func:`fwdkern.engine.quantize_base` / :func:`fwdkern.engine.dequantize_base`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops._qformat import (DEFAULT_GROUP_SIZE, QuantizedWeight, check_group_size, dequantize_reference, parse_quant,
                            quantize_weight)
from ..ops.quant import quant_linear

__all__ = ["QuantLinear", "QuantEmbedding", "quantized_bytes", "check_group_size", "parse_quant", "QUANT_BUFFERS"]

# The buffers that hold a quantized matrix (every other parameter and buffer of a model stays float).
QUANT_BUFFERS = ("qweight", "scales", "offsets")


class _QuantStorage(nn.Module):
    """The buffers of one quantized [rows, cols] matrix."""

    def _set_quantized(self, qw: QuantizedWeight, dtype: torch.dtype):
        self.register_buffer("qweight", qw.qdata)
        self.register_buffer("scales", qw.scales)
        self.register_buffer("offsets", qw.offsets)
        self.bits, self.group_size = qw.bits, qw.group_size
        # The dtype the float weight had: plain forwards compute in it (LoRALinear casts x to it).
        self.dtype = dtype

    def quantized_weight(self) -> QuantizedWeight:
        cols = self.in_features if isinstance(self, QuantLinear) else self.embedding_dim
        offsets = None if self.offsets is None else self.offsets.float()
        return QuantizedWeight(self.qweight, self.scales.float(), offsets, self.bits, self.group_size, cols)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """The float matrix this module computes with (a full copy: for inspection and tests)."""
        return self.quantized_weight().dequantize(dtype)

    @property
    def weight(self):
        raise AttributeError(f"{type(self).__name__} keeps its weight quantized (qweight / scales); use "
                             ".dequantize() for a float copy")

    def _quant_repr(self) -> str:
        return f"int{self.bits}" + ("" if self.bits == 8 else f", group_size={self.group_size}")


class QuantLinear(_QuantStorage):
    """A frozen ``nn.Linear`` with its weight quantized (int8 per channel or int4 group-wise)."""

    def __init__(self, qweight: QuantizedWeight, bias: Optional[torch.Tensor] = None, dtype=torch.float32):
        super().__init__()
        self.in_features, self.out_features = qweight.in_features, qweight.out_features
        self._set_quantized(qweight, dtype)
        if bias is not None and not isinstance(bias, nn.Parameter):
            bias = nn.Parameter(bias, requires_grad=False)
        self.bias = bias

    @classmethod
    def from_linear(cls, linear: nn.Module, bits: int, group_size: int = DEFAULT_GROUP_SIZE,
                    weight_t: bool = False) -> "QuantLinear":
        """Quantize an nn.Linear (or HF's Conv1D with ``weight_t=True``: weight [in, out]). Its bias
        parameter is kept as it is (same tensor, same requires_grad)."""
        w = linear.weight.detach()
        return cls(quantize_weight(w.t() if weight_t else w, bits, group_size), linear.bias, dtype=w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.bias
        if b is not None and b.dtype != x.dtype:
            b = b.to(x.dtype)
        return quant_linear(x, self.quantized_weight(), b)

    def dequantize_rows(self, start: int, end: int, dtype=torch.float32) -> torch.Tensor:
        """Rows [start, end) of the float weight (the causal-LM loss walks the LM head in row blocks)."""
        return self.quantized_weight().rows(slice(start, end)).dequantize(dtype)

    def dequantize_index(self, index: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        return dequantize_reference(self.quantized_weight().rows(index), dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self._quant_repr()}, "
                f"bias={self.bias is not None}")


class QuantEmbedding(_QuantStorage):
    """A frozen ``nn.Embedding`` with its table quantized by rows (int8 per row, int4 groups along the
    embedding dim). Keeps an ``embed_scale`` the source module multiplied by (Gemma 3)."""

    def __init__(self, qweight: QuantizedWeight, padding_idx: Optional[int] = None, dtype=torch.float32,
                 embed_scale: Optional[torch.Tensor] = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = qweight.out_features, qweight.in_features
        self.padding_idx = padding_idx
        self._set_quantized(qweight, dtype)
        self.register_buffer("embed_scale", None if embed_scale is None else embed_scale.detach().clone(),
                             persistent=False)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, bits: int, group_size: int = DEFAULT_GROUP_SIZE,
                       qweight: Optional[QuantizedWeight] = None) -> "QuantEmbedding":
        if emb.max_norm is not None:
            raise ValueError("QuantEmbedding: max_norm renormalizes the table in place; not supported")
        qw = qweight if qweight is not None else quantize_weight(emb.weight.detach(), bits, group_size)
        scale = getattr(emb, "embed_scale", None)
        return cls(qw, emb.padding_idx, emb.weight.dtype, scale if isinstance(scale, torch.Tensor) else None)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.quantized_weight().rows(input_ids.reshape(-1))
        out = dequantize_reference(rows, self.dtype).reshape(*input_ids.shape, self.embedding_dim)
        if self.embed_scale is not None:
            out = out * self.embed_scale.to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self._quant_repr()}"


def quantized_bytes(model: nn.Module) -> dict:
    """{"quantized": bytes of the quantized tensors (shared ones once), "float": bytes of every other
    parameter and buffer} -- the resident size of the model's weights."""
    seen, q, f = set(), 0, 0
    for mod in model.modules():
        for name, t in list(mod._parameters.items()) + list(mod._buffers.items()):
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            n = t.numel() * t.element_size()
            if isinstance(mod, _QuantStorage) and name in QUANT_BUFFERS:
                q += n
            else:
                f += n
    return {"quantized": q, "float": f}
