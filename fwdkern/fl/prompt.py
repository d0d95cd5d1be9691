"""Classification as next-token prediction for causal LMs (prompt classification).

Each example becomes ``template.format(text=...)``; its class is read from the LM's logits of the
label words (the first token of ``" " + label_name``: the verbalizer) at the last prompt position.
The model is a :class:`fwdkern.nn.VerbalizerForSequenceClassification`: the verbalizer rows of the
LM head as a classifier head, trained with cross-entropy over the label words (see there why not
over the vocabulary), so every method trains and evaluates it as a sequence classifier.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .lm import bos_prefix


class PromptTask:
    def __init__(self, tokenizer, label_names: Sequence[str], template: str = "{text}\nTopic:",
                 max_length: int = 128):
        if "{text}" not in template:
            raise ValueError(f"prompt_template must contain '{{text}}', got {template!r}")
        self.tok = tokenizer
        self.max_length = int(max_length)
        pre, post = template.split("{text}", 1)
        enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"] if s else []  # noqa: E731
        self.prefix, self.suffix = bos_prefix(tokenizer) + enc(pre), enc(post)
        self.verbalizer = verbalizer_ids(tokenizer, label_names)
        self.budget = self.max_length - len(self.prefix) - len(self.suffix)
        if self.budget < 1:
            raise ValueError(f"max_length {max_length} leaves no room for text in the prompt template")
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def _prompts(self, texts):
        ids = self.tok(list(texts), add_special_tokens=False, truncation=True, max_length=self.budget)["input_ids"]
        return [self.prefix + t + self.suffix for t in ids]

    def _pad(self, rows):
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for i, r in enumerate(rows):  # right padding: positions stay 0..len-1 for every row
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        return ids, mask

    def batch(self, texts, labels: Optional[Sequence[int]]) -> dict:
        """Right-padded prompts and their class ids (labels None: inputs only)."""
        ids, mask = self._pad(self._prompts(texts))
        batch = {"input_ids": ids, "attention_mask": mask}
        if labels is not None:
            batch["labels"] = torch.tensor(list(labels), dtype=torch.long)
        return batch


def verbalizer_ids(tokenizer, label_names: Sequence[str]) -> list:
    """The first token of " " + name for each label name (underscores read as spaces); distinct."""
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    ids = [enc(" " + str(n).replace("_", " "))[0] for n in label_names]
    if len(set(ids)) != len(ids):
        raise ValueError(f"label names {list(label_names)} share a first token; rename them so each starts "
                         f"with a distinct token")
    return ids
