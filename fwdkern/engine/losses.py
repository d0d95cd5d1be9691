"""Losses of the dual forward and their K tangents: classification cross-entropy, and causal-LM
cross-entropy with the LM head applied to the primal only (∂L/∂h from vocabulary chunks)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..dual import Dual, primal, tangent
from .patching import is_seq_cls

IGNORE = -100


def loss_kind(model, loss):
    if loss != "auto":
        if loss not in ("classification", "causal_lm"):
            raise ValueError(f"loss: expected 'auto', 'classification' or 'causal_lm', got {loss!r}")
        return loss
    if is_seq_cls(model):
        return "classification"
    if type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal_lm"
    raise ValueError(f"loss: cannot infer the loss of {type(model).__name__}; pass loss='classification' (the model "
                     "returns logits [B, C]) or loss='causal_lm'")


def logits_of(out):
    """The logits of a model's output: an HF ModelOutput (.logits), a tuple (first item) or a tensor."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    logits = getattr(out, "logits", None)
    if logits is None:
        raise TypeError(f"model output {type(out).__name__} has no logits (return a tensor, a tuple or an object "
                        "with .logits)")
    return logits


def check_class_labels(labels: torch.Tensor, C: int):
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"labels: expected integer class ids, got dtype {labels.dtype}")
    bad = labels[(labels != IGNORE) & ((labels < 0) | (labels >= C))]
    if bad.numel():
        raise ValueError(f"labels: class id {int(bad[0])} is outside [0, {C}) (use {IGNORE} to ignore an example)")
    if not bool((labels != IGNORE).any()):
        raise ValueError(f"labels: every label is {IGNORE} (nothing to learn from)")


def cls_loss(logits, labels, label_smoothing, per_sample: bool = False):
    """Mean CE (+ label smoothing, ignore_index -100) and its K tangents from a (possibly Dual) logits [B, C];
    per_sample: tangents [K, B] (each sample's share of the mean's derivative along its own tangents)."""
    z = primal(logits).float()
    zt = tangent(logits)
    C = z.shape[-1]
    check_class_labels(labels, C)
    keep = labels != IGNORE
    every = bool(keep.all())
    zk, yk = (z, labels) if every else (z[keep], labels[keep])
    loss = F.cross_entropy(zk, yk, label_smoothing=label_smoothing)
    if zt is None:  # no tangent reaches the logits: no dL/dz to take
        return loss, None
    g = torch.softmax(zk, -1)
    g = g - (1 - label_smoothing) * F.one_hot(yk.long(), C).to(g.dtype) - label_smoothing / C
    g = g / zk.shape[0]
    if per_sample:  # an ignored sample's row of ∂L/∂z is 0
        G = z.new_zeros(z.shape)
        G[keep] = g
        return loss, torch.einsum("kbc,bc->kb", zt.float(), G)
    return loss, torch.einsum("kbc,bc->k", (zt if every else zt[:, keep]).float(), g)


def causal_targets(inputs, labels):
    if labels is None:
        labels = inputs["input_ids"].clone()
        am = inputs.get("attention_mask")
        if am is not None:
            labels = labels.masked_fill(am == 0, IGNORE)
    return labels[:, 1:]


def lm_head_grad(h: torch.Tensor, head: nn.Module, y: torch.Tensor, chunk: Optional[int] = None):
    """For CE over ``logits = head(h)``: (sum of token losses, ∂(sum)/∂h [N, d]), one online pass over
    vocabulary chunks (K × tokens × vocab never exists; one [N, chunk] block at a time). A quantized
    head (fwdkern.nn.QuantLinear) dequantizes one chunk of rows at a time."""
    rows = getattr(head, "dequantize_rows", None)
    W = None if rows is not None else head.weight
    b = getattr(head, "bias", None)
    N, d = h.shape
    V = head.out_features if rows is not None else W.shape[0]
    bad = y[(y < 0) | (y >= V)]
    if bad.numel():
        raise ValueError(f"labels: token id {int(bad[0])} is outside the vocabulary [0, {V})")
    # 2M logits (8 MiB in fp32) a block: the block and its exp are the largest temporaries of a
    # causal-LM step, so a client's peak stays near the body's (one [N, V] block would dwarf it)
    chunk = chunk or max(1024, min(V, (1 << 21) // max(N, 1)))
    if rows is not None:  # the dequantized chunk is a temporary too: at most 4M elements of it
        chunk = min(chunk, max(1024, (1 << 22) // max(d, 1)))
    hf = h.float()
    m = torch.full((N, 1), float("-inf"), device=h.device)
    l = torch.zeros((N, 1), device=h.device)
    acc = torch.zeros((N, d), device=h.device)
    zy = torch.zeros(N, device=h.device)
    for c0 in range(0, V, chunk):
        c1 = min(V, c0 + chunk)
        Wc = rows(c0, c1) if rows is not None else W[c0:c1].float()
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
    grad = acc / l - (head.dequantize_index(y) if rows is not None else W[y].float())
    return loss_sum, grad


def causal_loss(model, inputs, labels, perturbed: set, per_sample: bool = False):
    """Primal loss and K tangents: body forward as dual, LM head without tangent. per_sample: tangents
    [K, B] (each sample's share of the mean's derivative along its own tangents)."""
    out = model.base_model(**inputs, use_cache=False)  # a KV cache would keep (and re-cat) dual tensors
    h = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
    head = model.get_output_embeddings()
    head_ids = {id(t) for t in (getattr(head, "weight", None), getattr(head, "bias", None)) if t is not None}
    if isinstance(getattr(head, "weight", None), Dual) or isinstance(getattr(head, "bias", None), Dual) \
            or head_ids & perturbed:
        # The LM head is applied to the primal only (no tangent): a perturbed head would be dropped.
        raise ValueError("params: the LM head (or an embedding tied to it) is perturbed; the causal-LM loss "
                         "does not propagate LM-head tangents -- exclude it with params=...")
    y = causal_targets(inputs, labels)
    hp = primal(h)[:, :-1]
    valid = y != IGNORE
    n = int(valid.sum())
    if n == 0:
        raise ValueError("labels: every target is -100 (nothing to predict)")
    loss_sum, g = lm_head_grad(hp[valid], head, y[valid])
    ht = tangent(h)
    jv = None
    if ht is not None and per_sample:
        G = g.new_zeros((*valid.shape, g.shape[-1]))
        G[valid] = g
        jv = torch.einsum("kbtd,btd->kb", ht[:, :, :-1].float(), G) / n
    elif ht is not None:
        jv = torch.einsum("knd,nd->k", ht[:, :, :-1][:, valid].float(), g) / n
    return loss_sum / n, jv


def primal_loss(model, kind, inputs, labels, label_smoothing):
    if kind == "classification":
        logits = logits_of(model(**inputs)).float()
        check_class_labels(labels, logits.shape[-1])
        return F.cross_entropy(logits, labels.long(), label_smoothing=label_smoothing, ignore_index=IGNORE)
    out = model.base_model(**inputs, use_cache=False)
    h = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
    y = causal_targets(inputs, labels)
    valid = y != IGNORE
    if not bool(valid.any()):
        raise ValueError("labels: every target is -100 (nothing to predict)")
    s, _ = lm_head_grad(h[:, :-1][valid], model.get_output_embeddings(), y[valid])
    return s / valid.sum()
