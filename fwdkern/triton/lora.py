"""Triton kernels of the fused LoRA dual forward and perturbed inference.

Layer: y = x W^T + b + s (x A^T) B^T, W [out, in], A [r, in], B [out, r].
Perturbations dA_k, dB_k, db_k = v(seed, pid, ks[k]) (docs/perturbations.md) are
generated tile by tile inside the kernels and never materialized.

Two passes (the fused shrink/expand structure of LoRA serving kernels):

1. shrink (`_nt_kernel`): H = [h; hdot_1..hdot_K] [(1+K) M, r] fp32, where
   h = x A^T and hdot_k = xdot_k A^T + x dA_k^T. The in-dim is walked in tiles of
   128 so each [rows of A, 128] tile of dA_k costs one Philox call per row
   (Rademacher). The same kernel is the standalone `seeded_matmul_nt`.
2. expand (`_dual_kernel`): one GEMM over the stacked rows [x; xdot_1..xdot_K]
   (not copied: row tiles of x and of xdot viewed as [K M, in] read in place), so
   W is streamed once for the primal and all K tangents (tiles sharing a W tile
   run together, grouped order); s H B^T is folded into the epilogue as an extra
   K=r step, and for tangent rows s h dB_k^T (dB tile [BLOCK_N, r] generated in
   registers) and db_k are added. When no input tangents are given, tangent rows
   skip the dense GEMM entirely.

Perturbed inference (`_perturbed_kernel`) computes base = x W^T + b + s h B^T
once per output tile and then, for every k, y+-_k = base +- eps T_k + eps^2 Q_k
with T_k = s g_k B^T + s h dB_k^T + db_k and Q_k = s g_k dB_k^T, g_k = x dA_k^T:
algebraically the same as x (W + s (B +- eps dB)(A +- eps dA))^T + b +- eps db,
but y+ - y- is not lost to rounding of B +- eps dB in 16-bit types.

Per-step integers (seed halves, param ids) are not specialized, so a new seed
does not recompile (beyond Triton typing int arguments by value range: a seed
half >= 2^31 is a second variant, compiled once). fp32 inputs use IEEE-precision dots (not TF32) so compiled
results match the 1e-5 tolerance of the tests; fp16/bf16 inputs use tensor-core
dots with fp32 accumulation; the rank-r epilogue operands (h, generated dA/dB)
are rounded to the input dtype, as a torch fp16/bf16 LoRA layer rounds h.
"""
import os

import torch
import triton
import triton.language as tl

from .._seed import split_seed
from .philox import element_values, tile_values

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---------------------------------------------------------------------------
# Autotune configurations
# ---------------------------------------------------------------------------
# The GPU config lists are sized for H100/H200 (bf16, in=out=4096, r=16; a GPU choice:
# fwdkern/backends.py).
# FWDKERN_AUTOTUNE=quick keeps the first two configs of each list (scripts/gpu_check.sh
# uses it to fit its time budget). Under the interpreter a single small config keeps
# the tests fast (autotuning there would only multiply the run time).
_QUICK = os.environ.get("FWDKERN_AUTOTUNE", "") == "quick"


def _nt_configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 32}, num_warps=4, num_stages=1)]
    cfg = [
        triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 16}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_M": 128}, num_warps=8, num_stages=3),
    ]
    return cfg[:2] if _QUICK else cfg


def _gemm_configs(max_tile=128 * 256):
    """max_tile bounds BLOCK_M * BLOCK_N (the perturbed kernel keeps three fp32 tiles live)."""
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=4, num_stages=1)]
    cfg = []
    for bm, bn, bk, w, s in (
        (128, 128, 64, 8, 3),
        (128, 256, 64, 8, 3),
        (64, 128, 64, 4, 4),
        (64, 64, 128, 4, 3),
        (16, 128, 128, 4, 4),  # decode-like M: memory-bound, wide N tiles
        (32, 64, 128, 4, 4),
    ):
        if bm * bn <= max_tile:
            cfg.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w,
                                     num_stages=s))
    return cfg[:2] if _QUICK else cfg


def _prune_for(rows_arg):
    """Drop configs whose tiles are far larger than the problem, and cut pipeline
    stages where the operand buffers would not leave room in shared memory."""

    def prune(configs, named_args, **kwargs):
        rows = max(16, triton.next_power_of_2(int(named_args[rows_arg])))
        cols = max(16, triton.next_power_of_2(int(named_args["N"])))
        kept = [c for c in configs if c.kwargs["BLOCK_M"] <= rows and c.kwargs["BLOCK_N"] <= cols]
        if not kept:  # every tile too big: keep the smallest one
            kept = [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
        # (stages - 1) buffered x and W tiles, as sm_90 TTGIR compiled here showed;
        # fp32 inputs at 3-4 stages plus the epilogue's buffers exceed the 227 KiB.
        size = named_args["X"].element_size()
        out = []
        for c in kept:
            kw, stages = c.kwargs, c.num_stages
            while stages > 2 and (stages - 1) * (kw["BLOCK_M"] + kw["BLOCK_N"]) * kw["BLOCK_K"] * size > 128 * 1024:
                stages -= 1
            out.append(c if stages == c.num_stages else triton.Config(dict(kw), num_warps=c.num_warps,
                                                                      num_stages=stages))
        return out

    return prune


# ---------------------------------------------------------------------------
# Shrink / seeded NT product
# ---------------------------------------------------------------------------


@triton.autotune(configs=_nt_configs(), key=["M", "N", "D", "J"])
@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "param_id"])
def _nt_kernel(X, XT, A, OUT, KS, M, N, D, J, DENSE_J, SEED_J0, stride_x, stride_xt, stride_a, seed_lo, seed_hi,
               param_id, SEEDED: tl.constexpr, DIST: tl.constexpr, PREC: tl.constexpr, VSPLIT: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """OUT[j] (fp32 [M, N], rows j*M..) for j = program_id(2) in [0, J):

        (j < DENSE_J)  ? S_j @ A^T         with S_0 = X, S_j = XT[j-1]
      + (j >= SEED_J0) ? X @ v(ks[j - SEED_J0])^T, v of shape [N, D]

    D is walked in 128-wide tiles: a Rademacher v tile is one Philox call per row.
    VSPLIT > 1 (16-bit X, Gaussian v): v is fed to the tensor-core dot as a sum of
    VSPLIT 16-bit parts (hi, lo, ...), so X v^T keeps fp32 accuracy; Rademacher
    values are exact in any dtype (VSPLIT = 1).
    Every M tile regenerates the v tiles (M / BLOCK_M times in all) instead of reading
    them from memory: r Philox calls per 128 columns for Rademacher, expected to be cheap
    next to the dense GEMM.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    j = tl.program_id(2)
    cdt = X.dtype.element_ty
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    lane = tl.arange(0, 128)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # Row pointers of the dense operand: x for j == 0, xdot_{j-1} otherwise. The base
    # is selected as a scalar so Triton keeps its alignment (pipelined loads).
    jt = tl.maximum(j - 1, 0).to(tl.int64)
    xd_base = tl.where(j == 0, X, XT + jt * M * stride_xt)
    xd_rows = xd_base + offs_m.to(tl.int64) * tl.where(j == 0, stride_x, stride_xt)
    x_rows = X + offs_m.to(tl.int64) * stride_x
    a_rows = A + offs_n.to(tl.int64) * stride_a
    kj = tl.load(KS + tl.maximum(j - SEED_J0, 0))
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # Two loops with data-dependent trip counts (0 or D) rather than branches inside
    # one loop: Triton only software-pipelines loops without branches around loads.
    for d0 in range(0, tl.where(j < DENSE_J, D, 0), 128):
        offs_d = d0 + lane
        mask_d = offs_d < D
        xa = tl.load(xd_rows[:, None] + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        a = tl.load(a_rows[:, None] + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        acc = tl.dot(xa.to(cdt), tl.trans(a.to(cdt)), acc, input_precision=PREC)
    if SEEDED:
        for d0 in range(0, tl.where(j >= SEED_J0, D, 0), 128):
            offs_d = d0 + lane
            mask_d = offs_d < D
            xs = tl.load(x_rows[:, None] + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :], other=0.0)
            v = tile_values(seed_lo, seed_hi, param_id, kj, offs_n, d0 >> 7, 0, 128, DIST)
            v = tl.where(mask_n[:, None] & mask_d[None, :], v, 0.0)
            xs = xs.to(cdt)
            for _ in tl.static_range(VSPLIT):
                vp = v.to(cdt)
                acc = tl.dot(xs, tl.trans(vp), acc, input_precision=PREC)
                v = v - vp.to(tl.float32)
    out_rows = (j * M + offs_m).to(tl.int64) * N
    tl.store(OUT + out_rows[:, None] + offs_n[None, :], acc, mask=mask_m[:, None] & mask_n[None, :])


# ---------------------------------------------------------------------------
# Expand + dense GEMM, dual mode
# ---------------------------------------------------------------------------


@triton.jit
def _dense(acc, X, x_rows, row_ok, W, S, Z, offs_n, mask_n, stride_w, D, d_end, G, GS, QBITS: tl.constexpr,
           PREC: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc + x_tile @ W^T over columns [0, d_end) of a [BLOCK_M, BLOCK_N] output tile.

    QBITS = 0: W float [N, D]. QBITS = 8: W int8 [N, D]; the per-channel scale S[n] multiplies the
    product once after the loop (exact in any dtype: |q| <= 127). QBITS = 4: W uint8 [N, ceil(D/2)],
    two columns per byte; each [BLOCK_K, BLOCK_N] tile is dequantized in registers, q * S[n, g] + Z[n, g]
    with g = d // GS (G groups per row). Either way W is read once per tile for every row it serves.
    The int4 tile loads each byte for its two columns (two lanes, one memory transaction) and
    gathers the group scale per element (cached lines).
    """
    cdt = X.dtype.element_ty
    offs_k = tl.arange(0, BLOCK_K)
    w_cols = W + offs_n.to(tl.int64) * stride_w
    for d0 in range(0, d_end, BLOCK_K):
        kk = d0 + offs_k
        mk = kk < D
        xa = tl.load(x_rows[:, None] + kk[None, :], mask=row_ok[:, None] & mk[None, :], other=0.0)
        if QBITS == 0:
            w = tl.load(w_cols[None, :] + kk[:, None], mask=mk[:, None] & mask_n[None, :], other=0.0)
        elif QBITS == 8:
            w = tl.load(w_cols[None, :] + kk[:, None], mask=mk[:, None] & mask_n[None, :], other=0)
        else:
            wmask = mk[:, None] & mask_n[None, :]
            byte = tl.load(w_cols[None, :] + (kk >> 1)[:, None], mask=wmask, other=0).to(tl.int32)
            nib = (byte >> ((kk & 1) * 4)[:, None]) & 15
            sidx = offs_n.to(tl.int64)[None, :] * G + (kk // GS)[:, None]
            sc = tl.load(S + sidx, mask=wmask, other=0.0)
            off = tl.load(Z + sidx, mask=wmask, other=0.0)
            w = nib.to(tl.float32) * sc + off
        acc = tl.dot(xa.to(cdt), w.to(cdt), acc, input_precision=PREC)
    if QBITS == 8:
        sc = tl.load(S + offs_n, mask=mask_n, other=0.0)
        acc = acc * sc[None, :]
    return acc


@triton.jit
def _swizzle(num_m, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped tile order over num_m row tiles: consecutive programs share W tiles in L2."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m
    return pid_m, pid_n


@triton.autotune(configs=_gemm_configs(), key=["T", "N", "D", "R"],
                 prune_configs_by={"early_config_prune": _prune_for("T")})
@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "pid_b", "pid_bias"])
def _dual_kernel(X, XT, W, S, Z, BIAS, H, B, Y, YT, KS, M, N, D, R, T, TD, HR, G, GS, stride_x, stride_xt, stride_w,
                 stride_b, scaling, seed_lo, seed_hi, pid_b, pid_bias, HAS_BIAS: tl.constexpr, PERTURB_B: tl.constexpr,
                 PERTURB_BIAS: tl.constexpr, DIST: tl.constexpr, PREC: tl.constexpr, RB: tl.constexpr,
                 QBITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr):
    """Stacked rows t in [0, T = (1+K) M): t < M is y[t], else yt[(t-M) // M, (t-M) % M].

    Row tiles come in two segments, x/y rows [0, M) and xt/yt rows [0, K M) (xt and
    yt contiguous [K M, *]), so a tile's base pointers are scalars; a tangent tile may
    still span several tangents k. Rows t < TD get the dense term (TD = T with input
    tangents, M without); rows t < HR get s H[t] B^T (HR = M when every hdot_k is 0).
    """
    num_m0 = tl.cdiv(M, BLOCK_M)
    pid_m, pid_n = _swizzle(num_m0 + tl.cdiv(T - M, BLOCK_M), N, BLOCK_M, BLOCK_N, GROUP_M)
    cdt = X.dtype.element_ty
    seg1 = pid_m >= num_m0  # tangent segment
    lrow0 = tl.where(seg1, pid_m - num_m0, pid_m) * BLOCK_M
    row0 = lrow0 + tl.where(seg1, M, 0)  # stacked index of the tile's first row
    row_end = tl.where(seg1, T, M)
    lrows = lrow0 + tl.arange(0, BLOCK_M)
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    jr = rows // M  # 0 = primal, j >= 1 = tangent j-1
    mr = rows - jr * M
    is_p = jr == 0
    rows64 = rows.to(tl.int64)
    lrows64 = lrows.to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)

    # Dense GEMM over the stacked rows; each W tile serves primal and tangent tiles
    # alike (grouped order keeps it in L2).
    # x and xdot are read in place (no torch.cat of [x; xdot], which would cost
    # about as much HBM traffic as the GEMM's own reads of x at large M). The base
    # pointer is picked per tile, as a scalar: a per-row pointer select hides the
    # 16-byte alignment from Triton and the x loads were then not pipelined
    # (checked on sm_90 TTGIR compiled ahead of time).
    # A loop bound of 0 (not an `if` around the loop) skips the GEMM for tangent
    # tiles without input tangents.
    d_end = tl.where(row0 < TD, D, 0)
    x_base = tl.where(seg1, XT, X)
    x_stride = tl.where(seg1, stride_xt, stride_x)
    x_rows = x_base + lrows64 * x_stride
    acc = _dense(acc, X, x_rows, row_ok, W, S, Z, offs_n, mask_n, stride_w, D, d_end, G, GS, QBITS, PREC, BLOCK_K)

    # Epilogue 1: + s H B^T (an extra K=r step of the GEMM), rank in chunks of RB <= 128.
    rl = tl.arange(0, RB)
    b_rows = B + offs_n.to(tl.int64) * stride_b
    if row0 < HR:
        mask_hr = row_ok & (rows < HR)
        for r0 in range(0, R, RB):
            rc = r0 + rl
            mr_ = rc < R
            h = tl.load(H + rows64[:, None] * R + rc[None, :], mask=mask_hr[:, None] & mr_[None, :], other=0.0)
            b = tl.load(b_rows[:, None] + rc[None, :], mask=mask_n[:, None] & mr_[None, :], other=0.0)
            acc = tl.dot((h * scaling).to(cdt), tl.trans(b.to(cdt)), acc, input_precision=PREC)

    # Epilogue 2: seeded terms of tangent rows; a row tile may span several tangents.
    if PERTURB_B or PERTURB_BIAS:
        j_lo = tl.maximum(row0 // M, 1)
        j_hi = (tl.minimum(row0 + BLOCK_M, row_end) - 1) // M
        if PERTURB_B:
            for r0 in range(0, R, RB):
                rc = r0 + rl
                mr_ = rc < R
                # primal h of the same token m, pre-scaled by s
                h0 = tl.load(H + mr.to(tl.int64)[:, None] * R + rc[None, :], mask=row_ok[:, None] & mr_[None, :],
                             other=0.0) * scaling
                for j in range(j_lo, j_hi + 1):
                    kj = tl.load(KS + j - 1)
                    hj = tl.where((jr == j)[:, None], h0, 0.0)
                    db = tile_values(seed_lo, seed_hi, pid_b, kj, offs_n, r0 >> 7, r0 & 127, RB, DIST)
                    db = tl.where(mr_[None, :], db, 0.0)
                    acc = tl.dot(hj.to(cdt), tl.trans(db.to(cdt)), acc, input_precision=PREC)
        if PERTURB_BIAS:
            for j in range(j_lo, j_hi + 1):
                kj = tl.load(KS + j - 1)
                dbias = element_values(seed_lo, seed_hi, pid_bias, kj, offs_n * 0, offs_n, DIST)
                acc += tl.where((jr == j)[:, None], dbias[None, :], 0.0)
    if HAS_BIAS:
        bias = tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc += tl.where(is_p[:, None], bias[None, :], 0.0)

    out_rows = tl.where(seg1, YT, Y) + lrows64 * N
    tl.store(out_rows[:, None] + offs_n[None, :], acc.to(Y.dtype.element_ty), mask=row_ok[:, None] & mask_n[None, :])


# ---------------------------------------------------------------------------
# Perturbed inference
# ---------------------------------------------------------------------------


@triton.autotune(configs=_gemm_configs(max_tile=128 * 128), key=["M", "N", "D", "R"],
                 prune_configs_by={"early_config_prune": _prune_for("M")})
@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "pid_b", "pid_bias", "K"])
def _perturbed_kernel(X, W, S, Z, BIAS, H, B, YP, YM, KS, M, N, D, R, K, G, GS, stride_x, stride_w, stride_b, scaling,
                      eps, seed_lo, seed_hi, pid_b, pid_bias, HAS_BIAS: tl.constexpr, PERTURB_A: tl.constexpr,
                      PERTURB_B: tl.constexpr, PERTURB_BIAS: tl.constexpr, DIST: tl.constexpr, PREC: tl.constexpr,
                      RB: tl.constexpr, QBITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """YP[k], YM[k] = base +- eps T_k + eps^2 Q_k (module docstring); H rows: [h; g_1..g_K]."""
    pid_m, pid_n = _swizzle(tl.cdiv(M, BLOCK_M), N, BLOCK_M, BLOCK_N, GROUP_M)
    cdt = X.dtype.element_ty
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    m64 = offs_m.to(tl.int64)
    base = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)

    # base = x W^T + b + s h B^T, once for all K perturbations (W read once).
    x_rows = X + m64 * stride_x
    base = _dense(base, X, x_rows, mask_m, W, S, Z, offs_n, mask_n, stride_w, D, D, G, GS, QBITS, PREC, BLOCK_K)
    rl = tl.arange(0, RB)
    b_rows = B + offs_n.to(tl.int64) * stride_b
    for r0 in range(0, R, RB):
        rc = r0 + rl
        mr_ = rc < R
        h = tl.load(H + m64[:, None] * R + rc[None, :], mask=mask_m[:, None] & mr_[None, :], other=0.0)
        b = tl.load(b_rows[:, None] + rc[None, :], mask=mask_n[:, None] & mr_[None, :], other=0.0)
        base = tl.dot((h * scaling).to(cdt), tl.trans(b.to(cdt)), base, input_precision=PREC)
    if HAS_BIAS:
        bias = tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        base += bias[None, :]

    out_mask = mask_m[:, None] & mask_n[None, :]
    # base, t and q are three live [BLOCK_M, BLOCK_N] fp32 tiles in this loop
    # (register pressure on GPU).
    for kidx in range(0, K):
        kj = tl.load(KS + kidx)
        t = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        q = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        g_rows = ((kidx + 1) * M + m64) * R
        for r0 in range(0, R, RB):
            rc = r0 + rl
            mr_ = rc < R
            if PERTURB_A:
                g = tl.load(H + g_rows[:, None] + rc[None, :], mask=mask_m[:, None] & mr_[None, :], other=0.0)
                gs = g * scaling
                b = tl.load(b_rows[:, None] + rc[None, :], mask=mask_n[:, None] & mr_[None, :], other=0.0)
                t = tl.dot(gs.to(cdt), tl.trans(b.to(cdt)), t, input_precision=PREC)
            if PERTURB_B:
                db = tile_values(seed_lo, seed_hi, pid_b, kj, offs_n, r0 >> 7, r0 & 127, RB, DIST)
                db = tl.where(mr_[None, :], db, 0.0).to(cdt)
                h = tl.load(H + m64[:, None] * R + rc[None, :], mask=mask_m[:, None] & mr_[None, :], other=0.0)
                t = tl.dot((h * scaling).to(cdt), tl.trans(db), t, input_precision=PREC)
                if PERTURB_A:
                    q = tl.dot(gs.to(cdt), tl.trans(db), q, input_precision=PREC)
        if PERTURB_BIAS:
            dbias = element_values(seed_lo, seed_hi, pid_bias, kj, offs_n * 0, offs_n, DIST)
            t += dbias[None, :]
        sym = base + (eps * eps) * q
        off = (kidx * M + m64)[:, None] * N + offs_n[None, :]
        tl.store(YP + off, (sym + eps * t).to(YP.dtype.element_ty), mask=out_mask)
        tl.store(YM + off, (sym - eps * t).to(YM.dtype.element_ty), mask=out_mask)


# ---------------------------------------------------------------------------
# Host wrappers (arguments validated by fwdkern/ops/lora.py)
# ---------------------------------------------------------------------------


def _prec(dtype):
    # fp32 layers get exact fp32 products (as torch's default matmul, TF32 off).
    return "ieee" if dtype == torch.float32 else "tf32"


def _vsplit(dtype, dist_code):
    """16-bit parts needed to carry fp32 Gaussian values exactly enough (fp32 output)."""
    if dist_code == 0 or dtype == torch.float32:
        return 1
    return 2 if dtype == torch.float16 else 3  # bf16 keeps 8 mantissa bits per part


def _pow2_block(n: int) -> int:
    """Power of two in [16, 128] covering n when n <= 128 (tl.dot needs >= 16)."""
    return min(128, max(16, triton.next_power_of_2(max(int(n), 1))))


def _ks_arg(ks):
    """A kernel-readable ks (an empty tensor would hand the kernel a null pointer)."""
    return ks if ks.numel() > 0 else torch.zeros(1, dtype=torch.int64, device=ks.device)


def _rowmajor(t):
    """Unit column stride (the kernels take the row stride only)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _shrink(x2d, xt_rows, A, H, J, dense_j, seeded, seed, pid, ks, dist_code):
    """H[j] = (j < dense_j ? S_j A^T : 0) + (seeded and j >= 1 ? x v(ks[j-1])^T : 0), j < J."""
    M, D = x2d.shape
    N = A.shape[0]
    bn = _pow2_block(N)
    xt_arg = x2d if xt_rows is None else xt_rows
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, bn), J)  # noqa: E731
    _nt_kernel[grid](x2d, xt_arg, A, H, _ks_arg(ks), M, N, D, J, dense_j, 1 if seeded else J, x2d.stride(0),
                     xt_arg.stride(0), A.stride(0), *split_seed(seed), pid, SEEDED=bool(seeded), DIST=dist_code,
                     PREC=_prec(x2d.dtype), VSPLIT=1, BLOCK_N=bn)


def seeded_matmul_nt(X: torch.Tensor, seed: int, pid: int, ks: torch.Tensor, N: int, dist_code: int) -> torch.Tensor:
    """fp32 [K, M, N]: X @ v_k^T for v_k = v(seed, pid, ks[k]) of shape [N, D], X [M, D].

    The v_k tiles are generated in registers (never materialized)."""
    K = ks.numel()
    M, D = X.shape
    out = torch.empty(K, M, N, dtype=torch.float32, device=X.device)
    if out.numel() == 0:
        return out
    if D == 0:
        return out.zero_()
    X = _rowmajor(X)
    bn = _pow2_block(N)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, bn), K)  # noqa: E731
    # No dense operand: A is a placeholder never read (DENSE_J = 0).
    _nt_kernel[grid](X, X, X, out, ks, M, N, D, K, 0, 0, X.stride(0), X.stride(0), X.stride(0), *split_seed(seed),
                     pid, SEEDED=True, DIST=dist_code, PREC=_prec(X.dtype), VSPLIT=_vsplit(X.dtype, dist_code),
                     BLOCK_N=bn)
    return out


def _weight_args(weight):
    """(W, S, Z, G, GS, QBITS) kernel arguments of a float weight [N, D] or a QuantizedWeight."""
    bits = getattr(weight, "bits", None)
    if bits is None:
        w = _rowmajor(weight)
        return w, w, w, 1, 1, 0  # S, Z: placeholders never read (QBITS = 0)
    z = weight.offsets if weight.offsets is not None else weight.scales
    return weight.qdata, weight.scales, z, weight.groups, weight.group_size, bits


def _launch_dual(x2d, xt_rows, weight, bias, H, B, ks, y, yt, R_eff: int, HR: int, scaling: float = 0.0,
                 seed: int = 0, pid_B: int = 0, pid_bias: int = 0, perturb_B: bool = False, perturb_bias: bool = False,
                 dist_code: int = 0, RB: int = 16):
    """One pass of the dual kernel over the M primal rows and the K * M tangent rows (W read once for
    all of them); R_eff = 0 drops the rank-r epilogue (H and B are then never read)."""
    M, D = x2d.shape
    N, K = y.shape[1], yt.shape[0]
    weight, S, Z, G, GS, QBITS = _weight_args(weight)
    T = (1 + K) * M
    TD = 0 if D == 0 else (T if xt_rows is not None else M)
    grid = lambda meta: ((triton.cdiv(M, meta["BLOCK_M"]) + triton.cdiv(T - M, meta["BLOCK_M"]))  # noqa: E731
                         * triton.cdiv(N, meta["BLOCK_N"]),)
    xt_arg = x2d if xt_rows is None else xt_rows
    _dual_kernel[grid](x2d, xt_arg, weight, S, Z, bias if bias is not None else weight, H, B, y, yt, ks, M, N,
                       D, R_eff, T, TD, HR, G, GS, x2d.stride(0), xt_arg.stride(0), weight.stride(0), B.stride(0),
                       float(scaling), *split_seed(seed), pid_B, pid_bias, HAS_BIAS=bias is not None,
                       PERTURB_B=bool(perturb_B) and K > 0 and R_eff > 0, PERTURB_BIAS=bool(perturb_bias) and K > 0,
                       DIST=dist_code, PREC=_prec(x2d.dtype), RB=RB, QBITS=QBITS)


def _outputs(x2d, N: int, K: int):
    M = x2d.shape[0]
    return (torch.empty(M, N, dtype=x2d.dtype, device=x2d.device),
            torch.empty(K, M, N, dtype=x2d.dtype, device=x2d.device))


def lora_dual(x2d, xt, weight, bias, A, B, scaling: float, seed: int, pid_A: int, pid_B: int, pid_bias: int, ks,
              dist_code: int, perturb_A: bool, perturb_B: bool, perturb_bias: bool):
    """Fused dual forward: x2d [M, in], xt [K, M, in] or None -> (y [M, out], yt [K, M, out]) in x2d's dtype.

    yt[k] = xt[k] W^T + s (xt[k] A^T + x dA_k^T) B^T + s (x A^T) dB_k^T + db_k,
    with xt = 0 when None and each perturbation zero unless its flag is set. `weight` may be a
    fwdkern QuantizedWeight (int8 / int4: dequantized tile by tile in the dense loop).
    """
    M, D = x2d.shape
    N, R = weight.shape[0], A.shape[0]
    K = ks.numel()
    y, yt = _outputs(x2d, N, K)
    if M == 0 or N == 0:
        return y, yt
    x2d, A, B = (_rowmajor(t) for t in (x2d, A, B))
    bias = bias.contiguous() if bias is not None else None
    xt_rows = _rowmajor(xt.reshape(K * M, D)) if xt is not None and K > 0 else None

    h_tangents = K > 0 and (xt_rows is not None or perturb_A)
    J = 1 + K if h_tangents else 1
    HR = J * M
    R_eff = R if D > 0 else 0  # x A^T = 0 when in = 0: skip the rank steps
    H = torch.empty(max(HR, 1), max(R, 1), dtype=torch.float32, device=x2d.device)
    if R_eff > 0:
        _shrink(x2d, xt_rows, A, H, J, J if xt_rows is not None else 1, perturb_A and K > 0, seed, pid_A, ks,
                dist_code)
    _launch_dual(x2d, xt_rows, weight, bias, H, B, _ks_arg(ks), y, yt, R_eff, HR, scaling, seed, pid_B, pid_bias,
                 perturb_B, perturb_bias, dist_code, _pow2_block(R))
    return y, yt


def linear_dual(x2d, xt, weight, bias):
    """Frozen layer, float or QuantizedWeight W: (y = x W^T + b [M, out], yt[k] = xt[k] W^T [K, M, out]); xt
    [K, M, in] or None (K = 0). The dual kernel without its rank-r and seeded epilogues."""
    M, D = x2d.shape
    K = xt.shape[0] if xt is not None else 0
    y, yt = _outputs(x2d, weight.shape[0], K)
    if M == 0 or weight.shape[0] == 0:
        return y, yt
    x2d = _rowmajor(x2d)
    bias = bias.contiguous() if bias is not None else None
    xt_rows = _rowmajor(xt.reshape(K * M, D)) if K > 0 else None
    H = torch.empty(1, 1, dtype=torch.float32, device=x2d.device)  # placeholder: no rank-r rows (HR = 0)
    ks = torch.zeros(1, dtype=torch.int64, device=x2d.device)  # placeholder: nothing seeded
    _launch_dual(x2d, xt_rows, weight, bias, H, x2d, ks, y, yt, R_eff=0, HR=0)  # B: placeholder, never read
    return y, yt


def lora_perturbed(x2d, weight, bias, A, B, scaling: float, seed: int, pid_A: int, pid_B: int, pid_bias: int, ks,
                   eps: float, dist_code: int, perturb_A: bool, perturb_B: bool, perturb_bias: bool):
    """Perturbed inference (FwdLLM finite difference). Returns (y_plus, y_minus), each [K, M, out]:

    y+-_k = x (W + s (B +- eps dB_k)(A +- eps dA_k))^T + (b +- eps db_k).
    """
    M, D = x2d.shape
    N, R = weight.shape[0], A.shape[0]
    K = ks.numel()
    dtype = x2d.dtype
    yp = torch.empty(K, M, N, dtype=dtype, device=x2d.device)
    ym = torch.empty(K, M, N, dtype=dtype, device=x2d.device)
    if yp.numel() == 0:
        return yp, ym
    weight, S, Z, G, GS, QBITS = _weight_args(weight)
    x2d, A, B = (_rowmajor(t) for t in (x2d, A, B))
    bias = bias.contiguous() if bias is not None else None
    R_eff = R if D > 0 else 0
    J = 1 + K if perturb_A else 1
    H = torch.empty(max(J * M, 1), max(R, 1), dtype=torch.float32, device=x2d.device)
    if R_eff > 0:
        _shrink(x2d, None, A, H, J, 1, perturb_A, seed, pid_A, ks, dist_code)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _perturbed_kernel[grid](x2d, weight, S, Z, bias if bias is not None else weight, H, B, yp, ym, _ks_arg(ks), M, N, D,
                            R_eff, K, G, GS, x2d.stride(0), weight.stride(0), B.stride(0), float(scaling), float(eps),
                            *split_seed(seed), pid_B, pid_bias, HAS_BIAS=bias is not None,
                            PERTURB_A=bool(perturb_A) and R_eff > 0, PERTURB_B=bool(perturb_B) and R_eff > 0,
                            PERTURB_BIAS=bool(perturb_bias), DIST=dist_code, PREC=_prec(dtype), RB=_pow2_block(R),
                            QBITS=QBITS)
    return yp, ym
