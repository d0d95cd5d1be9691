"""The dual forward through a whole model (`jvp`) and perturbed inference (`perturbed_loss`)."""
from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Mapping
from typing import Iterable, Optional

import torch
from torch import nn

from ..dual import (Dual, make_dual, primal, tangent, tangent_linear, tangent_matmul_dtype, tangent_matmuls,
                    track_modules)
from ..nn.lora import LoRALinear
from ..nn.peft_layers import BottleneckAdapter
from ..ops import perturbation, seeded_axpy_
from .losses import IGNORE, causal_loss, causal_targets, cls_loss, logits_of, loss_kind, primal_loss
from .patching import aliases, selected_ids, trainable

__all__ = ["jvp", "perturbed_loss", "batch_loss", "capture_input", "loss_terms", "PerSampleUnsupported"]


class capture_input:
    """``with capture_input(module) as cap: model(...)`` keeps ``cap.x``, the (primal, detached) first
    input of `module`'s last forward: e.g. a classifier head's features, from which its exact
    gradient costs no pass through the body."""

    def __init__(self, module: nn.Module):
        self.module, self.x, self._handle = module, None, None

    def _hook(self, module, args):
        self.x = primal(args[0]).detach()

    def __enter__(self):
        self._handle = self.module.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        return False


class PerSampleUnsupported(ValueError):
    """``jvp(per_sample=True)`` cannot run this model / batch / ks in one pass: raised before any result
    exists (from the arguments, or from the first LoRA layer whose input is not [samples, tokens, ...]),
    with the model left as it was, so a caller can run one pass per sample instead."""


@contextlib.contextmanager
def _dual_mode(model, seed, ks, dist, selected, sample_shape: tuple = ()):
    """LoRALinear -> fused dual op; full trainable tensors -> Dual parameters with stacked perturbations.

    A full tensor held by several modules (tied weights) becomes one Dual in every slot, so each
    use contributes its tangent; where the slot is a LoRALinear's base weight or bias (frozen for
    the fused op), the layer adds that tangent's term itself. `sample_shape` = (B samples, T tokens)
    for per-sample tangents: tangent slot j of sample b is perturbation ``ks[j * B + b]``; only LoRA
    layers may be perturbed then (a Dual parameter carries one perturbation per slot for the whole
    batch), and every layer a tangent reaches has K = len(ks) / B slots."""
    ks_list = [int(k) for k in ks]
    samples = sample_shape[0] if sample_shape else 0
    by_sample = [ks_list[b::samples] for b in range(samples)] if samples else None
    slot_ks = by_sample[0] if samples else ks_list  # one k per tangent slot (unperturbed layers count them)
    K = len(slot_ks)
    lora = [m for m in model.modules() if isinstance(m, LoRALinear)]
    base_of = {id(m.base_layer): m for m in lora}
    base_tangents: dict = {}  # LoRALinear -> {"weight"|"bias": [K, ...] tangent of a trainable base tensor}
    swapped = []
    adapters = [m for m in model.modules() if isinstance(m, BottleneckAdapter)]
    lora_params = {id(p) for m in lora for p in (m.lora_A.weight, m.lora_B.weight) + (
        (m.base_layer.bias,) if m.train_bias else ()) if p is not None}
    lora_params |= {id(p) for m in adapters for p in (m.adapter_down.weight, m.adapter_down.bias,
                                                       m.adapter_up.weight, m.adapter_up.bias)}
    mlps = [m for m in model.modules() if is_gated_mlp(m)]
    norms = [(m, rms_norm_form(m)) for m in model.modules()]
    norms = [(m, form) for m, form in norms if form is not None]
    slots = aliases(model)
    try:
        for name, pid, p in trainable(model):
            if pid not in selected or id(p) in lora_params:
                continue
            if samples:
                raise PerSampleUnsupported(f"per_sample: {name} is perturbed outside a LoRA layer (per-sample "
                                           "tangents cover LoRA layers only)")
            t = torch.stack([perturbation(p.shape, seed, pid, k, dist, dtype=p.dtype, device=p.device)
                             for k in ks_list]) if K else p.new_zeros((0, *p.shape))
            d = Dual(p.detach(), t)
            for owner, leaf in slots[id(p)]:
                if id(owner) in base_of:
                    base_tangents.setdefault(base_of[id(owner)], {})[leaf] = t
                    continue
                orig = owner._parameters.pop(leaf)
                setattr(owner, leaf, d)
                swapped.append((owner, leaf, orig))
        if samples and any(n in selected for m in adapters for n in m.param_ids.values()):
            raise PerSampleUnsupported("per_sample: a bottleneck adapter is perturbed (per-sample tangents cover "
                                       "LoRA layers only)")
        for mod in lora:
            mod.forward = _make_dual_forward(mod, seed, slot_ks, dist, mod.perturbed(selected),
                                             base_tangents.get(mod, {}), by_sample, sample_shape)
        for mod in adapters:
            mod.forward = _make_adapter_dual_forward(mod, seed, slot_ks, dist, selected)
        for mod in mlps:
            mod.forward = _make_gated_mlp_dual_forward(mod)
        for mod, form in norms:
            mod.forward = _make_rms_norm_dual_forward(mod, form)
        yield
    finally:
        for mod in lora + adapters + mlps + [m for m, _ in norms]:
            mod.__dict__.pop("forward", None)
        for owner, leaf, orig in reversed(swapped):
            delattr(owner, leaf)
            owner._parameters[leaf] = orig


def _make_dual_forward(mod: LoRALinear, seed, ks, dist, perturb, base_tangents, by_sample=None, sample_shape=()):
    plain_forward = type(mod).forward
    Wt, bt = base_tangents.get("weight"), base_tangents.get("bias")

    def per_sample(xp, xt):
        """Sample b's rows with its own perturbations by_sample[b]; the input tangents' product with the
        frozen weight batched over every sample when the tangent dtype asks for it."""
        if xp.dim() < 3 or tuple(xp.shape[:2]) != tuple(sample_shape):  # e.g. tokens flattened or routed
            raise PerSampleUnsupported(f"per_sample: a LoRA layer's input has shape {tuple(xp.shape)}, not "
                                       f"[samples, tokens {tuple(sample_shape)}, ...]")
        split = xt is not None and tangent_matmul_dtype(xt) is not None and not mod.quantized
        parts = [mod.forward_dual(xp[b:b + 1], None if (xt is None or split) else xt[:, b:b + 1], seed, kb,
                                  dist=dist, perturb=perturb) for b, kb in enumerate(by_sample)]
        y, yt = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts], 1)
        if split:
            yt = yt + tangent_linear(xt, mod.effective_weight(xp.dtype)).to(yt.dtype)
        return make_dual(y, yt)

    def forward(x):
        xt = tangent(x)
        if xt is None and not perturb and Wt is None and bt is None:
            return plain_forward(mod, x)
        xp = primal(x)
        if by_sample is not None and perturb:
            return per_sample(xp, xt)
        if xt is not None and tangent_matmul_dtype(xt) is not None and not mod.quantized:
            # ẋ_k (W + s·BA)ᵀ in the asked dtype beside the op's seeded low-rank terms (exact split:
            # the op with no input tangent returns s·(x dA_kᵀ)Bᵀ + s·(xAᵀ)dB_kᵀ + db_k).
            y, yt = mod.forward_dual(xp, None, seed, ks, dist=dist, perturb=perturb)
            yt = yt + tangent_linear(xt, mod.effective_weight(xp.dtype)).to(yt.dtype)
        else:
            y, yt = mod.forward_dual(xp, xt, seed, ks, dist=dist, perturb=perturb)
        if Wt is not None:  # a trainable (tied) base weight: + x dW_k^T
            yt = yt + torch.einsum("...i,koi->k...o", xp.to(Wt.dtype), Wt).to(yt.dtype)
        if bt is not None:
            yt = yt + bt.view(bt.shape[0], *([1] * (yt.dim() - 2)), bt.shape[-1]).to(yt.dtype)
        return make_dual(y, yt)
    return forward


@functools.lru_cache(maxsize=None)
def _body(fn) -> tuple:
    """The stripped lines of function `fn` after its ``def`` (comments and blank lines dropped), or ()
    without source. Cached: the rules below look every module's class up on each jvp call."""
    try:
        src = inspect.getsource(fn)
    except (OSError, TypeError):
        return ()
    return tuple(ln.strip() for ln in src.splitlines()[1:] if ln.strip() and not ln.strip().startswith("#"))


# RMSNorm modules whose forward is one of these bodies, by the scale they apply to x·rsqrt(mean x² + eps)
# (Llama, Mistral, Qwen2, SmolLM, ...: weight; Gemma 3: 1 + weight).
_RMS_NORM_FORMS = {
    ("input_dtype = hidden_states.dtype", "hidden_states = hidden_states.to(torch.float32)",
     "variance = hidden_states.pow(2).mean(-1, keepdim=True)",
     "hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)",
     "return self.weight * hidden_states.to(input_dtype)"): ("weight", "variance_epsilon"),
    ("output = self._norm(x.float())", "output = output * (1.0 + self.weight.float())",
     "return output.type_as(x)"): ("one_plus_weight", "eps"),
}
_GEMMA_NORM = ("return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)",)


def rms_norm_form(mod: nn.Module) -> Optional[tuple]:
    """(scale form, eps attribute) of an RMSNorm module the fused rule below covers, else None."""
    form = _RMS_NORM_FORMS.get(_body(type(mod).forward))
    if form is None or not isinstance(getattr(mod, form[1], None), float) or \
            not isinstance(getattr(mod, "weight", None), torch.Tensor) or mod.weight.dim() != 1:
        return None
    if form[0] == "one_plus_weight" and _body(getattr(type(mod), "_norm", None)) != _GEMMA_NORM:
        return None
    return form


def _make_rms_norm_dual_forward(mod: nn.Module, form: tuple):
    """RMSNorm's dual in two passes over the K tangents plus one batched dot: with r = rsqrt(mean x² + eps)
    and scale c, ẏ = c·r·ẋ − (c·r³/d)·x·⟨x, ẋ⟩ (op by op: seven passes). The primal is the module's
    own forward; a perturbed (Dual) weight keeps the op-by-op rules."""
    plain_forward = type(mod).forward
    kind, eps_name = form

    def forward(x):
        xt = tangent(x)
        if xt is None or isinstance(mod.weight, Dual):
            return plain_forward(mod, x)
        xp = primal(x)
        y = plain_forward(mod, xp)
        x32 = xp.float()
        d = x32.shape[-1]
        r = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + getattr(mod, eps_name))
        c = mod.weight.float() + 1.0 if kind == "one_plus_weight" else mod.weight.float()
        cr = c * r
        xd = torch.matmul(xt.float().reshape(xt.shape[0], -1, d).transpose(0, 1),
                          x32.reshape(-1, d, 1)).transpose(0, 1).reshape(*xt.shape[:-1], 1)  # ⟨x, ẋ_k⟩
        yt = (xt * cr).addcmul_(xd, x32 * (cr * r.square() / -d))
        return make_dual(y, yt.to(xt.dtype))
    return forward


# The gated feed-forward block of LLaMA-family models (Llama, Mistral, Qwen, Gemma, SmolLM, ...):
# its forward is exactly this expression, so the fused rule below computes the same function.
_GATED_MLP_SOURCE = "self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))"
_GATED_MLP_BODIES = ((f"down_proj = {_GATED_MLP_SOURCE}", "return down_proj"), (f"return {_GATED_MLP_SOURCE}",))


def is_gated_mlp(mod: nn.Module) -> bool:
    """True for a module whose forward is ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` with
    plain nn.Linear projections (a patched or quantized projection keeps the op-by-op rules)."""
    return (_body(type(mod).forward) in _GATED_MLP_BODIES and callable(getattr(mod, "act_fn", None))
            and all(type(getattr(mod, n, None)) is nn.Linear for n in ("gate_proj", "up_proj", "down_proj")))


def _make_gated_mlp_dual_forward(mod: nn.Module):
    """The gated MLP's dual in three tangent GEMMs and two passes over the [K, .., intermediate]
    tangents: ḣ = ġ ⊙ (act'(g) ⊙ u) + u̇ ⊙ act(g), with act' from forward AD on the primal. Op by
    op the same function costs four passes plus a cast on each side of every GEMM. Under
    :func:`tangent_matmuls` (bf16) the tangents stay in that dtype from the input's cast to the
    down projection's output (the elementwise passes read and write half the bytes); the primal
    is computed as the module computes it."""
    plain_forward = type(mod).forward
    lins = (mod.gate_proj, mod.up_proj, mod.down_proj)

    def forward(x):
        xt = tangent(x)
        if xt is None or any(isinstance(t, Dual) for lin in lins for t in (lin.weight, lin.bias)):
            return plain_forward(mod, x)
        xp = primal(x)
        g, u = mod.gate_proj(xp), mod.up_proj(xp)
        try:
            a, da = torch.func.jvp(mod.act_fn, (g,), (torch.ones_like(g),))
        except (NotImplementedError, RuntimeError):  # no forward-AD formula: the op-by-op rules name it
            return plain_forward(mod, x)
        y = mod.down_proj(a * u)
        dt = tangent_matmul_dtype(xt) or xt.dtype
        xb = xt.to(dt)
        h = tangent_linear(xb, mod.gate_proj.weight)
        h.mul_((da * u).to(h.dtype)).addcmul_(tangent_linear(xb, mod.up_proj.weight), a.to(h.dtype))
        return make_dual(y, tangent_linear(h, mod.down_proj.weight).to(y.dtype))
    return forward


def _make_adapter_dual_forward(mod: BottleneckAdapter, seed, ks, dist, selected):
    perturb = tuple(n for n, pid in mod.param_ids.items() if pid in selected)

    def forward(x, *args, **kwargs):
        y = mod.module(x, *args, **kwargs)
        if tangent(y) is None and not perturb:
            return mod.adapt(y)
        out, out_t = mod.forward_dual(primal(y), tangent(y), seed, ks, dist, perturb, {})
        return make_dual(out, out_t)
    return forward


def _unpack(batch):
    """(model inputs, labels) of a batch: a dict, a tokenizer's BatchEncoding or any Mapping."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch: expected a dict (or a tokenizer's BatchEncoding) with input_ids (attention_mask, "
                        f"labels optional), got {type(batch).__name__}")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return inputs, batch.get("labels")


def batch_loss(model: nn.Module, batch, loss: str = "auto", label_smoothing: float = 0.0) -> torch.Tensor:
    """The loss :func:`jvp` reports for `batch`, from one plain forward (no tangents, no grad; the
    model's training mode is left as it is). A causal LM's loss walks the vocabulary in blocks, so
    the tokens × vocab logits an HF forward with labels returns never exist. Arguments as :func:`jvp`."""
    kind = loss_kind(model, loss)
    inputs, labels = _unpack(batch)
    if kind == "classification" and labels is None:
        raise ValueError("batch: classification needs labels")
    with torch.no_grad():
        return primal_loss(model, kind, inputs, labels, label_smoothing).float()


def loss_terms(model: nn.Module, batch, loss: str = "auto") -> torch.Tensor:
    """How many terms each sample of `batch` adds to the loss :func:`jvp` averages (int64 [B]): the tokens
    it predicts for a causal LM, 1 per labelled example (0 for label -100) for a classifier. A sub-batch's
    loss weighs ``sum(its terms) / sum(all terms)`` in the batch's. Arguments as :func:`jvp`."""
    kind = loss_kind(model, loss)
    inputs, labels = _unpack(batch)
    if kind == "classification":
        if labels is None:
            raise ValueError("batch: classification needs labels")
        return (torch.as_tensor(labels).reshape(-1) != IGNORE).long()
    return (causal_targets(inputs, labels) != IGNORE).sum(1)


def jvp(model: nn.Module, batch, seed: int, ks: Iterable[int], dist: str = "rademacher", loss: str = "auto",
        params=None, label_smoothing: float = 0.0,
        tangent_dtype: Optional[torch.dtype] = None, per_sample: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Primal loss and ``jvps[k] = ∇L · v(seed, ·, ks[k])`` in one dual forward.

    Args:
        model: a model returned by :func:`patch`, or any model holding :class:`fwdkern.LoRALinear`
            layers (run in eval mode: dropout off). Classification models may return an HF output
            (``.logits``), a tuple or a logits tensor [B, C].
        batch: dict / BatchEncoding with ``input_ids`` [B, T] (+ ``attention_mask``, ``labels``; other model
            kwargs pass through). Classification: ``labels`` [B] required (-100 = ignore). Causal LM: ``labels``
            [B, T] (shifted inside, -100 ignored) or, if absent, ``input_ids`` with padding ignored.
        seed: int in [0, 2^64). ks: perturbation indices (K = len(ks)). dist: "rademacher" | "gaussian".
        loss: "auto" (from the model class), "classification" or "causal_lm".
        params: None (all trainable tensors) or an iterable of names / param ids to perturb (others get zero
            tangent; SPRY-style splitting).
        label_smoothing: for classification.
        tangent_dtype: None (the tangents' products in their own dtype: exact) or torch.bfloat16 / float16:
            the tangents' GEMMs with the frozen weights run in it (:func:`fwdkern.dual.tangent_matmuls`);
            the loss and every primal stay in the model's dtype.
        per_sample: each sample of the batch carries its own tangents: with B samples, ``ks[j * B + b]``
            is sample b's j-th, and ``jvps[i]`` is the derivative of sample b's share of the loss
            (its terms' sum / all terms, :func:`loss_terms`) along it. len(ks) / B tangents run through
            the model (the cost of that many whole-batch tangents) for len(ks) derivatives. len(ks) must be
            a multiple of B and only LoRA layers perturbed (else :class:`PerSampleUnsupported`).
    Returns:
        (loss: float32 scalar, jvps: float32 [K]).
    """
    kind = loss_kind(model, loss)
    inputs, labels = _unpack(batch)
    selected = selected_ids(model, params)
    ks = [int(k) for k in ks]
    if not ks:
        raise ValueError("ks: expected at least one perturbation index")
    if kind == "classification" and labels is None:
        raise ValueError("batch: classification needs labels")
    sample_shape = ()
    if per_sample:
        first = inputs.get("input_ids", inputs.get("inputs_embeds"))
        if not isinstance(first, torch.Tensor) or first.dim() < 2:
            raise PerSampleUnsupported("per_sample: the batch needs input_ids or inputs_embeds [samples, tokens, ...]")
        sample_shape = (int(first.shape[0]), int(first.shape[1]))
        samples = sample_shape[0]
        if len(ks) % samples:
            raise PerSampleUnsupported(f"per_sample: {len(ks)} tangents do not divide among {samples} samples")
    perturbed = {id(p) for _, pid, p in trainable(model) if pid in selected}  # before the Dual swap
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), track_modules(model), tangent_matmuls(tangent_dtype), \
                _dual_mode(model, seed, ks, dist, selected, sample_shape):
            if kind == "classification":
                L, jv = cls_loss(logits_of(model(**inputs)), labels, label_smoothing, per_sample=per_sample)
            else:
                L, jv = causal_loss(model, inputs, labels, perturbed, per_sample=per_sample)
            if jv is not None and per_sample:  # [K / B, B] -> ks' order
                jv = jv.reshape(-1)
    finally:
        model.train(was_training)
    if jv is None:
        jv = torch.zeros(len(ks), dtype=torch.float32, device=L.device)
    return L.float(), jv.float()


def perturbed_loss(model: nn.Module, batch, seed: int, ks: Iterable[int], eps: float,
                   dist: str = "rademacher", loss: str = "auto", params=None,
                   label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """FwdLLM perturbed inference: ``(L(θ + ε v_k), L(θ − ε v_k))`` for each k, float32 [K] each.

    The same perturbations as :func:`jvp` (same seed, ids, dist); ``(L+ − L−) / 2ε = jvp + O(ε²)``.
    Each perturbation is applied in place with :func:`fwdkern.seeded_axpy_` (never stored) and the
    trainable tensors are restored from a copy (exact) after each forward -- and on any exception
    (a bad label, Ctrl-C), so the model is never left perturbed.
    """
    kind = loss_kind(model, loss)
    inputs, labels = _unpack(batch)
    selected = selected_ids(model, params)
    tensors = [(pid, p) for _, pid, p in trainable(model) if pid in selected]
    saved = [p.detach().clone() for _, p in tensors]
    plus, minus = [], []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for k in ks:
                for sign, outl in ((1.0, plus), (-1.0, minus)):
                    try:
                        for pid, p in tensors:
                            seeded_axpy_(p.data, seed, pid, [int(k)], [sign * eps], dist=dist)
                        outl.append(primal_loss(model, kind, inputs, labels, label_smoothing).float())
                    finally:
                        for (_, p), s in zip(tensors, saved):
                            p.data.copy_(s)
    finally:
        model.train(was_training)
    return torch.stack(plus), torch.stack(minus)
