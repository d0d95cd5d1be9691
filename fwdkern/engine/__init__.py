"""Whole-model forward gradients for Hugging Face models (and any nn.Module with LoRALinear layers).

* :func:`patch` puts :class:`fwdkern.LoRALinear` adapters into a model (or converts a peft LoRA
  model), freezes the rest and assigns stable param ids; with ``base_quant`` it keeps the frozen
  base quantized (:func:`quantize_base`; :func:`dequantize_base` gives the float model back)
  (:mod:`.patching`).
* :func:`jvp` runs one dual forward: the primal loss and ``∇L·v_k`` for K seeded
  perturbations ``v_k = v(seed, param_id, ks[k])`` of the trainable tensors (:mod:`.forward`).
* :func:`perturbed_loss` gives ``L(θ ± εv_k)`` (FwdLLM perturbed inference); :func:`batch_loss` the
  loss :func:`jvp` reports, from one plain forward.
* :func:`save_adapter` / :func:`load_adapter` use peft's on-disk format (:mod:`.peft_io`).

Mechanism: :mod:`fwdkern.dual` (a Dual tensor through unmodified model code). LoRALinear
layers run the fused ``lora_linear_dual`` op (their perturbations never exist in memory);
full trainable tensors (``modules_to_save`` heads) get materialized stacked tangents.
For causal LM the LM head gets no tangent: ``∂L/∂h`` (h = final hidden state) is computed
once from the primal in vocabulary chunks and the loss tangent is ``⟨∂L/∂h, ḣ_k⟩`` (:mod:`.losses`).
"""
from .config import FwdkernConfig  # noqa: F401
from .forward import PerSampleUnsupported, batch_loss, capture_input, jvp, loss_terms, perturbed_loss  # noqa: F401
from .patching import (DEFAULT_TARGET_OVERRIDES, default_targets, dequantize_base, patch, quantize_base,  # noqa: F401
                       trainable)
from .peft_io import load_adapter, save_adapter  # noqa: F401

__all__ = ["patch", "trainable", "jvp", "perturbed_loss", "batch_loss", "save_adapter", "load_adapter", "default_targets",
           "FwdkernConfig", "DEFAULT_TARGET_OVERRIDES", "quantize_base", "dequantize_base"]
