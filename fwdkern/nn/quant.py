"""A frozen base kept quantized: :class:`QuantLinear`, :class:`QuantEmbedding` and :func:`quantize_base`.

Formats: int8 per output channel, int4 group-wise (``fwdkern/ops/_qformat.py``, docs/quantization.md).
The quantized tensors are buffers (``qweight``, ``scales``, ``offsets``; they move with ``.to(device)``
and appear in ``state_dict``); a bias stays a float parameter (trainable with BitFit / ``train_bias``).

* ``QuantLinear(x)`` = ``x Wqᵀ + b`` (:func:`fwdkern.ops.quant.quant_linear`): autograd reaches x and b
  (backprop LoRA on a quantized base, QLoRA-style: only the int tensors are kept for backward), and
  in the dual forward the rule in fwdkern/dual.py computes ``ẏ_k = ẋ_k Wqᵀ`` over the stacked rows.
* A :class:`fwdkern.LoRALinear` whose ``base_layer`` is a QuantLinear runs the quantized LoRA ops.
* ``QuantEmbedding`` dequantizes only the rows it looks up; a tied LM head shares its tensors
  (one quantized copy of the matrix) and dequantizes row blocks when applied.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops._qformat import (DEFAULT_GROUP_SIZE, QuantizedWeight, check_group_size, dequantize_reference, parse_quant,
                            quantize_weight)
from ..ops.quant import quant_linear

__all__ = ["QuantLinear", "QuantEmbedding", "quantize_base", "dequantize_base", "quantized_bytes",
           "check_group_size", "parse_quant"]


class _QuantStorage(nn.Module):
    """The buffers of one quantized [rows, cols] matrix."""

    def _set_quantized(self, qw: QuantizedWeight, dtype: torch.dtype):
        self.register_buffer("qweight", qw.qdata)
        self.register_buffer("scales", qw.scales)
        self.register_buffer("offsets", qw.offsets)
        self.bits, self.group_size = qw.bits, qw.group_size
        # The dtype the float weight had: plain forwards compute in it (LoRALinear casts x to it).
        self.dtype = dtype

    def quantized_weight(self) -> QuantizedWeight:
        cols = self.in_features if isinstance(self, QuantLinear) else self.embedding_dim
        offsets = None if self.offsets is None else self.offsets.float()
        return QuantizedWeight(self.qweight, self.scales.float(), offsets, self.bits, self.group_size, cols)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """The float matrix this module computes with (a full copy: for inspection and tests)."""
        return self.quantized_weight().dequantize(dtype)

    @property
    def weight(self):
        raise AttributeError(f"{type(self).__name__} keeps its weight quantized (qweight / scales); use "
                             ".dequantize() for a float copy")

    def _quant_repr(self) -> str:
        return f"int{self.bits}" + ("" if self.bits == 8 else f", group_size={self.group_size}")


class QuantLinear(_QuantStorage):
    """A frozen ``nn.Linear`` with its weight quantized (int8 per channel or int4 group-wise)."""

    def __init__(self, qweight: QuantizedWeight, bias: Optional[torch.Tensor] = None, dtype=torch.float32):
        super().__init__()
        self.in_features, self.out_features = qweight.in_features, qweight.out_features
        self._set_quantized(qweight, dtype)
        if bias is not None and not isinstance(bias, nn.Parameter):
            bias = nn.Parameter(bias, requires_grad=False)
        self.bias = bias

    @classmethod
    def from_linear(cls, linear: nn.Module, bits: int, group_size: int = DEFAULT_GROUP_SIZE,
                    weight_t: bool = False) -> "QuantLinear":
        """Quantize an nn.Linear (or HF's Conv1D with ``weight_t=True``: weight [in, out]). Its bias
        parameter is kept as it is (same tensor, same requires_grad)."""
        w = linear.weight.detach()
        return cls(quantize_weight(w.t() if weight_t else w, bits, group_size), linear.bias, dtype=w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.bias
        if b is not None and b.dtype != x.dtype:
            b = b.to(x.dtype)
        return quant_linear(x, self.quantized_weight(), b)

    def dequantize_rows(self, start: int, end: int, dtype=torch.float32) -> torch.Tensor:
        """Rows [start, end) of the float weight (the causal-LM loss walks the LM head in row blocks)."""
        return self.quantized_weight().rows(slice(start, end)).dequantize(dtype)

    def dequantize_index(self, index: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        return dequantize_reference(self.quantized_weight().rows(index), dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self._quant_repr()}, "
                f"bias={self.bias is not None}")


class QuantEmbedding(_QuantStorage):
    """A frozen ``nn.Embedding`` with its table quantized by rows (int8 per row, int4 groups along the
    embedding dim). Keeps an ``embed_scale`` the source module multiplied by (Gemma 3)."""

    def __init__(self, qweight: QuantizedWeight, padding_idx: Optional[int] = None, dtype=torch.float32,
                 embed_scale: Optional[torch.Tensor] = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = qweight.out_features, qweight.in_features
        self.padding_idx = padding_idx
        self._set_quantized(qweight, dtype)
        self.register_buffer("embed_scale", None if embed_scale is None else embed_scale.detach().clone(),
                             persistent=False)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, bits: int, group_size: int = DEFAULT_GROUP_SIZE,
                       qweight: Optional[QuantizedWeight] = None) -> "QuantEmbedding":
        if emb.max_norm is not None:
            raise ValueError("QuantEmbedding: max_norm renormalizes the table in place; not supported")
        qw = qweight if qweight is not None else quantize_weight(emb.weight.detach(), bits, group_size)
        scale = getattr(emb, "embed_scale", None)
        return cls(qw, emb.padding_idx, emb.weight.dtype, scale if isinstance(scale, torch.Tensor) else None)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.quantized_weight().rows(input_ids.reshape(-1))
        out = dequantize_reference(rows, self.dtype).reshape(*input_ids.shape, self.embedding_dim)
        if self.embed_scale is not None:
            out = out * self.embed_scale.to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self._quant_repr()}"


def _rehome_float_tensors(model: nn.Module) -> None:
    """Copy the float tensors that stay (norms, biases, adapters) into their own memory.

    A checkpoint loaded from safetensors can hold its tensors as views of one memory-mapped file; one
    kept norm weight then keeps the whole mapping, float weights included, resident.
    NOTE: SmolLM2-135M loaded by from_pretrained, int4 base: 904 MiB resident after quantization
    without this copy, the size of the fp32 file; the copy costs the kept tensors' size once.
    Parameters keep their identity (their .data is replaced), so tied tensors stay tied."""
    done: dict = {}
    for mod in model.modules():
        for name, p in mod._parameters.items():
            if p is not None and id(p) not in done:
                done[id(p)] = p
                p.data = p.data.clone()
        for name, b in list(mod._buffers.items()):
            if b is None or (isinstance(mod, _QuantStorage) and name in ("qweight", "scales", "offsets")):
                continue
            if id(b) not in done:
                done[id(b)] = b.clone()
            mod._buffers[name] = done[id(b)]


def _set(root: nn.Module, path: str, new: nn.Module):
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def quantized_bytes(model: nn.Module) -> dict:
    """{"quantized": bytes of the quantized tensors (shared ones once), "float": bytes of every other
    parameter and buffer} -- the resident size of the model's weights."""
    seen, q, f = set(), 0, 0
    qnames = {"qweight", "scales", "offsets"}
    for mod in model.modules():
        for name, t in list(mod._parameters.items()) + list(mod._buffers.items()):
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            n = t.numel() * t.element_size()
            if isinstance(mod, _QuantStorage) and name in qnames:
                q += n
            else:
                f += n
    return {"quantized": q, "float": f}


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
    from .lora import LoRALinear

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
            _set(model, path, new)
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
    from .lora import LoRALinear

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
