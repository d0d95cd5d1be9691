"""Embedded single-process federated simulation (the default runner).

All clients live in this process and share the global model (they evaluate it
at the server's current version), so a round costs one `fwdkern.jvp` per
(client, batch). Methods:

  fwdkern  exact forward gradients (fwdkern.jvp), seeds + scalars up
  mezo     zeroth order (FedKSeed/MeZO style): (L(θ+εv) − L(θ−εv)) / 2ε, seeds + scalars up
  fwdllm   FwdLLM as released: finite differences, Gaussian v, full-gradient uploads
  backprop LoRA FedAvg with autograd: `local_steps` SGD steps per client on its
           batches, full-adapter uploads, server averages the deltas (sample-weighted)

Output in `out`: metrics.jsonl (one JSON object per round), summary.json,
checkpoint.pt (atomic, every `checkpoint_every` rounds; rerunning the same
command resumes from it), PNG plots when matplotlib is installed.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from .optim import SGD, FedAdam, FedYogi, LRSchedule
from .protocol import Update
from .server import Server, VariancePacing, derive_seed


@dataclass
class RunConfig:
    model: str = "all-minilm-l6-v2"
    data: str = "bbc_news"
    text_column: str = "text"
    label_column: Optional[str] = "label"
    out: str = "runs/demo"
    method: str = "fwdkern"
    clients: int = 100
    clients_per_round: int = 10
    rounds: int = 30
    seed: int = 0
    partition: str = "dirichlet"
    dirichlet_alpha: float = 0.5
    test_fraction: float = 0.2
    max_test: int = 400
    batch_size: int = 8
    max_length: int = 128
    local_batches: int = 1
    r: int = 8
    lora_alpha: float = 16.0
    target_modules: Optional[list] = None
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.0
    warmup: int = 0
    decay: str = "constant"
    perturbations: int = 1
    pacing: str = "auto"  # "off", "auto", or a float threshold
    max_pacing_attempts: int = 4
    candidates: int = 1
    split: bool = False
    eps: float = 1e-3
    dist: str = "rademacher"
    eval_every: int = 5
    checkpoint_every: int = 5
    dropout: float = 0.0  # fraction of sampled clients that never answer
    num_threads: int = 0
    local_lr: float = 0.05  # backprop baseline: client SGD learning rate
    task: str = "auto"  # auto (classification if labelled, else causal LM) | classification | prompt | causal_lm
    prompt_template: str = "{text}\nTopic:"  # task=prompt: the label word follows this prompt

    def to_json(self):
        return dataclasses.asdict(self)


def _pacing(cfg: RunConfig) -> Optional[VariancePacing]:
    if cfg.pacing == "off" or cfg.method in ("backprop", "fwdllm"):
        return None
    if cfg.pacing == "auto":
        return VariancePacing(None, max_attempts=cfg.max_pacing_attempts)
    return VariancePacing(float(cfg.pacing), max_attempts=cfg.max_pacing_attempts)


def _optimizer(cfg: RunConfig):
    sched = LRSchedule(cfg.lr, warmup=cfg.warmup, total=cfg.rounds, decay=cfg.decay)
    if cfg.optimizer == "sgd":
        return SGD(sched, momentum=cfg.momentum)
    if cfg.optimizer == "fedadam":
        return FedAdam(sched)
    if cfg.optimizer == "fedyogi":
        return FedYogi(sched)
    raise ValueError(f"optimizer: unknown {cfg.optimizer!r} (sgd, fedadam, fedyogi)")


class Simulation:
    """Wires data, model, server and clients for one run (see RunConfig)."""

    def __init__(self, cfg: RunConfig, model, tokenizer, dataset, task: str = "classification", log: Callable = print):
        import fwdkern

        if cfg.method not in ("fwdkern", "mezo", "fwdllm", "backprop"):
            raise ValueError(f"method: unknown {cfg.method!r} (fwdkern, mezo, fwdllm, backprop)")
        self.cfg, self.model, self.tok, self.task, self.log = cfg, model, tokenizer, task, log
        from .data import partition, train_test_split

        train_idx, test_idx = train_test_split(len(dataset), cfg.test_fraction, cfg.seed)
        self.train = dataset.subset(train_idx)
        self.test = dataset.subset(test_idx[: cfg.max_test])
        labels = self.train.labels if self.train.labels is not None else [0] * len(self.train)
        self.parts = partition(labels, cfg.clients, cfg.partition, cfg.dirichlet_alpha, cfg.seed)
        self.model.eval()
        self.trainable = fwdkern.trainable(model)
        params = {n: t for n, _, t in self.trainable}
        ids = {n: pid for n, pid, _ in self.trainable}
        groups, shared = None, []
        if cfg.split:  # LoRA pairs are dealt out; everything else (the head) is shared
            groups = _layer_groups(list(params))
            shared = [n for n in params if not any(n in g for g in groups)]
        self.server = Server(params, ids, _optimizer(cfg), seed=cfg.seed, perturbations_per_client=cfg.perturbations,
                             dist="gaussian" if cfg.method == "fwdllm" else cfg.dist, groups=groups, shared=shared,
                             pacing=_pacing(cfg), candidates=cfg.candidates)
        self.n_trainable = sum(t.numel() for t in params.values())
        self.prompt = None
        if task == "prompt":  # causal LM predicting the label word (fwdkern.fl.prompt)
            from .prompt import PromptTask

            self.prompt = PromptTask(tokenizer, dataset.label_names, cfg.prompt_template, cfg.max_length)
        self.metrics: list = []
        self.wall = 0.0
        self.cpu = 0.0  # process CPU seconds: comparable across runs on a shared machine
        # Transport of a seed-and-scalar round: callable({client index: RoundPlan}) -> [Update, ...];
        # None = embedded (`_local_exchange`). fwdkern.fl.flower_app plugs Flower in here.
        self.exchange: Optional[Callable] = None

    # ------------------------------------------------------------------ batches
    def _batch(self, texts, labels):
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
            out.append(self._batch([self.train.texts[i] for i in pick],
                                   [self.train.labels[i] for i in pick] if self.train.labels else None))
        return out

    # ------------------------------------------------------------------ clients
    def client_update(self, client: int, plan) -> Update:
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
                      loss / n)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        if self.task not in ("classification", "prompt") or not self.test.labels:
            return {}
        correct, tot = 0, 0
        step = 16 if self.prompt is not None else 32
        for i in range(0, len(self.test), step):
            texts, labels = self.test.texts[i:i + step], torch.tensor(self.test.labels[i:i + step])
            correct += int((self._predict(texts, labels) == labels).sum())
            tot += len(labels)
        return {"accuracy": correct / max(1, tot)}

    def _predict(self, texts, labels) -> torch.Tensor:
        if self.prompt is not None:  # label-word logits at the last prompt position
            return self.prompt.predict(self.model, texts)
        b = self._batch(texts, labels.tolist())
        b.pop("labels")
        return self.model(**b).logits.argmax(-1)

    # ------------------------------------------------------------------ rounds
    def _run_round_backprop(self) -> dict:
        """LoRA FedAvg: clients start from the global adapter, take local SGD steps with
        autograd and upload their full trainable tensors; the server averages."""
        cfg, srv = self.cfg, self.server
        _, answering = self._choose_clients()
        params = srv.params
        start = {n: p.detach().clone() for n, p in params.items()}
        total = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        n_tot, loss_tot, answered = 0, 0.0, 0
        for c in answering:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(start[n])
            n_c = 0
            for batch in self.client_batches(c, srv.round):
                for p in params.values():
                    p.requires_grad_(True)
                out = self.model(**batch)
                grads = torch.autograd.grad(out.loss, list(params.values()), allow_unused=True)
                with torch.no_grad():
                    for p, g in zip(params.values(), grads):
                        p.requires_grad_(False)
                        if g is not None:
                            p.sub_(cfg.local_lr * g)
                bs = int(batch["input_ids"].shape[0])
                loss_tot += float(out.loss.detach()) * bs
                n_c += bs
            with torch.no_grad():
                for n, p in params.items():
                    total[n] += n_c * (p.float() - start[n].float())
            n_tot += n_c
            answered += 1
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(start[n] + (total[n] / max(1, n_tot)).to(p.dtype))
        srv.model_version += 1
        srv.round += 1
        upload = 4 * self.n_trainable
        return {"round": srv.round - 1, "attempt": 0, "stepped": answered > 0, "loss": loss_tot / max(1, n_tot),
                "perturbations": 0, "variance": None, "threshold": None, "bytes_up_per_client": upload,
                "bytes_down_per_client": upload, "accepted": answered, "rejected": 0}

    def _choose_clients(self) -> tuple:
        """(sampled, answering) client indices of the current round/attempt, both sorted.

        `answering` drops the simulated dropouts (``cfg.dropout``); the draws are the
        same ones the embedded loop always made, so every runner samples identically.
        """
        cfg, srv = self.cfg, self.server
        rng = np.random.default_rng(derive_seed(cfg.seed, srv.round, srv.attempt, 1) % (2**63))
        chosen = sorted(rng.choice(cfg.clients, size=min(cfg.clients_per_round, cfg.clients), replace=False).tolist())
        answering = [c for c in chosen if not (cfg.dropout and rng.random() < cfg.dropout)]
        return chosen, answering

    def _local_exchange(self, plans: dict) -> list:
        """Embedded transport: every client evaluates the shared model in this process."""
        return [self.client_update(c, plan) for c, plan in plans.items()]

    def run_round(self) -> dict:
        """One round (or pacing attempt): its metrics row, with an evaluation when the model
        version advanced onto a multiple of eval_every; evaluation is not counted in the times."""
        t0, c0 = time.perf_counter(), time.process_time()
        version = self.server.model_version
        row = self._run_round_backprop() if self.cfg.method == "backprop" else self._run_round_seeded()
        self.wall += time.perf_counter() - t0
        self.cpu += time.process_time() - c0
        v, every = self.server.model_version, self.cfg.eval_every
        if every and v != version and v % every == 0:
            row.update(self.evaluate())
        row["wall_time_s"] = round(self.wall, 3)
        row["cpu_time_s"] = round(self.cpu, 3)
        return row

    def _run_round_seeded(self) -> dict:
        """Seed-and-scalar round (fwdkern, mezo, fwdllm): plans out, scalar updates back."""
        cfg, srv = self.cfg, self.server
        chosen, answering = self._choose_clients()
        plans = srv.plan_round([f"client{c}" for c in chosen])
        # The exchange gets {client index: plan} in sorted client order and returns the
        # updates that arrived (an Update or its bytes each), in that same order, so the
        # aggregation is identical whatever the transport (`exchange`, e.g. Flower).
        exchange = self.exchange or self._local_exchange
        up = []
        for upd in exchange({c: plans[f"client{c}"] for c in answering}):
            srv.submit(upd)
            up.append(upd.nbytes if isinstance(upd, Update) else len(upd))
        info = srv.finish_round()
        if cfg.method == "fwdllm":  # as released: clients upload full trainable-size gradients
            up = [4 * self.n_trainable for _ in up]
        return {"round": info["round"], "attempt": info["attempt"], "stepped": info.get("stepped", False),
                "loss": info.get("loss"), "perturbations": info.get("perturbations", 0),
                "variance": info.get("variance"), "threshold": info.get("threshold"),
                "bytes_up_per_client": int(np.mean(up)) if up else 0,
                "bytes_down_per_client": self._bytes_down(plans), "accepted": info["accepted"],
                "rejected": info["rejected"]}

    def _bytes_down(self, plans) -> int:
        # Clients holding the previous version replay (seed, ks, coeffs) when the server optimizer is
        # linear; otherwise they download the LoRA weights.
        plan_bytes = int(np.mean([len(json.dumps(p.to_config())) for p in plans.values()]))
        if self.server.replay_log and self.server.optimizer.linear:
            rec = self.server.replay_log[-1]
            return plan_bytes + len(json.dumps(rec["ops"]))
        return plan_bytes + 4 * self.n_trainable

    # ------------------------------------------------------------------ driver
    def run(self, replace_other_run: bool = False) -> dict:
        """Run (or resume from `out`'s checkpoint) to `rounds` steps. A checkpoint of another
        configuration is refused, or with `replace_other_run` (the canned demo) started over."""
        cfg = self.cfg
        os.makedirs(cfg.out, exist_ok=True)
        ckpt = os.path.join(cfg.out, "checkpoint.pt")
        mpath = os.path.join(cfg.out, "metrics.jsonl")
        sd = None
        if os.path.exists(ckpt):
            try:
                sd = torch.load(ckpt, weights_only=False)
            except Exception:  # unreadable (e.g. written by an older version)
                if not replace_other_run:
                    raise
            if sd is None or sd.get("config") != cfg.to_json():
                if not replace_other_run:
                    raise ValueError(f"{cfg.out} holds a run with a different configuration; use another --out")
                self.log(f"{cfg.out} holds a run with other settings; starting a fresh one")
                sd = None
        if sd is not None:
            self.server.load_state_dict(sd["server"])
            self.metrics, self.wall, self.cpu = sd["metrics"], sd["wall"], sd.get("cpu", 0.0)
            self.log(f"resumed from {ckpt} at round {self.server.round}")
        with open(mpath, "w") as f:  # rewrite: rows after the checkpoint are recomputed
            for row in self.metrics:
                f.write(json.dumps(row) + "\n")
        while self.server.model_version < cfg.rounds:
            row = self.run_round()
            self.metrics.append(row)
            with open(mpath, "a") as f:
                f.write(json.dumps(row) + "\n")
            self.log(_progress(row, cfg.rounds, self.server.model_version))
            if cfg.checkpoint_every and row["stepped"] and self.server.model_version % cfg.checkpoint_every == 0:
                self.save(ckpt)
        self.save(ckpt)
        final = self.evaluate()
        summary = {"config": cfg.to_json(), "final": final, "rounds": self.server.model_version,
                   "perturbation_schedule": self.server.schedule, "wall_time_s": self.wall, "cpu_time_s": self.cpu,
                   "trainable_params": self.n_trainable,
                   "mean_bytes_up_per_client": float(np.mean([m["bytes_up_per_client"] for m in self.metrics])),
                   "rejections": len(self.server.rejections)}
        with open(os.path.join(cfg.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        _plots(self.metrics, cfg.out)
        return summary

    def save(self, path):
        sd = {"config": self.cfg.to_json(), "server": self.server.state_dict(), "metrics": self.metrics,
              "wall": self.wall, "cpu": self.cpu}
        tmp = path + ".tmp"
        torch.save(sd, tmp)
        os.replace(tmp, path)


def _layer_groups(names):
    """SPRY units: tensors of one layer (same module path up to the lora_A/lora_B leaf) together."""
    groups = {}
    for n in names:
        if ".lora_" not in n:
            continue
        key = n.split(".lora_")[0]
        groups.setdefault(key, []).append(n)
    return list(groups.values())


def _progress(row, total, version) -> str:
    width = 30
    done = int(width * version / max(1, total))
    acc = f" acc {row['accuracy']:.3f}" if "accuracy" in row else ""
    loss = f" loss {row['loss']:.4f}" if row.get("loss") is not None else ""
    return (f"[{'#' * done}{'.' * (width - done)}] step {version}/{total} (round {row['round']})"
            f"{loss}{acc} K={row['perturbations']} up={row['bytes_up_per_client']}B t={row['wall_time_s']:.1f}s")


def _plots(metrics, out):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ev = [m for m in metrics if "accuracy" in m]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    ax[0].plot([m["round"] for m in ev], [m["accuracy"] for m in ev], marker="o")
    ax[0].set(xlabel="round", ylabel="accuracy", title="accuracy vs round")
    ax[1].plot([m["wall_time_s"] for m in ev], [m["accuracy"] for m in ev], marker="o")
    ax[1].set(xlabel="wall time (s)", ylabel="accuracy", title="accuracy vs wall time")
    st = [m for m in metrics if m["stepped"]]
    ax[2].step(range(1, len(st) + 1), [m["perturbations"] for m in st], where="post")
    ax[2].set(xlabel="optimizer step", ylabel="perturbations", title="perturbation schedule")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=100)
    plt.close(fig)
