"""Server of the seed-and-scalar protocol (transport-agnostic).

Per round: ``plan_round(clients)`` -> RoundPlans; ``submit(update)`` for each
arriving update (validated; rejected ones are logged, never applied);
``finish_round()`` aggregates what arrived (dropouts and stragglers simply
contribute nothing), applies FwdLLM's variance-controlled pacing, and steps the
optimizer. The gradient estimate for tensor T is

    g_T = sum_{u perturbing T} w_u / W_T * (1 / K_u) * sum_j jvp_{u,j} * v(seed, pid_T, k_{u,j})

rebuilt with ``seeded_axpy_`` (no perturbation is materialized). Transports and
baselines reach the server only through its public methods: ``plan_round``,
``submit``, ``reject``, ``finish_round``, ``advance``, ``replay_chain``.
"""
from __future__ import annotations

import hashlib
import logging
from typing import Optional, Sequence

import torch

from ..ops import seeded_axpy_, seeded_dot
from .pacing import VariancePacing
from .checkpoint import load_checkpoint, save_checkpoint
from .protocol import RoundPlan, Update, UpdateRejected, robust_bound, validate_update
from .splitting import split_groups

log = logging.getLogger("fwdkern.fl")

__all__ = ["Server", "VariancePacing", "derive_seed"]


def derive_seed(base: int, *parts: int) -> int:
    """A uint64 seed from the run seed and (round, attempt, ...): stable across machines."""
    h = hashlib.blake2b(digest_size=8)
    for x in (base, *parts):
        h.update(int(x).to_bytes(16, "little", signed=True))
    return int.from_bytes(h.digest(), "little")


def _tensor_weight(u: Update, total: float) -> float:
    """Weight of one of `u`'s jvps in the estimate of a tensor whose updates hold `total` samples."""
    return u.num_samples / total / len(u.ks)


class Server:
    """Holds the trainable tensors (name -> tensor) and runs rounds.

    Args:
        params: trainable tensors, updated in place.
        param_ids: name -> stable uint32 perturbation id.
        optimizer: fwdkern.fl.optim SGD / FedAdam / FedYogi.
        seed: run seed (every round seed derives from it).
        perturbations_per_client: K per client per attempt.
        groups: SPRY split, a list of lists of tensor names (None: every client perturbs all).
        shared: names every client perturbs (e.g. a classifier head).
        pacing: VariancePacing or None.
        candidates: discriminative sampling: draw candidates x K indices, keep the
            K most aligned (|cosine|) with the previous global gradient (1 = off).
    """

    def __init__(self, params: dict, param_ids: dict, optimizer, *, seed: int = 0, perturbations_per_client: int = 1,
                 dist: str = "rademacher", groups: Optional[Sequence[Sequence[str]]] = None, shared: Sequence[str] = (),
                 pacing: Optional[VariancePacing] = None, candidates: int = 1, robust_factor: float = 10.0):
        missing = [n for n in params if n not in param_ids]
        if missing:
            raise ValueError(f"param_ids: no id for {missing}")
        self.params = params
        self.param_ids = dict(param_ids)
        self.names_by_id = {v: k for k, v in self.param_ids.items()}
        self.optimizer = optimizer
        self.seed = seed
        self.K = int(perturbations_per_client)
        self.dist = dist
        self.groups = [list(g) for g in groups] if groups else None
        self.shared = list(shared)
        self.pacing = pacing
        self.candidates = max(1, int(candidates))
        self.robust_factor = robust_factor
        self.round = 0
        self.model_version = 0
        self.attempt = 0
        self.plans: dict = {}
        self.accepted: list = []  # updates of the current attempt
        self.cache: list = []  # (seed, updates) of attempts rolled back by pacing
        self.rejections: list = []
        self.jvp_history: list = []
        self.prev_grad: Optional[dict] = None
        self.schedule: list = []  # perturbations per optimizer step
        self.replay_log: list = []

    # ------------------------------------------------------------------ planning
    def round_seed(self) -> int:
        return derive_seed(self.seed, self.round, self.attempt)

    def _select_ks(self, seed: int, count: int, pids: Sequence[int], offset: int) -> list:
        base = list(range(offset, offset + count))
        if self.candidates <= 1 or self.prev_grad is None:
            return base
        # Discriminative sampling: score candidates by |cos(v_k, g_prev)| via seeded_dot.
        cands = list(range(offset * self.candidates, (offset + count) * self.candidates))
        score = torch.zeros(len(cands), dtype=torch.float64)
        for pid in pids:
            g = self.prev_grad[self.names_by_id[pid]]
            score += seeded_dot(g, seed, pid, cands, self.dist, check_finite=False).double()
        top = torch.topk(score.abs(), count).indices.sort().values
        return [cands[i] for i in top.tolist()]

    def plan_round(self, clients: Sequence[str]) -> dict:
        """RoundPlans for the sampled clients of this round (or this pacing attempt)."""
        if len(set(clients)) != len(clients):
            raise ValueError("clients: duplicate client ids")
        seed = self.round_seed()
        all_ids = tuple(self.param_ids[n] for n in self.params)
        if self.groups:
            gids = [[self.param_ids[n] for n in g] for g in self.groups]
            assign = split_groups(gids, list(clients), self.round + self.attempt,
                                  shared=[self.param_ids[n] for n in self.shared])
        else:
            assign = {c: all_ids for c in clients}
        self.plans = {}
        offset = 0
        for c in clients:
            ks = self._select_ks(seed, self.K, assign[c], offset)
            offset += self.K
            self.plans[c] = RoundPlan(client_id=c, round=self.round, model_version=self.model_version, seed=seed,
                                      ks=tuple(ks), param_ids=tuple(assign[c]), dist=self.dist)
        self.accepted = []
        return dict(self.plans)

    # ------------------------------------------------------------------ updates
    def submit(self, update) -> bool:
        """Validate and keep an update; False (and a logged reason) when rejected."""
        try:
            if isinstance(update, (bytes, bytearray)):
                update = Update.from_bytes(bytes(update))
            cid = getattr(update, "client_id", None)
            if any(u.client_id == cid for u in self.accepted):
                raise UpdateRejected(f"duplicate update from {cid!r}")
            validate_update(update, self.plans.get(cid), current_round=self.round,
                            model_version=self.model_version)
        except UpdateRejected as e:
            self.reject(getattr(update, "client_id", None), str(e))
            return False
        self.accepted.append(update)
        return True

    def reject(self, client, reason: str):
        """Record a rejected update (or reply) of the current round; nothing of it is applied."""
        self.rejections.append({"round": self.round, "client": client, "reason": reason})
        log.warning("rejected update from %s: %s", client, reason)

    # ------------------------------------------------------------------ aggregation
    def _drop_outliers(self):
        """Reject updates whose jvp magnitude is far outside this round's robust spread.

        The bound (median + factor * MAD of the per-update max |jvp|) is taken over the
        current round's updates, since jvp scales drift as training moves; with fewer
        than 3 updates, the history of accepted rounds provides it.
        """
        mags = [max((abs(j) for j in u.jvps), default=0.0) for u in self.accepted]
        if len(mags) >= 3:
            bound = robust_bound(mags, self.robust_factor, min_count=3)
        else:
            bound = robust_bound(self.jvp_history, self.robust_factor * 10)
        if bound is None:
            return
        keep = []
        for u, m in zip(self.accepted, mags):
            if m > bound:
                self.reject(u.client_id, f"jvp magnitude {m:.3g} above the robust bound {bound:.3g}")
            else:
                keep.append(u)
        self.accepted = keep

    def _weights(self, attempts) -> dict:
        """Per tensor: total samples of the updates that perturbed it (W_T in the module docstring)."""
        weight = {n: 0.0 for n in self.params}
        for plans, updates in attempts:
            for u in updates:
                for pid in plans[u.client_id].param_ids:
                    weight[self.names_by_id[pid]] += u.num_samples
        return weight

    def _estimate(self, attempts) -> tuple:
        """(gradient dict, variance, perturbations) from [(plans, updates), ...]."""
        grads = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in self.params.items()}
        halves = [{n: torch.zeros_like(g) for n, g in grads.items()} for _ in range(2)]
        weight = self._weights(attempts)
        # Which half each (update, j) belongs to: alternate in arrival order.
        entries = [(plans[u.client_id], u, k, jv) for plans, updates in attempts for u in updates
                   for k, jv in zip(u.ks, u.jvps)]
        count = len(entries)
        per_half = [(count + 1) // 2, count // 2]
        # One seeded_axpy_ per (tensor, seed): ks/coeffs of all its perturbations at once.
        batches = {}
        for i, (plan, u, k, jv) in enumerate(entries):
            h = i % 2
            for pid in plan.param_ids:
                name = self.names_by_id[pid]
                w = _tensor_weight(u, weight[name])
                b = batches.setdefault((name, plan.seed, pid), ([], [], {0: ([], []), 1: ([], [])}))
                b[0].append(k)
                b[1].append(w * jv)
                b[2][h][0].append(k)
                b[2][h][1].append(jv)
        for (name, seed, pid), (ks, cs, hv) in batches.items():
            seeded_axpy_(grads[name], seed, pid, ks, cs, self.dist)
            for h in (0, 1):
                if hv[h][0]:
                    seeded_axpy_(halves[h][name], seed, pid, hv[h][0], hv[h][1], self.dist)
        var = None
        if per_half[0] and per_half[1]:
            tot, n = 0.0, 0
            for name in grads:
                d = halves[0][name] / per_half[0] - halves[1][name] / per_half[1]
                tot += float((d.double() ** 2).sum())
                n += d.numel()
            var = tot / (4 * max(n, 1))
        return grads, var, count

    def finish_round(self) -> dict:
        """Aggregate the accepted updates; step or (pacing) ask for more. Returns round info."""
        self._drop_outliers()
        info = {"round": self.round, "attempt": self.attempt, "accepted": len(self.accepted),
                "rejected": sum(1 for r in self.rejections if r["round"] == self.round)}
        if not self.accepted and not self.cache:
            info.update(stepped=False, reason="no valid updates")
            self.round += 1
            self.attempt = 0
            return info
        attempts = self.cache + [(dict(self.plans), list(self.accepted))]
        grads, var, count = self._estimate(attempts)
        info.update(variance=var, perturbations=count,
                    loss=sum(u.loss * u.num_samples for _, us in attempts for u in us)
                    / max(1, sum(u.num_samples for _, us in attempts for u in us)))
        if self.pacing is not None and var is not None:
            thr = self.pacing.current_threshold()
            info["threshold"] = thr
            if thr is not None and var > thr and self.attempt + 1 < self.pacing.max_attempts:
                self.cache = attempts
                self.attempt += 1
                info["stepped"] = False
                info["reason"] = "variance above threshold: more perturbations requested"
                return info
            if thr is None:
                self.pacing.history.append(var)
        for u in self.accepted:
            self.jvp_history.extend(abs(j) for j in u.jvps)
        self.jvp_history = self.jvp_history[-4096:]
        if self.replayable:
            lr = self.optimizer.schedule(self.optimizer.t)
            self.replay_log.append(self._replay_record(attempts, lr))
        self.optimizer.step(self.params, grads)
        self.prev_grad = grads
        self.schedule.append(count)
        self.model_version += 1
        self.round += 1
        self.attempt = 0
        self.cache = []
        info["stepped"] = True
        return info

    def _replay_record(self, attempts, lr) -> dict:
        """(seed, pid, ks, coeffs) list that reproduces this SGD step on a client: KBs, not weights."""
        weight = self._weights(attempts)
        ops = []
        for plans, updates in attempts:
            for u in updates:
                plan = plans[u.client_id]
                for pid in plan.param_ids:
                    w = _tensor_weight(u, weight[self.names_by_id[pid]])
                    ops.append((plan.seed, pid, list(u.ks), [-lr * w * j for j in u.jvps]))
        return {"from_version": self.model_version, "ops": ops}

    @property
    def replayable(self) -> bool:
        """Whether a client can rebuild each step from (seed, ks, coefficients): plain SGD only."""
        return bool(self.optimizer.linear and not getattr(self.optimizer, "momentum", 0.0))

    def replay_chain(self, start: int, stop: int) -> Optional[list]:
        """The replay records taking model version `start` to `stop`, or None when some step has none."""
        if not self.replayable:
            return None
        by_version = {rec["from_version"]: rec for rec in self.replay_log}
        chain = [by_version.get(v) for v in range(start, stop)]
        return None if any(r is None for r in chain) else chain

    def advance(self):
        """Close a round whose step was applied outside the seed protocol (the backprop baseline)."""
        self.model_version += 1
        self.round += 1
        self.attempt = 0

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        return {
            "params": {n: p.detach().clone() for n, p in self.params.items()},
            "optimizer": self.optimizer.state_dict(),
            "round": self.round, "model_version": self.model_version, "attempt": self.attempt,
            "cache": self.cache, "jvp_history": list(self.jvp_history),
            "prev_grad": self.prev_grad, "schedule": list(self.schedule),
            "pacing": self.pacing.state_dict() if self.pacing else None,
            "rejections": list(self.rejections),
        }

    def load_state_dict(self, sd: dict):
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(sd["params"][n])
        self.optimizer.load_state_dict(sd["optimizer"])
        self.round, self.model_version, self.attempt = sd["round"], sd["model_version"], sd["attempt"]
        self.cache, self.jvp_history = sd["cache"], list(sd["jvp_history"])
        self.prev_grad, self.schedule = sd["prev_grad"], list(sd["schedule"])
        if self.pacing and sd["pacing"]:
            self.pacing.load_state_dict(sd["pacing"])
        self.rejections = list(sd["rejections"])

    def save(self, path: str):
        save_checkpoint(path, self.state_dict())

    def load(self, path: str):
        self.load_state_dict(load_checkpoint(path))
