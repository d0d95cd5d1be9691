"""Pure-PyTorch reference of the LoRA ops (materializes every perturbation).

This is the executable specification of the LoRA ops; tests and benchmarks compare the
cpu / cuda / triton backends against it. Perturbations come from
:func:`fwdkern.ops.reference.reference_perturbations` (O(K * numel) memory).

Layer: ``y = x Wᵀ + b + s·(x Aᵀ) Bᵀ``. With ``dA_k = v(seed, pid_A, ks[k])`` [r, in],
``dB_k = v(seed, pid_B, ks[k])`` [out, r], ``db_k = v(seed, pid_bias, ks[k])`` [out]
(zero for tensors not perturbed), the exact tangent (what ``torch.func.jvp`` gives) is
``ẏ_k = ẋ_k Wᵀ + s·(ẋ_k Aᵀ + x dA_kᵀ) Bᵀ + s·(x Aᵀ) dB_kᵀ + db_k``.
"""
from __future__ import annotations

import torch

from .. import backends
from .reference import reference_perturbations


def lora_perturbations(seed: int, pids, ks: torch.Tensor, r: int, in_features: int, out_features: int,
                       dist: str, perturb, device, dtype=torch.float32):
    """(dA [K, r, in], dB [K, out, r], db [K, out]); a tensor not in `perturb` is None.

    pids: (pid_A, pid_B, pid_bias); perturb: (perturb_A, perturb_B, perturb_bias) bools.
    """
    ks = torch.as_tensor(ks, dtype=torch.int64).reshape(-1).cpu()
    shapes = ((r, in_features), (out_features, r), (out_features,))
    return tuple(
        reference_perturbations(shape, seed, pid, ks, dist).to(device=device, dtype=dtype) if on else None
        for shape, pid, on in zip(shapes, pids, perturb)
    )


def _operands(x, weight, bias, lora_A, lora_B, seed, pids, ks, dist, perturb, cd):
    """The layer's tensors in `cd` and its perturbations (dA, dB, db)."""
    x_, W, A, B = (t.to(cd) for t in (x, weight, lora_A, lora_B))
    b = bias.to(cd) if bias is not None else None
    perts = lora_perturbations(seed, pids, ks, A.shape[0], W.shape[1], W.shape[0], dist, perturb, x.device, cd)
    return x_, W, b, A, B, perts


@backends.register("lora_linear_dual", "reference")
def reference_lora_dual(x, x_tangents, weight, bias, lora_A, lora_B, scaling, seed, pids, ks, dist, perturb,
                        compute_dtype=torch.float32, out_dtype=None):
    """(y [..., out], y_tangents [K, ..., out]) in `out_dtype` (default x.dtype), computed in `compute_dtype`.

    x: [..., in]; x_tangents: [K, ..., in] or None (zero); weight [out, in]; bias [out] or None;
    lora_A [r, in]; lora_B [out, r]; pids/perturb as in :func:`lora_perturbations`.
    """
    cd = compute_dtype
    x_, W, b, A, B, (dA, dB, db) = _operands(x, weight, bias, lora_A, lora_B, seed, pids, ks, dist, perturb, cd)
    K, out_f, r = int(torch.as_tensor(ks).numel()), W.shape[0], A.shape[0]
    h = x_ @ A.T  # [..., r]
    y = x_ @ W.T + scaling * (h @ B.T)
    if b is not None:
        y = y + b
    batch = x.shape[:-1]
    yt = torch.zeros((K, *batch, out_f), dtype=cd, device=x.device)
    ht = torch.zeros((K, *batch, r), dtype=cd, device=x.device)
    if x_tangents is not None:
        xt = x_tangents.to(cd)
        yt = yt + xt @ W.T
        ht = ht + xt @ A.T
    if dA is not None:
        # x dA_kᵀ for every k: [K, ..., r]
        ht = ht + torch.einsum("...i,kri->k...r", x_, dA)
    yt = yt + scaling * (ht @ B.T)
    if dB is not None:
        yt = yt + scaling * torch.einsum("...r,kor->k...o", h, dB)
    if db is not None:
        yt = yt + db.reshape(K, *([1] * len(batch)), out_f)
    od = out_dtype or x.dtype
    return y.to(od).contiguous(), yt.to(od).contiguous()


@backends.register("lora_linear_perturbed", "reference")
def reference_lora_perturbed(x, weight, bias, lora_A, lora_B, scaling, seed, pids, ks, eps, dist, perturb,
                             compute_dtype=torch.float32, out_dtype=None):
    """(y_plus, y_minus), each [K, ..., out] in `out_dtype` (default x.dtype):
    ``y±_k = x (W + s(B ± ε dB_k)(A ± ε dA_k))ᵀ + (b ± ε db_k)``, forming the perturbed
    dense weights explicitly (the naive FwdLLM formulation)."""
    cd = compute_dtype
    x_, W, b, A, B, (dA, dB, db) = _operands(x, weight, bias, lora_A, lora_B, seed, pids, ks, dist, perturb, cd)
    K, out_f = int(torch.as_tensor(ks).numel()), W.shape[0]
    batch = x.shape[:-1]
    outs = []
    for sign in (1.0, -1.0):
        ys = []
        for k in range(K):
            Ak = A + sign * eps * dA[k] if dA is not None else A
            Bk = B + sign * eps * dB[k] if dB is not None else B
            Wk = W + scaling * (Bk @ Ak)
            yk = x_ @ Wk.T
            if b is not None:
                yk = yk + b
            if db is not None:
                yk = yk + sign * eps * db[k]
            ys.append(yk)
        y = torch.stack(ys) if ys else torch.zeros((0, *batch, out_f), dtype=cd, device=x.device)
        outs.append(y.to(out_dtype or x.dtype).contiguous())
    return outs[0], outs[1]


@backends.register("seeded_matmul", "reference")
def reference_seeded_matmul(x, seed, param_id, ks, n, dist):
    """float32 [K, ..., n]: ``x @ v(seed, param_id, ks[k])ᵀ`` with v_k of shape [n, x.shape[-1]]."""
    V = reference_perturbations((n, x.shape[-1]), seed, param_id, ks, dist).to(x.device)
    return torch.einsum("...d,knd->k...n", x.to(torch.float32), V).contiguous()
