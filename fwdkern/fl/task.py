"""A client's view of a federated run: the model and tokenizer, its partition of the training split,
its batches, and the trainable tensors it holds. Needs no Server (Flower's ClientApp builds only
this; the embedded simulation shares one among its clients).

What a client computes is :mod:`fwdkern.fl.client` (the method's row says which step), the exact
head's training :mod:`fwdkern.fl.head`, the test metrics :mod:`fwdkern.fl.evaluation`.
"""
from __future__ import annotations

import numpy as np
import torch

from .._seed import derive_seed
from ..engine import trainable
from .data import federated_split, load_dataset
from .head import ExactHead, find_head
from .methods import method as method_row
from .models import load_model, resolve_task

__all__ = ["ClientTask", "load_task"]


class ClientTask:
    """Model + tokenizer, the run's split and the client partitions, batching and the trainable tensors.

    `cfg` is the resolved configuration (fwdkern.fl.recipe: no setting left unset); `head_at`: the
    (path, names) of the head trained exactly (:func:`fwdkern.fl.head.find_head`), or None."""

    def __init__(self, cfg, model, tokenizer, dataset, task: str = "classification", head_at=None, split=None):
        self.cfg, self.model, self.tok, self.task = cfg, model, tokenizer, task
        self.method = method_row(cfg.method)
        self.dataset = dataset
        self.train, self.test, self.parts = split if split is not None else federated_split(dataset, cfg)
        self.model.eval()
        tr = trainable(model)
        self.params = {n: t for n, _, t in tr}
        self.param_ids = {n: pid for n, pid, _ in tr}
        self.names_by_id = {pid: n for n, pid in self.param_ids.items()}
        self.n_trainable = sum(t.numel() for t in self.params.values())
        self.head = None
        if head_at is not None:
            self.head = ExactHead.from_config(cfg, model, self.params, self.names_by_id, *head_at, self.train.labels,
                                              getattr(dataset, "label_names", None))
        self.prompt = None
        if task == "prompt":  # label-word logits of a causal LM (fwdkern.fl.prompt)
            from .prompt import PromptTask

            self.prompt = PromptTask(tokenizer, dataset.label_names, cfg.prompt_template, cfg.max_length)

    @property
    def head_names(self) -> list:
        """The tensors trained exactly on the clients ([] when none)."""
        return self.head.names if self.head is not None else []

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def load_weights(self, weights: dict):
        if set(weights) != set(self.params):
            raise ValueError("weights do not match this model's trainable tensors")
        for n, p in self.params.items():
            p.copy_(weights[n])

    def weights(self) -> dict:
        return {n: p.detach().cpu().clone() for n, p in self.params.items()}

    # ------------------------------------------------------------------ batches
    def batch(self, texts, labels):
        if self.prompt is not None:
            return self.prompt.batch(texts, labels)
        enc = self.tok(list(texts), padding=True, truncation=True, max_length=self.cfg.max_length, return_tensors="pt")
        batch = dict(enc)
        if self.task == "classification":
            batch["labels"] = torch.tensor(labels, dtype=torch.long)
        else:
            lab = enc["input_ids"].clone()
            lab[enc["attention_mask"] == 0] = -100
            batch["labels"] = lab
        return batch

    def client_batches(self, client: int, rnd: int):
        """The `local_batches` batches client `client` trains on in round `rnd` (drawn from its partition)."""
        rng = np.random.default_rng(derive_seed(self.cfg.seed, rnd, client, 7) % (2**63))
        idx = self.parts[client]
        out = []
        for _ in range(self.cfg.local_batches):
            pick = rng.choice(idx, size=min(self.cfg.batch_size, len(idx)), replace=False)
            out.append(self.batch([self.train.texts[i] for i in pick],
                                  [self.train.labels[i] for i in pick] if self.train.labels else None))
        return out

    def answer(self, client: int, plan):
        """The method's client step for `plan` (wire bytes or a WeightUpload)."""
        return self.method.client_step(self, client, plan)


def load_task(cfg, log=print) -> ClientTask:
    """Data + model for `cfg`, as every participant of the run builds them. The default recipe
    (:mod:`fwdkern.fl.recipe`) fills in every setting left unset before the task is built, from the
    model (whether it has a head to train exactly), the training split's size and the clients."""
    from .recipe import resolve

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    data = load_dataset(cfg.data, cfg.text_column, cfg.label_column)
    task = resolve_task(cfg.task, data)
    split = federated_split(data, cfg)
    model, tok = load_model(cfg, data, task)
    head_at = find_head(cfg, model, task, method_row(cfg.method))
    resolved = resolve(cfg, len(split[0]), head_at is not None)
    log(f"model {cfg.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), data {data.name} "
        f"({len(data)} examples), method {cfg.method}, {cfg.clients} clients / {cfg.clients_per_round} per round")
    return ClientTask(resolved, model, tok, data, task=task, head_at=head_at, split=split)
