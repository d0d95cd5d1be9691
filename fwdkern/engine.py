"""Whole-model forward gradients for Hugging Face models.

* :func:`patch` puts :class:`fwdkern.LoRALinear` adapters into a ``transformers`` model
  (or converts a peft LoRA model), freezes the rest and assigns stable param ids.
* :func:`jvp` runs one dual forward: the primal loss and ``∇L·v_k`` for K seeded
  perturbations ``v_k = v(seed, param_id, ks[k])`` of the trainable tensors.
* :func:`perturbed_loss` gives ``L(θ ± εv_k)`` (FwdLLM perturbed inference).
* :func:`save_adapter` / :func:`load_adapter` use peft's on-disk format.

Mechanism: :mod:`fwdkern.dual` (a Dual tensor through unmodified model code). LoRALinear
layers run the fused ``lora_linear_dual`` op (their perturbations never exist in memory);
full trainable tensors (``modules_to_save`` heads) get materialized stacked tangents.
For causal LM the LM head gets no tangent: ``∂L/∂h`` (h = final hidden state) is computed
once from the primal in vocabulary chunks and the loss tangent is ``⟨∂L/∂h, ḣ_k⟩``.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .dual import Dual, make_dual, primal, tangent, track_modules
from .nn.lora import LoRALinear, assign_param_ids, param_id
from .ops import perturbation, seeded_axpy_

__all__ = ["patch", "trainable", "jvp", "perturbed_loss", "save_adapter", "load_adapter", "DEFAULT_TARGETS"]

# peft's defaults (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING) for the families we verify.
DEFAULT_TARGETS = {
    "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
    "albert": ["query", "value"], "electra": ["query", "value"], "distilbert": ["q_lin", "v_lin"],
    "gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "opt": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"], "phi3": ["qkv_proj"],
}
_HEAD_NAMES = ("classifier", "score")  # peft adds these to modules_to_save for SEQ_CLS


def _matches(name: str, targets: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def _info(model: nn.Module) -> dict:
    info = getattr(model, "_fwdkern", None)
    if info is None:
        raise ValueError("model: not patched; call fwdkern.patch(model) first")
    return info


def _is_seq_cls(model) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification")


def _conv1d_to_linear(conv) -> nn.Linear:
    """HF Conv1D (weight [in, out], y = x W + b) as an nn.Linear (weight [out, in])."""
    nx, nf = conv.weight.shape
    lin = nn.Linear(nx, nf, bias=conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
        if conv.bias is not None:
            lin.bias.copy_(conv.bias)
    return lin


def _set_module(root: nn.Module, path: str, new: nn.Module):
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def _from_peft(model, dropout, train_bias):
    """Unwrap a peft PeftModel (LoRA): returns (base transformers model, r, alpha, targets, modules_to_save, fifo)."""
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
            bl = mod.base_layer
            if type(bl).__name__ == "Conv1D":
                bl, fifo = _conv1d_to_linear(bl), True
            elif not isinstance(bl, nn.Linear):
                raise TypeError(f"{path}: peft LoRA on {type(bl).__name__} is not supported (nn.Linear, Conv1D)")
            r, a = mod.r[adapter], mod.lora_alpha[adapter]
            new = LoRALinear.from_linear(bl, r=r, alpha=a, dropout=dropout, train_bias=train_bias,
                                         adapter_dtype=mod.lora_A[adapter].weight.dtype)
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
    return base, cfg.r, cfg.lora_alpha, targets, sorted(set(saved)), fifo


def patch(model: nn.Module, r: int = 8, alpha: float = 16, target_modules: Optional[Sequence[str]] = None,
          dropout: float = 0.0, train_bias: bool = False, modules_to_save: Optional[Sequence[str]] = None) -> nn.Module:
    """Replace target linear layers by :class:`fwdkern.LoRALinear` and freeze everything else.

    Args:
        model: a ``transformers`` model, or a peft ``PeftModel`` with one LoRA adapter (converted keeping its
            weights; r/alpha/targets come from its config and the arguments are ignored). GPT-2's Conv1D
            layers become nn.Linear (weight transposed; peft's ``fan_in_fan_out``).
        r, alpha: LoRA rank and alpha (scaling alpha / r). target_modules: module names matched as peft does
            (equal, or ending in ``"." + name``); default per family (:data:`DEFAULT_TARGETS`).
        dropout: adapter dropout (plain forward only). train_bias: the targets' biases are trainable.
        modules_to_save: modules trained as full tensors (perturbed like any other trainable tensor);
            default for ``*ForSequenceClassification``: ``classifier`` / ``score``.
    Returns the patched transformers model (for a PeftModel: its unwrapped base model).
    """
    fifo = False
    if type(model).__name__.startswith("PeftModel") or hasattr(model, "peft_config"):
        model, r, alpha, target_modules, saved, fifo = _from_peft(model, dropout, train_bias)
        modules_to_save = sorted(set(saved) | set(modules_to_save or []))
    else:
        if hasattr(model, "_fwdkern"):
            raise ValueError("model: already patched")
        if target_modules is None:
            mt = getattr(getattr(model, "config", None), "model_type", None)
            if mt not in DEFAULT_TARGETS:
                raise ValueError(f"target_modules: no default for model_type {mt!r}; pass target_modules")
            target_modules = DEFAULT_TARGETS[mt]
        target_modules = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        if modules_to_save is None:
            modules_to_save = [n for n in _HEAD_NAMES if _is_seq_cls(model) and hasattr(model, n)]
        modules_to_save = list(modules_to_save)
        n = 0
        for path, mod in list(model.named_modules()):
            if not path or not _matches(path, target_modules) or _matches(path, modules_to_save):
                continue
            if type(mod).__name__ == "Conv1D":
                mod, fifo = _conv1d_to_linear(mod), True
            elif not isinstance(mod, nn.Linear):
                continue
            _set_module(model, path, LoRALinear.from_linear(mod, r=r, alpha=alpha, dropout=dropout,
                                                            train_bias=train_bias))
            n += 1
        if n == 0:
            raise ValueError(f"target_modules: {target_modules} matched no nn.Linear/Conv1D in the model")
    for p in model.parameters():
        p.requires_grad_(False)
    for mod in model.modules():
        if isinstance(mod, LoRALinear):
            mod.lora_A.weight.requires_grad_(True)
            mod.lora_B.weight.requires_grad_(True)
            if mod.train_bias and mod.base_layer.bias is not None:
                mod.base_layer.bias.requires_grad_(True)
    for path, mod in model.named_modules():
        if path and _matches(path, modules_to_save):
            for p in mod.parameters():
                p.requires_grad_(True)
    assign_param_ids(model)
    model._fwdkern = {"r": r, "alpha": alpha, "target_modules": target_modules, "dropout": dropout,
                      "train_bias": train_bias, "modules_to_save": list(modules_to_save), "fan_in_fan_out": fifo}
    trainable(model)  # validates ids (collisions)
    return model


def trainable(model: nn.Module) -> list[tuple[str, int, torch.Tensor]]:
    """The perturbed tensors: [(state-dict name, param_id, tensor)] in ``named_parameters`` order."""
    _info(model)
    out = [(n, param_id(n), p) for n, p in model.named_parameters() if p.requires_grad]
    seen = {}
    for n, pid, _ in out:
        if pid in seen:
            raise ValueError(f"param ids collide: {seen[pid]!r} and {n!r}")
        seen[pid] = n
    return out


def _selected(model, params) -> set[int]:
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
        elif isinstance(p, int) and p in ids:
            sel.add(p)
        else:
            raise ValueError(f"params: {p!r} is neither a trainable tensor name nor a param id")
    return sel


# ----------------------------------------------------------------------------- dual forward


@contextlib.contextmanager
def _dual_mode(model, seed, ks, dist, selected):
    """LoRALinear -> fused dual op; full trainable tensors -> Dual parameters with stacked perturbations."""
    ks_list = [int(k) for k in ks]
    K = len(ks_list)
    patched = []
    for mod in model.modules():
        if isinstance(mod, LoRALinear):
            ids = mod.param_ids
            names = [n for n in ("A", "B", "bias") if ids.get(n) in selected and
                     (n != "bias" or (mod.train_bias and mod.base_layer.bias is not None))]
            mod.forward = _make_dual_forward(mod, seed, ks_list, dist, tuple(names))
            patched.append(mod)
    swapped = []
    lora_params = {id(p) for m in patched for p in (m.lora_A.weight, m.lora_B.weight, m.base_layer.bias)
                   if p is not None}
    for name, pid, p in trainable(model):
        if pid not in selected or id(p) in lora_params:
            continue
        t = torch.stack([perturbation(p.shape, seed, pid, k, dist, dtype=p.dtype, device=p.device)
                         for k in ks_list]) if K else p.new_zeros((0, *p.shape))
        mod_path, _, leaf = name.rpartition(".")
        owner = model.get_submodule(mod_path)
        orig = owner._parameters[leaf]
        owner._parameters.pop(leaf)
        setattr(owner, leaf, Dual(orig.detach(), t))
        swapped.append((owner, leaf, orig))
    try:
        yield
    finally:
        for mod in patched:
            del mod.forward
        for owner, leaf, orig in swapped:
            delattr(owner, leaf)
            owner._parameters[leaf] = orig


def _make_dual_forward(mod: LoRALinear, seed, ks, dist, perturb):
    plain_forward = type(mod).forward

    def forward(x):
        xt = tangent(x)
        if xt is None and not perturb:
            return plain_forward(mod, x)
        y, yt = mod.forward_dual(primal(x), xt, seed, ks, dist=dist, perturb=perturb)
        return make_dual(y, yt)
    return forward


def _unpack(batch):
    if not isinstance(batch, dict):
        raise TypeError("batch: expected a dict with input_ids (attention_mask, labels optional)")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return inputs, batch.get("labels")


def _loss_kind(model, loss):
    if loss != "auto":
        if loss not in ("classification", "causal_lm"):
            raise ValueError(f"loss: expected 'auto', 'classification' or 'causal_lm', got {loss!r}")
        return loss
    if _is_seq_cls(model):
        return "classification"
    if type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal_lm"
    raise ValueError(f"loss: cannot infer the loss of {type(model).__name__}; pass loss='classification'|'causal_lm'")


def _cls_loss(logits, labels, label_smoothing):
    """Mean CE (+ label smoothing) and its K tangents from a (possibly Dual) logits [B, C]."""
    z = primal(logits).float()
    zt = tangent(logits)
    C = z.shape[-1]
    loss = F.cross_entropy(z, labels, label_smoothing=label_smoothing)
    g = torch.softmax(z, -1)
    g = g - (1 - label_smoothing) * F.one_hot(labels, C).to(g.dtype) - label_smoothing / C
    g = g / z.shape[0]
    jv = torch.einsum("kbc,bc->k", zt.float(), g) if zt is not None else None
    return loss, jv


def _causal_targets(inputs, labels):
    if labels is None:
        labels = inputs["input_ids"].clone()
        am = inputs.get("attention_mask")
        if am is not None:
            labels = labels.masked_fill(am == 0, -100)
    return labels[:, 1:]


def _lm_head_grad(h: torch.Tensor, head: nn.Module, y: torch.Tensor, chunk: Optional[int] = None):
    """For CE over ``logits = head(h)``: (sum of token losses, ∂(sum)/∂h [N, d]), one online pass over
    vocabulary chunks (K × tokens × vocab never exists; one [N, chunk] block at a time)."""
    W = head.weight
    b = getattr(head, "bias", None)
    N, d = h.shape
    V = W.shape[0]
    chunk = chunk or max(1024, min(V, (1 << 24) // max(N, 1)))
    hf = h.float()
    m = torch.full((N, 1), float("-inf"), device=h.device)
    l = torch.zeros((N, 1), device=h.device)
    acc = torch.zeros((N, d), device=h.device)
    zy = torch.zeros(N, device=h.device)
    for c0 in range(0, V, chunk):
        c1 = min(V, c0 + chunk)
        Wc = W[c0:c1].float()
        z = hf @ Wc.t()
        if b is not None:
            z = z + b[c0:c1].float()
        inside = (y >= c0) & (y < c1)
        zy = torch.where(inside, z.gather(1, (y - c0).clamp(0, c1 - c0 - 1).unsqueeze(1)).squeeze(1), zy)
        m_new = torch.maximum(m, z.amax(1, keepdim=True))
        a = torch.exp(m - m_new)
        p = torch.exp(z - m_new)
        l = l * a + p.sum(1, keepdim=True)
        acc = acc * a + p @ Wc
        m = m_new
    lse = m + torch.log(l)
    loss_sum = (lse.squeeze(1) - zy).sum()
    grad = acc / l - W[y].float()
    return loss_sum, grad


def _causal_loss(model, inputs, labels, perturbed: set):
    """Primal loss and K tangents: body forward as dual, LM head without tangent."""
    out = model.base_model(**inputs, use_cache=False)  # a KV cache would keep (and re-cat) dual tensors
    h = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
    head = model.get_output_embeddings()
    head_ids = {id(t) for t in (getattr(head, "weight", None), getattr(head, "bias", None)) if t is not None}
    if isinstance(head.weight, Dual) or isinstance(getattr(head, "bias", None), Dual) or head_ids & perturbed:
        # The LM head is applied to the primal only (no tangent): a perturbed head would be dropped.
        raise ValueError("params: the LM head (or an embedding tied to it) is perturbed; the causal-LM loss "
                         "does not propagate LM-head tangents -- exclude it with params=...")
    y = _causal_targets(inputs, labels)
    hp = primal(h)[:, :-1]
    valid = y != -100
    n = int(valid.sum())
    if n == 0:
        raise ValueError("labels: every target is -100 (nothing to predict)")
    loss_sum, g = _lm_head_grad(hp[valid], head, y[valid])
    ht = tangent(h)
    jv = None
    if ht is not None:
        jv = torch.einsum("knd,nd->k", ht[:, :, :-1][:, valid].float(), g) / n
    return loss_sum / n, jv


def jvp(model: nn.Module, batch: dict, seed: int, ks: Iterable[int], dist: str = "rademacher", loss: str = "auto",
        params=None, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Primal loss and ``jvps[k] = ∇L · v(seed, ·, ks[k])`` in one dual forward.

    Args:
        model: a model returned by :func:`patch` (run in eval mode: dropout off).
        batch: dict with ``input_ids`` [B, T] (+ ``attention_mask``, ``labels``; other model kwargs pass
            through). Classification: ``labels`` [B] required. Causal LM: ``labels`` [B, T] (shifted inside,
            -100 ignored) or, if absent, ``input_ids`` with padding (attention_mask == 0) ignored.
        seed: int in [0, 2^64). ks: perturbation indices (K = len(ks)). dist: "rademacher" | "gaussian".
        loss: "auto" (from the model class), "classification" or "causal_lm".
        params: None (all trainable tensors) or an iterable of names / param ids to perturb (others get zero
            tangent; SPRY-style splitting).
        label_smoothing: for classification.
    Returns:
        (loss: float32 scalar, jvps: float32 [K]).
    """
    kind = _loss_kind(model, loss)
    inputs, labels = _unpack(batch)
    selected = _selected(model, params)
    ks = [int(k) for k in ks]
    if not ks:
        raise ValueError("ks: expected at least one perturbation index")
    perturbed = {id(p) for _, pid, p in trainable(model) if pid in selected}  # before the Dual swap
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), track_modules(model), _dual_mode(model, seed, ks, dist, selected):
            if kind == "classification":
                if labels is None:
                    raise ValueError("batch: classification needs labels")
                out = model(**inputs)
                logits = out[0] if isinstance(out, (tuple, list)) else out.logits
                L, jv = _cls_loss(logits, labels, label_smoothing)
            else:
                L, jv = _causal_loss(model, inputs, labels, perturbed)
    finally:
        model.train(was_training)
    if jv is None:
        jv = torch.zeros(len(ks), dtype=torch.float32, device=L.device)
    return L.float(), jv.float()


def _primal_loss(model, kind, inputs, labels, label_smoothing):
    if kind == "classification":
        out = model(**inputs)
        logits = out[0] if isinstance(out, (tuple, list)) else out.logits
        return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
    out = model.base_model(**inputs, use_cache=False)
    h = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
    y = _causal_targets(inputs, labels)
    valid = y != -100
    s, _ = _lm_head_grad(h[:, :-1][valid], model.get_output_embeddings(), y[valid])
    return s / valid.sum()


def perturbed_loss(model: nn.Module, batch: dict, seed: int, ks: Iterable[int], eps: float,
                   dist: str = "rademacher", loss: str = "auto", params=None,
                   label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """FwdLLM perturbed inference: ``(L(θ + ε v_k), L(θ − ε v_k))`` for each k, float32 [K] each.

    The same perturbations as :func:`jvp` (same seed, ids, dist); ``(L+ − L−) / 2ε = jvp + O(ε²)``.
    Each perturbation is applied in place with :func:`fwdkern.seeded_axpy_` (never stored) and the
    trainable tensors are restored from a copy (exact) after each forward.
    """
    kind = _loss_kind(model, loss)
    inputs, labels = _unpack(batch)
    selected = _selected(model, params)
    tensors = [(pid, p) for _, pid, p in trainable(model) if pid in selected]
    saved = [p.detach().clone() for _, p in tensors]
    plus, minus = [], []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for k in ks:
                for sign, outl in ((1.0, plus), (-1.0, minus)):
                    for pid, p in tensors:
                        seeded_axpy_(p.data, seed, pid, [int(k)], [sign * eps], dist=dist)
                    outl.append(_primal_loss(model, kind, inputs, labels, label_smoothing).float())
                    for (_, p), s in zip(tensors, saved):
                        p.data.copy_(s)
    finally:
        model.train(was_training)
    return torch.stack(plus), torch.stack(minus)


# ----------------------------------------------------------------------------- peft format


def _adapter_state(model) -> dict[str, torch.Tensor]:
    info = _info(model)
    if info["train_bias"]:
        raise ValueError("save_adapter: train_bias=True (peft bias='lora_only') is not supported by the peft "
                         "format writer yet")
    sd = {}
    for path, mod in model.named_modules():
        if isinstance(mod, LoRALinear):
            sd[f"base_model.model.{path}.lora_A.weight"] = mod.lora_A.weight.detach()
            sd[f"base_model.model.{path}.lora_B.weight"] = mod.lora_B.weight.detach()
        elif path and _matches(path, info["modules_to_save"]):
            for n, t in mod.state_dict().items():
                sd[f"base_model.model.{path}.{n}"] = t.detach()
    return sd


def save_adapter(model: nn.Module, directory: str) -> None:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` (peft LoRA format)."""
    from safetensors.torch import save_file

    info = _info(model)
    os.makedirs(directory, exist_ok=True)
    sd = {k: v.contiguous().cpu() for k, v in _adapter_state(model).items()}
    save_file(sd, os.path.join(directory, "adapter_model.safetensors"), metadata={"format": "pt"})
    task = "SEQ_CLS" if _is_seq_cls(model) else ("CAUSAL_LM" if _loss_kind_safe(model) == "causal_lm" else None)
    targets = info["target_modules"]
    cfg = {
        "peft_type": "LORA", "task_type": task, "r": info["r"], "lora_alpha": info["alpha"],
        "target_modules": list(targets) if not isinstance(targets, str) else targets,
        "lora_dropout": info["dropout"], "bias": "none", "fan_in_fan_out": info["fan_in_fan_out"],
        "modules_to_save": info["modules_to_save"] or None, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
    }
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)


def _loss_kind_safe(model):
    try:
        return _loss_kind(model, "auto")
    except ValueError:
        return None


def load_adapter(model: nn.Module, directory: str) -> nn.Module:
    """Load a peft LoRA adapter directory into `model` (patched first from its config if needed)."""
    from safetensors.torch import load_file

    with open(os.path.join(directory, "adapter_config.json")) as f:
        cfg = json.load(f)
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{directory}: peft_type {cfg.get('peft_type')!r} is not LORA")
    if cfg.get("use_dora") or cfg.get("use_rslora") or cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ValueError(f"{directory}: DoRA / rsLoRA / rank or alpha patterns are not supported")
    if not hasattr(model, "_fwdkern"):
        patch(model, r=cfg["r"], alpha=cfg["lora_alpha"], target_modules=cfg["target_modules"],
              dropout=cfg.get("lora_dropout", 0.0), modules_to_save=cfg.get("modules_to_save") or None)
    sd = load_file(os.path.join(directory, "adapter_model.safetensors"))
    own = model.state_dict()
    missing = []
    with torch.no_grad():
        for k, v in sd.items():
            if not k.startswith("base_model.model."):
                raise ValueError(f"{directory}: unexpected key {k!r}")
            name = k[len("base_model.model."):]
            if name not in own:
                missing.append(name)
                continue
            own[name].copy_(v)
    if missing:
        raise ValueError(f"{directory}: keys not found in the model: {missing[:5]}")
    return model
