"""Triton kernels of the seeded-perturbation ops.

A program handles BLOCK_U units of 128 consecutive elements of one row (the
same decomposition as the C++ and CUDA kernels); a tile is [BLOCK_U, 128].
Per-step integers (seed halves, param id, K) are not specialized, so a new seed
never recompiles.
"""
import torch
import triton
import triton.language as tl

from .philox import unit_values

# NOTE: BLOCK_U (units of 128 elements per program) is a fixed heuristic, not tuned:
# no GPU was available when these kernels were written (see bench/results).
BLOCK_U = 8


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "param_id", "k"])
def _perturbation_kernel(OUT, stride_r, stride_c, C, per_row, total, seed_lo, seed_hi, param_id, k,
                         DIST: tl.constexpr, BLOCK_U: tl.constexpr):
    u = tl.program_id(0) * BLOCK_U + tl.arange(0, BLOCK_U)
    row = u // per_row
    unit = u % per_row
    col = unit[:, None] * 128 + tl.arange(0, 128)[None, :]
    mask = (u < total)[:, None] & (col < C)
    v = unit_values(seed_lo, seed_hi, param_id, k, row, unit, DIST)
    ptr = OUT + row.to(tl.int64)[:, None] * stride_r + col.to(tl.int64) * stride_c
    tl.store(ptr, v.to(OUT.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "param_id", "K", "alpha"])
def _axpy_kernel(P, stride_r, stride_c, C, per_row, total, seed_lo, seed_hi, param_id, KS, COEF, K, alpha,
                 DIST: tl.constexpr, BLOCK_U: tl.constexpr):
    u = tl.program_id(0) * BLOCK_U + tl.arange(0, BLOCK_U)
    row = u // per_row
    unit = u % per_row
    col = unit[:, None] * 128 + tl.arange(0, 128)[None, :]
    mask = (u < total)[:, None] & (col < C)
    acc = tl.zeros([BLOCK_U, 128], dtype=tl.float32)
    for j in range(K):
        kj = tl.load(KS + j)
        cj = tl.load(COEF + j)
        acc += cj * unit_values(seed_lo, seed_hi, param_id, kj, row, unit, DIST)
    ptr = P + row.to(tl.int64)[:, None] * stride_r + col.to(tl.int64) * stride_c
    x = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptr, (x + alpha * acc).to(P.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "param_id", "K"])
def _dot_kernel(T, stride_r, stride_c, C, per_row, total, seed_lo, seed_hi, param_id, KS, K, PARTIAL,
                DIST: tl.constexpr, BLOCK_U: tl.constexpr):
    pid = tl.program_id(0)
    u = pid * BLOCK_U + tl.arange(0, BLOCK_U)
    row = u // per_row
    unit = u % per_row
    col = unit[:, None] * 128 + tl.arange(0, 128)[None, :]
    mask = (u < total)[:, None] & (col < C)
    ptr = T + row.to(tl.int64)[:, None] * stride_r + col.to(tl.int64) * stride_c
    x = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    for j in range(K):
        kj = tl.load(KS + j)
        v = unit_values(seed_lo, seed_hi, param_id, kj, row, unit, DIST)
        tl.store(PARTIAL + pid.to(tl.int64) * K + j, tl.sum(tl.sum(x * v, axis=1), axis=0))


def _geometry(rows, cols):
    per_row = max(1, -(-cols // 128))
    total = rows * per_row
    return per_row, total, (max(1, -(-total // BLOCK_U)),)


def perturbation(out2d: torch.Tensor, seed: int, param_id: int, k: int, dist_code: int):
    rows, cols = out2d.shape
    if out2d.numel() == 0:
        return
    per_row, total, grid = _geometry(rows, cols)
    _perturbation_kernel[grid](out2d, out2d.stride(0), out2d.stride(1), cols, per_row, total,
                               seed & 0xFFFFFFFF, seed >> 32, param_id, k, DIST=dist_code, BLOCK_U=BLOCK_U)


def seeded_axpy(p2d: torch.Tensor, seed: int, param_id: int, ks: torch.Tensor, coeffs: torch.Tensor, alpha: float,
                dist_code: int):
    rows, cols = p2d.shape
    if p2d.numel() == 0 or ks.numel() == 0:
        return
    per_row, total, grid = _geometry(rows, cols)
    _axpy_kernel[grid](p2d, p2d.stride(0), p2d.stride(1), cols, per_row, total, seed & 0xFFFFFFFF, seed >> 32,
                       param_id, ks, coeffs, ks.numel(), float(alpha), DIST=dist_code, BLOCK_U=BLOCK_U)


def seeded_dot(t2d: torch.Tensor, seed: int, param_id: int, ks: torch.Tensor, dist_code: int) -> torch.Tensor:
    rows, cols = t2d.shape
    K = ks.numel()
    if t2d.numel() == 0 or K == 0:
        return torch.zeros(K, dtype=torch.float32, device=t2d.device)
    per_row, total, grid = _geometry(rows, cols)
    partial = torch.empty(grid[0], K, dtype=torch.float32, device=t2d.device)
    _dot_kernel[grid](t2d, t2d.stride(0), t2d.stride(1), cols, per_row, total, seed & 0xFFFFFFFF, seed >> 32,
                      param_id, ks, K, partial, DIST=dist_code, BLOCK_U=BLOCK_U)
    # Fixed-shape reduction in program order: deterministic for a given tensor size.
    return partial.sum(dim=0)
