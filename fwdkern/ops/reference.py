"""Pure-PyTorch reference of the perturbation stream and the seeded ops.

This is the executable form of docs/perturbations.md. It materializes every
perturbation (O(K * n) memory) and is what tests and benchmarks compare the
C++, CUDA and Triton kernels against. uint32 arithmetic is emulated in int64
(products are split into 16-bit halves so nothing overflows).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .. import backends
from .._seed import split_seed

MASK32 = 0xFFFFFFFF
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
RADEMACHER_CHUNK = 128  # elements per Philox call (128 sign bits)
GAUSSIAN_CHUNK = 4  # elements per Philox call (two Box-Muller pairs)


def _mulhilo(a: int, b: torch.Tensor):
    """(hi, lo) 32-bit halves of a * b for a constant a < 2^32 and int64 b < 2^32."""
    p_lo = b * (a & 0xFFFF)
    p_hi = b * (a >> 16)
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & MASK32
    return hi, lo


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """Philox4x32-10 on int64 tensors holding uint32 values (broadcastable)."""
    c0, c1, c2, c3 = torch.broadcast_tensors(*(torch.as_tensor(c, dtype=torch.int64) for c in (c0, c1, c2, c3)))
    for _ in range(10):
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_W0) & MASK32
        k1 = (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def as_rows_cols(shape: Sequence[int]) -> tuple[int, int]:
    """The [rows, cols] view every backend uses: cols = last dim, rows = the rest."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0:
        return 1, 1
    cols = shape[-1]
    rows = math.prod(shape[:-1])
    return rows, cols


def _stream_words(seed: int, param_id: int, ks: torch.Tensor, rows: int, chunks: int):
    """Words [K, rows, chunks, 4] of Philox(counter=(chunk, row, param_id, k), key=seed)."""
    ks = ks.to(torch.int64).reshape(-1, 1, 1)
    row = torch.arange(rows, dtype=torch.int64).reshape(1, -1, 1)
    chunk = torch.arange(chunks, dtype=torch.int64).reshape(1, 1, -1)
    w = philox4x32_10(chunk, row, torch.full((), param_id, dtype=torch.int64), ks, *split_seed(seed))
    return torch.stack(w, dim=-1)


def _values(seed: int, param_id: int, ks: torch.Tensor, rows: int, cols: int, dist: str) -> torch.Tensor:
    """float32 [K, rows, cols] perturbation values."""
    K = ks.numel()
    if dist == "rademacher":
        chunks = -(-cols // RADEMACHER_CHUNK)
        w = _stream_words(seed, param_id, ks, rows, chunks)  # [K, R, U, 4]
        bits = (w.unsqueeze(-1) >> torch.arange(32, dtype=torch.int64)) & 1  # [K, R, U, 4, 32]
        v = 1.0 - 2.0 * bits.reshape(K, rows, chunks * RADEMACHER_CHUNK).to(torch.float32)
    elif dist == "gaussian":
        chunks = -(-cols // GAUSSIAN_CHUNK)
        w = _stream_words(seed, param_id, ks, rows, chunks).to(torch.float64)  # [K, R, G, 4]
        inv = 2.0**-24
        u = (torch.floor(w[..., 0::2] / 256.0) + 1.0) * inv  # words 0, 2
        a = torch.floor(w[..., 1::2] / 256.0) * inv  # words 1, 3
        rad = torch.sqrt(-2.0 * torch.log(u))
        ang = 2.0 * math.pi * a
        z = torch.stack([rad * torch.cos(ang), rad * torch.sin(ang)], dim=-1)  # [K,R,G,2(pair),2(cos,sin)]
        v = z.reshape(K, rows, chunks * GAUSSIAN_CHUNK).to(torch.float32)
    else:
        raise ValueError(f"dist: unknown distribution {dist!r} (expected 'rademacher' or 'gaussian')")
    return v[:, :, :cols]


def reference_perturbations(shape, seed: int, param_id: int, ks, dist: str = "rademacher") -> torch.Tensor:
    """All perturbations v(seed, param_id, ks[j]) materialized: float32 [K, *shape] on CPU."""
    ks = torch.as_tensor(ks, dtype=torch.int64).reshape(-1).cpu()
    rows, cols = as_rows_cols(shape)
    return _values(seed, param_id, ks, rows, cols, dist).reshape(ks.numel(), *tuple(shape))


@backends.register("perturbation", "reference")
def reference_perturbation(shape, seed, param_id, k, dist="rademacher", dtype=torch.float32, device="cpu"):
    """One perturbation v(seed, param_id, k) of `shape`, cast to `dtype` on `device`."""
    return reference_perturbations(shape, seed, param_id, [k], dist)[0].to(device=device, dtype=dtype).contiguous()


@backends.register("seeded_axpy_", "reference")
def reference_seeded_axpy_(param: torch.Tensor, seed, param_id, ks, coeffs, dist="rademacher", alpha=1.0):
    """param += alpha * sum_j coeffs[j] * v_j, materializing V [K, n] (fp32 accumulation)."""
    V = reference_perturbations(param.shape, seed, param_id, ks, dist).to(param.device)
    c = torch.as_tensor(coeffs, dtype=torch.float32, device=param.device).reshape(-1)
    upd = torch.tensordot(c, V, dims=1) if c.numel() else torch.zeros(param.shape, device=param.device)
    param.copy_((param.to(torch.float32) + alpha * upd).to(param.dtype))
    return param


@backends.register("seeded_dot", "reference")
def reference_seeded_dot(tensor: torch.Tensor, seed, param_id, ks, dist="rademacher") -> torch.Tensor:
    """float32 [K]: <v_j, tensor> for every j, materializing V [K, n]."""
    V = reference_perturbations(tensor.shape, seed, param_id, ks, dist).to(tensor.device)
    return V.reshape(V.shape[0], tensor.numel()) @ tensor.reshape(-1).to(torch.float32)
