"""Host code of the ``cpu`` backend: the C++ kernels of fwdkern._C on validated CPU tensors.

The bindings take raw pointers, shapes and strides (no libtorch); the public ops in
fwdkern/ops/ have validated every argument, so this module only lays tensors out for the
kernels.
"""
from __future__ import annotations

import torch

from .. import backends
from . import _compose
from ._validate import DIST_CODE, DTYPE_CODE, as2d, dims2d
from .reference_attention import block_dual_attention

F32 = torch.float32


@backends.register("perturbation", "cpu")
def perturbation(shape, seed, param_id, k, dist, dtype, device):
    out = torch.empty(shape, dtype=dtype, device=device)
    v = as2d(out)
    backends.extension().cpu_perturbation(v.data_ptr(), DTYPE_CODE[dtype], *dims2d(v), seed, param_id, k,
                                          DIST_CODE[dist])
    return out


@backends.register("seeded_axpy_", "cpu")
def seeded_axpy_(param, seed, param_id, ks, coeffs, dist, alpha):
    v = as2d(param)
    backends.extension().cpu_seeded_axpy(v.data_ptr(), DTYPE_CODE[param.dtype], *dims2d(v), seed, param_id,
                                         ks.data_ptr(), coeffs.data_ptr(), ks.numel(), alpha, DIST_CODE[dist])


@backends.register("seeded_dot", "cpu")
def seeded_dot(tensor, seed, param_id, ks, dist):
    v = as2d(tensor)
    out = torch.empty(ks.numel(), dtype=F32)
    backends.extension().cpu_seeded_dot(v.data_ptr(), DTYPE_CODE[tensor.dtype], *dims2d(v), seed, param_id,
                                        ks.data_ptr(), ks.numel(), DIST_CODE[dist], out.data_ptr())
    return out


def seeded_mm(x2d, x_stride_k, seed, pid, ks, dist, n, out, alpha, accumulate):
    """out[k] (+)= alpha * X_k @ v(seed, pid, ks[k])[n, D]ᵀ (the contract of fwdkern/ops/_compose.py)."""
    backends.extension().cpu_seeded_matmul(
        x2d.data_ptr(), DTYPE_CODE[x2d.dtype], x2d.shape[0], x2d.shape[1], x_stride_k, x2d.stride(0),
        x2d.stride(1), seed, pid, ks.data_ptr(), ks.numel(), DIST_CODE[dist], n, out.data_ptr(), out.stride(0),
        out.stride(1), out.stride(2), float(alpha), bool(accumulate))


@backends.register("seeded_matmul", "cpu")
def seeded_matmul(x, seed, param_id, ks, n, dist):
    return _compose.seeded_matmul(x, seed, param_id, ks, n, dist, seeded_mm)


@backends.register("lora_linear_dual", "cpu")
def lora_dual(x, x_tangents, weight, bias, lora_A, lora_B, scaling, seed, pids, ks, dist, perturb):
    """C++ (fp32 accumulation): H = [xAᵀ; ẋ_kAᵀ + x dA_kᵀ] (shrink), then
    Y = [s·H_0Bᵀ + b; s·(H_kBᵀ + H_0 dB_kᵀ) + db_k] (expand, one write pass); then the dense part
    (:func:`fwdkern.ops._compose.add_dense`)."""
    ext = backends.extension()
    out_f, in_f, r, K, batch, x2, xt3 = _compose.layer_rows(x, x_tangents, weight, lora_A, ks)
    M, (pA, pB, pb) = x2.shape[0], perturb
    dt, code = x.dtype, DIST_CODE[dist]
    fold = _compose.folds(xt3 is not None, dt, K, M, in_f, out_f)
    tangent_x = xt3 is not None and K > 0 and not fold
    H = torch.empty((1 + K, M, r), dtype=F32)
    y = torch.empty((M, out_f), dtype=F32)  # separate buffers: outputs must not be views
    yt = torch.empty((K, M, out_f), dtype=F32)
    xt_args = (xt3.data_ptr(), DTYPE_CODE[dt], xt3.stride(0), xt3.stride(1), xt3.stride(2)) if tangent_x \
        else (0, 0, 0, 0, 0)
    ext.cpu_lora_shrink(x2.data_ptr(), DTYPE_CODE[dt], M, in_f, x2.stride(0), x2.stride(1), *xt_args,
                        lora_A.data_ptr(), DTYPE_CODE[dt], r, lora_A.stride(0), lora_A.stride(1), seed, pids[0],
                        ks.data_ptr(), K, code, pA, H.data_ptr())
    bias_args = (bias.data_ptr(), DTYPE_CODE[dt], bias.stride(0)) if bias is not None else (0, 0, 0)
    ext.cpu_lora_expand(H.data_ptr(), M, r, lora_B.data_ptr(), DTYPE_CODE[dt], out_f, lora_B.stride(0),
                        lora_B.stride(1), *bias_args, float(scaling), seed, pids[1], pids[2], ks.data_ptr(), K, code,
                        pB, pb, pA or tangent_x, y.data_ptr(), yt.data_ptr())
    y, yt = _compose.add_dense(y, yt, x2, xt3, weight, lora_A, lora_B, scaling, fold)
    return y.reshape(*batch, out_f), yt.reshape(K, *batch, out_f)


@backends.register("lora_linear_perturbed", "cpu")
def lora_perturbed(x, weight, bias, lora_A, lora_B, scaling, seed, pids, ks, eps, dist, perturb):
    return _compose.lora_perturbed(x, weight, bias, lora_A, lora_B, scaling, seed, pids, ks, eps, dist, perturb,
                                   seeded_mm, perturbation)


backends.register("dual_attention", "cpu")(block_dual_attention)


# ----------------------------------------------------------------------------- quantized base


@backends.register("dequantize", "cpu")
def dequantize(qw, dtype=F32) -> torch.Tensor:
    """The float weight [out, in] of a CPU QuantizedWeight in `dtype` (csrc/cpu/quant_ops.cpp)."""
    out_f, in_f = qw.shape
    out = torch.empty((out_f, in_f), dtype=dtype)
    if out.numel() == 0:
        return out
    ext = backends.extension()
    if qw.bits == 8:
        ext.cpu_dequant_int8(qw.qdata.data_ptr(), qw.qdata.stride(0), qw.scales.data_ptr(), out.data_ptr(),
                             DTYPE_CODE[dtype], out_f, in_f, in_f, 1)
    else:
        ext.cpu_dequant_int4(qw.qdata.data_ptr(), qw.qdata.stride(0), qw.scales.data_ptr(), qw.offsets.data_ptr(),
                             qw.groups, qw.group_size, out.data_ptr(), DTYPE_CODE[dtype], out_f, in_f, in_f, 1)
    return out


def _f32(t):
    return None if t is None else t.to(F32)


@backends.register("quant_linear_dual", "cpu")
def quant_linear_dual(x, x_tangents, qw, bias):
    """C++ dequantization of each row block of Wq (fp32), then fp32 GEMMs; fp16/bf16 inputs are computed
    in fp32 and rounded once (:func:`fwdkern.ops._compose.quant_linear_dual`)."""
    return _compose.quant_linear_dual(x, x_tangents, qw, bias, dequantize, F32)


def _in_f32(x, *tensors):
    """fp16/bf16 operands computed in fp32 (rounded once at the end): torch's fp32 GEMM is the fast one here."""
    return (x, *tensors) if x.dtype == F32 else (x.to(F32), *[_f32(t) for t in tensors])


@backends.register("quant_lora_linear_dual", "cpu")
def quant_lora_dual(x, x_tangents, qw, bias, lora_A, lora_B, scaling, seed, pids, ks, dist, perturb):
    """The float cpu op on W = Wq dequantized to fp32 (one [out, in] temporary for this layer)."""
    x_, xt_, b_, A_, B_ = _in_f32(x, x_tangents, bias, lora_A, lora_B)
    y, yt = lora_dual(x_, xt_, dequantize(qw, F32), b_, A_, B_, scaling, seed, pids, ks, dist, perturb)
    return y.to(x.dtype), yt.to(x.dtype)


@backends.register("quant_lora_linear_perturbed", "cpu")
def quant_lora_perturbed(x, qw, bias, lora_A, lora_B, scaling, seed, pids, ks, eps, dist, perturb):
    x_, b_, A_, B_ = _in_f32(x, bias, lora_A, lora_B)
    yp, ym = lora_perturbed(x_, dequantize(qw, F32), b_, A_, B_, scaling, seed, pids, ks, eps, dist, perturb)
    return yp.to(x.dtype), ym.to(x.dtype)
