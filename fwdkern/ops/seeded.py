"""Seeded-perturbation ops: perturbation, seeded_axpy_, seeded_dot.

Each public op validates its arguments (fwdkern/ops/_validate.py), resolves a backend
(:mod:`fwdkern.backends`) and calls one ``torch.library`` custom op, whose body checks the
tensor values (ks, coeffs, a finite result) and runs the backend's registered
implementation. The fake kernels make the ops traceable by torch.compile (fullgraph) and
answer for meta tensors. Perturbations are generated from ``(seed, param_id, k, element)``
as specified in docs/perturbations.md and are never materialized by the cpu/cuda/triton
backends.
"""
from __future__ import annotations

import torch

from .. import backends
from ._validate import (
    DTYPE_CODE,
    check_coeffs,
    check_coeffs_values,
    check_dist,
    check_finite_result,
    check_float_tensor,
    check_inplace_target,
    check_ks,
    check_ks_values,
    check_scalar,
    check_seed,
    check_shape,
    check_stream_shape,
    check_u32,
    seed_from_i64,
    seed_to_i64,
    view2d,
)
from .reference import as_rows_cols

# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("fwdkern::perturbation", mutates_args=())
def _perturbation_op(shape: list[int], seed: int, param_id: int, k: int, dist: str, dtype: torch.dtype,
                     device: torch.device, backend: str) -> torch.Tensor:
    if device.type == "meta":  # no tensor argument routes this call to the fake kernel
        return torch.empty(shape, dtype=dtype, device=device)
    return backends.implementation("perturbation", backend)(shape, seed_from_i64(seed), param_id, k, dist, dtype,
                                                            device)


@_perturbation_op.register_fake
def _(shape, seed, param_id, k, dist, dtype, device, backend):
    return torch.empty(shape, dtype=dtype, device=device)


@torch.library.custom_op("fwdkern::seeded_axpy_", mutates_args=("param",))
def _seeded_axpy_op(param: torch.Tensor, seed: int, param_id: int, ks: torch.Tensor, coeffs: torch.Tensor,
                    dist: str, alpha: float, backend: str, check_finite: bool = True) -> None:
    check_ks_values(ks)
    if check_finite:
        check_coeffs_values(coeffs)
    backends.implementation("seeded_axpy_", backend)(param, seed_from_i64(seed), param_id, ks, coeffs, dist, alpha)


@_seeded_axpy_op.register_fake
def _(param, seed, param_id, ks, coeffs, dist, alpha, backend, check_finite=True):
    return None


@torch.library.custom_op("fwdkern::seeded_dot", mutates_args=())
def _seeded_dot_op(tensor: torch.Tensor, seed: int, param_id: int, ks: torch.Tensor, dist: str,
                   backend: str, check_finite: bool = True) -> torch.Tensor:
    check_ks_values(ks)
    out = backends.implementation("seeded_dot", backend)(tensor, seed_from_i64(seed), param_id, ks, dist)
    if check_finite:
        check_finite_result(out, "tensor", "seeded_dot")
    return out


@_seeded_dot_op.register_fake
def _(tensor, seed, param_id, ks, dist, backend, check_finite=True):
    return tensor.new_empty((ks.shape[0],), dtype=torch.float32)


# ----------------------------------------------------------------------------- public API


def perturbation(shape, seed: int, param_id: int, k: int, dist: str = "rademacher", dtype: torch.dtype = torch.float32,
                 device="cpu", backend: str | None = None) -> torch.Tensor:
    """Materialize one perturbation ``v(seed, param_id, k)`` (for tests and debugging).

    Args:
        shape: output shape (non-negative ints); element (row, col) of its
            [prod(shape[:-1]), shape[-1]] view is the stream element defined in docs/perturbations.md.
        seed: int in [0, 2^64). param_id, k: ints in [0, 2^32).
        dist: "rademacher" (±1, bit-identical on every backend) or "gaussian".
        dtype: float32, float16 or bfloat16. device: output device (meta: shape only).
        backend: None/"auto", "cpu", "cuda", "triton" or "reference".
    """
    shape = check_shape(shape)
    seed = check_seed(seed)
    param_id = check_u32(param_id, "param_id")
    k = check_u32(k, "k")
    check_dist(dist)
    check_stream_shape(*as_rows_cols(shape), dist, "shape")
    if dtype not in DTYPE_CODE:
        raise TypeError(f"dtype: {dtype} is not supported (float32, float16, bfloat16)")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    b = backends.resolve("perturbation", device, backend, dtype=dtype)
    return _perturbation_op(list(shape), seed_to_i64(seed), param_id, k, dist, dtype, device, b)


def _check_alpha(alpha, check_finite: bool) -> float:
    if check_finite:
        return check_scalar(alpha, "alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"alpha: expected a float, got {type(alpha).__name__}")
    return float(alpha)


def seeded_axpy_(param: torch.Tensor, seed: int, param_id: int, ks, coeffs, dist: str = "rademacher",
                 alpha: float = 1.0, backend: str | None = None, check_finite: bool = True) -> torch.Tensor:
    """In place: ``param += alpha * sum_j coeffs[j] * v(seed, param_id, ks[j])``.

    No perturbation is materialized (cpu/cuda/triton backends): memory is O(numel).
    Accumulation is fp32; ``param`` is rounded once.

    Args:
        param: float32/float16/bfloat16 tensor, any device; strided views are handled, views
            whose elements overlap in memory are refused. Like torch's in-place ops, a leaf
            that requires grad is refused outside ``torch.no_grad()``.
        ks: 1-D integer tensor or sequence, values in [0, 2^32) (any indices, not only 0..K-1).
        coeffs: 1-D float tensor or sequence of len(ks); must be finite in float32 (check_finite).
        alpha: scalar multiplier (finite, within float32's range, when check_finite).
    Returns ``param``.
    """
    check_float_tensor(param, "param")
    seed = check_seed(seed)
    param_id = check_u32(param_id, "param_id")
    check_dist(dist)
    view2d(param, "param", writable=True, dist=dist)
    check_inplace_target(param, "param")
    alpha = _check_alpha(alpha, check_finite)
    ks_t = check_ks(ks, param.device)
    c = check_coeffs(coeffs, ks_t.numel(), param.device)
    b = backends.resolve("seeded_axpy_", param.device, backend, dtype=param.dtype)
    _seeded_axpy_op(param, seed_to_i64(seed), param_id, ks_t, c, dist, alpha, b, bool(check_finite))
    return param


def seeded_dot(tensor: torch.Tensor, seed: int, param_id: int, ks, dist: str = "rademacher",
               backend: str | None = None, check_finite: bool = True) -> torch.Tensor:
    """``out[j] = <v(seed, param_id, ks[j]), tensor>`` for every j: float32 [len(ks)].

    No perturbation is materialized (cpu/cuda/triton backends); fp32 accumulation
    in a fixed order (deterministic for a given backend and shape).
    With ``check_finite`` a NaN/Inf in ``tensor`` (seen as a non-finite result)
    raises ValueError instead of returning NaN, compiled or not.
    """
    check_float_tensor(tensor, "tensor")
    seed = check_seed(seed)
    param_id = check_u32(param_id, "param_id")
    check_dist(dist)
    view2d(tensor, "tensor", dist=dist)
    ks_t = check_ks(ks, tensor.device)
    b = backends.resolve("seeded_dot", tensor.device, backend, dtype=tensor.dtype)
    return _seeded_dot_op(tensor, seed_to_i64(seed), param_id, ks_t, dist, b, bool(check_finite))
