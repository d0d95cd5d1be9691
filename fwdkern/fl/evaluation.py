"""Held-out metrics of a run's current weights: test accuracy of a classifier, held-out token loss and
perplexity of a causal LM, and greedy continuations of held-out prompts (samples.md)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .lm import IGNORE

__all__ = ["evaluate", "heldout_loss", "continuations", "samples_markdown"]


@torch.no_grad()
def evaluate(task, data, validation: bool = False) -> dict:
    """Accuracy on `data` (a labelled TextDataset) for a classifier; held-out token loss and perplexity
    (on the task's fixed test -- or `validation` -- windows) for a causal LM; {} when neither applies."""
    if task.task == "causal_lm":
        return heldout_loss(task, validation=validation)
    if task.task not in ("classification", "prompt") or not data.labels:
        return {}
    correct, tot = 0, 0
    step = 16 if task.prompt is not None else 32
    for i in range(0, len(data), step):
        texts, labels = data.texts[i:i + step], torch.tensor(data.labels[i:i + step])
        b = task.batch(texts, labels.tolist())
        b.pop("labels")
        correct += int((task.model(**b).logits.argmax(-1) == labels).sum())
        tot += len(labels)
    return {"accuracy": correct / max(1, tot)}


@torch.no_grad()
def heldout_loss(task, batch_size: int = 8, validation: bool = False) -> dict:
    """Mean next-token loss (nats per target token) over the held-out windows, and its perplexity."""
    wins = task.heldout_windows(validation)
    total, count = 0.0, 0
    for i in range(0, len(wins), batch_size):
        b = task.lm.batch(wins[i:i + batch_size])
        logits = task.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        target = b["labels"][:, 1:]
        total += float(F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                                       ignore_index=IGNORE, reduction="sum"))
        count += int((target != IGNORE).sum())
    if not count:
        return {}
    loss = total / count
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 700.0))}


@torch.no_grad()
def continuations(task, n: int, new_tokens: int = 32) -> list:
    """[(prompt, greedy continuation)] for the openings of the first `n` held-out documents (or their
    prompts): the same prompts every time, so a person can read what training changed."""
    lm, out = task.lm_test, []
    if lm is None:
        return out
    pad = task.tok.pad_token_id if task.tok.pad_token_id is not None else task.tok.eos_token_id
    for d in range(min(n, len(lm.windows))):
        ids = torch.tensor([lm.prompt_ids(d)])
        gen = task.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                  do_sample=False, pad_token_id=pad)
        out.append((task.tok.decode(ids[0], skip_special_tokens=False),
                    task.tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)))
    return out


def samples_markdown(before: list, after: list, title: str) -> str:
    """samples.md: each held-out prompt with its continuation before training and after."""
    lines = [f"# {title}", "", "Greedy continuations of held-out prompts (no client held these documents).", ""]
    for i, (prompt, first) in enumerate(before):
        lines += [f"## Prompt {i + 1}", "", "```text", prompt, "```", "", "**Before training:**", "", "```text",
                  first, "```", ""]
        if i < len(after):
            lines += ["**After training:**", "", "```text", after[i][1], "```", ""]
    return "\n".join(lines)
