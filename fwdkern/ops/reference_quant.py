"""Reference of the ops on a quantized base: dequantize (fwdkern/ops/_qformat.py), then the float
reference. Every backend's quantized ops are tested against these."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import backends
from ._qformat import dequantize_reference
from .reference_lora import reference_lora_dual, reference_lora_perturbed

backends.register("dequantize", "reference")(dequantize_reference)


@backends.register("quant_linear_dual", "reference")
def reference_quant_linear_dual(x, x_tangents, qw, bias):
    W = dequantize_reference(qw, torch.float32)
    y = F.linear(x.float(), W, None if bias is None else bias.float()).to(x.dtype)
    if x_tangents is None:
        return y, x.new_empty((0, *y.shape))
    return y, F.linear(x_tangents.float(), W).to(x.dtype)


@backends.register("quant_lora_linear_dual", "reference")
def reference_quant_lora_dual(x, x_tangents, qw, bias, lora_A, lora_B, scaling, seed, pids, ks, dist, perturb):
    W = dequantize_reference(qw, torch.float32)
    return reference_lora_dual(x, x_tangents, W, bias, lora_A, lora_B, scaling, seed, pids, ks, dist, perturb)


@backends.register("quant_lora_linear_perturbed", "reference")
def reference_quant_lora_perturbed(x, qw, bias, lora_A, lora_B, scaling, seed, pids, ks, eps, dist, perturb):
    W = dequantize_reference(qw, torch.float32)
    return reference_lora_perturbed(x, W, bias, lora_A, lora_B, scaling, seed, pids, ks, eps, dist, perturb)
