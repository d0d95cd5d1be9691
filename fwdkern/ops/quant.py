"""The frozen linear layer on a quantized weight (int8 / int4, fwdkern/ops/_qformat.py).

* :func:`quant_linear_dual` -- ``y = x Wqᵀ + b`` and the K tangents ``ẏ_k = ẋ_k Wqᵀ`` in one call over
  the stacked rows, so a backend reads (and dequantizes) Wq once for the primal and all K tangents.
  ``fwdkern::quant_linear_dual`` custom op; backends in fwdkern/backends.py.
* :func:`quant_linear` -- what :class:`fwdkern.nn.QuantLinear` runs: the primal for plain tensors
  (differentiable in x and b by autograd, for backprop baselines), and, through
  ``__torch_function__``, the dual rule in fwdkern/dual.py for Dual inputs.

The LoRA ops on a quantized base are :func:`fwdkern.lora_linear_dual` /
:func:`fwdkern.lora_linear_perturbed` with a :class:`QuantizedWeight` as ``weight``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.overrides import handle_torch_function, has_torch_function

from .. import backends
from ._qformat import QuantizedWeight, dense_chunks, quantize_weight  # noqa: F401 (quantize_weight: re-exported)
from ._validate import check_linear, check_tangents

__all__ = ["QuantizedWeight", "quantize_weight", "quant_linear_dual", "quant_linear"]


@torch.library.custom_op("fwdkern::quant_linear_dual", mutates_args=())
def _quant_linear_dual_op(x: torch.Tensor, x_tangents: Optional[torch.Tensor], qdata: torch.Tensor,
                          scales: torch.Tensor, offsets: Optional[torch.Tensor], bits: int, group_size: int,
                          bias: Optional[torch.Tensor], backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    qw = QuantizedWeight(qdata, scales, offsets, bits, group_size, x.shape[-1])
    return backends.implementation("quant_linear_dual", backend)(x, x_tangents, qw, bias)


@_quant_linear_dual_op.register_fake
def _(x, x_tangents, qdata, scales, offsets, bits, group_size, bias, backend):
    shape = (*x.shape[:-1], qdata.shape[0])
    K = x_tangents.shape[0] if x_tangents is not None else 0
    return x.new_empty(shape), x.new_empty((K, *shape))


def quant_linear_dual(x: torch.Tensor, x_tangents: Optional[torch.Tensor], weight: QuantizedWeight,
                      bias: Optional[torch.Tensor] = None,
                      backend: Optional[str] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Frozen quantized linear layer with K tangents: ``y = x Wqᵀ + b``, ``ẏ_k = ẋ_k Wqᵀ``.

    Args:
        x: [..., in] float32/float16/bfloat16. x_tangents: [K, ..., in] (same dtype/device) or None.
        weight: a :class:`QuantizedWeight` [out, in] on x's device. bias: [out] in x's dtype, or None.
        backend: None/"auto", "cpu", "cuda", "triton" or "reference".
    Returns:
        (y [..., out], y_tangents [K, ..., out] or None when x_tangents is None), in x's dtype.
    """
    if not isinstance(weight, QuantizedWeight):
        raise TypeError(f"weight: expected a fwdkern QuantizedWeight, got {type(weight).__name__}")
    check_linear(x, weight, bias)
    if x_tangents is not None:
        check_tangents(x_tangents, x, "x_tangents", "x")
    b = backends.resolve("quant_linear_dual", x.device, backend, dtype=x.dtype)
    y, yt = _quant_linear_dual_op(x, x_tangents, *weight.op_args(), bias, b)
    return y, (yt if x_tangents is not None else None)


class _QuantLinearFn(torch.autograd.Function):
    """y = x Wqᵀ + b with gradients for x and b; only the quantized tensors are kept for backward
    (Wq is dequantized again there, in row chunks), so backprop through a quantized base does not
    hold a float copy of every weight."""

    @staticmethod
    def forward(ctx, x, bias, weight):
        ctx.weight = weight
        ctx.has_bias = bias is not None
        return quant_linear_dual(x, None, weight, bias)[0]

    @staticmethod
    def backward(ctx, gy):
        w = ctx.weight
        out_f, in_f = w.shape
        g2 = gy.reshape(-1, out_f)
        gx = None
        if ctx.needs_input_grad[0]:
            gx = torch.zeros((g2.shape[0], in_f), dtype=torch.float32, device=gy.device)
            for n0, n1, Wc in dense_chunks(w, torch.float32):
                gx.addmm_(g2[:, n0:n1].float(), Wc)
            gx = gx.to(gy.dtype).reshape(*gy.shape[:-1], in_f)
        gb = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[1] else None
        return gx, gb, None


def quant_linear(x: torch.Tensor, weight: QuantizedWeight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x Wqᵀ + b`` for :class:`fwdkern.nn.QuantLinear`. Dual inputs (x or a trainable bias) go to
    the rule in fwdkern/dual.py (``ẏ_k = ẋ_k Wqᵀ + ḃ_k``, one call over the stacked rows)."""
    relevant = (x,) if bias is None else (x, bias)
    if has_torch_function(relevant):
        return handle_torch_function(quant_linear, relevant, x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return _QuantLinearFn.apply(x, bias, weight)
    return quant_linear_dual(x, None, weight, bias)[0]
