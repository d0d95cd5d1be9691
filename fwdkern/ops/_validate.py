"""Argument checks shared by the public ops: every bad input raises a ValueError /
TypeError naming the argument, before any kernel runs."""
from __future__ import annotations

import math
from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
DIST_CODE = {"rademacher": 0, "gaussian": 1}
U32 = 1 << 32
U64 = 1 << 64


def check_dist(dist) -> int:
    if not isinstance(dist, str) or dist not in DIST_CODE:
        raise ValueError(f"dist: unknown distribution {dist!r} (expected 'rademacher' or 'gaussian')")
    return DIST_CODE[dist]


def check_seed(seed) -> int:
    if isinstance(seed, torch.Tensor) and seed.numel() == 1 and not seed.is_floating_point():
        seed = int(seed.item())
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed: expected a Python int in [0, 2^64), got {type(seed).__name__}")
    if not 0 <= seed < U64:
        raise ValueError(f"seed: {seed} is outside [0, 2^64)")
    return seed


def check_u32(value, name: str) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value.item())
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int in [0, 2^32), got {type(value).__name__}")
    if not 0 <= value < U32:
        raise ValueError(f"{name}: {value} is outside [0, 2^32)")
    return value


def check_ks(ks, device) -> torch.Tensor:
    """1-D int64 tensor on `device` with values in [0, 2^32)."""
    if isinstance(ks, torch.Tensor):
        if ks.is_floating_point() or ks.is_complex() or ks.dtype == torch.bool:
            raise TypeError(f"ks: expected an integer tensor, got dtype {ks.dtype}")
        if ks.dim() != 1:
            raise ValueError(f"ks: expected a 1-D tensor, got shape {tuple(ks.shape)}")
        host = ks.detach().to("cpu", torch.int64)
        if host.numel() and (int(host.min()) < 0 or int(host.max()) >= U32):
            bad = host[(host < 0) | (host >= U32)][0].item()
            raise ValueError(f"ks: value {bad} is outside [0, 2^32)")
    else:
        try:
            vals = list(ks)
        except TypeError:
            raise TypeError(f"ks: expected a 1-D integer tensor or sequence, got {type(ks).__name__}") from None
        for v in vals:
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"ks: expected integers, got {v!r}")
            if not 0 <= v < U32:
                raise ValueError(f"ks: value {v} is outside [0, 2^32)")
        host = torch.tensor(vals, dtype=torch.int64)
    return host.to(device).contiguous()


def check_coeffs(coeffs, K: int, device, check_finite: bool = True) -> torch.Tensor:
    if isinstance(coeffs, torch.Tensor):
        if not (coeffs.is_floating_point() or coeffs.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"coeffs: expected a float tensor, got dtype {coeffs.dtype}")
        if coeffs.dim() != 1:
            raise ValueError(f"coeffs: expected a 1-D tensor, got shape {tuple(coeffs.shape)}")
        c = coeffs.detach().to(device=device, dtype=torch.float32)
    else:
        try:
            c = torch.tensor([float(x) for x in coeffs], dtype=torch.float32, device=device)
        except (TypeError, ValueError):
            raise TypeError(f"coeffs: expected a 1-D float tensor or sequence, got {coeffs!r}") from None
    if c.numel() != K:
        raise ValueError(f"coeffs: length {c.numel()} does not match len(ks) = {K}")
    if check_finite and c.numel() and not bool(torch.isfinite(c).all()):
        raise ValueError("coeffs: contains NaN or Inf")
    return c.contiguous()


def check_float_tensor(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: dtype {t.dtype} is not supported (float32, float16, bfloat16)")
    return t


def view2d(t: torch.Tensor, name: str, writable: bool = False) -> torch.Tensor:
    """The [rows, last_dim] view all backends use (see docs/perturbations.md), without copying.

    Strided views are handled; a layout that cannot be expressed as one
    [rows, cols] stride pair raises (call .contiguous() first).
    """
    if t.dim() == 0:
        v = t.view(1, 1)
    else:
        cols = t.shape[-1]
        rows = math.prod(t.shape[:-1])
        try:
            v = t.view(rows, cols)
        except RuntimeError:
            raise ValueError(
                f"{name}: non-contiguous layout with strides {tuple(t.stride())} cannot be viewed as "
                f"[{rows}, {cols}]; pass {name}.contiguous()"
            ) from None
    if rows_cols_overflow(v):
        raise ValueError(f"{name}: more than 2^32-1 rows in the [rows, last_dim] view")
    if writable and v.numel() > 1:
        for size, stride in zip(v.shape, v.stride()):
            if size > 1 and stride == 0:
                raise ValueError(f"{name}: has overlapping memory (an expanded tensor); it cannot be updated in place")
    return v


def rows_cols_overflow(v: torch.Tensor) -> bool:
    return v.shape[0] >= U32


def check_shape(shape) -> tuple:
    if isinstance(shape, int):
        shape = (shape,)
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(f"shape: expected a sequence of ints, got {shape!r}") from None
    if any(s < 0 for s in shape):
        raise ValueError(f"shape: negative dimension in {shape}")
    return shape


def seed_to_i64(seed: int) -> int:
    """torch.library schemas carry int64: pass the uint64 seed as its two's complement."""
    return seed - U64 if seed >= (1 << 63) else seed


def seed_from_i64(seed: int) -> int:
    return seed % U64
