"""Triton kernels of the seeded-perturbation ops.

A program handles BLOCK_U units of 128 consecutive elements of one row (the
same decomposition as the C++ and CUDA kernels); a tile is [BLOCK_U, 128].
Per-step integers (seed halves, param id, K) are not specialized, so a new seed
never recompiles. Host wrappers take arguments validated by fwdkern/ops/seeded.py.
"""
import torch
import triton
import triton.language as tl

from .._seed import split_seed
from .philox import tile_values

# BLOCK_U (units of 128 elements per program) is a fixed heuristic (a GPU choice: fwdkern/backends.py).
BLOCK_U = 8


@triton.jit
def _units(T, stride_r, stride_c, C, per_row, total, BLOCK_U: tl.constexpr):
    """This program's rows [BLOCK_U], units [BLOCK_U], element pointers and mask [BLOCK_U, 128]."""
    u = tl.program_id(0) * BLOCK_U + tl.arange(0, BLOCK_U)
    row = u // per_row
    unit = u % per_row
    col = unit[:, None] * 128 + tl.arange(0, 128)[None, :]
    mask = (u < total)[:, None] & (col < C)
    ptr = T + row.to(tl.int64)[:, None] * stride_r + col.to(tl.int64) * stride_c
    return row, unit, ptr, mask


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "param_id", "k"])
def _perturbation_kernel(OUT, stride_r, stride_c, C, per_row, total, seed_lo, seed_hi, param_id, k,
                         DIST: tl.constexpr, BLOCK_U: tl.constexpr):
    row, unit, ptr, mask = _units(OUT, stride_r, stride_c, C, per_row, total, BLOCK_U)
    v = tile_values(seed_lo, seed_hi, param_id, k, row, unit, 0, 128, DIST)
    tl.store(ptr, v.to(OUT.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "param_id", "K", "alpha"])
def _axpy_kernel(P, stride_r, stride_c, C, per_row, total, seed_lo, seed_hi, param_id, KS, COEF, K, alpha,
                 DIST: tl.constexpr, BLOCK_U: tl.constexpr):
    row, unit, ptr, mask = _units(P, stride_r, stride_c, C, per_row, total, BLOCK_U)
    acc = tl.zeros([BLOCK_U, 128], dtype=tl.float32)
    for j in range(K):
        kj = tl.load(KS + j)
        cj = tl.load(COEF + j)
        acc += cj * tile_values(seed_lo, seed_hi, param_id, kj, row, unit, 0, 128, DIST)
    x = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptr, (x + alpha * acc).to(P.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "param_id", "K"])
def _dot_kernel(T, stride_r, stride_c, C, per_row, total, seed_lo, seed_hi, param_id, KS, K, PARTIAL,
                DIST: tl.constexpr, BLOCK_U: tl.constexpr):
    row, unit, ptr, mask = _units(T, stride_r, stride_c, C, per_row, total, BLOCK_U)
    x = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    for j in range(K):
        kj = tl.load(KS + j)
        v = tile_values(seed_lo, seed_hi, param_id, kj, row, unit, 0, 128, DIST)
        tl.store(PARTIAL + tl.program_id(0).to(tl.int64) * K + j, tl.sum(tl.sum(x * v, axis=1), axis=0))


def _geometry(t2d):
    """(kernel's leading arguments, number of programs) for the [rows, cols] view t2d."""
    rows, cols = t2d.shape
    per_row = max(1, -(-cols // 128))
    total = rows * per_row
    return (t2d, t2d.stride(0), t2d.stride(1), cols, per_row, total), max(1, -(-total // BLOCK_U))


def perturbation(out2d: torch.Tensor, seed: int, param_id: int, k: int, dist_code: int):
    if out2d.numel() == 0:
        return
    lead, programs = _geometry(out2d)
    _perturbation_kernel[(programs,)](*lead, *split_seed(seed), param_id, k, DIST=dist_code, BLOCK_U=BLOCK_U)


def seeded_axpy(p2d: torch.Tensor, seed: int, param_id: int, ks: torch.Tensor, coeffs: torch.Tensor, alpha: float,
                dist_code: int):
    if p2d.numel() == 0 or ks.numel() == 0:
        return
    lead, programs = _geometry(p2d)
    _axpy_kernel[(programs,)](*lead, *split_seed(seed), param_id, ks, coeffs, ks.numel(), float(alpha),
                              DIST=dist_code, BLOCK_U=BLOCK_U)


def seeded_dot(t2d: torch.Tensor, seed: int, param_id: int, ks: torch.Tensor, dist_code: int) -> torch.Tensor:
    K = ks.numel()
    if t2d.numel() == 0 or K == 0:
        return torch.zeros(K, dtype=torch.float32, device=t2d.device)
    lead, programs = _geometry(t2d)
    partial = torch.empty(programs, K, dtype=torch.float32, device=t2d.device)
    _dot_kernel[(programs,)](*lead, *split_seed(seed), param_id, ks, K, partial, DIST=dist_code, BLOCK_U=BLOCK_U)
    # Fixed-shape reduction in program order: deterministic for a given tensor size.
    return partial.sum(dim=0)
