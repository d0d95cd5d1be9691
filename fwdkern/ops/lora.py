"""LoRA linear ops with seeded tangents: dual forward and perturbed (finite-difference) forward.

Layer: ``y = x Wᵀ + b + s·(x Aᵀ) Bᵀ`` with W [out, in] frozen, A [r, in], B [out, r],
optional b [out], s = ``scaling``. Each trainable tensor has its own param id, and its
k-th perturbation is the stream ``v(seed, param_id, ks[k])`` of docs/perturbations.md:
``dA_k`` [r, in], ``dB_k`` [out, r], ``db_k`` [out]; tensors not listed in ``perturb``
have zero tangent.

* :func:`lora_linear_dual` — primal and K exact tangents (what ``torch.func.jvp`` gives):
  ``ẏ_k = ẋ_k Wᵀ + s·(ẋ_k Aᵀ + x dA_kᵀ) Bᵀ + s·(x Aᵀ) dB_kᵀ + db_k``.
* :func:`lora_linear_perturbed` — FwdLLM's ``y±_k = x (W + s(B ± ε dB_k)(A ± ε dA_k))ᵀ + (b ± ε db_k)``,
  computed in low rank (the dense GEMM runs once, at M rows).

* :func:`seeded_matmul` — ``x @ v(seed, param_id, ks[k])ᵀ``, the seeded rank-r product.

A frozen base kept quantized (int8 / int4, :class:`fwdkern.ops.quant.QuantizedWeight`) is passed as
``weight``; the call then runs ``fwdkern::quant_lora_linear_dual`` / ``..._perturbed``, whose
backends compute the dense GEMM over the (1+K)·M stacked rows on the quantized weight (docs/quantization.md).
The result equals the float op on ``weight.dequantize()`` up to rounding.

Each is a ``torch.library`` custom op (``fwdkern::lora_linear_dual``, ...) with a fake
kernel. The public functions below validate every argument once, resolve the backend
(:mod:`fwdkern.backends`) and call the op, whose body checks the ks values and runs the
backend's registered implementation (fwdkern/ops/_cpu.py, _cuda.py, _triton.py,
reference_lora.py). Not differentiable by autograd (forward-gradient use only).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import backends
from ._qformat import QuantizedWeight
from ._validate import (
    check_dist,
    check_float_tensor,
    check_ks,
    check_ks_values,
    check_like,
    check_linear,
    check_scalar,
    check_seed,
    check_stream_shape,
    check_tangents,
    check_u32,
    seed_from_i64,
    seed_to_i64,
)

PERTURB_NAMES = ("A", "B", "bias")


# ----------------------------------------------------------------------------- custom ops
# A float base travels as one tensor ``weight``, a quantized one as ``QuantizedWeight.op_args()``;
# the bodies are one function for both (:func:`_run`), and so are the fake kernels.


def _run(op, backend, head, seed, pids, ks, tail, perturb):
    """The body of every LoRA op: the ks values, then the implementation the backend registered for `op`,
    called with (*head, seed, pids, ks, *tail, perturb)."""
    check_ks_values(ks)
    return backends.implementation(op, backend)(*head, seed_from_i64(seed), pids, ks, *tail, perturb)


def _dual_fake(x, out_f, ks):
    out_shape = (*x.shape[:-1], out_f)
    return x.new_empty(out_shape), x.new_empty((ks.shape[0], *out_shape))


def _perturbed_fake(x, out_f, ks):
    shape = (ks.shape[0], *x.shape[:-1], out_f)
    return x.new_empty(shape), x.new_empty(shape)


@torch.library.custom_op("fwdkern::lora_linear_dual", mutates_args=())
def _lora_dual_op(x: torch.Tensor, x_tangents: Optional[torch.Tensor], weight: torch.Tensor,
                  bias: Optional[torch.Tensor], lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                  seed: int, pid_A: int, pid_B: int, pid_bias: int, ks: torch.Tensor, dist: str,
                  perturb_A: bool, perturb_B: bool, perturb_bias: bool,
                  backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _run("lora_linear_dual", backend, (x, x_tangents, weight, bias, lora_A, lora_B, scaling), seed,
                (pid_A, pid_B, pid_bias), ks, (dist,), (perturb_A, perturb_B, perturb_bias))


@_lora_dual_op.register_fake
def _(x, x_tangents, weight, bias, lora_A, lora_B, scaling, seed, pid_A, pid_B, pid_bias, ks, dist, perturb_A,
      perturb_B, perturb_bias, backend):
    return _dual_fake(x, weight.shape[0], ks)


@torch.library.custom_op("fwdkern::lora_linear_perturbed", mutates_args=())
def _lora_perturbed_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                       lora_B: torch.Tensor, scaling: float, seed: int, pid_A: int, pid_B: int, pid_bias: int,
                       ks: torch.Tensor, eps: float, dist: str, perturb_A: bool, perturb_B: bool,
                       perturb_bias: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _run("lora_linear_perturbed", backend, (x, weight, bias, lora_A, lora_B, scaling), seed,
                (pid_A, pid_B, pid_bias), ks, (eps, dist), (perturb_A, perturb_B, perturb_bias))


@_lora_perturbed_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, seed, pid_A, pid_B, pid_bias, ks, eps, dist, perturb_A, perturb_B,
      perturb_bias, backend):
    return _perturbed_fake(x, weight.shape[0], ks)


@torch.library.custom_op("fwdkern::quant_lora_linear_dual", mutates_args=())
def _quant_lora_dual_op(x: torch.Tensor, x_tangents: Optional[torch.Tensor], qdata: torch.Tensor,
                        scales: torch.Tensor, offsets: Optional[torch.Tensor], bits: int, group_size: int,
                        bias: Optional[torch.Tensor], lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                        seed: int, pid_A: int, pid_B: int, pid_bias: int, ks: torch.Tensor, dist: str,
                        perturb_A: bool, perturb_B: bool, perturb_bias: bool,
                        backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    qw = QuantizedWeight(qdata, scales, offsets, bits, group_size, x.shape[-1])
    return _run("quant_lora_linear_dual", backend, (x, x_tangents, qw, bias, lora_A, lora_B, scaling), seed,
                (pid_A, pid_B, pid_bias), ks, (dist,), (perturb_A, perturb_B, perturb_bias))


@_quant_lora_dual_op.register_fake
def _(x, x_tangents, qdata, scales, offsets, bits, group_size, bias, lora_A, lora_B, scaling, seed, pid_A, pid_B,
      pid_bias, ks, dist, perturb_A, perturb_B, perturb_bias, backend):
    return _dual_fake(x, qdata.shape[0], ks)


@torch.library.custom_op("fwdkern::quant_lora_linear_perturbed", mutates_args=())
def _quant_lora_perturbed_op(x: torch.Tensor, qdata: torch.Tensor, scales: torch.Tensor,
                             offsets: Optional[torch.Tensor], bits: int, group_size: int,
                             bias: Optional[torch.Tensor], lora_A: torch.Tensor, lora_B: torch.Tensor,
                             scaling: float, seed: int, pid_A: int, pid_B: int, pid_bias: int, ks: torch.Tensor,
                             eps: float, dist: str, perturb_A: bool, perturb_B: bool, perturb_bias: bool,
                             backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    qw = QuantizedWeight(qdata, scales, offsets, bits, group_size, x.shape[-1])
    return _run("quant_lora_linear_perturbed", backend, (x, qw, bias, lora_A, lora_B, scaling), seed,
                (pid_A, pid_B, pid_bias), ks, (eps, dist), (perturb_A, perturb_B, perturb_bias))


@_quant_lora_perturbed_op.register_fake
def _(x, qdata, scales, offsets, bits, group_size, bias, lora_A, lora_B, scaling, seed, pid_A, pid_B, pid_bias, ks,
      eps, dist, perturb_A, perturb_B, perturb_bias, backend):
    return _perturbed_fake(x, qdata.shape[0], ks)


# op name -> custom op (the quantized base's ops are "quant_" + the float op's name).
_OPS = {"lora_linear_dual": _lora_dual_op, "lora_linear_perturbed": _lora_perturbed_op,
        "quant_lora_linear_dual": _quant_lora_dual_op, "quant_lora_linear_perturbed": _quant_lora_perturbed_op}


def _weight_args(weight) -> tuple:
    """The custom-op arguments that carry the frozen weight (one tensor, or a QuantizedWeight's op_args)."""
    return weight.op_args() if isinstance(weight, QuantizedWeight) else (weight,)


@torch.library.custom_op("fwdkern::seeded_matmul", mutates_args=())
def _seeded_matmul_op(x: torch.Tensor, seed: int, param_id: int, ks: torch.Tensor, n: int, dist: str,
                      backend: str) -> torch.Tensor:
    check_ks_values(ks)
    return backends.implementation("seeded_matmul", backend)(x, seed_from_i64(seed), param_id, ks, n, dist)


@_seeded_matmul_op.register_fake
def _(x, seed, param_id, ks, n, dist, backend):
    return x.new_empty((ks.shape[0], *x.shape[:-1], n), dtype=torch.float32)


# ----------------------------------------------------------------------------- validation


def _check_perturb(perturb) -> tuple[bool, bool, bool]:
    if isinstance(perturb, str):
        perturb = (perturb,)
    try:
        names = list(perturb)
    except TypeError:
        raise TypeError(f"perturb: expected a sequence of names from {PERTURB_NAMES}, got {perturb!r}") from None
    for n in names:
        if n not in PERTURB_NAMES:
            raise ValueError(f"perturb: unknown tensor name {n!r} (expected some of {', '.join(PERTURB_NAMES)})")
    return tuple(n in names for n in PERTURB_NAMES)


def _check_param_ids(param_ids, perturb) -> tuple[int, int, int]:
    """(pid_A, pid_B, pid_bias); ids of tensors that are not perturbed may be None (passed as 0)."""
    if isinstance(param_ids, dict):
        unknown = set(param_ids) - set(PERTURB_NAMES)
        if unknown:
            raise ValueError(f"param_ids: unknown keys {sorted(unknown)} (expected {', '.join(PERTURB_NAMES)})")
        ids = [param_ids.get(n) for n in PERTURB_NAMES]
    elif isinstance(param_ids, (tuple, list)):
        if len(param_ids) not in (2, 3):
            raise ValueError(f"param_ids: expected (A, B) or (A, B, bias) ids, got {len(param_ids)} values")
        ids = list(param_ids) + [None] * (3 - len(param_ids))
    else:
        raise TypeError(f"param_ids: expected a dict or tuple (A, B, bias) of ints, got {type(param_ids).__name__}")
    out = []
    for name, pid, on in zip(PERTURB_NAMES, ids, perturb):
        if pid is None:
            if on:
                raise ValueError(f"param_ids: no id for perturbed tensor {name!r}")
            out.append(0)
        else:
            out.append(check_u32(pid, f"param_ids[{name!r}]"))
    used = [(n, p) for n, p, on in zip(PERTURB_NAMES, out, perturb) if on]
    if len({p for _, p in used}) != len(used):
        # Equal ids would give equal (correlated) random words to different tensors.
        raise ValueError(f"param_ids: perturbed tensors share an id: {dict(used)}")
    return tuple(out)


def _check_layer(x, weight, bias, lora_A, lora_B):
    out_f, in_f = check_linear(x, weight, bias)
    for t, name in ((lora_A, "lora_A"), (lora_B, "lora_B")):
        check_float_tensor(t, name)
    if lora_A.dim() != 2 or lora_A.shape[1] != in_f:
        raise ValueError(f"lora_A: expected [r, {in_f}], got shape {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    if lora_B.dim() != 2 or tuple(lora_B.shape) != (out_f, r):
        raise ValueError(f"lora_B: expected [{out_f}, {r}] (out_features, r), got shape {tuple(lora_B.shape)}")
    check_like(x, (("lora_A", lora_A), ("lora_B", lora_B)))


def _common(x, weight, bias, lora_A, lora_B, scaling, seed, param_ids, ks, dist, perturb, backend, op):
    """Every check of a LoRA op call; returns (scaling, seed, flags, pids, ks tensor, custom op, backend)."""
    _check_layer(x, weight, bias, lora_A, lora_B)
    s = check_scalar(scaling, "scaling")
    seed = check_seed(seed)
    check_dist(dist)
    flags = _check_perturb(perturb)
    if flags[2] and bias is None:
        raise ValueError("perturb: 'bias' is perturbed but bias is None")
    pids = _check_param_ids(param_ids, flags)
    (out_f, in_f), r = weight.shape, lora_A.shape[0]
    for on, name, rows, cols in zip(flags, ("lora_A", "lora_B", "bias"), (r, out_f, 1), (in_f, r, out_f)):
        if on:
            check_stream_shape(rows, cols, dist, name)
    ks_t = check_ks(ks, x.device)
    if isinstance(weight, QuantizedWeight):
        op = "quant_" + op
    b = backends.resolve(op, x.device, backend, dtype=x.dtype)
    return s, seed, flags, pids, ks_t, _OPS[op], b


# ----------------------------------------------------------------------------- public API


def lora_linear_dual(x: torch.Tensor, x_tangents: Optional[torch.Tensor], weight: torch.Tensor,
                     bias: Optional[torch.Tensor], lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                     seed: int, param_ids, ks, dist: str = "rademacher", perturb=("A", "B"),
                     backend: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dual forward of a LoRA linear layer with K seeded tangents.

    ``y = x Wᵀ + b + s·(x Aᵀ) Bᵀ``;
    ``ẏ_k = ẋ_k Wᵀ + s·(ẋ_k Aᵀ + x dA_kᵀ) Bᵀ + s·(x Aᵀ) dB_kᵀ + db_k`` (exact JVP along
    ``(dA_k, dB_k, db_k, ẋ_k)``; perturbations generated from the seed, never stored).

    Args:
        x: [..., in] float32/float16/bfloat16 (any number of batch dims, incl. none).
        x_tangents: [K, ..., in] same dtype/device as x, or None (ẋ = 0: the first perturbed layer).
        weight: [out, in] frozen base weight, or a :class:`fwdkern.ops.quant.QuantizedWeight` (int8 / int4
            base: the dense GEMM runs on the quantized weight); bias: [out] or None. lora_A: [r, in];
            lora_B: [out, r]. All in x's dtype (a quantized weight: any compute dtype) and on x's device.
        scaling: s (alpha / r). seed: int in [0, 2^64).
        param_ids: dict {"A", "B", "bias"} -> int in [0, 2^32), or tuple (A, B[, bias]);
            ids of unperturbed tensors may be None. See :func:`fwdkern.nn.param_id`.
        ks: 1-D ints in [0, 2^32): the perturbation indices (K = len(ks)).
        dist: "rademacher" or "gaussian". perturb: which of "A", "B", "bias" get tangents.
        backend: None/"auto", "cpu", "cuda", "triton" or "reference".
    Returns:
        (y [..., out], y_tangents [K, ..., out]) in x's dtype; low-rank parts accumulate in fp32.
    """
    s, seed, flags, pids, ks_t, op, b = _common(x, weight, bias, lora_A, lora_B, scaling, seed, param_ids, ks,
                                                dist, perturb, backend, "lora_linear_dual")
    if x_tangents is not None:
        check_tangents(x_tangents, x, "x_tangents", "x", K=ks_t.numel(), layout="[len(ks), *x.shape]")
    return op(x, x_tangents, *_weight_args(weight), bias, lora_A, lora_B, s, seed_to_i64(seed), *pids, ks_t, dist,
              *flags, b)


def lora_linear_perturbed(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                          lora_B: torch.Tensor, scaling: float, seed: int, param_ids, ks, eps: float,
                          dist: str = "rademacher", perturb=("A", "B"),
                          backend: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Perturbed inference (FwdLLM finite differences) of a LoRA linear layer.

    ``y±_k = x (W + s(B ± ε dB_k)(A ± ε dA_k))ᵀ + (b ± ε db_k)``, computed in low rank
    (the dense GEMM runs once; nothing of size [out, in] is formed).
    ``(y+ − y−) / 2ε`` equals the dual tangent with ẋ = 0 (exactly, the layer is bilinear).

    Args: as :func:`lora_linear_dual`, plus ``eps``: finite ε > 0.
    Returns:
        (y_plus, y_minus), each [K, ..., out] in x's dtype.
    """
    s, seed, flags, pids, ks_t, op, b = _common(x, weight, bias, lora_A, lora_B, scaling, seed, param_ids, ks,
                                                dist, perturb, backend, "lora_linear_perturbed")
    e = check_scalar(eps, "eps", positive=True)
    return op(x, *_weight_args(weight), bias, lora_A, lora_B, s, seed_to_i64(seed), *pids, ks_t, e, dist, *flags, b)


def seeded_matmul(x: torch.Tensor, seed: int, param_id: int, ks, n: int, dist: str = "rademacher",
                  backend: Optional[str] = None) -> torch.Tensor:
    """``out[k] = x @ v(seed, param_id, ks[k])ᵀ`` with v_k of shape [n, x.shape[-1]], never materialized.

    x: [..., D] float32/float16/bfloat16. Returns float32 [K, ..., n] (fp32 accumulation).
    """
    check_float_tensor(x, "x")
    if x.dim() < 1:
        raise ValueError("x: expected at least 1 dimension [..., D]")
    seed = check_seed(seed)
    param_id = check_u32(param_id, "param_id")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n: expected a non-negative int, got {n!r}")
    check_dist(dist)
    check_stream_shape(n, x.shape[-1], dist, "x")
    ks_t = check_ks(ks, x.device)
    b = backends.resolve("seeded_matmul", x.device, backend, dtype=x.dtype)
    return _seeded_matmul_op(x, seed_to_i64(seed), param_id, ks_t, n, dist, b)
