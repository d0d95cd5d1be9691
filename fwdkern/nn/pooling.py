"""Sentence-embedding classifiers: an encoder, the pooling its checkpoint was trained with, and a linear head.

A sentence-transformers checkpoint (all-MiniLM-L6-v2, ...) is trained to be read through its
pooling (mean over tokens, then L2 normalisation), not through BERT's CLS pooler, whose weights
such checkpoints never trained. `AutoModelForSequenceClassification` would put the head on the
CLS pooler; this puts it where the checkpoint's embedding is.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

POOLINGS = ("mean", "cls", "max")


def sentence_transformers_pooling(path: str) -> Optional[tuple]:
    """(pooling, normalize) declared by a sentence-transformers folder (modules.json), or None."""
    try:
        with open(os.path.join(path, "modules.json")) as f:
            modules = json.load(f)
    except (OSError, ValueError):
        return None
    pool = next((m for m in modules if str(m.get("type", "")).endswith("models.Pooling")), None)
    if pool is None:
        return None
    try:
        with open(os.path.join(path, pool.get("path", ""), "config.json")) as f:
            pcfg = json.load(f)
    except (OSError, ValueError):
        return None
    mode = ("mean" if pcfg.get("pooling_mode_mean_tokens") else "cls" if pcfg.get("pooling_mode_cls_token")
            else "max" if pcfg.get("pooling_mode_max_tokens") else None)
    if mode is None:
        return None
    normalize = any(str(m.get("type", "")).endswith("models.Normalize") for m in modules)
    return mode, normalize


class SentenceEncoderForSequenceClassification(nn.Module):
    """``logits = classifier(normalize?(pool(encoder(x).last_hidden_state, attention_mask)))``.

    Args:
        encoder: a transformers base model (``AutoModel``), returning ``last_hidden_state``.
        num_labels: classes. pooling: "mean" (masked), "cls" (first token) or "max" (masked).
        normalize: L2-normalise the pooled embedding (sentence-transformers' Normalize module).
    """

    def __init__(self, encoder: nn.Module, num_labels: int, pooling: str = "mean", normalize: bool = False):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling: {pooling!r} is not one of {', '.join(POOLINGS)}")
        self.encoder = encoder
        self.config = encoder.config
        self.pooling, self.normalize = pooling, bool(normalize)
        self.classifier = nn.Linear(self.config.hidden_size, num_labels)
        self.num_labels = num_labels

    @classmethod
    def from_pretrained(cls, path: str, num_labels: int, pooling: Optional[str] = None,
                        normalize: Optional[bool] = None) -> "SentenceEncoderForSequenceClassification":
        """The encoder of `path` with the pooling its modules.json declares (or the one given)."""
        from transformers import AutoModel

        declared = sentence_transformers_pooling(path) or ("mean", False)
        encoder = AutoModel.from_pretrained(path)
        if getattr(encoder, "pooler", None) is not None:
            # BERT-like encoders carry a CLS pooler this head never reads; loaded with the checkpoint (so
            # nothing is reported as unexpected) and dropped (so no forward computes it).
            encoder.pooler = None
        return cls(encoder, num_labels, pooling or declared[0], declared[1] if normalize is None else normalize)

    def activation_checkpointing_enable(self, **kw):
        self.encoder.activation_checkpointing_enable(**kw)

    def activation_checkpointing_disable(self):
        self.encoder.activation_checkpointing_disable()

    def embed(self, input_ids, attention_mask=None, **kw) -> torch.Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kw).last_hidden_state
        if self.pooling == "cls":
            e = h[:, 0]
        else:
            m = (attention_mask if attention_mask is not None else torch.ones(h.shape[:2], device=h.device))
            m = m.unsqueeze(-1).to(h.dtype)
            if self.pooling == "mean":
                e = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
            else:
                e = (h + (m - 1.0) * 1e9).amax(1)
        if self.normalize:
            e = e / (e * e).sum(-1, keepdim=True).sqrt().clamp(min=1e-12)
        return e

    def forward(self, input_ids, attention_mask=None, labels=None, **kw):
        from transformers.modeling_outputs import SequenceClassifierOutput

        logits = self.classifier(self.embed(input_ids, attention_mask, **kw))
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)

