"""Causal-LM data of a federated run: documents cut into training windows, prompt/response pairs with
the loss on the response only, and the held-out windows and prompts that say whether it learned.

A document is tokenized once and split into consecutive windows of at most ``max_length`` tokens,
each next-token target in exactly one window (nothing is truncated away); a prompt/response pair is
one window whose prompt positions carry no loss (label -100), the prompt wrapped in the tokenizer's
chat template when it has one. Clients
hold documents (fwdkern.fl.data.partition deals documents), so no window of a document reaches two
clients, and the held-out windows come from documents no client holds.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100

__all__ = ["Window", "LMData", "bos_prefix", "check_model_takes", "encode_prompt", "uses_chat_template", "wrap_prompt"]


@dataclass(frozen=True)
class Window:
    """One training or held-out sequence: token ids and their labels (IGNORE where no loss is taken)."""

    doc: int
    ids: tuple
    labels: tuple


def bos_prefix(tokenizer) -> list:
    """``[bos_token_id]`` when the tokenizer itself starts an encoding with its BOS token (what the model
    saw at position 0 in training), else ``[]``. Read from what it does, since ``add_bos_token`` is not
    set on every tokenizer that adds one (Gemma's adds BOS through its post-processor)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    with_special = tokenizer("a")["input_ids"]
    return [bos] if (with_special and with_special[0] == bos
                     and len(with_special) > len(tokenizer("a", add_special_tokens=False)["input_ids"])) else []


def encode_prompt(tokenizer, prompt: str, chat_template: str = "auto") -> list:
    """The token ids a prompt/response pair's prompt trains on, and a generation from it starts from:
    wrapped in the chat template when the tokenizer has one (which supplies its own special tokens), else
    the tokenizer's BOS first (:func:`bos_prefix`)."""
    bos = [] if uses_chat_template(tokenizer, chat_template) else bos_prefix(tokenizer)
    return bos + tokenizer(wrap_prompt(tokenizer, prompt, chat_template), add_special_tokens=False)["input_ids"]


def uses_chat_template(tokenizer, chat_template: str = "auto") -> bool:
    return chat_template != "off" and getattr(tokenizer, "chat_template", None) is not None


def wrap_prompt(tokenizer, prompt: str, chat_template: str = "auto") -> str:
    """`prompt` as a user turn of the tokenizer's chat template, ready for the reply (unchanged without one)."""
    if uses_chat_template(tokenizer, chat_template):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt


def check_model_takes(path: str, max_length: int):
    """ValueError when `max_length` exceeds the positions the model at `path` takes (its config only)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if limit and max_length > limit:
        raise ValueError(f"--max-length {max_length} is longer than anything the model takes ({limit} positions)")


class LMData:
    """Windows of a TextDataset's documents (or prompt/response pairs) for a causal LM.

    `windows[d]`: the windows of document d, in order. ``prompt_ids(d)``: the opening of document d
    (or its prompt) that a sample continues."""

    def __init__(self, tokenizer, dataset, max_length: int, chat_template: str = "auto", where: str = "--data"):
        self.tok, self.max_length = tokenizer, int(max_length)
        self.bos = bos_prefix(tokenizer)
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.chat_template = chat_template
        self.chat = uses_chat_template(tokenizer, chat_template)
        self.pairs = dataset.prompts is not None
        self._openings: list = []
        if self.pairs:
            self.windows = [self._pair(i, p, r, where) for i, (p, r) in enumerate(zip(dataset.prompts, dataset.texts))]
        else:
            self.windows = self._documents(dataset.texts)
        if not any(self.windows):
            raise ValueError(f"{where}: no text to train on (every document is empty after tokenization)")

    def _encode(self, texts) -> list:
        return self.tok(list(texts), add_special_tokens=False)["input_ids"]

    def _documents(self, texts) -> list:
        out = []
        L = self.max_length
        if self.bos and L < 3:
            raise ValueError(f"--max-length {L}: this model's sequences start with its BOS token, so a window needs "
                             "at least 3 positions (BOS, a context token, a target)")
        for d, ids in enumerate(self._encode(texts)):
            ids = self.bos + ids + self.eos
            # Consecutive windows share one token (the next one's first is its context only), so every
            # next-token target of the document is in exactly one window.
            if not self.bos:
                wins = [ids[i:i + L] for i in range(0, max(1, len(ids) - 1), max(1, L - 1))]
                wins = [Window(d, tuple(w), tuple(w)) for w in wins if len(w) >= 2]
            else:
                # A model that starts every sequence with BOS reads a window without it as a different
                # distribution (Gemma: bench/results/README.md, its learning section), so every window
                # starts with BOS; after the first, BOS and the shared context token carry no loss.
                wins = [Window(d, tuple(ids[:L]), tuple(ids[:L]))] if len(ids) > len(self.bos + self.eos) else []
                for c in range(L - 1, len(ids) - 1 if wins else 0, L - 2):  # c: the shared context token
                    w = ids[c:c + L - 1]
                    wins.append(Window(d, tuple(self.bos + w), (IGNORE, IGNORE) + tuple(w[1:])))
            out.append(wins)
            self._openings.append(ids[:max(2, min(16, len(ids) // 2))])
        return out

    def _pair(self, d, prompt, response, where) -> list:
        p = encode_prompt(self.tok, prompt, self.chat_template)
        r = self._encode([response])[0] + self.eos
        if len(p) >= self.max_length:
            raise ValueError(f"{where}: the prompt of row {d + 1} is {len(p)} tokens, which leaves no room for its "
                             f"response in --max-length {self.max_length}; raise --max-length or shorten it")
        ids = (p + r)[:self.max_length]
        self._openings.append(p)
        return [Window(d, tuple(ids), tuple([IGNORE] * len(p) + ids[len(p):]))]

    def prompt_ids(self, d: int) -> list:
        return list(self._openings[d])

    def batch(self, windows) -> dict:
        """Right-padded input_ids, attention_mask and labels (IGNORE on padding and prompt tokens)."""
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else (self.eos or [0])[0]
        T = max(len(w.ids) for w in windows)
        ids = torch.full((len(windows), T), pad, dtype=torch.long)
        mask = torch.zeros((len(windows), T), dtype=torch.long)
        labels = torch.full((len(windows), T), IGNORE, dtype=torch.long)
        for i, w in enumerate(windows):
            ids[i, :len(w.ids)] = torch.tensor(w.ids)
            mask[i, :len(w.ids)] = 1
            labels[i, :len(w.labels)] = torch.tensor(w.labels)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
