"""Test metrics of a run's current weights (on the held-out split every participant builds)."""
from __future__ import annotations

import torch

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(task, data) -> dict:
    """Accuracy of `task`'s model on `data` (a labelled TextDataset); {} when not applicable."""
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
