"""peft's on-disk adapter format: ``adapter_model.safetensors`` + ``adapter_config.json`` (LoRA and
IA3 load in peft; BitFit and bottleneck adapters, which peft does not have, use the same two files)."""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from ..nn.lora import LoRALinear
from .config import FwdkernConfig
from .losses import loss_kind
from .patching import get_config, is_seq_cls, patch, trainable

__all__ = ["save_adapter", "load_adapter", "adapter_state"]

PREFIX = "base_model.model."


def adapter_state(model) -> dict[str, torch.Tensor]:
    """peft-named adapter tensors of `model`: every trainable tensor (LoRA A/B, IA3 vectors, biases,
    bottleneck adapters, full modules_to_save) under ``base_model.model.<state-dict name>``."""
    cfg = get_config(model)
    if cfg.train_bias and cfg.peft_type == "lora":
        raise ValueError("save_adapter: train_bias=True (peft bias='lora_only') is not supported by the peft "
                         "format writer yet")
    return {f"{PREFIX}{n}": p for n, _, p in trainable(model)}


def _task_type(model):
    if is_seq_cls(model):
        return "SEQ_CLS"
    try:
        return "CAUSAL_LM" if loss_kind(model, "auto") == "causal_lm" else None
    except ValueError:
        return None


def save_adapter(model: nn.Module, directory: str) -> None:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` (peft LoRA format)."""
    from safetensors.torch import save_file

    cfg = get_config(model)
    os.makedirs(directory, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in adapter_state(model).items()}
    save_file(sd, os.path.join(directory, "adapter_model.safetensors"), metadata={"format": "pt"})
    base = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(cfg.to_peft_json(_task_type(model), base), f, indent=2, sort_keys=True)


def load_adapter(model: nn.Module, directory: str) -> nn.Module:
    """Load a peft LoRA adapter directory into `model` (patched first from its config if needed).

    Strict: every adapter tensor of the model must be in the file and every tensor of the file must
    be an adapter tensor of the model, with the same shape -- all checked before anything is written."""
    from safetensors.torch import load_file

    path = os.path.join(directory, "adapter_config.json")
    with open(path) as f:
        pcfg = FwdkernConfig.from_peft_json(json.load(f), where=path)
    if getattr(model, "fwdkern_config", None) is None and not any(isinstance(m, LoRALinear) for m in model.modules()):
        if pcfg.peft_type == "lora":
            patch(model, r=pcfg.r, alpha=pcfg.alpha, target_modules=pcfg.target_modules, dropout=pcfg.dropout,
                  modules_to_save=pcfg.modules_to_save or None)
        else:
            patch(model, peft=pcfg.peft_type, target_modules=pcfg.target_modules,
                  modules_to_save=pcfg.modules_to_save or None, feedforward_modules=pcfg.feedforward_modules,
                  reduction=pcfg.reduction)
    sd = load_file(os.path.join(directory, "adapter_model.safetensors"))
    own = adapter_state(model)
    unexpected = sorted(k for k in sd if k not in own)
    missing = sorted(k for k in own if k not in sd)
    if unexpected or missing:
        raise ValueError(f"{directory}: adapter does not fit the model: unexpected keys {unexpected[:5]}"
                         f"{' (not adapter tensors of this model: a base weight is never loaded)' if unexpected else ''}"
                         f", missing keys {missing[:5]}")
    wrong = [(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in sd if tuple(sd[k].shape) != tuple(own[k].shape)]
    if wrong:
        k, got, want = wrong[0]
        raise ValueError(f"{directory}: {k} has shape {got}, the model's is {want} (e.g. another LoRA rank); "
                         f"{len(wrong)} tensor(s) differ")
    with torch.no_grad():
        for k, v in sd.items():
            own[k].copy_(v)
    return model
