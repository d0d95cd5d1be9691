"""Triton kernel of the dual (primal + K tangents) flash attention forward.

Semantics and formula: :mod:`fwdkern.ops.reference_attention`. One program
handles a block of BLOCK_M queries of one (batch, query head) for one tangent k and
walks the keys in blocks of BLOCK_N with the online softmax: running max m,
normalizer l, primal accumulator ``Σ e^{s−m} V`` and the three tangent sums
``A₁ = Σ e^{s−m}·dS·V``, ``A₂ = Σ e^{s−m}·dS``, ``A₃ = Σ e^{s−m}·dV``. Memory is
O(T) (nothing of size Tq × Tk is stored).

The grid has one program per tangent, so S = QKᵀ and PV are recomputed per k (about 6 block
matmuls per tangent instead of the ~4 + 2/K of a kernel that keeps all K accumulators; a GPU
choice: fwdkern/backends.py); the program with k == 0 writes the primal. Tested under
TRITON_INTERPRET=1 (fp32/fp16; bf16 is not supported by the interpreter) and on GPU by
scripts/gpu_check.sh.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _dual_attn_kernel(Q, KK, VV, QT, KT, VT, MASK, O, OT,
                      Tq, Tk, D, H, G, scale,
                      sqb, sqh, sqt, skb, skh, skt, svb, svh, svt,
                      sqtk, sktk, svtk,
                      smb, smh, smq, smk,
                      sob, soh, sot, sotk,
                      HAS_QT: tl.constexpr, HAS_KT: tl.constexpr, HAS_VT: tl.constexpr, HAS_MASK: tl.constexpr,
                      CAUSAL: tl.constexpr, WRITE_T: tl.constexpr, PREC: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    kk = tl.program_id(2)
    b = bh // H
    h = bh % H
    hk = h // G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mrow = offs_m < Tq
    dmask = offs_d < D
    qmask = mrow[:, None] & dmask[None, :]
    q_off = b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :]
    q = tl.load(Q + q_off, mask=qmask, other=0.0)
    if HAS_QT:
        qt = tl.load(QT + kk * sqtk + q_off, mask=qmask, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    a1 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    a2 = tl.zeros([BLOCK_M], tl.float32)
    a3 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    for n0 in range(0, Tk, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nrow = offs_n < Tk
        kvmask = nrow[:, None] & dmask[None, :]
        k_off = b * skb + hk * skh + offs_n[:, None] * skt + offs_d[None, :]
        v_off = b * svb + hk * svh + offs_n[:, None] * svt + offs_d[None, :]
        kb = tl.load(KK + k_off, mask=kvmask, other=0.0)
        vb = tl.load(VV + v_off, mask=kvmask, other=0.0)
        s = tl.dot(q, tl.trans(kb), input_precision=PREC) * scale
        valid = mrow[:, None] & nrow[None, :]
        if HAS_MASK:
            mk = tl.load(MASK + b * smb + h * smh + offs_m[:, None] * smq + offs_n[None, :] * smk, mask=valid,
                         other=0.0)
            s = s + mk
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=PREC)
        if HAS_QT or HAS_KT:
            ds = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            if HAS_QT:
                ds += tl.dot(qt, tl.trans(kb), input_precision=PREC)
            if HAS_KT:
                ktb = tl.load(KT + kk * sktk + k_off, mask=kvmask, other=0.0)
                ds += tl.dot(q, tl.trans(ktb), input_precision=PREC)
            pds = p * ds * scale
            a1 = a1 * alpha[:, None] + tl.dot(pds.to(vb.dtype), vb, input_precision=PREC)
            a2 = a2 * alpha + tl.sum(pds, 1)
        if HAS_VT:
            vtb = tl.load(VT + kk * svtk + v_off, mask=kvmask, other=0.0)
            a3 = a3 * alpha[:, None] + tl.dot(p.to(vtb.dtype), vtb, input_precision=PREC)
        m_i = m_new

    # Rows whose every key is masked have l == 0: output 0 (like torch SDPA's math path).
    inv_l = tl.where(l_i == 0.0, 0.0, 1.0 / tl.where(l_i == 0.0, 1.0, l_i))
    o = acc * inv_l[:, None]
    o_off = b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :]
    if kk == 0:
        tl.store(O + o_off, o.to(O.dtype.element_ty), mask=qmask)
    if WRITE_T:
        do = (a1 - a2[:, None] * o + a3) * inv_l[:, None]
        tl.store(OT + kk * sotk + o_off, do.to(OT.dtype.element_ty), mask=qmask)


def _mask_arg(attn_mask, B, Hq, Tq, Tk, device):
    """Additive fp32 mask broadcast to [B, Hq, Tq, Tk] by strides (no copy of broadcast dims)."""
    m = attn_mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    if m.dtype == torch.bool:
        m = torch.zeros(m.shape, dtype=torch.float32, device=device).masked_fill_(~m, float("-inf"))
    else:
        m = m.to(torch.float32)
    m = m.expand(B, Hq, Tq, Tk)
    return m, m.stride()


def dual_attention_triton(q, k, v, q_t, k_t, v_t, attn_mask, is_causal, scale):
    """The triton backend of ``fwdkern::dual_attention``: (O, dO [K, ...]; K = 0 without tangents).

    q [B, Hq, Tq, D], k [B, Hkv, Tk, D], v [B, Hkv, Tk, D] (Dv == D), tangents [K, *shape] or None,
    as validated by :func:`fwdkern.ops.attention.dual_attention`.
    """
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    dt = q.dtype
    tans = [t for t in (q_t, k_t, v_t) if t is not None]
    K = tans[0].shape[0] if tans else 0
    c = lambda t: t.contiguous() if t is not None else None  # noqa: E731
    q, k, v = c(q), c(k), c(v.to(dt))
    qt, kt, vt = c(q_t), c(k_t), c(v_t)
    o = torch.empty((B, Hq, Tq, D), dtype=dt, device=q.device)
    ot = torch.empty((K, B, Hq, Tq, D), dtype=dt, device=q.device)
    dummy = q
    if attn_mask is not None:
        mask, ms = _mask_arg(attn_mask, B, Hq, Tq, Tk, q.device)
    else:
        mask, ms = dummy, (0, 0, 0, 0)
    BLOCK_D = max(16, triton.next_power_of_2(D))
    BLOCK_M = 32 if BLOCK_D > 64 else 64
    BLOCK_N = 32
    prec = "ieee" if dt == torch.float32 else "tf32"  # ieee: fp32 results within the fp32 test tolerance
    grid = (triton.cdiv(Tq, BLOCK_M), B * Hq, max(K, 1))
    st = lambda t: t.stride(0) if t is not None else 0  # noqa: E731
    _dual_attn_kernel[grid](
        q, k, v, qt if qt is not None else dummy, kt if kt is not None else dummy, vt if vt is not None else dummy,
        mask, o, ot if K else o, Tq, Tk, D, Hq, Hq // Hkv, float(scale),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), st(qt), st(kt), st(vt), ms[0], ms[1], ms[2], ms[3],
        o.stride(0), o.stride(1), o.stride(2), ot.stride(0) if K else 0,
        HAS_QT=qt is not None, HAS_KT=kt is not None, HAS_VT=vt is not None, HAS_MASK=attn_mask is not None,
        CAUSAL=bool(is_causal), WRITE_T=K > 0, PREC=prec, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D)
    return o, ot
