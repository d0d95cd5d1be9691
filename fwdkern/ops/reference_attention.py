"""Pure-PyTorch dual attention: the chunked path and the eager attention it is checked against.

:func:`chunked_dual_attention` is the ``reference`` backend of ``fwdkern::dual_attention`` and
also what the ``cpu`` and ``cuda`` backends run (there is no hand-written attention kernel for
them: the chunked form is matmul-bound, so torch's own kernels on the tensors' device do the
work). It walks the keys in chunks with an online softmax, so memory is O(K·Tq·chunk) instead
of the O(K·Tq·Tk) of eager attention under vmap(jvp). :func:`reference_attention` is eager
attention (materializes [.., Tq, Tk]); the tests compare the dual op with it under
``torch.func.jvp``.

``O = softmax(Q Kᵀ·scale + mask) V``. With S = QKᵀ·scale,
``dS = (dQ·Kᵀ + Q·dKᵀ)·scale``, ``dP = P ⊙ (dS − rowsum(P ⊙ dS))``, and
``dO = (A₁ − A₂·O + A₃) / l`` where, with the running max m and normalizer
``l = Σ e^{s−m}``, the online sums are ``A₁ = Σ e^{s−m}·dS·V``,
``A₂ = Σ e^{s−m}·dS`` and ``A₃ = Σ e^{s−m}·dV``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import backends


def _mask5(mask: Optional[torch.Tensor], Hkv: int, G: int) -> Optional[torch.Tensor]:
    """Additive fp32 mask as [B|1, Hkv|1, G|1, Tq|1, Tk] (views where possible)."""
    if mask is None:
        return None
    m = mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    if m.dtype == torch.bool:
        m = torch.zeros(m.shape, dtype=torch.float32, device=m.device).masked_fill_(~m, float("-inf"))
    else:
        m = m.float()
    if m.shape[1] == 1:
        return m.unsqueeze(2)
    m = m.expand(m.shape[0], Hkv * G, m.shape[2], m.shape[3])
    return m.reshape(m.shape[0], Hkv, G, m.shape[2], m.shape[3])


def _packed(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` contiguous in `dtype`, in at most one copy (a strided cast copies once)."""
    if t.dtype == dtype and t.is_contiguous():
        return t
    return torch.empty(t.shape, dtype=dtype, device=t.device).copy_(t)


@backends.register("dual_attention", "reference")
def chunked_dual_attention(q, k, v, q_t, k_t, v_t, attn_mask, is_causal: bool, scale: float, chunk: int,
                           tangent_dtype: Optional[torch.dtype] = None):
    """(O [..., Hq, Tq, Dv] in q's dtype, dO [K, ..., Hq, Tq, Dv]); K = 0 when every tangent is None.

    Inputs as validated by :func:`fwdkern.ops.attention.dual_attention`; fp32 throughout (the
    reference: `tangent_dtype` is accepted and not used); rows with every key masked give 0
    (output and tangent)."""
    lead = q.shape[:-3]
    Hq, Tq, D = q.shape[-3:]
    Hkv, Tk, Dv = k.shape[-3], k.shape[-2], v.shape[-1]
    G = Hq // Hkv
    B = int(math.prod(lead)) if lead else 1
    dt = q.dtype
    tans = [t for t in (q_t, k_t, v_t) if t is not None]
    K = tans[0].shape[0] if tans else 0
    f32 = torch.float32
    q5 = q.reshape(B, Hkv, G, Tq, D).to(f32)
    k4 = k.reshape(B, Hkv, Tk, D).to(f32)
    v4 = v.reshape(B, Hkv, Tk, Dv).to(f32)
    qt6 = q_t.reshape(K, B, Hkv, G, Tq, D).to(f32) if q_t is not None else None
    kt5 = k_t.reshape(K, B, Hkv, Tk, D).to(f32) if k_t is not None else None
    vt5 = v_t.reshape(K, B, Hkv, Tk, Dv).to(f32) if v_t is not None else None
    mask = attn_mask
    if mask is not None and lead and mask.dim() > 4:
        mask = mask.reshape(-1, *mask.shape[-3:])
    m5 = _mask5(mask, Hkv, G)

    dev = q.device
    m = torch.full((B, Hkv, G, Tq, 1), float("-inf"), dtype=f32, device=dev)
    l = torch.zeros((B, Hkv, G, Tq, 1), dtype=f32, device=dev)
    acc = torch.zeros((B, Hkv, G, Tq, Dv), dtype=f32, device=dev)
    has_s = qt6 is not None or kt5 is not None
    A1 = torch.zeros((K, B, Hkv, G, Tq, Dv), dtype=f32, device=dev) if has_s else None
    A2 = torch.zeros((K, B, Hkv, G, Tq, 1), dtype=f32, device=dev) if has_s else None
    A3 = torch.zeros((K, B, Hkv, G, Tq, Dv), dtype=f32, device=dev) if vt5 is not None else None
    qi = torch.arange(Tq, device=dev).view(Tq, 1) if is_causal else None

    for j0 in range(0, Tk, chunk):
        j1 = min(Tk, j0 + chunk)
        kc = k4[:, :, None, j0:j1]  # [B, Hkv, 1, C, D]
        vc = v4[:, :, None, j0:j1]
        s = torch.matmul(q5, kc.transpose(-1, -2)).mul_(scale)  # [B, Hkv, G, Tq, C]
        if m5 is not None:
            s = s + m5[..., j0:j1]
        if is_causal:
            kj = torch.arange(j0, j1, device=dev).view(1, -1)
            s = s.masked_fill(kj > qi, float("-inf"))
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        alpha = torch.exp(m - m_safe)  # 0 where m was -inf
        p = torch.exp(s - m_safe)
        l = l * alpha + p.sum(-1, keepdim=True)
        acc = acc * alpha + torch.matmul(p, vc)
        if has_s:
            ds = None
            if qt6 is not None:
                ds = torch.matmul(qt6, kc.transpose(-1, -2))
            if kt5 is not None:
                dk = torch.matmul(q5, kt5[:, :, :, None, j0:j1].transpose(-1, -2))
                ds = dk if ds is None else ds + dk
            pds = p * ds.mul_(scale)  # [K, B, Hkv, G, Tq, C]
            A1 = A1 * alpha + torch.matmul(pds, vc)
            A2 = A2 * alpha + pds.sum(-1, keepdim=True)
        if A3 is not None:
            A3 = A3 * alpha + torch.matmul(p, vt5[:, :, :, None, j0:j1])
        m = m_new

    empty = l == 0  # every key masked: output 0 (torch SDPA's math path does the same)
    inv_l = torch.where(empty, torch.zeros_like(l), 1.0 / torch.where(empty, torch.ones_like(l), l))
    o = acc * inv_l
    out_shape = (*lead, Hq, Tq, Dv)
    o_ret = o.reshape(out_shape).to(dt)
    if K == 0:
        return o_ret, q.new_empty((0, *out_shape))
    do = None
    if has_s:
        do = (A1 - A2 * o) * inv_l
    if A3 is not None:
        d3 = A3 * inv_l
        do = d3 if do is None else do + d3
    return o_ret, do.reshape(K, *out_shape).to(dt)


def block_dual_attention(q, k, v, q_t, k_t, v_t, attn_mask, is_causal: bool, scale: float, chunk: int,
                         tangent_dtype: Optional[torch.dtype] = None):
    """:func:`chunked_dual_attention` with every key in one block when ``Tk <= chunk`` (else the
    chunked path): no online rescaling, the softmax's scale folded into P, and the K tangents
    batched into the matrix products' rows instead of broadcast batch dims, so torch runs a few
    large products and a few passes over the [K, .., Tq, Tk] scores. `tangent_dtype` (bf16/fp16):
    the four products that carry tangents take their operands in it (the matrix units' rate);
    sums, softmax and the primal stay fp32. The ``cpu`` and ``cuda`` backends run it; the tests
    compare it with the chunked path and with eager attention."""
    Tk = k.shape[-2]
    if Tk > chunk:
        return chunked_dual_attention(q, k, v, q_t, k_t, v_t, attn_mask, is_causal, scale, chunk)
    lead = q.shape[:-3]
    Hq, Tq, D = q.shape[-3:]
    Hkv, Dv = k.shape[-3], v.shape[-1]
    G = Hq // Hkv
    B = int(math.prod(lead)) if lead else 1
    M = G * Tq  # a key/value head's query rows: its G query heads stacked
    dt = q.dtype
    tans = [t for t in (q_t, k_t, v_t) if t is not None]
    K = tans[0].shape[0] if tans else 0
    f32 = torch.float32
    mm = f32 if tangent_dtype in (None, f32) else tangent_dtype  # operands of the tangents' products
    q4 = q.reshape(B, Hkv, M, D).to(f32)
    k4 = k.reshape(B, Hkv, Tk, D).to(f32)
    v4 = v.reshape(B, Hkv, Tk, Dv).to(f32)
    mask = attn_mask
    if mask is not None and lead and mask.dim() > 4:
        mask = mask.reshape(-1, *mask.shape[-3:])
    m5 = _mask5(mask, Hkv, G)

    s = torch.matmul(q4, k4.transpose(-1, -2)).mul_(scale).view(B, Hkv, G, Tq, Tk)
    if m5 is not None:
        s = s + m5
    if is_causal:
        above = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).triu_(1)
        s = s.masked_fill(above, float("-inf"))
    mx = s.amax(-1, keepdim=True)
    mx = torch.where(torch.isinf(mx), torch.zeros_like(mx), mx)
    p = torch.exp(s - mx)
    l = p.sum(-1, keepdim=True)
    p = p.div_(torch.where(l == 0, torch.ones_like(l), l)).view(B, Hkv, M, Tk)  # rows with every key masked: 0
    o = torch.matmul(p, v4)  # [B, Hkv, M, Dv]
    out_shape = (*lead, Hq, Tq, Dv)
    o_ret = o.reshape(out_shape).to(dt)
    if K == 0:
        return o_ret, q.new_empty((0, *out_shape))
    # The tangents' products, each a single batched product over the K tangents with the two
    # terms side by side in the contraction: dS_k = [dQ_k | Q]·[K | dK_k]ᵀ and
    # dO_k = [P⊙dS_k | P]·[V ; dV_k] (minus rowsum(P⊙dS_k)·O). Operands are in `mm`, written
    # straight from the strided tangents in one cast copy each; the [K, .., Tq, Tk] scores stay in
    # `mm` (mixed-dtype passes run at a fraction of same-dtype ones); row sums and the output's
    # correction are fp32.
    dev = q.device
    nq, nk, nv = (t is not None for t in (q_t, k_t, v_t))
    if nq or nk:
        cq = D * (nq + nk)
        a = torch.empty((K, B, Hkv, M, cq), dtype=mm, device=dev)
        b = torch.empty((K, B, Hkv, Tk, cq), dtype=mm, device=dev)
        c = 0
        if nq:
            a[..., :D].view(K, B, Hq, Tq, D).copy_(q_t.reshape(K, B, Hq, Tq, D))
            b[..., :D].copy_(k4.expand(K, B, Hkv, Tk, D))
            c = D
        if nk:
            a[..., c:].copy_(q4.expand(K, B, Hkv, M, D))
            b[..., c:].copy_(k_t.reshape(K, B, Hkv, Tk, D))
        ps = (p * scale).to(mm)
        cv = Tk * (1 + nv)
        a2 = torch.empty((K, B, Hkv, M, cv), dtype=mm, device=dev)
        pds = torch.mul(torch.matmul(a, b.transpose(-1, -2)), ps, out=a2[..., :Tk])  # P ⊙ dS
        del a, b
        rs = pds.sum(-1, keepdim=True, dtype=f32)
        b2 = torch.empty((K, B, Hkv, cv, Dv), dtype=mm, device=dev)
        b2[..., :Tk, :].copy_(v4.expand(K, B, Hkv, Tk, Dv))
        if nv:
            a2[..., Tk:].copy_(p.expand(K, B, Hkv, M, Tk))
            b2[..., Tk:, :].copy_(v_t.reshape(K, B, Hkv, Tk, Dv))
        do = torch.matmul(a2, b2).to(f32).addcmul_(rs, o, value=-1.0)
    else:  # only dV: P·dV_k
        do = torch.matmul(p.to(mm), _packed(v_t.reshape(K, B, Hkv, Tk, Dv), mm)).to(f32)
    return o_ret, do.reshape(K, *out_shape).to(dt)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                        is_causal: bool = False, scale: Optional[float] = None) -> torch.Tensor:
    """Eager attention (materializes [.., Tq, Tk]; differentiable by forward AD). Same semantics as
    :func:`fwdkern.ops.attention.dual_attention`; fully masked rows give 0."""
    Hq, Tq, D = q.shape[-3:]
    Hkv, Tk = k.shape[-3], k.shape[-2]
    G = Hq // Hkv
    if G > 1:
        k = k.repeat_interleave(G, dim=-3)
        v = v.repeat_interleave(G, dim=-3)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    keep = None
    if is_causal:
        keep = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            keep = attn_mask if keep is None else keep & attn_mask
        else:
            s = s + attn_mask
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)  # fully masked rows
    return torch.matmul(p, v)
