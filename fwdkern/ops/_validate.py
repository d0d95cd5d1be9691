"""Argument checks of the public ops: every bad input raises a ValueError / TypeError naming
the argument, before any kernel runs.

Two kinds: checks of Python values, shapes, dtypes and layouts run in the public wrappers
(they are static under torch.compile); checks of tensor *values* (``check_ks_values``,
``check_coeffs_values``, ``check_finite_result``) run inside the custom ops, on the real
tensors, so eager and compiled calls refuse the same inputs.
"""
from __future__ import annotations

import math
import operator

import torch

from ._qformat import QuantizedWeight, check_quantized

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
DIST_CODE = {"rademacher": 0, "gaussian": 1}
U32 = 1 << 32
U64 = 1 << 64
F32_MAX = torch.finfo(torch.float32).max
# Columns of one perturbation's [rows, cols] view (docs/perturbations.md): counter word 0 is
# col >> 7 (Rademacher; the kernels cap the width at 2^36) or col >> 2 (Gaussian).
MAX_COLS = {"rademacher": 1 << 36, "gaussian": 1 << 34}


def check_dist(dist) -> int:
    if not isinstance(dist, str) or dist not in DIST_CODE:
        raise ValueError(f"dist: unknown distribution {dist!r} (expected 'rademacher' or 'gaussian')")
    return DIST_CODE[dist]


def check_int(value, name: str, lo: int = 0, hi: int | None = None, what: str = "an int") -> int:
    """A Python (or numpy, or 0-d integer tensor) integer in [lo, hi); bools and floats are refused."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point() \
            and value.dtype != torch.bool:
        value = int(value.item())
    if type(value).__name__ in ("bool", "bool_"):  # Python and numpy bools
        raise TypeError(f"{name}: expected {what}, got a bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: expected {what}, got {type(value).__name__}") from None
    if value < lo or (hi is not None and value >= hi):
        rng = f"[{lo}, {'2^64' if hi == U64 else '2^32' if hi == U32 else hi})" if hi is not None else f">= {lo}"
        raise ValueError(f"{name}: {value} is outside {rng}")
    return value


def check_seed(seed) -> int:
    return check_int(seed, "seed", 0, U64, "a Python int in [0, 2^64)")


def check_u32(value, name: str) -> int:
    return check_int(value, name, 0, U32, "an int in [0, 2^32)")


def check_scalar(value, name: str, positive: bool = False) -> float:
    """A finite real scalar that float32 represents (|x| <= float32 max: the kernels take fp32)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: {value} is not finite")
    if abs(value) > F32_MAX:
        raise ValueError(f"{name}: {value} overflows float32 (|{name}| > {F32_MAX:.4g})")
    if positive and value <= 0:
        raise ValueError(f"{name}: expected a positive value, got {value}")
    return value


def _as_list(value, name: str, what: str) -> list:
    """The elements of a sequence argument (strings and non-iterables are refused)."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name}: expected {what}, got {value!r}")
    try:
        return list(value)
    except TypeError:
        raise TypeError(f"{name}: expected {what}, got {type(value).__name__}") from None


def check_ks(ks, device) -> torch.Tensor:
    """1-D int64 tensor on `device`. Values of a sequence are checked here; values of a tensor
    are checked inside the op (:func:`check_ks_values`)."""
    if isinstance(ks, torch.Tensor):
        if ks.is_floating_point() or ks.is_complex() or ks.dtype == torch.bool:
            raise TypeError(f"ks: expected an integer tensor, got dtype {ks.dtype}")
        if ks.dim() != 1:
            raise ValueError(f"ks: expected a 1-D tensor, got shape {tuple(ks.shape)}")
        return ks.detach().to(device=device, dtype=torch.int64).contiguous()
    vals = [check_int(v, "ks", 0, U32, "integers") for v in _as_list(ks, "ks", "a 1-D integer tensor or sequence")]
    return torch.tensor(vals, dtype=torch.int64).to(device)


def check_ks_values(ks: torch.Tensor) -> None:
    """Inside the ops: every k in [0, 2^32)."""
    if ks.numel() and ks.device.type != "meta":
        bad = (ks < 0) | (ks >= U32)
        if bool(bad.any()):
            raise ValueError(f"ks: value {int(ks[bad][0])} is outside [0, 2^32)")


def check_coeffs(coeffs, K: int, device) -> torch.Tensor:
    """1-D float32 tensor of length K on `device` (finiteness: :func:`check_coeffs_values`)."""
    if isinstance(coeffs, torch.Tensor):
        if not (coeffs.is_floating_point() or coeffs.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"coeffs: expected a float tensor, got dtype {coeffs.dtype}")
        if coeffs.dim() != 1:
            raise ValueError(f"coeffs: expected a 1-D tensor, got shape {tuple(coeffs.shape)}")
        c = coeffs.detach().to(device=device, dtype=torch.float32)
    else:
        try:
            vals = [float(x) for x in coeffs]
        except (TypeError, ValueError):
            raise TypeError(f"coeffs: expected a 1-D float tensor or sequence, got {coeffs!r}") from None
        c = torch.tensor(vals, dtype=torch.float32).to(device)
    if c.numel() != K:
        raise ValueError(f"coeffs: length {c.numel()} does not match len(ks) = {K}")
    return c.contiguous()


def check_coeffs_values(c: torch.Tensor) -> None:
    """Inside the ops: coeffs are finite in float32 (values past float32's range became inf)."""
    if c.numel() and c.device.type != "meta" and not bool(torch.isfinite(c).all()):
        raise ValueError("coeffs: contains NaN or Inf (or a value that overflows float32)")


def check_finite_result(out: torch.Tensor, name: str, op: str) -> None:
    if out.numel() and out.device.type != "meta" and not bool(torch.isfinite(out).all()):
        raise ValueError(f"{name}: contains NaN or Inf ({op} result is not finite)")


def check_float_tensor(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: dtype {t.dtype} is not supported (float32, float16, bfloat16)")
    return t


def check_like(x: torch.Tensor, named) -> None:
    """Every (name, tensor) of `named` in x's dtype and on x's device (the ops take one dtype)."""
    for name, t in named:
        if t.dtype != x.dtype:
            raise TypeError(f"{name}: dtype {t.dtype} differs from x.dtype {x.dtype} (cast it first)")
        if t.device != x.device:
            raise ValueError(f"{name}: on {t.device}, but x is on {x.device}")


def check_linear(x: torch.Tensor, weight, bias) -> tuple:
    """A linear layer's operands: x [..., in] float; weight [out, in], a float tensor in x's dtype or a
    valid :class:`QuantizedWeight` (its format is the weight's own; any compute dtype); bias [out] in
    x's dtype or None; all on x's device. Returns (out_features, in_features)."""
    check_float_tensor(x, "x")
    quantized = isinstance(weight, QuantizedWeight)
    if quantized:
        check_quantized(weight)
    else:
        check_float_tensor(weight, "weight")
    if bias is not None:
        check_float_tensor(bias, "bias")
    if x.dim() < 1:
        raise ValueError("x: expected at least 1 dimension [..., in_features]")
    if not quantized and weight.dim() != 2:
        raise ValueError(f"weight: expected [out_features, in_features], got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    if x.shape[-1] != in_f:
        raise ValueError(f"x: last dimension {x.shape[-1]} does not match weight in_features {in_f}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != out_f):
        raise ValueError(f"bias: expected [{out_f}], got shape {tuple(bias.shape)}")
    if quantized and weight.device != x.device:
        raise ValueError(f"weight: on {weight.device}, but x is on {x.device}")
    check_like(x, ([] if quantized else [("weight", weight)]) + ([("bias", bias)] if bias is not None else []))
    return out_f, in_f


def check_tangents(t, primal: torch.Tensor, name: str, primal_name: str, K=None, layout: str = "",
                   same_dtype: bool = True):
    """A stack of K tangents [K, *primal.shape] on primal's device; returns K.

    K: the number the call fixes (len(ks)), or None to take it from `t`; layout: how the shape error
    spells the expected layout (default ``[K, *<primal_name>.shape]``). same_dtype: a float tensor in
    primal's dtype (the linear and LoRA ops); without it any tensor (dual attention accumulates in fp32
    whatever the tangents' dtype)."""
    if same_dtype:
        check_float_tensor(t, name)
    elif not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor or None, got {type(t).__name__}")
    if K is None and t.dim():
        K = t.shape[0]
    if tuple(t.shape) != (K, *primal.shape):
        raise ValueError(f"{name}: expected shape {(K, *primal.shape)} ({layout or f'[K, *{primal_name}.shape]'}), "
                         f"got {tuple(t.shape)}")
    if same_dtype and t.dtype != primal.dtype:
        raise TypeError(f"{name}: dtype {t.dtype} differs from {primal_name}.dtype {primal.dtype}")
    if t.device != primal.device:
        raise ValueError(f"{name}: on {t.device}, but {primal_name} is on {primal.device}")
    return K


def check_stream_shape(rows: int, cols: int, dist: str, name: str) -> None:
    """A perturbation of [rows, cols] fits the stream's counters (docs/perturbations.md)."""
    if rows >= U32:
        raise ValueError(f"{name}: more than 2^32-1 rows in the [rows, last_dim] view")
    if cols > MAX_COLS[dist]:
        limit = "2^36" if dist == "rademacher" else "2^34"
        raise ValueError(f"{name}: last dimension {cols} exceeds the {dist} stream's limit of {limit} columns")


def overlaps(v: torch.Tensor) -> bool:
    """Whether two elements of the 2-D view `v` share memory (exact: torch strides are >= 0).

    With strides s1 <= s2 of the dims of size > 1 (sizes n1, n2), elements (i, j) and
    (i + a, j - b) coincide iff a*s1 == b*s2 for some 0 < a < n1, 0 < b < n2; the smallest such
    pair is a = s2/g, b = s1/g with g = gcd(s1, s2)."""
    dims = [(st, n) for n, st in zip(v.shape, v.stride()) if n > 1]
    if any(st == 0 for st, _ in dims):
        return True
    if len(dims) < 2:
        return False
    (s1, n1), (s2, n2) = sorted(dims)
    g = math.gcd(s1, s2)
    return s2 // g < n1 and s1 // g < n2


def as2d(t: torch.Tensor) -> torch.Tensor:
    """The [rows, last_dim] view all backends use (docs/perturbations.md); :func:`view2d` checked it."""
    return t.view(1, 1) if t.dim() == 0 else t.view(math.prod(t.shape[:-1]), t.shape[-1])


def dims2d(v: torch.Tensor) -> tuple:
    """(rows, cols, stride_r, stride_c) of a 2-D view: the kernels' View2D fields."""
    return v.shape[0], v.shape[1], v.stride(0), v.stride(1)


def view2d(t: torch.Tensor, name: str, writable: bool = False, dist: str = "rademacher") -> torch.Tensor:
    """:func:`as2d` of a validated tensor, without copying.

    Strided views are handled; a layout that cannot be expressed as one [rows, cols] stride
    pair raises (call .contiguous() first), and so does a target of an in-place update whose
    elements overlap in memory (an expanded or overlapping as_strided view).
    """
    try:
        v = as2d(t)
    except RuntimeError:
        raise ValueError(
            f"{name}: non-contiguous layout with strides {tuple(t.stride())} cannot be viewed as "
            f"[{math.prod(t.shape[:-1])}, {t.shape[-1]}]; pass {name}.contiguous()"
        ) from None
    check_stream_shape(v.shape[0], v.shape[1], dist, name)
    if writable and overlaps(v):
        raise ValueError(f"{name}: has overlapping memory (an expanded or overlapping strided tensor); "
                         "it cannot be updated in place")
    return v


def check_inplace_target(t: torch.Tensor, name: str) -> None:
    """Refuse what torch's own in-place ops refuse: a tensor autograd would track, under grad mode."""
    if not (t.requires_grad and torch.is_grad_enabled()):
        return
    if t.is_leaf:
        raise RuntimeError(f"{name}: a leaf Variable that requires grad is being used in an in-place operation.")
    if t._base is not None and t._base.is_leaf:
        raise RuntimeError(f"{name}: a view of a leaf Variable that requires grad is being used in an in-place "
                           "operation.")
    raise RuntimeError(f"{name}: requires grad; seeded_axpy_ is not differentiable (call it under torch.no_grad() "
                       f"or on {name}.detach())")


def check_shape(shape) -> tuple:
    if isinstance(shape, torch.Size):
        return tuple(shape)
    if isinstance(shape, (int, torch.SymInt)) and not isinstance(shape, bool):
        shape = (shape,)
    dims = _as_list(shape, "shape", "a sequence of ints")
    out = []
    for s in dims:
        if isinstance(s, torch.SymInt):
            out.append(s)
            continue
        try:
            out.append(check_int(s, "shape", 0, None, "a sequence of ints"))
        except ValueError:
            raise ValueError(f"shape: negative dimension in {tuple(dims)}") from None
    return tuple(out)


def seed_to_i64(seed: int) -> int:
    """torch.library schemas carry int64: pass the uint64 seed as its two's complement."""
    return seed - U64 if seed >= (1 << 63) else seed


def seed_from_i64(seed: int) -> int:
    return seed % U64
