"""Host compositions of the LoRA ops that any backend with two kernels can run.

A backend brings

* ``seeded_mm(x2d, x_stride_k, seed, pid, ks, dist, n, out, alpha, accumulate)``:
  ``out[k] (+)= alpha * X_k @ v(seed, pid, ks[k])[n, D]ᵀ`` into fp32 ``out`` [K, M, n] (any
  strides), with ``X_k`` the [M, D] view ``x2d`` shifted by ``k * x_stride_k`` elements;
* ``perturbation``: its registered ``perturbation`` implementation;

and gets ``seeded_matmul``, ``lora_dual`` and ``lora_perturbed`` from here: dense GEMMs run
through torch, every seeded rank-r product through ``seeded_mm``, the bias perturbations
through ``perturbation``. The ``cuda`` backend runs all three; ``cpu`` runs the first and the
last (its dual forward has fused C++ kernels and shares :func:`add_dense`). The tests run
these functions with the cpu kernels, so the composition the cuda backend uses is checked on
machines without a GPU.

:func:`quant_linear_dual` is the frozen layer on a quantized weight for a backend that brings a
``dequantize(weight, dtype)``: the ``cpu`` backend (C++ dequantization, fp32 GEMMs) and the
``cuda`` backend (torch ops, GEMMs in x's dtype) both run it.

Arguments are validated by the public ops (fwdkern/ops/lora.py); accumulation is fp32.
"""
from __future__ import annotations

import math

import torch

from ._qformat import dense_chunks

F32 = torch.float32


def rows2d(x: torch.Tensor, D: int) -> torch.Tensor:
    """[..., D] -> [M, D] (explicit sizes: D or M may be 0)."""
    return x.reshape(math.prod(x.shape[:-1]), D)


def layer_rows(x, x_tangents, weight, lora_A, ks):
    """(out, in, r, K, batch dims, x as [M, in], x_tangents as [K, M, in] or None) of a LoRA call."""
    out_f, in_f = weight.shape
    x2 = rows2d(x, in_f)
    K = ks.numel()
    xt3 = x_tangents.reshape(K, x2.shape[0], in_f) if x_tangents is not None else None
    return out_f, in_f, lora_A.shape[0], K, x.shape[:-1], x2, xt3


def seeded_matmul(x, seed, param_id, ks, n, dist, seeded_mm):
    """float32 [K, ..., n]: ``x @ v(seed, param_id, ks[k])ᵀ``."""
    D = x.shape[-1]
    x2 = rows2d(x, D)
    out = torch.empty((ks.numel(), x2.shape[0], n), dtype=F32, device=x.device)
    seeded_mm(x2, 0, seed, param_id, ks, dist, n, out, 1.0, False)
    return out.view(ks.numel(), *x.shape[:-1], n)


def bias_perturbations(out_f, seed, pid, ks, dist, device, perturbation) -> torch.Tensor:
    """fp32 [K, out]: db_k = v(seed, pid, ks[k]) of shape [out]."""
    db = torch.empty((ks.numel(), out_f), dtype=F32, device=device)
    for j, k in enumerate(ks.tolist()):
        db[j] = perturbation([out_f], seed, pid, k, dist, F32, device)
    return db


def folds(x_tangents_given: bool, dtype, K: int, M: int, in_f: int, out_f: int) -> bool:
    """Whether the tangent rows' ẋ_k Wᵀ + s·(ẋ_k Aᵀ)Bᵀ run as one GEMM with W + s·BA.

    Folding s·BA into the dense weight once (out·in·r FMAs) beats the rank-r path for the tangent
    rows (K·M·r·(in + out) FMAs plus a second read of ẋ) whenever K·M·(in + out) > in·out.
    fp32 only: a rounded low-precision W_eff would add an error torch's own low-precision layer
    does not have.
    """
    return x_tangents_given and K > 0 and dtype == F32 and K * M * (in_f + out_f) > in_f * out_f


def add_dense(y, yt, x2, xt3, W, A, B, s, fold):
    """Adds the dense part to the fp32 low-rank parts y [M, out], yt [K, M, out]; returns them in x's dtype.

    fp32: GEMMs with beta = 1 (y is read once inside the GEMM instead of in extra passes); the
    K·M tangent rows are already stacked in xt3 (no torch.cat copy). fp16/bf16: torch's GEMM
    rounds to the dtype; it is added to the fp32 low-rank part and rounded once more."""
    K, M, out_f = yt.shape
    has_t = xt3 is not None and K > 0
    if x2.dtype == F32:
        y.addmm_(x2, W.t())
        if has_t:
            W_t = torch.addmm(W, B, A, alpha=s) if fold else W
            yt.view(K * M, out_f).addmm_(xt3.reshape(K * M, x2.shape[1]), W_t.t())
        return y, yt
    y += torch.mm(x2, W.t())
    if has_t:
        yt += torch.mm(xt3.reshape(K * M, x2.shape[1]), W.t()).view(K, M, out_f)
    return y.to(x2.dtype), yt.to(x2.dtype)


def lora_dual(x, x_tangents, weight, bias, lora_A, lora_B, scaling, seed, pids, ks, dist, perturb, seeded_mm,
              perturbation):
    """(y [..., out], y_tangents [K, ..., out]) of fwdkern.lora_linear_dual.

    H_0 = x Aᵀ and H_k = ẋ_k Aᵀ + x dA_kᵀ (rank r); y = s·H_0 Bᵀ + b + x Wᵀ and
    ẏ_k = s·(H_k Bᵀ + H_0 dB_kᵀ) + db_k + ẋ_k Wᵀ."""
    out_f, in_f, r, K, batch, x2, xt3 = layer_rows(x, x_tangents, weight, lora_A, ks)
    M, (pA, pB, pb) = x2.shape[0], perturb
    fold = folds(xt3 is not None, x.dtype, K, M, in_f, out_f)
    A32, B32 = lora_A.to(F32), lora_B.to(F32)
    h = torch.mm(x2.to(F32), A32.t())  # [M, r]
    y = torch.mm(h, B32.t()).mul_(scaling)
    if bias is not None:
        y += bias.to(F32)
    yt = torch.zeros((K, M, out_f), dtype=F32, device=x.device)
    ht = None
    if xt3 is not None and K > 0 and not fold:
        # ẋ_k Aᵀ in x's dtype, as torch's own low-precision LoRA layer rounds h.
        ht = torch.mm(xt3.reshape(K * M, in_f), lora_A.t()).to(F32).view(K, M, r)
    if pA and K > 0:
        g = torch.empty((K, M, r), dtype=F32, device=x.device)
        seeded_mm(x2, 0, seed, pids[0], ks, dist, r, g, 1.0, False)
        ht = g if ht is None else ht.add_(g)
    if ht is not None:
        yt.view(K * M, out_f).addmm_(ht.view(K * M, r), B32.t(), alpha=scaling)
    if pB and K > 0:
        seeded_mm(h, 0, seed, pids[1], ks, dist, out_f, yt, scaling, True)
    if pb and K > 0:
        yt += bias_perturbations(out_f, seed, pids[2], ks, dist, x.device, perturbation).unsqueeze(1)
    y, yt = add_dense(y, yt, x2, xt3, weight, lora_A, lora_B, scaling, fold)
    return y.reshape(*batch, out_f), yt.reshape(K, *batch, out_f)


def lora_perturbed(x, weight, bias, lora_A, lora_B, scaling, seed, pids, ks, eps, dist, perturb, seeded_mm,
                   perturbation):
    """(y_plus, y_minus), each [K, ..., out], of fwdkern.lora_linear_perturbed.

    y±_k = (xWᵀ + b) + s·H±_k (B ± ε dB_k)ᵀ ± ε db_k with H±_k = xAᵀ ± ε x dA_kᵀ: the dense
    GEMM runs once at M rows; everything else is rank r (fp32)."""
    out_f, _, r, K, batch, x2, _ = layer_rows(x, None, weight, lora_A, ks)
    M, (pA, pB, pb) = x2.shape[0], perturb
    A32, B32 = lora_A.to(F32), lora_B.to(F32)
    base = torch.mm(x2, weight.t()).to(F32)
    if bias is not None:
        base += bias.to(F32)
    h = torch.mm(x2.to(F32), A32.t())  # [M, r]
    g = None
    if pA and K > 0:
        g = torch.empty((K, M, r), dtype=F32, device=x.device)
        seeded_mm(x2, 0, seed, pids[0], ks, dist, r, g, 1.0, False)
    else:
        base.addmm_(h, B32.t(), alpha=scaling)  # A unperturbed: s·h Bᵀ is shared by every k and sign
    db = bias_perturbations(out_f, seed, pids[2], ks, dist, x.device, perturbation) if (pb and K > 0) else None
    outs = []
    for sign in (1.0, -1.0):
        Y = base.expand(K, M, out_f).clone()
        Hs = h
        if g is not None:
            Hs = torch.add(h, g, alpha=sign * eps)  # [K, M, r]
            Y.view(K * M, out_f).addmm_(Hs.view(K * M, r), B32.t(), alpha=scaling)
        if pB and K > 0:
            # X_k = H±_k (one [M, r] slab per k, stride M·r) or the shared h.
            seeded_mm(Hs if g is None else Hs[0], 0 if g is None else M * r, seed, pids[1], ks, dist, out_f, Y,
                      sign * eps * scaling, True)
        if db is not None:
            Y.add_(db.unsqueeze(1), alpha=sign * eps)
        outs.append(Y.to(x.dtype).reshape(K, *batch, out_f))
    return outs[0], outs[1]


def quant_linear_dual(x, x_tangents, qw, bias, dequantize, dtype):
    """(y [..., out], y_tangents [K, ..., out]) of fwdkern.ops.quant.quant_linear_dual, computed in `dtype`
    and returned in x's dtype (one rounding when they differ).

    y = x Wqᵀ + b, ẏ_k = ẋ_k Wqᵀ: each row block of Wq is dequantized once (:func:`dense_chunks`, with
    the backend's `dequantize`) and serves the primal rows and all K·M tangent rows (two GEMMs)."""
    out_f, in_f = qw.shape
    x2 = rows2d(x, in_f).to(dtype)
    M = x2.shape[0]
    K = x_tangents.shape[0] if x_tangents is not None else 0
    xt2 = x_tangents.reshape(K * M, in_f).to(dtype) if x_tangents is not None else None
    b = None if bias is None else bias.to(dtype)
    y = torch.empty((M, out_f), dtype=dtype, device=x.device)
    yt = torch.empty((K * M, out_f), dtype=dtype, device=x.device)
    for n0, n1, Wc in dense_chunks(qw, dtype, dequantize):
        bc = None if b is None else b[n0:n1]
        if n0 == 0 and n1 == out_f:  # the whole weight: GEMMs straight into the outputs
            torch.mm(x2, Wc.t(), out=y) if bc is None else torch.addmm(bc, x2, Wc.t(), out=y)
            if xt2 is not None:
                torch.mm(xt2, Wc.t(), out=yt)
        else:
            y[:, n0:n1] = x2 @ Wc.t() if bc is None else torch.addmm(bc, x2, Wc.t())
            if xt2 is not None:
                yt[:, n0:n1] = xt2 @ Wc.t()
    return y.reshape(*x.shape[:-1], out_f).to(x.dtype), yt.reshape(K, *x.shape[:-1], out_f).to(x.dtype)
