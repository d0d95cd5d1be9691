"""Classification as next-token prediction for causal LMs (prompt classification).

Each example becomes ``template.format(text=...)`` followed by the first token of
`` " " + label_name`` (the verbalizer); only that token carries a loss, so
``fwdkern.jvp``'s causal-LM path applies the LM head to one position per example.
Prediction compares the LM's logits for the verbalizer tokens at the last prompt
position (the LM head is applied to those positions only: [B, vocab] never [B, T, vocab]).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


class PromptTask:
    def __init__(self, tokenizer, label_names: Sequence[str], template: str = "{text}\nTopic:",
                 max_length: int = 128):
        if "{text}" not in template:
            raise ValueError(f"prompt_template must contain '{{text}}', got {template!r}")
        self.tok = tokenizer
        self.max_length = int(max_length)
        pre, post = template.split("{text}", 1)
        enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"] if s else []  # noqa: E731
        bos = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None else []
        self.prefix, self.suffix = bos + enc(pre), enc(post)
        self.verbalizer = [enc(" " + str(n).replace("_", " "))[0] for n in label_names]
        if len(set(self.verbalizer)) != len(self.verbalizer):
            raise ValueError(f"label names {list(label_names)} share a first token; rename them so each starts "
                             f"with a distinct token")
        self.budget = self.max_length - len(self.prefix) - len(self.suffix) - 1
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
        if labels is None:
            raise ValueError("prompt classification needs labels")
        prompts = self._prompts(texts)
        rows = [p + [self.verbalizer[y]] for p, y in zip(prompts, labels)]
        ids, mask = self._pad(rows)
        lab = torch.full_like(ids, -100)
        for i, (p, y) in enumerate(zip(prompts, labels)):
            lab[i, len(p)] = self.verbalizer[y]
        return {"input_ids": ids, "attention_mask": mask, "labels": lab}

    @torch.no_grad()
    def predict(self, model, texts) -> torch.Tensor:
        prompts = self._prompts(texts)
        ids, mask = self._pad(prompts)
        out = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
        h = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
        last = torch.tensor([len(p) - 1 for p in prompts])
        logits = model.get_output_embeddings()(h[torch.arange(len(prompts)), last])
        return logits[:, self.verbalizer].argmax(-1)
