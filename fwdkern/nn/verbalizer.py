"""Prompt classification with a causal LM: the label words' logits at the last prompt position.

A causal LM classifies a prompt ("<text>\\nTopic:") by comparing the logits of the label words
(the verbalizer: " business", " sport", ...) at the prompt's last position. Those logits are
``h_last @ W_lm[verbalizer]ᵀ``: a C-row slice of the LM head. This module makes that slice an
ordinary classifier head, initialised from the LM head's rows (so before training it predicts
exactly what the LM does zero-shot) and trained with cross-entropy over the C label words (as
LM-BFF and MeZO train prompts) instead of over the whole vocabulary.

Why not the full-vocabulary loss: it spends the gradient on raising the label words against the
other 49k tokens (a direction shared by every class that leaves the argmax unchanged), and a
forward-gradient estimate's variance grows with the whole gradient's norm. NOTE (SmolLM2-135M on
BBC News, bench/results/fl_smollm2_cpu/fullvocab/ against bench/results/fl_smollm2_cpu/, read in
bench/results/README.md): with the full-vocabulary loss the best fwdkern body setting raised test
accuracy part of the way in 10 client rounds and backprop and MeZO did not raise it; with the
label-word head fwdkern went further in the same rounds.
The slice also removes the vocabulary-sized LM-head product from every forward.

The head is a copy: the LM head (often tied to the input embeddings) stays frozen and untouched.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class VerbalizerForSequenceClassification(nn.Module):
    """``logits[b] = classifier(lm.base_model(x).last_hidden_state[b, last[b]])``, ``last[b]`` the
    last attended position (inputs are right-padded prompts), ``classifier`` = the LM head's
    verbalizer rows.

    Args:
        lm: a transformers causal LM (``*ForCausalLM``: ``base_model`` + output embeddings).
        verbalizer: the token id of each class's label word, in class order.
    """

    def __init__(self, lm: nn.Module, verbalizer: Sequence[int]):
        super().__init__()
        ids = [int(t) for t in verbalizer]
        head = lm.get_output_embeddings()
        W = getattr(head, "weight", None)
        if W is None:
            raise ValueError(f"{type(lm).__name__} has no output embedding weight to read the label words from")
        V = W.shape[0]
        if not ids or any(t < 0 or t >= V for t in ids) or len(set(ids)) != len(ids):
            raise ValueError(f"verbalizer: expected distinct token ids in [0, {V}), got {ids}")
        self.lm = lm
        self.config = lm.config
        self.num_labels = len(ids)
        self.verbalizer = ids
        self.classifier = nn.Linear(W.shape[1], len(ids), bias=True, device=W.device, dtype=torch.float32)
        with torch.no_grad():
            self.classifier.weight.copy_(W.detach()[ids].float())
            b = getattr(head, "bias", None)
            self.classifier.bias.copy_(b.detach()[ids].float() if b is not None else torch.zeros(len(ids)))

    def activation_checkpointing_enable(self, **kw):
        self.lm.activation_checkpointing_enable(**kw)

    def activation_checkpointing_disable(self):
        self.lm.activation_checkpointing_disable()

    def last_hidden(self, input_ids, attention_mask=None, **kw) -> torch.Tensor:
        out = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kw)
        h = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
        B, T = input_ids.shape
        last = (attention_mask.long().sum(1) - 1).clamp(min=0) if attention_mask is not None \
            else torch.full((B,), T - 1, dtype=torch.long, device=input_ids.device)
        return h[torch.arange(B, device=h.device), last]

    def forward(self, input_ids, attention_mask=None, labels=None, **kw):
        from transformers.modeling_outputs import SequenceClassifierOutput

        e = self.last_hidden(input_ids, attention_mask, **kw)
        logits = self.classifier(e.to(self.classifier.weight.dtype))
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)
