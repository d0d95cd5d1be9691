"""Client side of a federated run: the model, the client's batches, its local computation and
replay. Needs no Server (Flower's ClientApp builds only this; the embedded simulation shares one).

Methods of the client computation:

  fwdkern  exact forward gradients (fwdkern.jvp), seeds + scalars up
  mezo     zeroth order (FedKSeed/MeZO style): (L(θ+εv) − L(θ−εv)) / 2ε, seeds + scalars up
  fwdllm   FwdLLM as released: finite differences, Gaussian v, full-gradient uploads
  backprop LoRA FedAvg with autograd: `local_batches` SGD steps per client, full-adapter uploads
"""
from __future__ import annotations

import numpy as np
import torch

from ..ops import seeded_axpy_
from .data import federated_split, load_dataset
from .models import load_model, resolve_task
from .protocol import Update
from .server import derive_seed

__all__ = ["ClientTask", "load_task", "apply_replay"]


def apply_replay(params: dict, names_by_id: dict, record: dict, dist: str = "rademacher"):
    """Reproduce a server SGD step from its replay record (``Server.replay_chain``)."""
    for seed, pid, ks, coeffs in record["ops"]:
        seeded_axpy_(params[names_by_id[pid]], seed, pid, ks, coeffs, dist)


class ClientTask:
    """A client's view of the run: model + tokenizer, its partition of the training split, batching,
    local computation (``client_update``, ``local_backprop``), replay and evaluation."""

    def __init__(self, cfg, model, tokenizer, dataset, task: str = "classification"):
        import fwdkern

        self.cfg, self.model, self.tok, self.task = cfg, model, tokenizer, task
        self.dataset = dataset
        self.train, self.test, self.parts = federated_split(dataset, cfg)
        self.model.eval()
        self.trainable = fwdkern.trainable(model)
        self.params = {n: t for n, _, t in self.trainable}
        self.param_ids = {n: pid for n, pid, _ in self.trainable}
        self.names_by_id = {pid: n for n, pid in self.param_ids.items()}
        self.n_trainable = sum(t.numel() for t in self.params.values())
        self.prompt = None
        if task == "prompt":  # causal LM predicting the label word (fwdkern.fl.prompt)
            from .prompt import PromptTask

            self.prompt = PromptTask(tokenizer, dataset.label_names, cfg.prompt_template, cfg.max_length)

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def load_weights(self, weights: dict):
        if set(weights) != set(self.params):
            raise ValueError("weights do not match this model's trainable tensors")
        for n, p in self.params.items():
            p.copy_(weights[n])

    def weights(self) -> dict:
        return {n: p.detach().cpu().clone() for n, p in self.params.items()}

    def apply_replay(self, record: dict, dist: str):
        apply_replay(self.params, self.names_by_id, record, dist)

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
        rng = np.random.default_rng(derive_seed(self.cfg.seed, rnd, client, 7) % (2**63))
        idx = self.parts[client]
        out = []
        for _ in range(self.cfg.local_batches):
            pick = rng.choice(idx, size=min(self.cfg.batch_size, len(idx)), replace=False)
            out.append(self.batch([self.train.texts[i] for i in pick],
                                  [self.train.labels[i] for i in pick] if self.train.labels else None))
        return out

    # ------------------------------------------------------------------ local computation
    def client_update(self, client: int, plan) -> Update:
        """The seed-and-scalar answer to `plan`: one (sample-averaged) directional derivative per k."""
        import fwdkern

        jv = np.zeros(len(plan.ks))
        loss = 0.0
        n = 0
        for batch in self.client_batches(client, plan.round):
            bs = int(batch["input_ids"].shape[0])
            if self.cfg.method == "fwdkern":
                l, j = fwdkern.jvp(self.model, batch, plan.seed, list(plan.ks), dist=plan.dist, params=list(plan.param_ids))
            else:  # zeroth order: central finite difference per perturbation
                lp, lm = fwdkern.perturbed_loss(self.model, batch, plan.seed, list(plan.ks), self.cfg.eps,
                                                dist=plan.dist, params=list(plan.param_ids))
                j = (lp - lm) / (2 * self.cfg.eps)
                l = (lp + lm) / 2
                l = l.mean()
            jv += np.asarray(torch.as_tensor(j, dtype=torch.float64)) * bs
            loss += float(l) * bs
            n += bs
        return Update(plan.client_id, plan.round, plan.model_version, plan.ks, tuple(float(x) for x in jv / n), n,
                      loss / n).as_sent(self.cfg.wire)

    def local_backprop(self, client: int, rnd: int) -> tuple:
        """Backprop baseline: SGD steps (autograd) from the current weights on the client's batches.
        Leaves the trained weights in place; returns (samples, loss sum)."""
        params = self.params
        n_c, loss_tot = 0, 0.0
        for batch in self.client_batches(client, rnd):
            for p in params.values():
                p.requires_grad_(True)
            out = self.model(**batch)
            grads = torch.autograd.grad(out.loss, list(params.values()), allow_unused=True)
            with torch.no_grad():
                for p, g in zip(params.values(), grads):
                    p.requires_grad_(False)
                    if g is not None:
                        p.sub_(self.cfg.local_lr * g)
            bs = int(batch["input_ids"].shape[0])
            loss_tot += float(out.loss.detach()) * bs
            n_c += bs
        return n_c, loss_tot

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, data) -> dict:
        """Accuracy of the current weights on `data` (a labelled TextDataset); {} when not applicable."""
        if self.task not in ("classification", "prompt") or not data.labels:
            return {}
        correct, tot = 0, 0
        step = 16 if self.prompt is not None else 32
        for i in range(0, len(data), step):
            texts, labels = data.texts[i:i + step], torch.tensor(data.labels[i:i + step])
            correct += int((self._predict(texts, labels) == labels).sum())
            tot += len(labels)
        return {"accuracy": correct / max(1, tot)}

    def _predict(self, texts, labels) -> torch.Tensor:
        if self.prompt is not None:  # label-word logits at the last prompt position
            return self.prompt.predict(self.model, texts)
        b = self.batch(texts, labels.tolist())
        b.pop("labels")
        return self.model(**b).logits.argmax(-1)


def load_task(cfg, log=print) -> ClientTask:
    """Data + model for `cfg`, as every participant of the run builds them."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    data = load_dataset(cfg.data, cfg.text_column, cfg.label_column)
    task = resolve_task(cfg.task, data)
    model, tok = load_model(cfg, data, task)
    log(f"model {cfg.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), data {data.name} "
        f"({len(data)} examples), method {cfg.method}, {cfg.clients} clients / {cfg.clients_per_round} per round")
    return ClientTask(cfg, model, tok, data, task=task)
