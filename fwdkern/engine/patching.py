"""Putting adapters into a model: `patch`, the layer dispatcher, peft conversion, the quantized frozen
base (:func:`quantize_base`, :func:`dequantize_base`), and the trainable tensors with their stable ids
(the one source every other part of fwdkern reads them from). Every walk that changes a model's
structure lives here."""
from __future__ import annotations

import math
import re
from typing import Optional, Sequence

import torch
from torch import nn

from ..nn.lora import LoRALinear, assign_param_ids, param_id
from ..nn.peft_layers import BottleneckAdapter, IA3Linear
from ..nn.quant import QUANT_BUFFERS, QuantEmbedding, QuantLinear, check_group_size, parse_quant
from ..ops._qformat import DEFAULT_GROUP_SIZE, QuantizedWeight, quantize_weight
from .config import FwdkernConfig

__all__ = ["patch", "trainable", "default_targets", "as_lora_linear", "get_config", "DEFAULT_TARGET_OVERRIDES",
           "quantize_base", "dequantize_base"]

# Families peft's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING lacks (peft 0.21: 40 families);
# everything else comes from peft's own table.
DEFAULT_TARGET_OVERRIDES = {
    "distilbert": ["q_lin", "v_lin"],  # absent from peft's table; its attention names differ from BERT's
    "albert": ["query", "value"],  # absent from peft's table
    "phi3": ["qkv_proj"],  # absent from peft's table; fused q/k/v projection
    "gemma3": ["q_proj", "v_proj"],  # peft lists only "gemma3_text"; the multimodal config wraps the same layers
}
_HEAD_NAMES = ("classifier", "score")  # peft adds these to modules_to_save for SEQ_CLS
PEFT_TYPES = ("lora", "ia3", "bitfit", "adapter")
# Bottleneck adapters go after each attention output and feed-forward output (Houlsby's placement;
# FwdLLM's DistilBERT adapter is the feed-forward one).
ADAPTER_TARGETS = {
    "bert": ["output.dense"], "roberta": ["output.dense"], "xlm-roberta": ["output.dense"],
    "electra": ["output.dense"], "albert": ["attention.dense", "ffn_output"],
    "distilbert": ["attention.out_lin", "ffn.lin2"], "gpt2": ["attn.c_proj", "mlp.c_proj"],
}
_DECODER_ADAPTER = ["self_attn.o_proj", "mlp.down_proj"]
IA3_OVERRIDES = {  # families peft's IA3 tables lack: (targets, feed-forward targets)
    "distilbert": (["k_lin", "v_lin", "ffn.lin2"], ["ffn.lin2"]),
    "albert": (["key", "value", "ffn_output"], ["ffn_output"]),
    "electra": (["key", "value", "output.dense"], ["output.dense"]),
}


def _matches(name: str, targets) -> bool:
    if isinstance(targets, str):
        targets = [targets]
    return any(name == t or name.endswith("." + t) for t in targets)


_BLOCK = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)\.")


def _layer_filter(model, layers):
    """path -> whether it lies in one of `layers` (block indices; negative count from the end), as
    peft's layers_to_transform; None keeps every path."""
    if layers is None:
        return lambda path: True
    found = [int(m.group(1)) for path, _ in model.named_modules() for m in [_BLOCK.search(path)] if m]
    if not found:
        raise ValueError("layers: the model has no numbered blocks (layer.N / layers.N / h.N)")
    n = max(found) + 1
    want = {i % n if -n <= i < n else None for i in layers}
    if None in want:
        raise ValueError(f"layers: {list(layers)} outside the model's {n} blocks")

    def keep(path):
        m = _BLOCK.search(path)
        return m is not None and int(m.group(1)) in want
    return keep


def is_seq_cls(model) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification")


def default_targets(model_type: Optional[str]) -> list:
    """LoRA target module names for a transformers ``model_type`` (peft's table + overrides)."""
    if model_type in DEFAULT_TARGET_OVERRIDES:
        return list(DEFAULT_TARGET_OVERRIDES[model_type])
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as table
    except ImportError:
        table = {}
    if model_type not in table:
        raise ValueError(f"target_modules: no default for model_type {model_type!r}; pass target_modules=[...] "
                         "(the names of the nn.Linear layers to adapt, e.g. ['q_proj', 'v_proj'])")
    return list(table[model_type])


def default_peft_targets(peft: str, model_type: Optional[str]) -> tuple:
    """(targets, feed-forward targets) of `peft` for a model type."""
    if peft == "lora":
        return default_targets(model_type), []
    if peft == "adapter":
        return list(ADAPTER_TARGETS.get(model_type, _DECODER_ADAPTER)), []
    if peft == "ia3":
        if model_type in IA3_OVERRIDES:
            t, ff = IA3_OVERRIDES[model_type]
            return list(t), list(ff)
        try:
            from peft.utils.constants import (TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as ffm,
                                              TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as tm)
        except ImportError:
            tm, ffm = {}, {}
        if model_type not in tm:
            raise ValueError(f"target_modules: no IA3 default for model_type {model_type!r}; pass target_modules")
        return list(tm[model_type]), list(ffm.get(model_type, []))
    return [], []


def _out_features(module) -> int:
    w = getattr(module, "weight", None)
    if w is None:
        raise TypeError(f"{type(module).__name__} has no weight: cannot size an adapter for it")
    return w.shape[1] if type(module).__name__ == "Conv1D" else w.shape[0]


def _conv1d_to_linear(conv) -> nn.Linear:
    """HF Conv1D (weight [in, out], y = x W + b) as an nn.Linear (weight [out, in])."""
    nx, nf = conv.weight.shape
    lin = nn.Linear(nx, nf, bias=conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
        if conv.bias is not None:
            lin.bias.copy_(conv.bias)
    return lin


def as_lora_linear(module: nn.Module, path: str, r: int, alpha: float, dropout: float = 0.0,
                   train_bias: bool = False, adapter_dtype=None):
    """(LoRALinear, converted Conv1D?) for a target layer, or (None, False) for a module that is not
    a linear layer (peft's ``_create_new_module`` dispatch: nn.Linear, GPT-2 Conv1D; an existing
    LoRALinear is kept as it is)."""
    if isinstance(module, LoRALinear):
        return module, False
    fifo = False
    if type(module).__name__ == "Conv1D":
        module, fifo = _conv1d_to_linear(module), True
    elif not isinstance(module, nn.Linear):
        return None, False
    return LoRALinear.from_linear(module, r=r, alpha=alpha, dropout=dropout, train_bias=train_bias,
                                  adapter_dtype=adapter_dtype), fifo


def _set_module(root: nn.Module, path: str, new: nn.Module):
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def _from_peft(model, dropout, train_bias):
    """Unwrap a peft PeftModel (LoRA): returns (base transformers model, FwdkernConfig)."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    cfg = model.peft_config[model.active_adapter]
    if getattr(cfg, "use_dora", False) or getattr(cfg, "use_rslora", False):
        raise ValueError("model: peft LoRA with DoRA/rsLoRA is not supported")
    adapter = model.active_adapter
    base = model.base_model.model
    fifo = False
    for path, mod in list(base.named_modules()):
        if isinstance(mod, LoraLayer):
            r, a = mod.r[adapter], mod.lora_alpha[adapter]
            new, conv = as_lora_linear(mod.base_layer, path, r, a, dropout, train_bias,
                                       adapter_dtype=mod.lora_A[adapter].weight.dtype)
            if new is None:
                raise TypeError(f"{path}: peft LoRA on {type(mod.base_layer).__name__} is not supported "
                                "(nn.Linear, Conv1D)")
            fifo = fifo or conv
            if not math.isclose(new.scaling, mod.scaling[adapter]):
                raise ValueError(f"{path}: peft scaling {mod.scaling[adapter]} != alpha / r")
            with torch.no_grad():
                new.lora_A.weight.copy_(mod.lora_A[adapter].weight)
                new.lora_B.weight.copy_(mod.lora_B[adapter].weight)
            _set_module(base, path, new)
    saved = []
    for path, mod in list(base.named_modules()):
        if isinstance(mod, ModulesToSaveWrapper):
            _set_module(base, path, mod.modules_to_save[adapter])
            saved.append(path.rsplit(".", 1)[-1])
    targets = cfg.target_modules
    targets = sorted(targets) if isinstance(targets, (set, list, tuple)) else targets
    return base, FwdkernConfig(r=cfg.r, alpha=cfg.lora_alpha, target_modules=targets, dropout=dropout,
                               train_bias=train_bias, modules_to_save=sorted(set(saved)), fan_in_fan_out=fifo)


def _check_no_shared_adapters(model):
    """A LoRA tensor that another module also holds would get two different tangents."""
    owners: dict = {}
    for mpath, mod in model.named_modules():
        for leaf, p in mod._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append(f"{mpath}.{leaf}" if mpath else leaf)
    for path, mod in model.named_modules():
        if isinstance(mod, LoRALinear):
            for t in (mod.lora_A.weight, mod.lora_B.weight):
                if len(owners.get(id(t), [])) > 1:
                    raise ValueError(f"{path}: a LoRA tensor is shared with {owners[id(t)]}; untie it first")


def patch(model: nn.Module, r: int = 8, alpha: float = 16, target_modules: Optional[Sequence[str]] = None,
          dropout: float = 0.0, train_bias: bool = False, modules_to_save: Optional[Sequence[str]] = None,
          peft: str = "lora", feedforward_modules: Optional[Sequence[str]] = None, reduction: int = 16,
          layers: Optional[Sequence[int]] = None, base_quant: Optional[str] = None, quant_group_size: int = 64,
          embed_quant: Optional[str] = "int8") -> nn.Module:
    """Replace target linear layers by :class:`fwdkern.LoRALinear` and freeze everything else.

    Args:
        model: a ``transformers`` model (or any nn.Module), or a peft ``PeftModel`` with one LoRA adapter
            (converted keeping its weights; r/alpha/targets come from its config and the arguments are
            ignored). GPT-2's Conv1D layers become nn.Linear (weight transposed; peft's ``fan_in_fan_out``).
            Layers that already are LoRALinear (inserted by hand) are kept as they are.
        r, alpha: LoRA rank and alpha (scaling alpha / r). target_modules: module names matched as peft does
            (equal, or ending in ``"." + name``); default per family from peft's table
            (:func:`default_targets`).
        dropout: adapter dropout (plain forward only). train_bias: the targets' biases are trainable.
        modules_to_save: modules trained as full tensors (perturbed like any other trainable tensor);
            default for ``*ForSequenceClassification``: ``classifier`` / ``score``.
        peft: "lora" (LoRALinear), "ia3" (:class:`fwdkern.nn.IA3Linear`, peft's IA3; feedforward_modules
            scale the input), "bitfit" (every bias trainable) or "adapter" (:class:`fwdkern.nn.BottleneckAdapter`
            after each target, hidden = dim // reduction). Defaults per family for each.
        layers: only these transformer blocks get adapters (indices; -1 = the last), like peft's
            layers_to_transform; default all.
        base_quant: None (float base), "int8" (per channel) or "int4" (group-wise): the frozen base is kept
            quantized (:func:`quantize_base`): every frozen linear layer, including the LoRA
            targets' base layers, becomes a :class:`fwdkern.nn.QuantLinear`; the dual and perturbed forwards
            run their dense GEMMs on the quantized weights. quant_group_size: int4 columns per group (even;
            one that does not divide in_features leaves a shorter last group). embed_quant: "int8" (default),
            "int4" or None (float) for the embeddings and the LM head (a tied pair is quantized once).
            Trainable tensors (adapters, modules_to_save, trained biases) stay float. Not with peft="ia3".
    Returns the patched model (for a PeftModel: its unwrapped base model).
    """
    if peft not in PEFT_TYPES:
        raise ValueError(f"peft: {peft!r} is not one of {', '.join(PEFT_TYPES)}")
    if base_quant is not None:
        parse_quant(base_quant, "base_quant")
        parse_quant(embed_quant, "embed_quant")
        check_group_size(quant_group_size, "quant_group_size")
        if peft == "ia3":
            raise ValueError("base_quant: not supported with peft='ia3' (IA3Linear scales its base layer's output "
                             "through the float weight); use peft='lora', 'bitfit' or 'adapter'")
    if peft != "lora":
        model = _patch_other(model, peft, target_modules, modules_to_save, feedforward_modules, reduction, layers)
        return _quantize(model, base_quant, quant_group_size, embed_quant)
    if type(model).__name__.startswith("PeftModel") or hasattr(model, "peft_config"):
        model, cfg = _from_peft(model, dropout, train_bias)
        cfg.modules_to_save = sorted(set(cfg.modules_to_save) | set(modules_to_save or []))
    else:
        if getattr(model, "fwdkern_config", None) is not None and not model.fwdkern_config.adopted:
            raise ValueError("model: already patched")
        hand = [m for m in model.modules() if isinstance(m, LoRALinear)]
        if target_modules is None:
            mt = getattr(getattr(model, "config", None), "model_type", None)
            if hand and mt is None:
                target_modules = [p.rsplit(".", 1)[-1] for p, m in model.named_modules() if isinstance(m, LoRALinear)]
            else:
                target_modules = default_targets(mt)
        target_modules = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        if modules_to_save is None:
            modules_to_save = [n for n in _HEAD_NAMES if is_seq_cls(model) and hasattr(model, n)]
        modules_to_save = list(modules_to_save)
        fifo, n = False, 0
        in_layers = _layer_filter(model, layers)
        for path, mod in list(model.named_modules()):
            if not path or not _matches(path, target_modules) or _matches(path, modules_to_save) or not in_layers(path):
                continue
            if any(path.startswith(p + ".") for p, m in model.named_modules() if isinstance(m, LoRALinear) and p):
                continue  # inside a LoRALinear (its base_layer / lora_A / lora_B)
            new, conv = as_lora_linear(mod, path, r, alpha, dropout, train_bias)
            if new is None:
                continue
            fifo = fifo or conv
            if new is not mod:
                _set_module(model, path, new)
            n += 1
        if n == 0:
            raise ValueError(f"target_modules: {target_modules} matched no nn.Linear/Conv1D in the model")
        cfg = FwdkernConfig(r=r, alpha=alpha, target_modules=target_modules, dropout=dropout, train_bias=train_bias,
                            modules_to_save=modules_to_save, fan_in_fan_out=fifo)
    for p in model.parameters():
        p.requires_grad_(False)
    for mod in model.modules():
        if isinstance(mod, LoRALinear):
            mod.lora_A.weight.requires_grad_(True)
            mod.lora_B.weight.requires_grad_(True)
            if mod.train_bias and mod.base_layer.bias is not None:
                mod.base_layer.bias.requires_grad_(True)
    for path, mod in model.named_modules():
        if path and _matches(path, cfg.modules_to_save):
            for p in mod.parameters():
                p.requires_grad_(True)
    _check_no_shared_adapters(model)
    model.fwdkern_config = cfg
    trainable(model)  # assigns and validates the ids (collisions)
    return _quantize(model, base_quant, quant_group_size, embed_quant)


def _quantize(model, base_quant, group_size, embed_quant):
    """The frozen base quantized in place (after the trainable tensors are marked, which stay float)."""
    if base_quant is None:
        return model
    quantize_base(model, base_quant, group_size, embed_quant, skip=model.fwdkern_config.modules_to_save or ())
    trainable(model)
    return model


def _rehome_float_tensors(model: nn.Module) -> None:
    """Copy the float tensors that stay (norms, biases, adapters) into their own memory.

    A checkpoint loaded from safetensors can hold its tensors as views of one memory-mapped file; one
    kept norm weight then keeps the whole mapping, float weights included, resident, and quantizing
    the base would save no memory; the copy costs the kept tensors' size once.
    Parameters keep their identity (their .data is replaced), so tied tensors stay tied."""
    done: dict = {}
    for mod in model.modules():
        for name, p in mod._parameters.items():
            if p is not None and id(p) not in done:
                done[id(p)] = p
                p.data = p.data.clone()
        for name, b in list(mod._buffers.items()):
            if b is None or (isinstance(mod, (QuantLinear, QuantEmbedding)) and name in QUANT_BUFFERS):
                continue
            if id(b) not in done:
                done[id(b)] = b.clone()
            mod._buffers[name] = done[id(b)]


@torch.no_grad()
def quantize_base(model: nn.Module, base_quant: str, group_size: int = DEFAULT_GROUP_SIZE,
                  embed_quant: Optional[str] = "int8", skip=()) -> nn.Module:
    """Quantize the frozen base of `model` in place and return it.

    * every :class:`fwdkern.LoRALinear`'s ``base_layer`` and every other ``nn.Linear`` / HF ``Conv1D``
      whose weight is frozen -> :class:`QuantLinear` (``base_quant``: "int8" | "int4");
    * every frozen ``nn.Embedding`` and the model's output embedding (LM head) -> quantized with
      ``embed_quant`` ("int8" default, "int4", or None to keep them float). A tied embedding / LM head
      is quantized once and both modules share the tensors.
    Modules whose path matches `skip` (names as in ``patch``'s modules_to_save), modules with a
    trainable weight, and the adapters' own tensors stay float. Float weights are released as each
    module is replaced. group_size: columns per int4 group (even; a group size that does not divide
    in_features leaves a shorter last group).
    """
    bits = parse_quant(base_quant, "base_quant")
    if bits is None:
        return model
    ebits = parse_quant(embed_quant, "embed_quant")
    group_size = check_group_size(group_size, "quant_group_size")

    def skipped(path):
        return any(path == s or path.endswith("." + s) or path.startswith(s + ".") or ("." + s + ".") in path
                   for s in skip)

    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    adapter_ids = {id(m.lora_A) for m in model.modules() if isinstance(m, LoRALinear)}
    adapter_ids |= {id(m.lora_B) for m in model.modules() if isinstance(m, LoRALinear)}
    shared: dict = {}  # id(float weight) -> QuantizedWeight (tied matrices quantized once)

    def quantized(w: torch.Tensor, b: int, transpose: bool = False) -> QuantizedWeight:
        key = (id(w), transpose, b)
        if key not in shared:
            shared[key] = quantize_weight(w.detach().t() if transpose else w.detach(), b, group_size)
        return shared[key]

    replace = []
    for path, mod in model.named_modules():
        if not path or skipped(path) or id(mod) in adapter_ids:
            continue
        if isinstance(mod, LoRALinear):
            if isinstance(mod.base_layer, nn.Linear):
                replace.append((path + ".base_layer", mod.base_layer, bits, False))
            continue
        if isinstance(mod, QuantLinear) or isinstance(mod, QuantEmbedding):
            continue
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor) or w.requires_grad:
            continue
        is_head = mod is out_emb
        if isinstance(mod, nn.Embedding):
            if ebits is not None:
                replace.append((path, mod, ebits, False))
        elif isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D":
            b = ebits if is_head else bits
            if b is not None:
                replace.append((path, mod, b, type(mod).__name__ == "Conv1D"))
    parent_of_lora = {path + ".base_layer": m for path, m in model.named_modules() if isinstance(m, LoRALinear)}
    for path, mod, b, transpose in replace:
        qw = quantized(mod.weight, b, transpose)
        if isinstance(mod, nn.Embedding):
            new = QuantEmbedding.from_embedding(mod, b, group_size, qweight=qw)
        else:
            new = QuantLinear(qw, mod.bias, dtype=mod.weight.dtype)
        if path in parent_of_lora:
            parent_of_lora[path].base_layer = new
        else:
            _set_module(model, path, new)
    if replace:
        _rehome_float_tensors(model)
    if not replace:
        raise ValueError("quantize_base: no frozen nn.Linear / nn.Embedding to quantize (it quantizes weights with "
                         "requires_grad=False: use fwdkern.patch(model, base_quant=...), or freeze the base first)")
    return model


@torch.no_grad()
def dequantize_base(model: nn.Module) -> nn.Module:
    """The float model a quantized one computes: every QuantLinear / QuantEmbedding replaced (in place)
    by an nn.Linear / nn.Embedding holding the dequantized weight (in the dtype it was quantized from);
    a shared (tied) quantized matrix becomes one shared float parameter. For references and tests."""
    floats: dict = {}

    def weight_of(mod):
        key = id(mod.qweight)
        if key not in floats:
            floats[key] = nn.Parameter(mod.dequantize(mod.dtype), requires_grad=False)
        return floats[key]

    for path, mod in list(model.named_modules()):
        if isinstance(mod, QuantLinear):
            new = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device=mod.qweight.device,
                            dtype=mod.dtype)
            new.weight = weight_of(mod)
            if mod.bias is not None:
                new.bias = mod.bias
        elif isinstance(mod, QuantEmbedding):
            new = nn.Embedding(mod.num_embeddings, mod.embedding_dim, padding_idx=mod.padding_idx,
                               device=mod.qweight.device, dtype=mod.dtype)
            new.weight = weight_of(mod)
            if mod.embed_scale is not None:
                scale = mod.embed_scale
                new.register_buffer("embed_scale", scale, persistent=False)
                new.forward = (lambda ids, _e=new, _s=scale: nn.Embedding.forward(_e, ids) * _s.to(_e.weight.dtype))
        else:
            continue
        parent, _, leaf = path.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        if isinstance(owner, LoRALinear) and leaf == "base_layer":
            owner.base_layer = new
        else:
            setattr(owner, leaf, new)
    return model


def _patch_other(model, peft, target_modules, modules_to_save, feedforward_modules, reduction, layers=None):
    """patch() for IA3, BitFit and bottleneck adapters."""
    if getattr(model, "fwdkern_config", None) is not None:
        raise ValueError("model: already patched")
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if target_modules is None:
        target_modules, ff = default_peft_targets(peft, mt)
        feedforward_modules = ff if feedforward_modules is None else feedforward_modules
    target_modules = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    feedforward_modules = list(feedforward_modules or [])
    if modules_to_save is None:
        modules_to_save = [n for n in _HEAD_NAMES if is_seq_cls(model) and hasattr(model, n)]
    modules_to_save = list(modules_to_save)
    n = 0
    in_layers = _layer_filter(model, layers)
    if peft != "bitfit":
        for path, mod in list(model.named_modules()):
            if not path or not _matches(path, target_modules) or _matches(path, modules_to_save) or not in_layers(path):
                continue
            if not (isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D"):
                continue
            if any(path.startswith(p + ".") for p, m in model.named_modules()
                   if isinstance(m, (IA3Linear, BottleneckAdapter)) and p):
                continue
            new = (IA3Linear(mod, feedforward=_matches(path, feedforward_modules)) if peft == "ia3"
                   else BottleneckAdapter(mod, _out_features(mod), reduction))
            _set_module(model, path, new)
            n += 1
        if n == 0:
            raise ValueError(f"target_modules: {target_modules} matched no nn.Linear/Conv1D in the model")
    for p in model.parameters():
        p.requires_grad_(False)
    for path, mod in model.named_modules():
        if isinstance(mod, IA3Linear):
            mod.ia3_l.requires_grad_(True)
        elif isinstance(mod, BottleneckAdapter):
            for p in list(mod.adapter_down.parameters()) + list(mod.adapter_up.parameters()):
                p.requires_grad_(True)
        elif peft == "bitfit" and isinstance(getattr(mod, "bias", None), nn.Parameter):
            mod.bias.requires_grad_(True)
        if path and _matches(path, modules_to_save):
            for p in mod.parameters():
                p.requires_grad_(True)
    if peft == "bitfit" and not any(p.requires_grad for p in model.parameters()):
        raise ValueError("peft='bitfit': the model has no bias to train")
    model.fwdkern_config = FwdkernConfig(peft_type=peft, target_modules=target_modules if peft != "bitfit" else None,
                                         modules_to_save=modules_to_save, feedforward_modules=feedforward_modules,
                                         reduction=reduction, r=0, alpha=0.0)
    trainable(model)
    return model


def get_config(model: nn.Module) -> FwdkernConfig:
    """The model's FwdkernConfig; a model with hand-inserted LoRALinear layers is adopted as it is."""
    cfg = getattr(model, "fwdkern_config", None)
    if cfg is not None:
        return cfg
    layers = [(p, m) for p, m in model.named_modules() if isinstance(m, LoRALinear)]
    if not layers:
        raise ValueError("model: not patched; call fwdkern.patch(model) first (or insert fwdkern.LoRALinear layers)")
    _check_no_shared_adapters(model)
    first = layers[0][1]
    cfg = FwdkernConfig(r=first.r, alpha=first.lora_alpha, target_modules=sorted({p.rsplit(".", 1)[-1] for p, _ in layers}),
                        train_bias=any(m.train_bias for _, m in layers), adopted=True)
    model.fwdkern_config = cfg
    return cfg


def trainable(model: nn.Module) -> list[tuple[str, int, torch.Tensor]]:
    """The perturbed tensors: [(state-dict name, param_id, tensor)] in ``named_parameters`` order.

    Ids are ``param_id(name)`` of the first name a tensor has (a tied tensor is listed once);
    LoRALinear layers learn theirs here too, so every op sees the same ids."""
    cfg = get_config(model)
    if cfg.adopted:  # only the adapters' tensors; the user's own requires_grad flags are left alone
        mine = {id(t) for m in model.modules() if isinstance(m, LoRALinear)
                for t in (m.lora_A.weight, m.lora_B.weight) + ((m.base_layer.bias,) if m.train_bias else ())}
        out = [(n, param_id(n), p) for n, p in model.named_parameters() if id(p) in mine]
    else:
        out = [(n, param_id(n), p) for n, p in model.named_parameters() if p.requires_grad]
    seen = {}
    for n, pid, _ in out:
        if pid in seen:
            raise ValueError(f"param ids collide: {seen[pid]!r} and {n!r}")
        seen[pid] = n
    assign_param_ids(model)
    for path, mod in model.named_modules():
        if isinstance(mod, BottleneckAdapter):
            base = f"{path}." if path else ""
            mod.param_ids = {"down": param_id(base + "adapter_down.weight"), "down_bias": param_id(base + "adapter_down.bias"),
                             "up": param_id(base + "adapter_up.weight"), "up_bias": param_id(base + "adapter_up.bias")}
    return out


def selected_ids(model, params) -> set[int]:
    """Ids of the tensors to perturb: all trainable ones (None) or those named / given by id."""
    tr = trainable(model)
    if params is None:
        return {pid for _, pid, _ in tr}
    names = {n: pid for n, pid, _ in tr}
    ids = set(names.values())
    sel = set()
    for p in ([params] if isinstance(params, (str, int)) else params):
        if isinstance(p, str):
            if p not in names:
                raise ValueError(f"params: {p!r} is not a trainable tensor name (see fwdkern.trainable)")
            sel.add(names[p])
        elif isinstance(p, int) and not isinstance(p, bool) and p in ids:
            sel.add(p)
        else:
            raise ValueError(f"params: {p!r} is neither a trainable tensor name nor a param id")
    return sel


def aliases(model: nn.Module) -> dict:
    """id(parameter) -> [(owner module, attribute)] for every module slot holding it (tied weights)."""
    out: dict = {}
    for mod in model.modules():
        for leaf, p in mod._parameters.items():
            if p is not None:
                out.setdefault(id(p), []).append((mod, leaf))
    return out
