"""Embedded single-process federated simulation (the default runner).

All clients live in this process and share the global model (they evaluate it at the
server's current version), so a round costs one `fwdkern.jvp` per (client, batch). The
client computation is :class:`fwdkern.fl.task.ClientTask`'s; this module owns the
server side and the run loop.

Output in `out`: metrics.jsonl (one JSON object per round), summary.json,
checkpoint.safetensors (atomic and hashed, every `checkpoint_every` steps; rerunning the
same command resumes from it), curves.png when matplotlib is installed.
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable, Optional

import numpy as np
import torch

from .checkpoint import CorruptCheckpoint, RunLock, load_checkpoint, save_checkpoint, write_atomic
from .config import METHODS, RunConfig
from .metrics import MetricsLog, plots, progress
from .optim import SGD, FedAdam, FedYogi, LRSchedule
from .pacing import VariancePacing
from .protocol import Update
from .server import Server, derive_seed
from .task import ClientTask, load_task

__all__ = ["Simulation", "build", "RunConfig", "RunFailed"]

CHECKPOINT = "checkpoint.safetensors"


class RunFailed(RuntimeError):
    """A run that cannot make progress (e.g. every client dropped out or was rejected, round after round)."""


class Interrupted(RuntimeError):
    """Ctrl-C during a run: the state before the interrupted round is saved; the message says how to resume."""


def _pacing(cfg: RunConfig) -> Optional[VariancePacing]:
    if cfg.pacing == "off" or cfg.method in ("backprop", "spry"):
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


def _layer_groups(names):
    """SPRY units: tensors of one layer (same module path up to the lora_A/lora_B leaf) together."""
    groups = {}
    for n in names:
        if ".lora_" not in n:
            continue
        key = n.split(".lora_")[0]
        groups.setdefault(key, []).append(n)
    return list(groups.values())


class Simulation:
    """Server + clients of one run (see RunConfig): rounds, evaluation, checkpoints, metrics."""

    def __init__(self, cfg: RunConfig, task: ClientTask, log: Callable = print):
        """`cfg`: the resolved configuration (``task.cfg``: no setting left unset)."""
        if cfg.method not in METHODS:
            raise ValueError(f"method: unknown {cfg.method!r} ({', '.join(METHODS)})")
        self.cfg, self.task, self.log = cfg, task, log
        self.test = task.test
        params = task.params
        groups, shared = None, []
        if cfg.split or cfg.method == "spry":  # LoRA pairs are dealt out; everything else (the head) is shared
            groups = _layer_groups(list(params))
            shared = [n for n in params if not any(n in g for g in groups)]
        if cfg.perturbations == 0 and not task.head_names and cfg.method != "backprop":
            raise ValueError("--perturbations 0 leaves nothing to train: the model has no exact head (--head exact)")
        self.server = Server(params, task.param_ids, _optimizer(cfg), seed=cfg.seed,
                             perturbations_per_client=cfg.perturbations,
                             dist="gaussian" if cfg.method in ("fwdllm", "spry") else cfg.dist, groups=groups, shared=shared,
                             pacing=_pacing(cfg), candidates=cfg.candidates,
                             max_samples=cfg.batch_size * cfg.local_batches, head=task.head_names,
                             head_directions=cfg.head_directions if task.head_names else 0,
                             head_optimizer=SGD(cfg.head_server_lr))
        self.n_trainable = task.n_trainable
        self.metrics: list = []
        self.initial: dict = {}  # test metrics before any training
        self.failed = 0  # consecutive rounds without a valid update
        self.wall = 0.0
        self.cpu = 0.0  # process CPU seconds: comparable across runs on a shared machine
        # Transport of a seed-and-scalar round: callable({client index: RoundPlan}) -> [Update, ...];
        # None = embedded (`_local_exchange`). fwdkern.fl.flower plugs Flower in here.
        self.exchange: Optional[Callable] = None
        self._evaluated: Optional[tuple] = None  # (model version, metrics) of the last evaluation

    @property
    def model(self):
        return self.task.model

    def evaluate(self) -> dict:
        """Test metrics of the current weights. The result is kept per model version, so the final
        evaluation reuses the one of the last round instead of running the test set twice (on
        SmolLM2 one pass over 445 prompts costs more CPU than a training round)."""
        version = self.server.model_version
        if self._evaluated is not None and self._evaluated[0] == version:
            return dict(self._evaluated[1])
        metrics = self.task.evaluate(self.test)
        self._evaluated = (version, dict(metrics))
        return metrics

    # ------------------------------------------------------------------ rounds
    def _run_round_weights(self) -> dict:
        """Weight-upload round (backprop: LoRA FedAvg; spry: SPRY as released). Each answering client
        starts from the global tensors, takes its local steps and uploads the tensors it trained;
        the server averages the updates per tensor (sample-weighted over the clients that trained
        it) and steps its optimizer on minus that average (SGD lr 1 = FedAvg)."""
        cfg, srv = self.cfg, self.server
        chosen, answering = self._choose_clients()
        params = srv.params
        plans = srv.plan_round([f"client{c}" for c in chosen]) if cfg.method == "spry" else None
        start = {n: p.detach().clone() for n, p in params.items()}
        total = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        weight = {n: 0 for n in params}
        n_tot, loss_tot, answered, up = 0, 0.0, 0, []
        for c in answering:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(start[n])
            if plans is None:
                n_c, loss_c = self.task.local_backprop(c, srv.round)
                names = list(params)
            else:
                n_c, loss_c, names = self.task.local_spry(c, plans[f"client{c}"])
            loss_tot += loss_c
            with torch.no_grad():
                for n in names:
                    total[n] += n_c * (params[n].float() - start[n].float())
                    weight[n] += n_c
            up.append(4 * sum(params[n].numel() for n in names))
            n_tot += n_c
            answered += 1
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(start[n])
        rnd = srv.round
        stepped = answered > 0 and srv.apply_update({n: total[n] / weight[n] for n in params if weight[n]})
        if plans is not None:
            srv.plans = {}
        return {"round": rnd, "attempt": 0, "stepped": stepped, "loss": loss_tot / max(1, n_tot),
                "perturbations": 0, "variance": None, "threshold": None,
                "bytes_up_per_client": int(np.mean(up)) if up else 0,
                "bytes_down_per_client": 4 * self.n_trainable, "accepted": answered, "rejected": 0,
                "forward_passes_per_client": self._forward_passes()}

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
        return [self.task.client_update(c, plan) for c, plan in plans.items()]

    def run_round(self) -> dict:
        """One round (or pacing attempt): its metrics row, with an evaluation when the model
        version advanced onto a multiple of eval_every; evaluation is not counted in the times."""
        t0, c0 = time.perf_counter(), time.process_time()
        version = self.server.model_version
        weights = self.cfg.method in ("backprop", "spry")
        row = self._run_round_weights() if weights else self._run_round_seeded()
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
            up.append(len(upd.to_bytes(cfg.wire)) if isinstance(upd, Update) else len(upd))
        info = srv.finish_round()
        if cfg.method == "fwdllm":  # as released: clients upload full trainable-size gradients
            up = [4 * self.n_trainable for _ in up]
        return {"round": info["round"], "attempt": info["attempt"], "stepped": info.get("stepped", False),
                "loss": info.get("loss"), "perturbations": info.get("perturbations", 0),
                "variance": info.get("variance"), "threshold": info.get("threshold"),
                "bytes_up_per_client": int(np.mean(up)) if up else 0,
                "bytes_down_per_client": self._bytes_down(plans), "accepted": info["accepted"],
                "forward_passes_per_client": self._forward_passes(),
                "rejected": info["rejected"], **({"reason": info["reason"]} if "reason" in info else {}),
                **({"noise_ratio": info["noise_ratio"]} if info.get("noise_ratio") is not None else {})}

    def _forward_passes(self) -> int:
        """Client compute per round in forward-pass equivalents: a primal forward 1, each tangent 1
        (an upper bound: a LoRA tangent costs at most a forward), a backward 2."""
        cfg, L, K = self.cfg, self.cfg.local_batches, self.cfg.perturbations or 0
        per_batch = {"fwdkern": 1 + K, "mezo": 2 * K, "fwdllm": 2 * K, "spry": 1 + K, "backprop": 3}[cfg.method]
        return L * per_batch

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
        configuration is refused, or with `replace_other_run` (the canned demo) started over.

        Raises RunFailed after ``max_failed_rounds`` consecutive rounds without a valid update
        (the checkpoint on disk then holds the last good state), RunLocked when another process
        runs in `out`, CorruptCheckpoint for a damaged checkpoint."""
        cfg = self.cfg
        with RunLock(cfg.out):
            return self._run(replace_other_run)

    def _resume(self, ckpt: str, replace_other_run: bool):
        if not os.path.exists(ckpt):
            return
        try:
            sd = load_checkpoint(ckpt)
        except CorruptCheckpoint:
            if not replace_other_run:
                raise
            self.log(f"{ckpt} is unreadable; starting a fresh run")
            return
        saved = sd.get("config") if isinstance(sd.get("config"), dict) else {}
        diff = self.cfg.resume_differences(saved)
        if diff:
            if not replace_other_run:
                shown = ", ".join(f"{k} {saved.get(k)!r} -> {getattr(self.cfg, k, None)!r}" for k in diff[:6])
                raise ValueError(f"{self.cfg.out} holds a run with a different configuration ({shown}); use "
                                 "another --out, or rerun with the saved settings to resume")
            self.log(f"{self.cfg.out} holds a run with other settings; starting a fresh one")
            return
        self.server.load_state_dict(sd["server"])
        self._evaluated = None
        self.metrics, self.wall, self.cpu = sd["metrics"], sd["wall"], sd.get("cpu", 0.0)
        self.failed, self.initial = sd.get("failed", 0), sd.get("initial", {})
        self.log(f"resumed from {ckpt} at round {self.server.round}")

    def _run(self, replace_other_run: bool) -> dict:
        cfg = self.cfg
        ckpt = os.path.join(cfg.out, CHECKPOINT)
        self._resume(ckpt, replace_other_run)
        mlog = MetricsLog(os.path.join(cfg.out, "metrics.jsonl"), self.metrics)
        if not self.metrics and not self.initial:
            self.initial = self.evaluate()
            if self.initial:
                self.log(f"before training: " + ", ".join(f"{k} {v:.3f}" for k, v in self.initial.items()))
        while self.server.model_version < cfg.rounds and not (
                cfg.max_client_rounds and len(self.metrics) >= cfg.max_client_rounds):
            before = self._state()
            try:
                row = self.run_round()
            except KeyboardInterrupt:
                save_checkpoint(ckpt, before)
                raise Interrupted(f"interrupted in round {self.server.round}; the state before it is saved in "
                                  f"{ckpt}: rerun the same command to resume") from None
            self.failed = 0 if row["stepped"] or row.get("reason", "").startswith("variance") else self.failed + 1
            self.metrics.append(row)
            mlog.append(row)
            self.log(progress(row, cfg.rounds, self.server.model_version, len(self.metrics)))
            if self.failed >= cfg.max_failed_rounds:
                self.save(ckpt)
                raise RunFailed(f"{self.failed} consecutive rounds without a valid update (last: "
                                f"{row.get('reason', 'no step')}; {row['accepted']} accepted, {row['rejected']} "
                                f"rejected); state saved in {ckpt}")
            if cfg.checkpoint_every and row["stepped"] and self.server.model_version % cfg.checkpoint_every == 0:
                self.save(ckpt)
        final = self.final_evaluation()
        self.save(ckpt)
        summary = {"config": cfg.to_json(), "initial": self.initial, "final": final,
                   "rounds": self.server.model_version,
                   "client_rounds": len(self.metrics),
                   "perturbation_schedule": self.server.schedule, "wall_time_s": self.wall, "cpu_time_s": self.cpu,
                   "trainable_params": self.n_trainable,
                   "mean_bytes_up_per_client": float(np.mean([m["bytes_up_per_client"] for m in self.metrics])),
                   "rejections": self.server.rejected_total}
        write_atomic(os.path.join(cfg.out, "summary.json"), json.dumps(summary, indent=2).encode())
        plots(self.metrics, cfg.out, self.initial, self._reference_lines())
        return summary

    def _reference_lines(self) -> dict:
        """Chance and majority-class accuracy of the test set (what "it learned" is measured against)."""
        labels = self.test.labels
        if not labels or self.task.task not in ("classification", "prompt"):
            return {}
        counts = np.bincount(labels)
        return {"chance": 1.0 / max(1, len(self.task.dataset.label_names or counts)),
                "majority class": float(counts.max()) / len(labels)}

    def final_evaluation(self) -> dict:
        """The test metrics of the final weights; the last metrics row carries them too, so every run's
        curve ends with an evaluation of its last round."""
        final = self.evaluate()
        if self.metrics and final and "accuracy" not in self.metrics[-1]:
            self.metrics[-1].update(final)
            MetricsLog(os.path.join(self.cfg.out, "metrics.jsonl"), self.metrics)
        return final

    def _state(self) -> dict:
        return {"config": self.cfg.to_json(), "server": self.server.state_dict(), "metrics": list(self.metrics),
                "wall": self.wall, "cpu": self.cpu, "failed": self.failed, "initial": dict(self.initial)}

    def save(self, path):
        save_checkpoint(path, self._state())


def build(cfg: RunConfig, log=print) -> Simulation:
    """The embedded simulation of `cfg`: data, model, clients and server."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg.validate()
    task = load_task(cfg, log=log)
    return Simulation(task.cfg, task, log=log)
