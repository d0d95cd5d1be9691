"""Dual scaled-dot-product attention: primal + K tangents in one flash-style pass.

:func:`dual_attention` validates its arguments, resolves the backend through
:mod:`fwdkern.backends` (per-call ``backend=``, then ``FWDKERN_BACKEND``, then automatic:
``triton`` for CUDA tensors whose shapes its kernel takes, else the chunked torch path) and
calls the custom op ``fwdkern::dual_attention`` (with a fake kernel, so it traces under
torch.compile). The ``reference`` backend is the chunked pure-torch path of
fwdkern/ops/reference_attention.py (``backend="torch"`` is an alias of it); the ``cpu`` and
``cuda`` backends run its one-block form on their device (every key at once when they fit one
chunk, the tangents batched into the products' rows). Tests compare every backend with eager
:func:`reference_attention` under ``torch.func.jvp``.

Semantics follow ``torch.nn.functional.scaled_dot_product_attention``: bool masks
(True = attend) or additive float masks broadcastable to [B, Hq, Tq, Tk],
``is_causal`` (top-left aligned), GQA (Hq a multiple of Hkv, as ``enable_gqa`` or
HF's repeat_kv), rows with every key masked give 0 (output and tangent).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import backends
from ._validate import check_int, check_scalar, check_tangents
from .reference_attention import reference_attention

__all__ = ["dual_attention", "reference_attention"]


@torch.library.custom_op("fwdkern::dual_attention", mutates_args=())
def _dual_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_t: Optional[torch.Tensor],
                       k_t: Optional[torch.Tensor], v_t: Optional[torch.Tensor], attn_mask: Optional[torch.Tensor],
                       is_causal: bool, scale: float, chunk: int, tangent_dtype: Optional[torch.dtype],
                       backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return backends.implementation("dual_attention", backend)(q, k, v, q_t, k_t, v_t, attn_mask, is_causal, scale,
                                                              chunk, tangent_dtype)


@_dual_attention_op.register_fake
def _(q, k, v, q_t, k_t, v_t, attn_mask, is_causal, scale, chunk, tangent_dtype, backend):
    K = next((t.shape[0] for t in (q_t, k_t, v_t) if t is not None), 0)
    shape = (*q.shape[:-1], v.shape[-1])
    return q.new_empty(shape), q.new_empty((K, *shape))


def _check(q, k, v, q_t, k_t, v_t, attn_mask, is_causal) -> int:
    """Validates the call; returns K (0 when every tangent is None)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point torch.Tensor, got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
    if q.dim() < 3:
        raise ValueError(f"q: expected [..., H, T, D], got shape {tuple(q.shape)}")
    lead = q.shape[:-3]
    Hq, Tq, D = q.shape[-3:]
    if k.dim() != q.dim() or k.shape[:-3] != lead or k.shape[-1] != D:
        raise ValueError(f"k: expected [{', '.join(map(str, lead))}{', ' if lead else ''}Hkv, Tk, {D}], "
                         f"got shape {tuple(k.shape)}")
    Hkv, Tk = k.shape[-3], k.shape[-2]
    if v.dim() != q.dim() or v.shape[:-1] != k.shape[:-1]:
        raise ValueError(f"v: expected [{', '.join(map(str, k.shape[:-1]))}, Dv], got shape {tuple(v.shape)}")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"query heads {Hq} are not a multiple of key/value heads {Hkv}")
    if attn_mask is not None and is_causal:
        raise ValueError("attn_mask and is_causal cannot both be set (as in torch SDPA)")
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor) or not (attn_mask.dtype == torch.bool
                                                           or attn_mask.is_floating_point()):
            raise TypeError("attn_mask: expected a bool or floating-point tensor")
        full = (*lead, Hq, Tq, Tk)
        try:
            shape = torch.broadcast_shapes(attn_mask.shape, full)
            # extra leading mask dims of size 1 are harmless (a [1, H, Tq, Tk] mask of 3-D inputs)
            ok = tuple(shape[len(shape) - len(full):]) == full and all(d == 1 for d in shape[:len(shape) - len(full)])
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"attn_mask: shape {tuple(attn_mask.shape)} does not broadcast to {full}")
    for name, t in (("k", k), ("v", v), ("attn_mask", attn_mask)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{name}: on {t.device}, but q is on {q.device}")
    K = None
    for name, t, p in (("q_t", q_t, q), ("k_t", k_t, k), ("v_t", v_t, v)):
        if t is not None:
            K = check_tangents(t, p, name, name[0], K=K, same_dtype=False,
                               layout=f"[K, *{name[0]}.shape], the same K for every tangent")
    return K or 0


def dual_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_t: Optional[torch.Tensor],
                   k_t: Optional[torch.Tensor], v_t: Optional[torch.Tensor], attn_mask: Optional[torch.Tensor] = None,
                   is_causal: bool = False, scale: Optional[float] = None, enable_gqa: bool = False,
                   chunk: int = 256, backend: Optional[str] = None,
                   tangent_dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Dual attention: returns (O, dO).

    backend: None/"auto", "cpu", "cuda", "triton" (fwdkern/triton/attention.py; CUDA, or CPU under
    TRITON_INTERPRET=1; 4-D inputs with Dv == D), "reference" or its alias "torch" (the chunked
    pure-torch path, any device; "cpu" and "cuda" run it too). Automatic choice takes triton for
    CUDA tensors when it is available and the shapes fit, else the chunked path.

    Args:
        q: [B, Hq, Tq, D]; k: [B, Hkv, Tk, D]; v: [B, Hkv, Tk, Dv] (Hq % Hkv == 0; also leading batch
            dims other than one B).
        q_t, k_t, v_t: tangents [K, *shape] or None (zero).
        attn_mask: bool (True = keep) or additive float, broadcastable to [B, Hq, Tq, Tk].
        is_causal: key j is visible from query i iff j <= i. scale: default 1/sqrt(D).
        enable_gqa: accepted for signature parity; GQA is inferred from Hq != Hkv.
        chunk: keys per step of the chunked path (memory/speed trade-off); the cpu and cuda backends
            take every key in one block when Tk <= chunk.
        tangent_dtype: None, torch.float32, torch.bfloat16 or torch.float16: the dtype of the operands
            of the products that carry tangents in the cpu and cuda backends (accumulation and every
            sum stay fp32; the primal is untouched). The reference and triton backends compute in
            fp32 whatever it says.
    Returns:
        O [B, Hq, Tq, Dv] in q's dtype; dO [K, B, Hq, Tq, Dv] or None when K == 0 (every tangent None).
        Accumulation is fp32.
    """
    K = _check(q, k, v, q_t, k_t, v_t, attn_mask, is_causal)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else check_scalar(scale, "scale")
    chunk = check_int(chunk, "chunk", 1, None, "a positive int")
    if tangent_dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"tangent_dtype: expected None, torch.float32, torch.bfloat16 or torch.float16, "
                         f"got {tangent_dtype!r}")
    fits = q.dim() == 4 and v.shape[-1] == q.shape[-1]
    b = backends.resolve("dual_attention", q.device, backend, dtype=q.dtype, fits=fits)
    o, ot = _dual_attention_op(q, k, v, q_t, k_t, v_t, attn_mask, bool(is_causal), scale, chunk, tangent_dtype, b)
    return o, (ot if K else None)
