"""The trainable classifier head of a patched model: the first ``modules_to_save`` module holding
trainable tensors (a fresh classification head, a verbalizer's label-word rows). Both exact-head
trainers (the Hugging Face Trainer's and the federated client's) find it here."""
from __future__ import annotations

from typing import Optional

from torch import nn

from .patching import get_config, trainable


def trainable_head(model: nn.Module) -> tuple[Optional[str], list]:
    """(module path, trainable tensor names under it) of the model's head, or (None, [])."""
    info = getattr(model, "fwdkern_config", None)
    if info is None:
        return None, []
    names = [n for n, _, _ in trainable(model)]
    for path in get_config(model).modules_to_save:
        mine = [n for n in names if n.startswith(path + ".")]
        if mine:
            return path, mine
    return None, []
