"""LoRA linear ops with seeded tangents: dual forward and perturbed (finite-difference) forward.

Layer: ``y = x Wᵀ + b + s·(x Aᵀ) Bᵀ`` with W [out, in] frozen, A [r, in], B [out, r],
optional b [out], s = ``scaling``. Each trainable tensor has its own param id, and its
k-th perturbation is the stream ``v(seed, param_id, ks[k])`` of docs/perturbations.md:
``dA_k`` [r, in], ``dB_k`` [out, r], ``db_k`` [out]; tensors not listed in ``perturb``
have zero tangent.

* :func:`lora_linear_dual` — primal and K exact tangents (what ``torch.func.jvp`` gives):
  ``ẏ_k = ẋ_k Wᵀ + s·(ẋ_k Aᵀ + x dA_kᵀ) Bᵀ + s·(x Aᵀ) dB_kᵀ + db_k``.
  (Issue 3 writes ``ẋ_k W_effᵀ + s(ẋ_k Aᵀ + …)Bᵀ`` with ``W_eff = W + sBA``, which
  counts ``s·ẋ_k AᵀBᵀ`` twice; the exact derivative above is implemented.)
* :func:`lora_linear_perturbed` — FwdLLM's ``y±_k = x (W + s(B ± ε dB_k)(A ± ε dA_k))ᵀ + (b ± ε db_k)``,
  computed in low rank (the dense GEMM runs once, at M rows).

Both are ``torch.library`` custom ops (``fwdkern::lora_linear_dual``,
``fwdkern::lora_linear_perturbed``) with fake kernels; the backend is chosen by
:mod:`fwdkern.backends`. Not differentiable by autograd (forward-gradient use only).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import backends
from . import reference_lora as ref
from ._validate import (
    DIST_CODE,
    DTYPE_CODE,
    check_dist,
    check_float_tensor,
    check_ks,
    check_seed,
    check_u32,
    seed_from_i64,
    seed_to_i64,
)

PERTURB_NAMES = ("A", "B", "bias")


def _triton_lora():
    from ..triton import lora as tl_lora

    return tl_lora


# ----------------------------------------------------------------------------- cpu helpers


def _seeded_mm(x2d: torch.Tensor, seed: int, pid: int, ks: torch.Tensor, code: int, n: int, out: torch.Tensor,
               alpha: float, accumulate: bool, x_stride_k: int = 0):
    """out[k] (+)= alpha * X_k @ v(seed, pid, ks[k])[n, D]ᵀ via the C++ kernel.

    x2d: [M, D] view of X_0 (X_k = X_0 shifted by k * x_stride_k elements); out: fp32 [K, M, n]
    (any strides)."""
    backends.extension().cpu_seeded_matmul(
        x2d.data_ptr(), DTYPE_CODE[x2d.dtype], x2d.shape[0], x2d.shape[1], x_stride_k, x2d.stride(0),
        x2d.stride(1), seed, pid, ks.data_ptr(), ks.numel(), code, n, out.data_ptr(), out.stride(0),
        out.stride(1), out.stride(2), float(alpha), bool(accumulate))


def _cpu_bias_perturbations(out_f: int, seed: int, pid: int, ks: torch.Tensor, code: int) -> torch.Tensor:
    """fp32 [K, out]: db_k = v(seed, pid, ks[k]) of shape [out]."""
    ext = backends.extension()
    db = torch.empty((ks.numel(), out_f), dtype=torch.float32)
    for j, k in enumerate(ks.tolist()):
        ext.cpu_perturbation(db[j].data_ptr(), DTYPE_CODE[torch.float32], 1, out_f, out_f, 1, seed, pid, k, code)
    return db


def _cpu_dual(x2, xt3, W, b, A, B, s, seed, pids, ks, code, pA, pB, pb):
    """x2 [M, in], xt3 [K, M, in] or None -> (y [M, out], yt [K, M, out]) in x2.dtype.

    C++ (fp32 accumulation): H = [xAᵀ; ẋ_kAᵀ + x dA_kᵀ] (shrink), then
    Y = [s·H_0Bᵀ + b; s·(H_kBᵀ + H_0 dB_kᵀ) + db_k] (expand, one write pass). The dense
    part is then added by torch GEMMs with beta = 1, so Y is read once inside the GEMM
    instead of in extra passes."""
    ext = backends.extension()
    M, in_f = x2.shape
    out_f, r, K = W.shape[0], A.shape[0], ks.numel()
    dt, f32 = x2.dtype, torch.float32
    has_t = xt3 is not None and K > 0
    # ẋ_k Wᵀ + s·(ẋ_k Aᵀ)Bᵀ = ẋ_k (W + s·BA)ᵀ: folding s·BA into the dense weight once
    # (out·in·r FMAs) beats the rank-r path for the tangent rows (K·M·r·(in + out) FMAs plus a
    # second read of ẋ) whenever K·M·(in + out) > in·out. fp32 only: a rounded low-precision
    # W_eff would add an error torch's own low-precision layer does not have.
    # NOTE: M=512, in=out=1024, r=8, K=8 on 2 cores: shrink+expand 13 ms -> 7 ms per call.
    fold = has_t and dt == f32 and K * M * (in_f + out_f) > in_f * out_f
    H = torch.empty((1 + K, M, r), dtype=f32)
    y = torch.empty((M, out_f), dtype=f32)  # separate buffers: outputs must not be views
    yt = torch.empty((K, M, out_f), dtype=f32)
    if has_t and not fold:
        xt_args = (xt3.data_ptr(), DTYPE_CODE[dt], xt3.stride(0), xt3.stride(1), xt3.stride(2))
    else:
        xt_args = (0, 0, 0, 0, 0)
    ext.cpu_lora_shrink(x2.data_ptr(), DTYPE_CODE[dt], M, in_f, x2.stride(0), x2.stride(1), *xt_args,
                        A.data_ptr(), DTYPE_CODE[A.dtype], r, A.stride(0), A.stride(1), seed, pids[0], ks.data_ptr(),
                        K, code, pA, H.data_ptr())
    bias_args = (b.data_ptr(), DTYPE_CODE[b.dtype], b.stride(0)) if b is not None else (0, 0, 0)
    ext.cpu_lora_expand(H.data_ptr(), M, r, B.data_ptr(), DTYPE_CODE[B.dtype], out_f, B.stride(0), B.stride(1),
                        *bias_args, float(s), seed, pids[1], pids[2], ks.data_ptr(), K, code, pB, pb,
                        pA or (has_t and not fold), y.data_ptr(), yt.data_ptr())
    # Dense part. The K·M tangent rows are already stacked in xt3 (no torch.cat copy).
    if dt == f32:
        y.addmm_(x2, W.t())
        if has_t:
            W_t = torch.addmm(W, B, A, alpha=s) if fold else W
            yt.view(K * M, out_f).addmm_(xt3.reshape(K * M, in_f), W_t.t())
        return y, yt
    # fp16/bf16: torch's GEMM rounds to dt; add it to the fp32 low-rank part and round once more.
    y += torch.mm(x2, W.t())
    if has_t:
        yt += torch.mm(xt3.reshape(K * M, in_f), W.t()).view(K, M, out_f)
    return y.to(dt), yt.to(dt)


def _cpu_perturbed(x2, W, b, A, B, s, seed, pids, ks, eps, code, pA, pB, pb):
    """x2 [M, in] -> (y_plus, y_minus) each [K, M, out] in x2.dtype.

    y±_k = (xWᵀ + b) + s·H±_k (B ± ε dB_k)ᵀ ± ε db_k with H±_k = xAᵀ ± ε x dA_kᵀ:
    the dense GEMM runs once at M rows; everything else is rank r (fp32)."""
    M, in_f = x2.shape
    out_f, r, K = W.shape[0], A.shape[0], ks.numel()
    dt, f32 = x2.dtype, torch.float32
    A32, B32 = A.to(f32), B.to(f32)
    base = torch.mm(x2, W.t()).to(f32)
    if b is not None:
        base += b.to(f32)
    h = torch.mm(x2.to(f32), A32.t())  # [M, r]
    g = None
    if pA and K:
        g = torch.empty((K, M, r), dtype=f32)
        _seeded_mm(x2, seed, pids[0], ks, code, r, g, 1.0, False)
    else:
        base.addmm_(h, B32.t(), alpha=s)  # A unperturbed: s·h Bᵀ is shared by every k and sign
    db = _cpu_bias_perturbations(out_f, seed, pids[2], ks, code) if (pb and K) else None
    outs = []
    for sign in (1.0, -1.0):
        Y = base.expand(K, M, out_f).clone()
        Hs = h
        if g is not None:
            Hs = torch.add(h, g, alpha=sign * eps)  # [K, M, r]
            Y.view(K * M, out_f).addmm_(Hs.view(K * M, r), B32.t(), alpha=s)
        if pB and K:
            # X_k = H±_k (one [M, r] slab per k, stride M·r) or the shared h.
            _seeded_mm(Hs if g is None else Hs[0], seed, pids[1], ks, code, out_f, Y, sign * eps * s, True,
                       x_stride_k=0 if g is None else M * r)
        if db is not None:
            Y.add_(db.unsqueeze(1), alpha=sign * eps)
        outs.append(Y.to(dt))
    return outs[0], outs[1]


# ----------------------------------------------------------------------------- custom ops


def _flat(x: torch.Tensor, in_f: int) -> torch.Tensor:
    return x.reshape(-1, in_f)


@torch.library.custom_op("fwdkern::lora_linear_dual", mutates_args=())
def _lora_dual_op(x: torch.Tensor, x_tangents: Optional[torch.Tensor], weight: torch.Tensor,
                  bias: Optional[torch.Tensor], lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                  seed: int, pid_A: int, pid_B: int, pid_bias: int, ks: torch.Tensor, dist: str,
                  perturb_A: bool, perturb_B: bool, perturb_bias: bool,
                  backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    seed = seed_from_i64(seed)
    pids = (pid_A, pid_B, pid_bias)
    perturb = (perturb_A, perturb_B, perturb_bias)
    if backend == "reference":
        return ref.reference_lora_dual(x, x_tangents, weight, bias, lora_A, lora_B, scaling, seed, pids, ks, dist,
                                       perturb)
    out_f, in_f = weight.shape
    K = ks.numel()
    batch = x.shape[:-1]
    x2 = _flat(x, in_f)
    M = x2.shape[0]
    xt3 = x_tangents.reshape(K, M, in_f) if x_tangents is not None else None
    code = DIST_CODE[dist]
    if backend == "cpu":
        y, yt = _cpu_dual(x2, xt3, weight, bias, lora_A, lora_B, scaling, seed, pids, ks, code, *perturb)
    elif backend == "triton":
        y, yt = _triton_lora().lora_dual(
            x2.contiguous(), xt3.contiguous() if xt3 is not None else None, weight.contiguous(),
            bias.contiguous() if bias is not None else None, lora_A.contiguous(), lora_B.contiguous(),
            float(scaling), seed, pid_A, pid_B, pid_bias if perturb_bias else 0, ks, code, *perturb)
    else:
        raise backends.BackendUnavailable(f"lora_linear_dual: backend {backend!r} has no LoRA kernels")
    return y.reshape(*batch, out_f), yt.reshape(K, *batch, out_f)


@_lora_dual_op.register_fake
def _(x, x_tangents, weight, bias, lora_A, lora_B, scaling, seed, pid_A, pid_B, pid_bias, ks, dist, perturb_A,
      perturb_B, perturb_bias, backend):
    out_shape = (*x.shape[:-1], weight.shape[0])
    return x.new_empty(out_shape), x.new_empty((ks.shape[0], *out_shape))


@torch.library.custom_op("fwdkern::lora_linear_perturbed", mutates_args=())
def _lora_perturbed_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                       lora_B: torch.Tensor, scaling: float, seed: int, pid_A: int, pid_B: int, pid_bias: int,
                       ks: torch.Tensor, eps: float, dist: str, perturb_A: bool, perturb_B: bool,
                       perturb_bias: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    seed = seed_from_i64(seed)
    pids = (pid_A, pid_B, pid_bias)
    perturb = (perturb_A, perturb_B, perturb_bias)
    if backend == "reference":
        return ref.reference_lora_perturbed(x, weight, bias, lora_A, lora_B, scaling, seed, pids, ks, eps, dist,
                                            perturb)
    out_f, in_f = weight.shape
    K = ks.numel()
    batch = x.shape[:-1]
    x2 = _flat(x, in_f)
    code = DIST_CODE[dist]
    if backend == "cpu":
        yp, ym = _cpu_perturbed(x2, weight, bias, lora_A, lora_B, scaling, seed, pids, ks, eps, code, *perturb)
    elif backend == "triton":
        yp, ym = _triton_lora().lora_perturbed(
            x2.contiguous(), weight.contiguous(), bias.contiguous() if bias is not None else None,
            lora_A.contiguous(), lora_B.contiguous(), float(scaling), seed, pid_A, pid_B,
            pid_bias if perturb_bias else 0, ks, float(eps), code, *perturb)
    else:
        raise backends.BackendUnavailable(f"lora_linear_perturbed: backend {backend!r} has no LoRA kernels")
    return yp.reshape(K, *batch, out_f), ym.reshape(K, *batch, out_f)


@_lora_perturbed_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, seed, pid_A, pid_B, pid_bias, ks, eps, dist, perturb_A, perturb_B,
      perturb_bias, backend):
    shape = (ks.shape[0], *x.shape[:-1], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape)


@torch.library.custom_op("fwdkern::seeded_matmul", mutates_args=())
def _seeded_matmul_op(x: torch.Tensor, seed: int, param_id: int, ks: torch.Tensor, n: int, dist: str,
                      backend: str) -> torch.Tensor:
    seed = seed_from_i64(seed)
    if backend == "reference":
        return ref.reference_seeded_matmul(x, seed, param_id, ks, n, dist)
    K, D = ks.numel(), x.shape[-1]
    x2 = x.reshape(-1, D)
    if backend == "triton":
        out = _triton_lora().seeded_matmul_nt(x2.contiguous(), seed, param_id, ks, n, DIST_CODE[dist])
        return out.view(K, *x.shape[:-1], n)
    if backend != "cpu":
        raise backends.BackendUnavailable(f"seeded_matmul: backend {backend!r} has no kernel (cpu, triton, reference)")
    out = torch.empty((K, x2.shape[0], n), dtype=torch.float32)
    _seeded_mm(x2, seed, param_id, ks, DIST_CODE[dist], n, out, 1.0, False)
    return out.view(K, *x.shape[:-1], n)


@_seeded_matmul_op.register_fake
def _(x, seed, param_id, ks, n, dist, backend):
    return x.new_empty((ks.shape[0], *x.shape[:-1], n), dtype=torch.float32)


# ----------------------------------------------------------------------------- validation


def _check_scalar(value, name: str, positive: bool = False) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: {value} is not finite")
    if positive and value <= 0:
        raise ValueError(f"{name}: expected a positive value, got {value}")
    return value


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


def _check_layer(x, weight, bias, lora_A, lora_B, scaling):
    check_float_tensor(x, "x")
    for t, name in ((weight, "weight"), (lora_A, "lora_A"), (lora_B, "lora_B")):
        check_float_tensor(t, name)
    if bias is not None:
        check_float_tensor(bias, "bias")
    if x.dim() < 1:
        raise ValueError("x: expected at least 1 dimension [..., in_features]")
    if weight.dim() != 2:
        raise ValueError(f"weight: expected [out_features, in_features], got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    if x.shape[-1] != in_f:
        raise ValueError(f"x: last dimension {x.shape[-1]} does not match weight in_features {in_f}")
    if lora_A.dim() != 2 or lora_A.shape[1] != in_f:
        raise ValueError(f"lora_A: expected [r, {in_f}], got shape {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    if lora_B.dim() != 2 or tuple(lora_B.shape) != (out_f, r):
        raise ValueError(f"lora_B: expected [{out_f}, {r}] (out_features, r), got shape {tuple(lora_B.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != out_f):
        raise ValueError(f"bias: expected [{out_f}], got shape {tuple(bias.shape)}")
    named = [("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)]
    if bias is not None:
        named.append(("bias", bias))
    for name, t in named:
        if t.dtype != x.dtype:
            raise TypeError(f"{name}: dtype {t.dtype} differs from x.dtype {x.dtype} (cast it first)")
        if t.device != x.device:
            raise ValueError(f"{name}: on {t.device}, but x is on {x.device}")
    return _check_scalar(scaling, "scaling")


def _common(x, weight, bias, lora_A, lora_B, scaling, seed, param_ids, ks, dist, perturb, backend, op):
    s = _check_layer(x, weight, bias, lora_A, lora_B, scaling)
    seed = check_seed(seed)
    check_dist(dist)
    flags = _check_perturb(perturb)
    if flags[2] and bias is None:
        raise ValueError("perturb: 'bias' is perturbed but bias is None")
    pids = _check_param_ids(param_ids, flags)
    ks_t = check_ks(ks, x.device)
    b = backends.resolve(op, x.device, backend)
    if b == "triton" and x.device.type == "cpu" and x.dtype == torch.bfloat16:
        raise backends.BackendUnavailable(
            "x: bfloat16 is not supported by the Triton interpreter (TRITON_INTERPRET=1); use float32/float16 or "
            "another backend")
    if b == "cuda":
        raise backends.BackendUnavailable(f"{op}: backend 'cuda' has no LoRA kernels yet; use 'triton'")
    return s, seed, flags, pids, ks_t, b


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
        weight: [out, in] frozen base weight; bias: [out] or None. lora_A: [r, in]; lora_B: [out, r].
            All in x's dtype and on x's device.
        scaling: s (alpha / r). seed: int in [0, 2^64).
        param_ids: dict {"A", "B", "bias"} -> int in [0, 2^32), or tuple (A, B[, bias]);
            ids of unperturbed tensors may be None. See :func:`fwdkern.nn.param_id`.
        ks: 1-D ints in [0, 2^32): the perturbation indices (K = len(ks)).
        dist: "rademacher" or "gaussian". perturb: which of "A", "B", "bias" get tangents.
        backend: None/"auto", "cpu", "triton", "reference" ("cuda": not implemented yet).
    Returns:
        (y [..., out], y_tangents [K, ..., out]) in x's dtype; low-rank parts accumulate in fp32.
    """
    s, seed, flags, pids, ks_t, b = _common(x, weight, bias, lora_A, lora_B, scaling, seed, param_ids, ks, dist,
                                            perturb, backend, "lora_linear_dual")
    K = ks_t.numel()
    if x_tangents is not None:
        check_float_tensor(x_tangents, "x_tangents")
        if tuple(x_tangents.shape) != (K, *x.shape):
            raise ValueError(f"x_tangents: expected shape {(K, *x.shape)} ([len(ks), *x.shape]), "
                             f"got {tuple(x_tangents.shape)}")
        if x_tangents.dtype != x.dtype:
            raise TypeError(f"x_tangents: dtype {x_tangents.dtype} differs from x.dtype {x.dtype}")
        if x_tangents.device != x.device:
            raise ValueError(f"x_tangents: on {x_tangents.device}, but x is on {x.device}")
    return _lora_dual_op(x, x_tangents, weight, bias, lora_A, lora_B, s, seed_to_i64(seed), *pids, ks_t, dist,
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
    s, seed, flags, pids, ks_t, b = _common(x, weight, bias, lora_A, lora_B, scaling, seed, param_ids, ks, dist,
                                            perturb, backend, "lora_linear_perturbed")
    e = _check_scalar(eps, "eps", positive=True)
    return _lora_perturbed_op(x, weight, bias, lora_A, lora_B, s, seed_to_i64(seed), *pids, ks_t, e, dist, *flags, b)


def seeded_matmul(x: torch.Tensor, seed: int, param_id: int, ks, n: int, dist: str = "rademacher",
                  backend: Optional[str] = None) -> torch.Tensor:
    """``out[k] = x @ v(seed, param_id, ks[k])ᵀ`` with v_k of shape [n, x.shape[-1]], never materialized.

    x: [..., D] float32/float16/bfloat16. Returns float32 [K, ..., n] (fp32 accumulation).
    Backends: "cpu" (C++), "triton" (fwdkern/triton/lora.py) and "reference".
    """
    check_float_tensor(x, "x")
    if x.dim() < 1:
        raise ValueError("x: expected at least 1 dimension [..., D]")
    seed = check_seed(seed)
    param_id = check_u32(param_id, "param_id")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n: expected a non-negative int, got {n!r}")
    check_dist(dist)
    ks_t = check_ks(ks, x.device)
    b = backends.resolve("seeded_matmul", x.device, backend)
    if b == "cuda":
        raise backends.BackendUnavailable("seeded_matmul: backend 'cuda' has no kernel; use 'triton'")
    if b == "triton" and x.device.type == "cpu" and x.dtype == torch.bfloat16:
        raise backends.BackendUnavailable("x: bfloat16 is not supported by the Triton interpreter (TRITON_INTERPRET=1)")
    return _seeded_matmul_op(x, seed_to_i64(seed), param_id, ks_t, n, dist, b)
