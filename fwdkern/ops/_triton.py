"""Host code of the ``triton`` backend: lays validated tensors out for the kernels of fwdkern/triton/.

Importing this module imports triton; fwdkern.backends imports it only when a call resolves
to the triton backend.
"""
from __future__ import annotations

import torch

from .. import backends
from ..triton import attention as tri_attention
from ..triton import lora as tri_lora
from ..triton import seeded as tri_seeded
from . import _compose
from ._qformat import dequantize_reference
from ._validate import DIST_CODE, as2d


@backends.register("perturbation", "triton")
def perturbation(shape, seed, param_id, k, dist, dtype, device):
    out = torch.empty(shape, dtype=dtype, device=device)
    tri_seeded.perturbation(as2d(out), seed, param_id, k, DIST_CODE[dist])
    return out


@backends.register("seeded_axpy_", "triton")
def seeded_axpy_(param, seed, param_id, ks, coeffs, dist, alpha):
    tri_seeded.seeded_axpy(as2d(param), seed, param_id, ks, coeffs, alpha, DIST_CODE[dist])


@backends.register("seeded_dot", "triton")
def seeded_dot(tensor, seed, param_id, ks, dist):
    return tri_seeded.seeded_dot(as2d(tensor), seed, param_id, ks, DIST_CODE[dist])


@backends.register("seeded_matmul", "triton")
def seeded_matmul(x, seed, param_id, ks, n, dist):
    out = tri_lora.seeded_matmul_nt(_compose.rows2d(x, x.shape[-1]), seed, param_id, ks, n, DIST_CODE[dist])
    return out.view(ks.numel(), *x.shape[:-1], n)


@backends.register("lora_linear_dual", "triton")
def lora_dual(x, x_tangents, weight, bias, lora_A, lora_B, scaling, seed, pids, ks, dist, perturb):
    out_f, _, _, K, batch, x2, xt3 = _compose.layer_rows(x, x_tangents, weight, lora_A, ks)
    y, yt = tri_lora.lora_dual(x2, xt3, weight, bias, lora_A, lora_B, float(scaling), seed, *pids, ks,
                               DIST_CODE[dist], *perturb)
    return y.reshape(*batch, out_f), yt.reshape(K, *batch, out_f)


@backends.register("lora_linear_perturbed", "triton")
def lora_perturbed(x, weight, bias, lora_A, lora_B, scaling, seed, pids, ks, eps, dist, perturb):
    out_f, _, _, K, batch, x2, _ = _compose.layer_rows(x, None, weight, lora_A, ks)
    yp, ym = tri_lora.lora_perturbed(x2, weight, bias, lora_A, lora_B, float(scaling), seed,
                                     *pids, ks, float(eps), DIST_CODE[dist], *perturb)
    return yp.reshape(K, *batch, out_f), ym.reshape(K, *batch, out_f)


@backends.register("dual_attention", "triton")
def dual_attention(q, k, v, q_t, k_t, v_t, attn_mask, is_causal, scale, chunk, tangent_dtype):
    return tri_attention.dual_attention_triton(q, k, v, q_t, k_t, v_t, attn_mask, is_causal, scale)


# The quantized base: the same kernels with the dense loop dequantizing W tiles in registers. The float
# copy outside the ops (QuantizedWeight.dequantize) is torch ops on the device.
backends.register("dequantize", "triton")(dequantize_reference)


@backends.register("quant_linear_dual", "triton")
def quant_linear_dual(x, x_tangents, qw, bias):
    out_f, in_f = qw.shape
    x2 = _compose.rows2d(x, in_f)
    K = x_tangents.shape[0] if x_tangents is not None else 0
    xt3 = x_tangents.reshape(K, x2.shape[0], in_f) if x_tangents is not None else None
    y, yt = tri_lora.linear_dual(x2, xt3, qw, bias)
    return y.reshape(*x.shape[:-1], out_f), yt.reshape(K, *x.shape[:-1], out_f)


@backends.register("quant_lora_linear_dual", "triton")
def quant_lora_dual(x, x_tangents, qw, bias, lora_A, lora_B, scaling, seed, pids, ks, dist, perturb):
    return lora_dual(x, x_tangents, qw, bias, lora_A, lora_B, scaling, seed, pids, ks, dist, perturb)


@backends.register("quant_lora_linear_perturbed", "triton")
def quant_lora_perturbed(x, qw, bias, lora_A, lora_B, scaling, seed, pids, ks, eps, dist, perturb):
    return lora_perturbed(x, qw, bias, lora_A, lora_B, scaling, seed, pids, ks, eps, dist, perturb)
