"""Host code of the ``cuda`` backend: the CUDA kernels of fwdkern._C on validated CUDA tensors.

Kernels run on the tensors' device and torch's current stream of that device. The LoRA ops
are the compositions of fwdkern/ops/_compose.py over the CUDA seeded matmul and perturbation
kernels (dense GEMMs through torch).
"""
from __future__ import annotations

import torch

from .. import backends
from . import _compose
from ._qformat import dequantize_reference
from ._validate import DIST_CODE, DTYPE_CODE, as2d, dims2d
from .reference_attention import block_dual_attention

F32 = torch.float32
# csrc/cuda/lora_ops.cu launches one grid z-slice per perturbation (at most 65535).
MAX_K_PER_LAUNCH = 65535


def _stream(device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


@backends.register("perturbation", "cuda")
def perturbation(shape, seed, param_id, k, dist, dtype, device):
    out = torch.empty(shape, dtype=dtype, device=device)
    v = as2d(out)
    with torch.cuda.device(out.device):
        backends.extension().cuda_perturbation(v.data_ptr(), DTYPE_CODE[dtype], *dims2d(v), seed, param_id, k,
                                               DIST_CODE[dist], _stream(out.device))
    return out


@backends.register("seeded_axpy_", "cuda")
def seeded_axpy_(param, seed, param_id, ks, coeffs, dist, alpha):
    v = as2d(param)
    with torch.cuda.device(param.device):
        backends.extension().cuda_seeded_axpy(v.data_ptr(), DTYPE_CODE[param.dtype], *dims2d(v), seed, param_id,
                                              ks.data_ptr(), coeffs.data_ptr(), ks.numel(), alpha, DIST_CODE[dist],
                                              _stream(param.device))


@backends.register("seeded_dot", "cuda")
def seeded_dot(tensor, seed, param_id, ks, dist):
    ext = backends.extension()
    v = as2d(tensor)
    K = ks.numel()
    out = torch.empty(K, dtype=F32, device=tensor.device)
    ws = torch.empty(ext.cuda_seeded_dot_workspace(v.shape[0], v.shape[1], K), dtype=F32, device=tensor.device)
    with torch.cuda.device(tensor.device):
        ext.cuda_seeded_dot(v.data_ptr(), DTYPE_CODE[tensor.dtype], *dims2d(v), seed, param_id, ks.data_ptr(), K,
                            DIST_CODE[dist], out.data_ptr(), ws.data_ptr(), _stream(tensor.device))
    return out


def seeded_mm(x2d, x_stride_k, seed, pid, ks, dist, n, out, alpha, accumulate):
    """out[k] (+)= alpha * X_k @ v(seed, pid, ks[k])[n, D]ᵀ (the contract of fwdkern/ops/_compose.py)."""
    ext = backends.extension()
    K = ks.numel()
    with torch.cuda.device(x2d.device):
        stream = _stream(x2d.device)
        for j0 in range(0, K, MAX_K_PER_LAUNCH):
            j1 = min(K, j0 + MAX_K_PER_LAUNCH)
            ext.cuda_seeded_matmul(
                x2d.data_ptr() + j0 * x_stride_k * x2d.element_size(), DTYPE_CODE[x2d.dtype], x2d.shape[0],
                x2d.shape[1], x_stride_k, x2d.stride(0), x2d.stride(1), seed, pid, ks[j0:j1].data_ptr(), j1 - j0,
                DIST_CODE[dist], n, out[j0:j1].data_ptr(), out.stride(0), out.stride(1), out.stride(2), float(alpha),
                bool(accumulate), stream)


@backends.register("seeded_matmul", "cuda")
def seeded_matmul(x, seed, param_id, ks, n, dist):
    return _compose.seeded_matmul(x, seed, param_id, ks, n, dist, seeded_mm)


@backends.register("lora_linear_dual", "cuda")
def lora_dual(x, x_tangents, weight, bias, lora_A, lora_B, scaling, seed, pids, ks, dist, perturb):
    with torch.cuda.device(x.device):
        return _compose.lora_dual(x, x_tangents, weight, bias, lora_A, lora_B, scaling, seed, pids, ks, dist,
                                  perturb, seeded_mm, perturbation)


@backends.register("lora_linear_perturbed", "cuda")
def lora_perturbed(x, weight, bias, lora_A, lora_B, scaling, seed, pids, ks, eps, dist, perturb):
    with torch.cuda.device(x.device):
        return _compose.lora_perturbed(x, weight, bias, lora_A, lora_B, scaling, seed, pids, ks, eps, dist, perturb,
                                       seeded_mm, perturbation)


backends.register("dual_attention", "cuda")(block_dual_attention)


# ----------------------------------------------------------------------------- quantized base
# Composition: the weight is dequantized with torch ops on the device into x's dtype (one layer, or
# one row block of a large LM head, at a time), then the float ops above run on it.
backends.register("dequantize", "cuda")(dequantize_reference)


@backends.register("quant_linear_dual", "cuda")
def quant_linear_dual(x, x_tangents, qw, bias):
    with torch.cuda.device(x.device):
        return _compose.quant_linear_dual(x, x_tangents, qw, bias, dequantize_reference, x.dtype)


@backends.register("quant_lora_linear_dual", "cuda")
def quant_lora_dual(x, x_tangents, qw, bias, lora_A, lora_B, scaling, seed, pids, ks, dist, perturb):
    return lora_dual(x, x_tangents, dequantize_reference(qw, x.dtype), bias, lora_A, lora_B, scaling, seed, pids, ks,
                     dist, perturb)


@backends.register("quant_lora_linear_perturbed", "cuda")
def quant_lora_perturbed(x, qw, bias, lora_A, lora_B, scaling, seed, pids, ks, eps, dist, perturb):
    return lora_perturbed(x, dequantize_reference(qw, x.dtype), bias, lora_A, lora_B, scaling, seed, pids, ks, eps,
                          dist, perturb)
