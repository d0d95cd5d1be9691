"""Seeded-perturbation ops: perturbation, seeded_axpy_, seeded_dot.

Each op is one ``torch.library`` custom op (with a fake kernel, so it works under
torch.compile) whose implementation dispatches to the backend chosen by
:mod:`fwdkern.backends`. Perturbations are generated from
``(seed, param_id, k, element)`` as specified in docs/perturbations.md and are
never materialized by the cpu/cuda/triton backends.
"""
from __future__ import annotations

import math

import torch

from .. import backends
from . import reference as ref
from ._validate import (
    DIST_CODE,
    DTYPE_CODE,
    check_coeffs,
    check_dist,
    check_float_tensor,
    check_ks,
    check_seed,
    check_shape,
    check_u32,
    seed_from_i64,
    seed_to_i64,
    view2d,
)

_DIST_NAME = {v: k for k, v in DIST_CODE.items()}


def _triton():
    from ..triton import seeded as tk

    return tk


def _check_triton_dtype(t: torch.Tensor, name: str):
    if t.device.type == "cpu" and t.dtype == torch.bfloat16:
        raise backends.BackendUnavailable(
            f"{name}: bfloat16 is not supported by the Triton interpreter (TRITON_INTERPRET=1); use float32/float16 "
            "or another backend"
        )


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def _dims(v: torch.Tensor):
    return v.shape[0], v.shape[1], v.stride(0), v.stride(1)


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("fwdkern::perturbation", mutates_args=())
def _perturbation_op(shape: list[int], seed: int, param_id: int, k: int, dist: str, dtype: torch.dtype,
                     device: torch.device, backend: str) -> torch.Tensor:
    seed = seed_from_i64(seed)
    if backend == "reference":
        return ref.reference_perturbation(shape, seed, param_id, k, dist, dtype, device)
    out = torch.empty(shape, dtype=dtype, device=device)
    v = view2d(out, "out", writable=True)
    code = DIST_CODE[dist]
    if backend == "cpu":
        backends.extension().cpu_perturbation(v.data_ptr(), DTYPE_CODE[dtype], *_dims(v), seed, param_id, k, code)
    elif backend == "cuda":
        with torch.cuda.device(out.device):
            backends.extension().cuda_perturbation(v.data_ptr(), DTYPE_CODE[dtype], *_dims(v), seed, param_id, k,
                                                   code, _stream(out))
    elif backend == "triton":
        _triton().perturbation(v, seed, param_id, k, code)
    else:  # pragma: no cover - resolve() only returns known names
        raise ValueError(f"backend: unknown backend {backend!r}")
    return out


@_perturbation_op.register_fake
def _(shape, seed, param_id, k, dist, dtype, device, backend):
    return torch.empty(shape, dtype=dtype, device=device)


@torch.library.custom_op("fwdkern::seeded_axpy_", mutates_args=("param",))
def _seeded_axpy_op(param: torch.Tensor, seed: int, param_id: int, ks: torch.Tensor, coeffs: torch.Tensor,
                    dist: str, alpha: float, backend: str) -> None:
    seed = seed_from_i64(seed)
    if backend == "reference":
        ref.reference_seeded_axpy_(param, seed, param_id, ks, coeffs, dist, alpha)
        return
    v = view2d(param, "param", writable=True)
    code = DIST_CODE[dist]
    K = ks.numel()
    if backend == "cpu":
        backends.extension().cpu_seeded_axpy(v.data_ptr(), DTYPE_CODE[param.dtype], *_dims(v), seed, param_id,
                                             ks.data_ptr(), coeffs.data_ptr(), K, alpha, code)
    elif backend == "cuda":
        with torch.cuda.device(param.device):
            backends.extension().cuda_seeded_axpy(v.data_ptr(), DTYPE_CODE[param.dtype], *_dims(v), seed, param_id,
                                                  ks.data_ptr(), coeffs.data_ptr(), K, alpha, code, _stream(param))
    elif backend == "triton":
        _triton().seeded_axpy(v, seed, param_id, ks, coeffs, alpha, code)
    else:  # pragma: no cover
        raise ValueError(f"backend: unknown backend {backend!r}")


@_seeded_axpy_op.register_fake
def _(param, seed, param_id, ks, coeffs, dist, alpha, backend):
    return None


@torch.library.custom_op("fwdkern::seeded_dot", mutates_args=())
def _seeded_dot_op(tensor: torch.Tensor, seed: int, param_id: int, ks: torch.Tensor, dist: str,
                   backend: str) -> torch.Tensor:
    seed = seed_from_i64(seed)
    if backend == "reference":
        return ref.reference_seeded_dot(tensor, seed, param_id, ks, dist)
    v = view2d(tensor, "tensor")
    code = DIST_CODE[dist]
    K = ks.numel()
    if backend == "triton":
        return _triton().seeded_dot(v, seed, param_id, ks, code)
    out = torch.empty(K, dtype=torch.float32, device=tensor.device)
    if K == 0:
        return out
    if backend == "cpu":
        backends.extension().cpu_seeded_dot(v.data_ptr(), DTYPE_CODE[tensor.dtype], *_dims(v), seed, param_id,
                                            ks.data_ptr(), K, code, out.data_ptr())
    elif backend == "cuda":
        ext = backends.extension()
        ws = torch.empty(ext.cuda_seeded_dot_workspace(v.shape[0], v.shape[1], K), dtype=torch.float32,
                         device=tensor.device)
        with torch.cuda.device(tensor.device):
            ext.cuda_seeded_dot(v.data_ptr(), DTYPE_CODE[tensor.dtype], *_dims(v), seed, param_id, ks.data_ptr(), K,
                                code, out.data_ptr(), ws.data_ptr(), _stream(tensor))
    else:  # pragma: no cover
        raise ValueError(f"backend: unknown backend {backend!r}")
    return out


@_seeded_dot_op.register_fake
def _(tensor, seed, param_id, ks, dist, backend):
    return tensor.new_empty((ks.shape[0],), dtype=torch.float32)


# ----------------------------------------------------------------------------- public API


def perturbation(shape, seed: int, param_id: int, k: int, dist: str = "rademacher", dtype: torch.dtype = torch.float32,
                 device="cpu", backend: str | None = None) -> torch.Tensor:
    """Materialize one perturbation ``v(seed, param_id, k)`` (for tests and debugging).

    Args:
        shape: output shape; element (row, col) of its [prod(shape[:-1]), shape[-1]] view
            is the stream element defined in docs/perturbations.md.
        seed: int in [0, 2^64). param_id, k: ints in [0, 2^32).
        dist: "rademacher" (±1, bit-identical on every backend) or "gaussian".
        dtype: float32, float16 or bfloat16. device: output device.
        backend: None/"auto", "cpu", "cuda", "triton" or "reference".
    """
    shape = check_shape(shape)
    seed = check_seed(seed)
    param_id = check_u32(param_id, "param_id")
    k = check_u32(k, "k")
    check_dist(dist)
    if dtype not in DTYPE_CODE:
        raise TypeError(f"dtype: {dtype} is not supported (float32, float16, bfloat16)")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    b = backends.resolve("perturbation", device, backend)
    if b == "triton" and device.type == "cpu" and dtype == torch.bfloat16:
        _check_triton_dtype(torch.empty(0, dtype=dtype), "dtype")
    return _perturbation_op(list(shape), seed_to_i64(seed), param_id, k, dist, dtype, device, b)


def seeded_axpy_(param: torch.Tensor, seed: int, param_id: int, ks, coeffs, dist: str = "rademacher",
                 alpha: float = 1.0, backend: str | None = None, check_finite: bool = True) -> torch.Tensor:
    """In place: ``param += alpha * sum_j coeffs[j] * v(seed, param_id, ks[j])``.

    No perturbation is materialized (cpu/cuda/triton backends): memory is O(numel).
    Accumulation is fp32; ``param`` is rounded once.

    Args:
        param: float32/float16/bfloat16 tensor, any device; strided views are handled.
        ks: 1-D integer tensor or sequence, values in [0, 2^32) (any indices, not only 0..K-1).
        coeffs: 1-D float tensor or sequence of len(ks); must be finite (check_finite).
        alpha: scalar multiplier (finite).
    Returns ``param``.
    """
    check_float_tensor(param, "param")
    seed = check_seed(seed)
    param_id = check_u32(param_id, "param_id")
    check_dist(dist)
    view2d(param, "param", writable=True)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha: expected a float, got {type(alpha).__name__}")
    if check_finite and not math.isfinite(float(alpha)):
        raise ValueError(f"alpha: {alpha} is not finite")
    ks_t = check_ks(ks, param.device)
    c = check_coeffs(coeffs, ks_t.numel(), param.device, check_finite)
    b = backends.resolve("seeded_axpy_", param.device, backend)
    if b == "triton":
        _check_triton_dtype(param, "param")
    _seeded_axpy_op(param, seed_to_i64(seed), param_id, ks_t, c, dist, float(alpha), b)
    return param


def seeded_dot(tensor: torch.Tensor, seed: int, param_id: int, ks, dist: str = "rademacher",
               backend: str | None = None, check_finite: bool = True) -> torch.Tensor:
    """``out[j] = <v(seed, param_id, ks[j]), tensor>`` for every j: float32 [len(ks)].

    No perturbation is materialized (cpu/cuda/triton backends); fp32 accumulation
    in a fixed order (deterministic for a given backend and shape).
    With ``check_finite`` a NaN/Inf in ``tensor`` (seen as a non-finite result)
    raises ValueError instead of returning NaN.
    """
    check_float_tensor(tensor, "tensor")
    seed = check_seed(seed)
    param_id = check_u32(param_id, "param_id")
    check_dist(dist)
    view2d(tensor, "tensor")
    ks_t = check_ks(ks, tensor.device)
    b = backends.resolve("seeded_dot", tensor.device, backend)
    if b == "triton":
        _check_triton_dtype(tensor, "tensor")
    out = _seeded_dot_op(tensor, seed_to_i64(seed), param_id, ks_t, dist, b)
    if check_finite and out.numel() and not torch.compiler.is_compiling() and not bool(torch.isfinite(out).all()):
        raise ValueError("tensor: contains NaN or Inf (seeded_dot result is not finite)")
    return out
