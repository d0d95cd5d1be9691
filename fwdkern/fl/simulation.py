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

from .._seed import derive_seed
from .checkpoint import CorruptCheckpoint, RunLock, atomic_path, load_checkpoint, save_checkpoint, write_atomic
from .config import RunConfig
from .evaluation import continuations, evaluate, samples_markdown
from .guard import Guard
from .metrics import MetricsLog, plots, progress, provenance
from .optim import SGD, FedAdam, FedYogi, LRSchedule
from .pacing import VariancePacing
from .protocol import RoundRow, client_id
from .runstate import LAYOUT, LayoutError, foreign_files, migrate
from .sync import Download, Holdings, swapped
from .server import Server
from .task import ClientTask, load_task

__all__ = ["Simulation", "build", "RunConfig", "RunFailed"]

CHECKPOINT = "checkpoint.safetensors"


class RunFailed(RuntimeError):
    """A run that cannot make progress (e.g. every client dropped out or was rejected, round after round)."""


class Interrupted(RuntimeError):
    """Ctrl-C during a run: the state before the interrupted round is saved; the message says how to resume."""


def _pacing(cfg: RunConfig, method) -> Optional[VariancePacing]:
    if cfg.pacing == "off" or not method.pacing:
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
    """Server + clients of one run (the task's resolved RunConfig): rounds, evaluation, checkpoints, metrics."""

    def __init__(self, task: ClientTask, log: Callable = print):
        cfg = task.cfg
        self.cfg, self.task, self.log, self.method = cfg, task, log, task.method
        self.test = task.test
        params = task.params
        groups, shared = None, []
        if cfg.split or self.method.deals_layers:  # LoRA pairs are dealt out; everything else (the head) is shared
            groups = _layer_groups(list(params))
            shared = [n for n in params if not any(n in g for g in groups)]
        if cfg.perturbations == 0 and not task.head_names and self.method.perturbs:
            raise ValueError("--perturbations 0 leaves nothing to train: the model has no exact head (--head exact)")
        self.server = Server(params, task.param_ids, _optimizer(cfg), seed=cfg.seed,
                             client_state=self.method.server_step == "seeded",
                             perturbations_per_client=cfg.perturbations,
                             dist=self.method.perturbation_dist(cfg.dist), groups=groups, shared=shared,
                             contiguous_groups=self.method.deal == "blocks",
                             pacing=_pacing(cfg, self.method), candidates=cfg.candidates,
                             max_samples=cfg.batch_size * cfg.local_batches, head=task.head_names,
                             head_directions=cfg.head_directions if task.head_names else 0,
                             head_optimizer=SGD(cfg.head_server_lr),
                             guard=Guard(cfg.guard_tolerance) if cfg.guard == "on" else None)
        self.n_trainable = task.n_trainable
        self.metrics: list = []  # RoundRow per client round
        self.initial: dict = {}  # test metrics before any training
        self.failed = 0  # consecutive rounds without a valid update
        self.wall = 0.0
        self.cpu = 0.0  # process CPU seconds: comparable across runs on a shared machine
        # Transport of a seed-and-scalar round: callable({client index: RoundPlan}, {client index: Download})
        # -> [Update wire bytes, ...]; None = embedded (`_local_exchange`).
        # fwdkern.fl.flower plugs Flower in here.
        self.exchange: Optional[Callable] = None
        self.holdings = Holdings(first=0)  # the model version each client holds (fwdkern.fl.sync)
        self._download_sizes: list = []  # (bytes, first contact) per client per round
        self.on_download: Optional[Callable] = None  # callable(client, download record), e.g. to check it
        self._evaluated: Optional[tuple] = None  # (model version, metrics) of the last evaluation
        self.samples_before: list = []  # causal LM: held-out prompts continued before training

    @property
    def model(self):
        """The model, holding the server's current weights (the embedded clients share it)."""
        self._sync_model()
        return self.task.model

    def _sync_model(self):
        """Every embedded client downloads the server's current weights into the one shared model."""
        self.task.load_weights(self.server.params)

    def evaluate(self) -> dict:
        """Test metrics of the current weights. The result is kept per model version, so the final
        evaluation reuses the one of the last round instead of running the test set twice (on
        SmolLM2 one pass over 445 prompts costs more CPU than a training round)."""
        version = self.server.model_version
        if self._evaluated is not None and self._evaluated[0] == version:
            return dict(self._evaluated[1])
        self._sync_model()
        metrics = evaluate(self.task, self.test)
        if self.task.validation is not None:  # what settings are chosen on (never the test split)
            metrics.update({f"val_{k}": v for k, v in evaluate(self.task, self.task.validation, True).items()})
        self._evaluated = (version, dict(metrics))
        return metrics

    # ------------------------------------------------------------------ rounds
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

    def _local_exchange(self, plans: dict, downloads: dict) -> list:
        """Embedded transport: every client evaluates the one shared model (which holds the server's
        weights), so the downloads are only counted; the guard's probe is the server's proposal itself."""
        pending = self.server.pending
        probe = (lambda: swapped(self.task.params, pending["params"])) if pending is not None else None
        return [self.task.answer(c, plan, probe=probe) for c, plan in plans.items()]

    def _downloads(self, plans: dict) -> dict:
        """{client: Download}: what each answering client receives this round --
        its plan, and the cheapest sufficient message from the version it holds (fwdkern.fl.sync), or
        for a method that downloads as released, the whole trainable state."""
        srv, out = self.server, {}
        for c, plan in plans.items():
            first = self.holdings.is_first_contact(c)
            base = self.holdings.base(c) if self.method.download == "sync" else None
            msg = srv.sync_message(base, first_contact=first)
            out[c] = Download(plan.to_bytes(), msg.to_bytes(), Download.kind_of(msg))
            self.holdings.synced(c, srv.model_version)
            self._download_sizes.append((out[c].nbytes, first))
            if self.on_download is not None:
                self.on_download(c, out[c].sync)
        return out

    def run_round(self) -> RoundRow:
        """One round (or pacing attempt): its metrics row, with an evaluation when the model
        version advanced onto a multiple of eval_every; evaluation is not counted in the times."""
        t0, c0 = time.perf_counter(), time.process_time()
        version = self.server.model_version
        chosen, answering = self._choose_clients()
        plans = self.server.plan_round([client_id(c) for c in chosen])
        plans = {c: plans[client_id(c)] for c in answering}
        downloads = self._downloads(plans)
        if self.method.server_step == "weights":
            res, up = self._weights_round(plans)
        else:
            res, up = self._seeded_round(plans, downloads)
        down = [d.nbytes for d in downloads.values()]
        row = RoundRow.of(res, bytes_up_per_client=int(np.mean(up)) if up else 0,
                          bytes_down_per_client=int(np.mean(down)) if down else 0,
                          bytes_down_max=max(down, default=0), forward_passes_per_client=self._forward_passes(),
                          **self._per_client())
        self.wall += time.perf_counter() - t0
        self.cpu += time.process_time() - c0
        v, every = self.server.model_version, self.cfg.eval_every
        if every and v != version and v % every == 0:
            row.evaluation = self.evaluate()
        row.wall_time_s = round(self.wall, 3)
        row.cpu_time_s = round(self.cpu, 3)
        return row

    def _weights_round(self, plans: dict) -> tuple:
        """Weight-upload round (backprop: LoRA FedAvg; spry: SPRY as released). Each answering client
        downloads the global tensors, takes its local steps and uploads the tensors it trained; the
        server averages the changes per tensor (sample-weighted over the clients that trained it) and
        steps its optimizer on minus that average (SGD lr 1 = FedAvg). (RoundResult, bytes up per client)."""
        srv = self.server
        start = srv.weights()
        up = []
        for c, plan in plans.items():
            self.task.load_weights(start)
            upload = self.task.answer(c, plan)
            srv.submit_weights(upload)
            up.append(upload.nbytes)
        return srv.finish_weight_round(), up

    def _seeded_round(self, plans: dict, downloads: dict) -> tuple:
        """Seed-and-scalar round (fwdkern, mezo, fwdllm): plans and downloads out, scalar updates back.
        (RoundResult, bytes up per client)."""
        srv = self.server
        self._sync_model()
        # The exchange gets {client index: plan} in sorted client order (and each client's download
        # records) and returns the update records that arrived (wire bytes, or Update objects), in that
        # same order, so the aggregation is identical whatever the transport (`exchange`, e.g. Flower).
        exchange = self.exchange or self._local_exchange
        up = []
        for upd in exchange(plans, downloads):
            srv.submit(upd)
            up.append(len(upd) if isinstance(upd, (bytes, bytearray)) else len(upd.to_bytes(self.cfg.wire)))
        res = srv.finish_round()
        if self.method.upload == "gradient":  # as released: clients upload full trainable-size gradients
            up = [4 * self.n_trainable for _ in up]
        return res, up

    def _per_client(self) -> dict:
        """What one participating client evaluates: body tangents and exact-head projections."""
        return {"tangents_per_client": self.server.K if self.method.perturbs else 0,
                "head_projections_per_client": self.cfg.head_directions if self.task.head is not None else 0}

    def _forward_passes(self) -> int:
        """Client compute per round in forward-pass equivalents (see Method.passes_per_batch)."""
        probe = self.cfg.local_batches if self.server.pending is not None else 0  # the guard's probe forward
        # the seed-and-scalar clients share their tangents out (fwdkern.fl.client.seeded_answer)
        sample = self.cfg.tangent_scope == "sample" and self.cfg.reads_tangent_scope()
        per_sample = self.cfg.batch_size if sample else 0
        return self.method.forward_passes(self.server.K, self.cfg.local_batches, per_sample) + probe

    def download_stats(self) -> dict:
        """Bytes a participating client received per round, over every (client, round) of the run: mean,
        median, p95 and max, and the mean at a client's first contact."""
        sizes = np.array([n for n, _ in self._download_sizes], dtype=np.float64)
        first = [n for n, f in self._download_sizes if f]
        if not sizes.size:
            return {}
        return {"mean": float(sizes.mean()), "p50": float(np.percentile(sizes, 50)),
                "p95": float(np.percentile(sizes, 95)), "max": int(sizes.max()),
                "first_contact_mean": float(np.mean(first)) if first else None, "count": int(sizes.size)}

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
        foreign = foreign_files(self.cfg.out)
        if foreign:
            what = (f"{self.cfg.out} holds {', '.join(foreign)}, a run of an older fwdkern that this one never loads "
                    "(a pickle can run code)")
            if not replace_other_run:
                raise LayoutError(f"{what}: move it away to start a run there, or use another --out")
            self.log(f"{what}; starting a fresh run beside it")
        if not os.path.exists(ckpt):
            return
        try:
            sd = migrate(load_checkpoint(ckpt), ckpt, self.log)
        except (CorruptCheckpoint, LayoutError) as e:
            if not replace_other_run:
                raise
            self.log(f"{e}; starting a fresh run")
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
        self.metrics = [RoundRow.from_json(r) for r in sd["metrics"]]
        self.wall, self.cpu = sd["wall"], sd.get("cpu", 0.0)
        self.failed, self.initial = sd.get("failed", 0), sd.get("initial", {})
        self.samples_before = [tuple(x) for x in sd.get("samples_before", [])]
        self.holdings.load_state_dict(sd.get("holdings", {}))
        self._download_sizes = [(int(n), bool(f)) for n, f in sd.get("downloads", [])]
        self.log(f"resumed from {ckpt} at round {self.server.round}")

    def _run(self, replace_other_run: bool) -> dict:
        cfg = self.cfg
        ckpt = os.path.join(cfg.out, CHECKPOINT)
        self._resume(ckpt, replace_other_run)
        mlog = MetricsLog(os.path.join(cfg.out, "metrics.jsonl"), self._rows())
        if not self.metrics and not self.initial:
            self.initial = self.evaluate()
            if self.initial:
                self.log(f"before training: " + ", ".join(f"{k} {v:.3f}" for k, v in self.initial.items()))
            if self.task.lm is not None and cfg.samples:
                self.samples_before = continuations(self.task, cfg.samples)
        while self.server.model_version < cfg.rounds and not (
                cfg.max_client_rounds and len(self.metrics) >= cfg.max_client_rounds):
            before = self._state()
            try:
                row = self.run_round()
            except KeyboardInterrupt:
                save_checkpoint(ckpt, before)
                raise Interrupted(f"interrupted in round {self.server.round}; the state before it is saved in "
                                  f"{ckpt}: rerun the same command to resume") from None
            # a pacing retry or a rejected body step is the protocol working, not a failed round
            self.failed = 0 if row.stepped or (row.reason or "").startswith(("variance", "guard")) else self.failed + 1
            self.metrics.append(row)
            mlog.append(row.to_json())
            self.log(progress(row.to_json(), cfg.rounds, self.server.model_version, len(self.metrics)))
            if self.failed >= cfg.max_failed_rounds:
                self.save(ckpt)
                raise RunFailed(f"{self.failed} consecutive rounds without a valid update (last: "
                                f"{row.reason or 'no step'}; {row.accepted} accepted, {row.rejected} "
                                f"rejected); state saved in {ckpt}")
            if cfg.checkpoint_every and row.stepped and self.server.model_version % cfg.checkpoint_every == 0:
                self.save(ckpt)
        final = self.final_evaluation()
        self.save(ckpt)
        self._write_outputs()
        summary = {"config": cfg.to_json(), "provenance": provenance(), "initial": self.initial, "final": final,
                   "rounds": self.server.model_version,
                   "client_rounds": len(self.metrics),
                   "perturbation_schedule": self.server.schedule, "wall_time_s": self.wall, "cpu_time_s": self.cpu,
                   "trainable_params": self.n_trainable,
                   "mean_bytes_up_per_client": float(np.mean([m.bytes_up_per_client for m in self.metrics])),
                   "bytes_down_per_client": self.download_stats(),
                   "rejections": self.server.rejected_total}
        if self.task.lm is not None:
            summary["heldout_windows"] = len(self.task.heldout_windows())
        write_atomic(os.path.join(cfg.out, "summary.json"), json.dumps(summary, indent=2).encode())
        plots(self._rows(), cfg.out, self.initial, self._reference_lines())
        return summary

    def _write_outputs(self):
        """What a causal-LM run leaves to read and ship: samples.md (held-out prompts continued before
        training and now) and adapter/ (peft's format: PeftModel.from_pretrained(base, out/adapter))."""
        if self.task.lm is None:
            return
        from ..engine import save_adapter

        with atomic_path(os.path.join(self.cfg.out, "adapter"), directory=True) as tmp:
            save_adapter(self.model, tmp)
        if self.cfg.samples:
            after = continuations(self.task, self.cfg.samples)
            text = samples_markdown(self.samples_before, after, f"{self.cfg.model} on {self.task.dataset.name}, "
                                    f"{self.cfg.method}, {self.server.model_version} steps")
            write_atomic(os.path.join(self.cfg.out, "samples.md"), text.encode())

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
        if self.metrics and final and not self.metrics[-1].evaluation:
            self.metrics[-1].evaluation = dict(final)
            MetricsLog(os.path.join(self.cfg.out, "metrics.jsonl"), self._rows())
        return final

    def _rows(self) -> list:
        return [r.to_json() for r in self.metrics]

    def _state(self) -> dict:
        return {"layout": LAYOUT, "config": self.cfg.to_json(), "server": self.server.state_dict(),
                "metrics": self._rows(), "wall": self.wall, "cpu": self.cpu, "failed": self.failed,
                "holdings": self.holdings.state_dict(), "samples_before": [list(x) for x in self.samples_before],
                "downloads": [list(d) for d in self._download_sizes], "initial": dict(self.initial)}

    def save(self, path):
        save_checkpoint(path, self._state())


def build(cfg: RunConfig, log=print) -> Simulation:
    """The embedded simulation of `cfg`: data, model, clients and server."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg.validate()
    return Simulation(load_task(cfg, log=log), log=log)
