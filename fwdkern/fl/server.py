"""Server of the seed-and-scalar protocol (transport-agnostic).

Per round: ``plan_round(clients)`` -> RoundPlans; ``submit(update)`` for each
arriving update (validated; rejected ones are logged, never applied);
``finish_round()`` aggregates what arrived (dropouts and stragglers simply
contribute nothing), applies variance-controlled pacing, and steps the
optimizer. The gradient estimate for tensor T is

    g_T = sum_{u, block b of u holding T} w_u / W_T * (1 / K_b) * sum_j value_{u,b,j} * v(seed, pid_T, k_{b,j})

(w_u: the update's clipped sample count, W_T: their sum over the updates that cover T;
blocks: the jvp block ``ks`` and the optional head block ``head_ks``), rebuilt with
``seeded_axpy_`` (no perturbation is materialized). Transports and baselines reach the
server only through its public methods: ``plan_round``, ``submit``, ``reject``,
``finish_round`` (seed-and-scalar rounds), ``submit_weights`` / ``finish_weight_round``
(weight-upload rounds: backprop, SPRY), ``weights`` and ``sync_message`` (what a client downloads).
The server holds its own copy of the trainable tensors; clients never share them.

Robustness: every update is parsed strictly (:mod:`fwdkern.fl.protocol`); within a round an
update whose values are far outside the round's own spread is rejected (the bound needs no
history: median + 10·max(MAD, median/2) of the per-update magnitudes), of two updates the
larger is scaled down to that bound around the smaller, sample counts are capped by the plan
and clipped to twice the round's median claim, and a step that would leave a weight or the
optimizer state non-finite is rolled back (the round counts as failed).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
from typing import Optional, Sequence

import numpy as np
import torch

from .._seed import derive_seed
from ..ops import seeded_axpy_, seeded_dot
from .checkpoint import load_checkpoint, save_checkpoint
from .guard import Guard
from .optim import SGD, optimizer_spec, stateful
from .pacing import VariancePacing
from .protocol import (RawTensor, RoundPlan, RoundResult, Step, SyncMessage, TermGroup, Update, UpdateRejected,
                       robust_bound, validate_update)
from .sync import state_digest
from .splitting import split_groups

log = logging.getLogger("fwdkern.fl")

__all__ = ["Server", "VariancePacing"]

MAX_REJECTIONS_KEPT = 1000  # the rejection log keeps the latest ones (the count is kept in full)
MAX_WARNINGS_PER_ROUND = 20
HEAD_K_OFFSET = 1 << 30  # head-block indices: disjoint from the jvp block's


def _probe_loss(u) -> Optional[float]:
    """A client's loss with the guard's proposed body step (Update.extra["probe_loss"]), when it is a finite number."""
    v = (u.extra or {}).get("probe_loss")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _lower_median(vals):
    vals = sorted(vals)
    return vals[(len(vals) - 1) // 2]


def _blocks(plan: RoundPlan, u: Update):
    """(param ids, ks, values) of each non-empty block of `u` answering `plan`."""
    out = [(plan.param_ids, u.ks, u.jvps)]
    if plan.head_ks:
        out.append((plan.head_ids, plan.head_ks, u.head))
    return [b for b in out if b[1]]


@dataclasses.dataclass(frozen=True)
class _Record:
    """A step the server took: from which version, its seeded terms (None: a dense step from weight
    uploads) and the ids of the tensors whose values it changed."""

    from_version: int
    step: Optional[Step]
    changed: frozenset

    def to_json(self) -> dict:
        st = self.step
        return {"from_version": self.from_version, "changed": sorted(self.changed),
                "step": None if st is None else {"t": list(st.t), "scale": list(st.scale), "groups": [
                    [g.seed, list(g.ks), list(g.coeffs), list(g.pids)] for g in st.groups]}}

    @classmethod
    def from_json(cls, d: dict) -> "_Record":
        st = d["step"]
        step = None if st is None else Step(int(d["from_version"]), tuple(None if t is None else int(t)
                                                                          for t in st["t"]), tuple(
            TermGroup(int(s), tuple(int(k) for k in ks), tuple(float(c) for c in cs), tuple(int(p) for p in ps))
            for s, ks, cs, ps in st["groups"]), tuple(float(x) for x in st.get("scale", (1.0, 1.0))))
        return cls(int(d["from_version"]), step, frozenset(int(p) for p in d["changed"]))


class Server:
    """Holds its own copy of the trainable tensors (name -> tensor) and runs rounds.

    Args:
        params: the trainable tensors' initial values (copied; ``Server.params`` holds the current ones).
        param_ids: name -> stable uint32 perturbation id.
        optimizer: fwdkern.fl.optim SGD / FedAdam / FedYogi.
        seed: run seed (every round seed derives from it).
        perturbations_per_client: K per client per attempt.
        groups: SPRY split, a list of lists of tensor names (None: every client perturbs all).
        contiguous_groups: deal each client a run of consecutive groups (a block of layers) rather than
            every C-th group (fwdkern.fl.splitting.split_groups).
        shared: names every client perturbs (e.g. a classifier head).
        pacing: VariancePacing or None.
        candidates: discriminative sampling: draw candidates x K indices, keep the
            K most aligned (|cosine|) with the smoothed previous estimates (1 = off).
        head: names of the tensors whose exact pseudo-gradient clients project (the head
            block; they leave the jvp block). head_directions: projections per client.
            head_optimizer: the head tensors' server optimizer (default SGD lr 1: the clients'
            head pseudo-gradient is minus their local update, so this is FedAvg on the head).
        max_samples: the most samples one update may claim (0: no cap).
        replay_window: steps whose seeded terms are kept (a client further behind downloads tensors).
        client_state: clients keep their own optimizer state and roll tensors forward (seed-and-scalar
            methods); False: a download carries tensor values only (weight-upload methods).
        guard: a :class:`fwdkern.fl.guard.Guard`: each body step is proposed and taken only when the next
            round's clients measure that it does not raise their loss (the head steps at once).
    """

    def __init__(self, params: dict, param_ids: dict, optimizer, *, seed: int = 0, perturbations_per_client: int = 1,
                 dist: str = "rademacher", groups: Optional[Sequence[Sequence[str]]] = None, shared: Sequence[str] = (),
                 contiguous_groups: bool = False,
                 pacing: Optional[VariancePacing] = None, candidates: int = 1, robust_factor: float = 10.0,
                 head: Sequence[str] = (), head_directions: int = 0, max_samples: int = 0, replay_window: int = 1000,
                 smoothing: float = 0.9, head_optimizer=None, client_state: bool = True,
                 guard: Optional[Guard] = None):
        missing = [n for n in params if n not in param_ids]
        if missing:
            raise ValueError(f"param_ids: no id for {missing}")
        unknown = [n for n in head if n not in params]
        if unknown:
            raise ValueError(f"head: {unknown} are not trainable tensors")
        self.params = {n: t.detach().clone() for n, t in params.items()}
        self.param_ids = dict(param_ids)
        self.names_by_id = {v: k for k, v in self.param_ids.items()}
        self.optimizer = optimizer
        self.head_optimizer = head_optimizer if head_optimizer is not None else SGD(1.0)
        self.seed = seed
        self.K = int(perturbations_per_client)
        self.dist = dist
        self.head = [n for n in params if n in set(head)] if head_directions else []
        self.M = int(head_directions) if self.head else 0
        self.groups = [list(g) for g in groups] if groups else None
        self.contiguous_groups = contiguous_groups
        self.shared = [n for n in shared if n not in self.head]
        self.pacing = pacing
        self.candidates = max(1, int(candidates))
        self.robust_factor = robust_factor
        self.max_samples = int(max_samples)
        self.replay_window = int(replay_window)
        self.client_state = bool(client_state)
        if guard is not None and pacing is not None:
            raise ValueError("guard: the body guard and variance pacing do not combine (use one)")
        self.guard = guard
        self.pending: Optional[dict] = None  # the guard's proposed body step: params, optimizer state, Step
        self.smoothing = float(smoothing)
        self.round = 0
        self.model_version = 0
        self.attempt = 0
        self.plans: dict = {}
        self.accepted: list = []  # updates of the current attempt
        self.cache: list = []  # (plans, updates) of attempts held back by pacing
        self.rejections: list = []
        self.rejected_total = 0
        self._round_rejected = 0
        self.jvp_history: list = []
        self.prev_grad: Optional[dict] = None  # smoothed (EMA) estimate: discriminative sampling ranks against it
        self.schedule: list = []  # perturbations per optimizer step
        self.steps_log: list = []  # _Record per step, the latest replay_window
        self.init_digest = state_digest(self.params)  # the version-0 state a fresh client rebuilds
        # Weight-upload rounds: name -> sample-weighted sum of the uploads' changes, name -> samples that
        # trained it, [loss sum, samples], the clients whose uploads are in.
        self._weights_in, self._weights_n, self._weights_loss, self._weights_from = {}, {}, [0.0, 0], []

    def weights(self) -> dict:
        """A copy of the current trainable tensors (what a client downloads)."""
        return {n: p.detach().clone() for n, p in self.params.items()}

    # ------------------------------------------------------------------ planning
    def round_seed(self) -> int:
        return derive_seed(self.seed, self.round, self.attempt)

    def _select_ks(self, seed: int, count: int, pids: Sequence[int], offset: int) -> list:
        base = list(range(offset, offset + count))
        if self.candidates <= 1 or self.prev_grad is None:
            return base
        # Discriminative sampling: score candidates by |cos(v_k, g_smoothed)| via seeded_dot.
        cands = list(range(offset * self.candidates, (offset + count) * self.candidates))
        score = torch.zeros(len(cands), dtype=torch.float64)
        for pid in pids:
            g = self.prev_grad.get(self.names_by_id[pid])
            if g is not None:
                score += seeded_dot(g, seed, pid, cands, self.dist, check_finite=False).double()
        top = torch.topk(score.abs(), count).indices.sort().values
        return [cands[i] for i in top.tolist()]

    def plan_round(self, clients: Sequence[str]) -> dict:
        """RoundPlans for the sampled clients of this round (or this pacing attempt)."""
        if len(set(clients)) != len(clients):
            raise ValueError("clients: duplicate client ids")
        seed = self.round_seed()
        body = [n for n in self.params if n not in self.head]
        all_ids = tuple(self.param_ids[n] for n in body)
        head_ids = tuple(self.param_ids[n] for n in self.head)
        if self.groups:
            gids = [[self.param_ids[n] for n in g if n not in self.head] for g in self.groups]
            assign = split_groups([g for g in gids if g], list(clients), self.round + self.attempt,
                                  shared=[self.param_ids[n] for n in self.shared], contiguous=self.contiguous_groups)
        else:
            assign = {c: all_ids for c in clients}
        self.plans = {}
        offset = 0
        for i, c in enumerate(clients):
            ks = self._select_ks(seed, self.K, assign[c], offset) if assign[c] else []
            offset += self.K
            head_ks = tuple(range(HEAD_K_OFFSET + i * self.M, HEAD_K_OFFSET + (i + 1) * self.M)) if self.M else ()
            self.plans[c] = RoundPlan(client_id=c, round=self.round, model_version=self.model_version, seed=seed,
                                      ks=tuple(ks), param_ids=tuple(assign[c]), dist=self.dist,
                                      max_samples=self.max_samples, head_ks=head_ks,
                                      head_ids=head_ids if self.M else (), probe=self.pending is not None)
        self.accepted = []
        return dict(self.plans)

    # ------------------------------------------------------------------ updates
    def submit(self, update) -> bool:
        """Validate and keep an update; False (and a logged reason) when rejected. Never raises:
        whatever a client sends costs the server nothing but a line in the rejection log."""
        cid = None
        try:
            if isinstance(update, (bytes, bytearray, memoryview)):
                update = Update.from_bytes(update)
            cid = getattr(update, "client_id", None)
            plan = self.plans.get(cid) if isinstance(cid, str) else None
            update = validate_update(update, plan, current_round=self.round, model_version=self.model_version)
            if any(u.client_id == update.client_id for u in self.accepted):
                raise UpdateRejected(f"duplicate update from {update.client_id!r}")
        except UpdateRejected as e:
            self.reject(cid, str(e))
            return False
        except Exception as e:  # noqa: BLE001 -- a hostile object (e.g. a property that raises)
            self.reject(cid, f"malformed update: {type(e).__name__}")
            return False
        self.accepted.append(update)
        return True

    def reject(self, client, reason: str):
        """Record a rejected update (or reply) of the current round; nothing of it is applied."""
        if not (isinstance(client, str) and len(client) <= 128):
            client = None if client is None else repr(client)[:64]
        reason = str(reason)[:300]
        self.rejections.append({"round": self.round, "client": client, "reason": reason})
        del self.rejections[:-MAX_REJECTIONS_KEPT]
        self.rejected_total += 1
        self._round_rejected += 1
        if self._round_rejected <= MAX_WARNINGS_PER_ROUND:
            log.warning("rejected update from %s: %s", client, reason)
        elif self._round_rejected == MAX_WARNINGS_PER_ROUND + 1:
            log.warning("round %d: more rejections than %d; not logging each", self.round, MAX_WARNINGS_PER_ROUND)

    # ------------------------------------------------------------------ aggregation
    def _drop_outliers(self):
        """Bound each update's influence by this round's robust spread, block by block.

        With three or more updates, one whose max |value| exceeds median + factor * max(MAD,
        median / 2) of the round's is rejected; with two, the larger is scaled down to that bound
        taken around the smaller one (a pair cannot say who is the outlier, but neither can move
        the step by more than a bounded multiple of the other); a lone update is bounded by the
        history of accepted rounds when there is one. The bound needs no history and follows
        the scale of the round, which drifts as training moves.
        """
        for blk in ("jvps", "head"):
            mags = [max((abs(j) for j in getattr(u, blk)), default=0.0) for u in self.accepted]
            if not any(mags):
                continue
            clip = len(mags) == 2
            if len(mags) >= 3:
                bound = robust_bound(mags, self.robust_factor, min_count=3)
            elif clip:
                bound = robust_bound([min(mags)], self.robust_factor, min_count=1)
            else:
                bound = robust_bound(self.jvp_history, self.robust_factor * 10) if blk == "jvps" else None
            if bound is None:
                continue
            keep = []
            for u, m in zip(self.accepted, mags):
                if m <= bound:
                    keep.append(u)
                elif clip:
                    scale = bound / m
                    keep.append(dataclasses.replace(u, **{blk: tuple(v * scale for v in getattr(u, blk))}))
                else:
                    self.reject(u.client_id, f"{'jvp' if blk == 'jvps' else 'head'} magnitude {m:.3g} above the "
                                             f"robust bound {bound:.3g}")
            self.accepted = keep

    def _sample_weights(self, attempts) -> dict:
        """client id -> sample weight: its claim, clipped to twice the round's (lower) median claim."""
        claims = [u.num_samples for _, us in attempts for u in us]
        cap = 2 * _lower_median(claims) if claims else 0
        return {u.client_id: min(u.num_samples, cap) for _, us in attempts for u in us}

    def _terms(self, attempts, halves: bool = False):
        """(name, seed, pid, k, coefficient, half) of every seeded term of the estimate: the
        coefficient of v(seed, pid, k) in tensor `name`'s estimate (in the estimate of the
        update's half, normalised within that half, when `halves`)."""
        weights = self._sample_weights(attempts)
        members = [(plans[u.client_id], u) for plans, updates in attempts for u in updates]
        total: dict = {}
        for i, (plan, u) in enumerate(members):
            for pids, _, _ in _blocks(plan, u):
                for pid in pids:
                    key = (self.names_by_id[pid], i % 2 if halves else 0)
                    total[key] = total.get(key, 0.0) + weights[u.client_id]
        for i, (plan, u) in enumerate(members):
            h = i % 2 if halves else 0
            w = weights[u.client_id]
            for pids, ks, vals in _blocks(plan, u):
                for pid in pids:
                    name = self.names_by_id[pid]
                    c = w / total[(name, h)] / len(ks)
                    for k, v in zip(ks, vals):
                        yield name, plan.seed, pid, k, c * v, h

    @staticmethod
    def _batches(terms) -> dict:
        """{(output, name, seed, pid): (ks, coefficients)} of `_terms` rows, in the order they first occur:
        one seeded_axpy_ each."""
        batches: dict = {}
        for name, seed, pid, k, c, h in terms:
            b = batches.setdefault((h, name, seed, pid), ([], []))
            b[0].append(k)
            b[1].append(c)
        return batches

    def _accumulate(self, batches: dict, n_out: int) -> list:
        """[{name: estimate}] x n_out: the seeded_axpy_ of every batch, in order, into float32 zeros."""
        outs = [{n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in self.params.items()}
                for _ in range(n_out)]
        for (h, name, seed, pid), (ks, cs) in batches.items():
            seeded_axpy_(outs[h][name], seed, pid, ks, cs, self.dist)
        return outs

    def _estimate(self, attempts) -> tuple:
        """(gradient dict, variance, noise ratio, perturbations, the estimate's batches) from
        [(plans, updates), ...]."""
        batches = self._batches(self._terms(attempts))
        grads = self._accumulate(batches, 1)[0]
        members = [u for _, us in attempts for u in us]
        count = sum(len(u.ks) + len(u.head) for u in members)
        var = ratio = None
        if len(members) >= 2:  # client-level halves: the spread holds the client-to-client noise
            m1, m2 = self._accumulate(self._batches(self._terms(attempts, halves=True)), 2)
            diff = sig = 0.0
            n = 0
            for name in grads:
                d = (m1[name] - m2[name]).double()
                diff += float((d ** 2).sum())
                sig += float(((m1[name] + m2[name]).double() ** 2).sum())
                n += d.numel()
            var = diff / (4 * max(n, 1))
            ratio = diff / sig if sig > 0 else None
        return grads, var, ratio, count, batches

    def _optimizers(self, grads) -> list:
        """[(optimizer, its slice of grads)]: the head tensors have their own (FedAvg) step."""
        head = set(self.head)
        groups = [(self.optimizer, {n: g for n, g in grads.items() if n not in head})]
        if head:
            groups.append((self.head_optimizer, {n: g for n, g in grads.items() if n in head}))
        return [(o, g) for o, g in groups if g]

    def _opt_of(self, name: str):
        return self.head_optimizer if name in self.head else self.optimizer

    def _step(self, grads) -> Optional[frozenset]:
        """Optimizer step: the names of the tensors whose values changed, or None (rolled back) when a
        weight or the optimizer state would go non-finite."""
        saved = {n: p.detach().clone() for n, p in self.params.items()}
        groups = self._optimizers(grads)
        states = [o.state_dict() for o, _ in groups]
        if all(bool(torch.isfinite(g).all()) for g in grads.values()):
            for o, g in groups:
                o.step(self.params, g)
            ok = (all(bool(torch.isfinite(p).all()) for p in self.params.values())
                  and all(o.finite() for o, _ in groups))
        else:
            ok = False
        if not ok:
            self._restore(saved, [o for o, _ in groups], states)
            return None
        return frozenset(n for n, p in self.params.items() if not torch.equal(saved[n], p))

    def _restore(self, saved: dict, optimizers, states):
        """Put back the tensors and optimizer states a step was about to change."""
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(saved[n])
        for o, st in zip(optimizers, states):
            o.load_state_dict(st)

    def _rolled_back(self, res: RoundResult) -> RoundResult:
        """Close a round whose step was rolled back (it would have left a weight or state non-finite)."""
        res.reason = "the step would make weights or optimizer state non-finite"
        self.reject(None, f"round {self.round}: step rolled back (non-finite result)")
        self._close_round()
        return res

    def _remember(self, grads: dict):
        """What later rounds draw on: the accepted jvps' magnitudes (robust bounds) and, with
        discriminative sampling, the smoothed direction it ranks candidates against (not the raw one)."""
        for u in self.accepted:
            self.jvp_history.extend(abs(j) for j in u.jvps)
        self.jvp_history = self.jvp_history[-4096:]
        if self.candidates > 1:
            a = self.smoothing
            prev = self.prev_grad
            self.prev_grad = {n: g.clone() if prev is None else prev[n].mul(a).add_(g, alpha=1 - a)
                              for n, g in grads.items()}

    def _close_round(self):
        self.round += 1
        self.attempt = 0
        self.cache = []
        self._round_rejected = 0
        self._weights_in, self._weights_n, self._weights_loss, self._weights_from = {}, {}, [0.0, 0], []

    def finish_round(self) -> RoundResult:
        """Aggregate the accepted updates; step or (pacing) ask for more."""
        self._drop_outliers()
        res = RoundResult(round=self.round, attempt=self.attempt, accepted=len(self.accepted),
                          rejected=self._round_rejected)
        if not self.accepted and not self.cache:
            res.reason = "no valid updates"
            self._close_round()
            return res
        attempts = self.cache + [(dict(self.plans), list(self.accepted))]
        grads, var, ratio, count, batches = self._estimate(attempts)
        weights = self._sample_weights(attempts)
        res.variance, res.noise_ratio, res.perturbations = var, ratio, count
        res.loss = (sum(u.loss * weights[u.client_id] for _, us in attempts for u in us)
                    / max(1, sum(weights.values())))
        if self.guard is not None:
            return self._finish_guarded(res, attempts, grads, batches, count)
        if self.pacing is not None:
            res.threshold = self.pacing.current_threshold()
            if self.pacing.exceeded(var, ratio) and self.attempt + 1 < self.pacing.max_attempts:
                self.cache = attempts
                self.attempt += 1
                res.reason = "variance above threshold: more perturbations requested"
                return res
            self.pacing.history.append(ratio if self.pacing.threshold is None else var)
            del self.pacing.history[:-1000]
        t = (self.optimizer.t, self.head_optimizer.t)
        changed = self._step(grads)
        if changed is None:
            return self._rolled_back(res)
        self._remember(grads)
        self._record(Step(self.model_version, t, self._term_groups(batches)), changed)
        self.schedule.append(count)
        self.model_version += 1
        self._close_round()
        res.stepped = True
        return res

    def _finish_guarded(self, res: RoundResult, attempts, grads: dict, batches: dict, count: int) -> RoundResult:
        """A round under the body guard: decide on the pending body proposal from this round's probe
        losses, take the head's exact step and (if accepted) the proposal as one model version, and
        propose the body step of this round's estimate for the next round's clients to measure."""
        head = set(self.head)
        commit = None
        if self.pending is not None:
            w = self._sample_weights(attempts)
            d = self.guard.decide([(w[u.client_id], u.loss, _probe_loss(u)) for _, us in attempts for u in us])
            res.guard, res.guard_delta, res.guard_scale = ("accepted" if d.accepted else "rejected"), d.delta, d.scale
            commit = self.pending if d.accepted else None
            self.pending = None
            if self.guard.gives_up() and self.head:  # the body has not paid: no more tangents this run
                self.K = 0
                res.guard = "stopped"
        saved = {n: p.detach().clone() for n, p in self.params.items()}
        states = (self.optimizer.state_dict(), self.head_optimizer.state_dict())
        head_grads = {n: g for n, g in grads.items() if n in head}
        t_head = self.head_optimizer.t if head_grads else None
        groups = self._term_groups(batches)
        head_ids = {self.param_ids[n] for n in head}
        ok = all(bool(torch.isfinite(g).all()) for g in grads.values())
        if ok and head_grads:
            self.head_optimizer.step(self.params, head_grads)
        body_step = None
        if ok and commit is not None:
            with torch.no_grad():
                for n, v in commit["params"].items():
                    self.params[n].copy_(v)
            self.optimizer.load_state_dict(commit["state"])
            body_step = commit["step"]
        ok = ok and all(bool(torch.isfinite(p).all()) for p in self.params.values()) and self.head_optimizer.finite()
        if not ok:
            self._restore(saved, (self.optimizer, self.head_optimizer), states)
            return self._rolled_back(res)
        changed = frozenset(n for n, p in self.params.items() if not torch.equal(saved[n], p))
        if head_grads or body_step is not None:
            head_groups = tuple(g for g in (TermGroup(g.seed, g.ks, g.coeffs, tuple(p for p in g.pids if p in head_ids))
                                            for g in groups) if g.pids)
            self._record(Step(self.model_version, (body_step.t[0] if body_step else None, t_head),
                              (body_step.groups if body_step else ()) + head_groups,
                              (body_step.scale[0] if body_step else 1.0, 1.0)), changed)
            self.model_version += 1
            self.schedule.append(count)
            res.stepped = True
        else:  # nothing to take this round: the guard keeps the body where it is
            res.reason = ("guard: body step rejected" if res.guard in ("rejected", "stopped") else
                          "guard: body step proposed, measured next round")
        body_groups = tuple(g for g in (TermGroup(g.seed, g.ks, g.coeffs, tuple(p for p in g.pids if p not in head_ids))
                                        for g in groups) if g.pids)
        if body_groups and self.K:  # this round's body step, proposed for the next round's clients to measure
            body = {n: g for n, g in grads.items() if n not in head}
            params = {n: self.params[n].detach().clone() for n in body}
            opt = copy.deepcopy(self.optimizer)
            t = opt.t
            opt.step(params, body, lr_scale=self.guard.scale)
            if all(bool(torch.isfinite(p).all()) for p in params.values()) and opt.finite():
                self.pending = {"params": params, "state": opt.state_dict(),
                                "step": Step(self.model_version, (t, None), body_groups, (self.guard.scale, 1.0))}
        self._remember(grads)
        self._close_round()
        return res

    @staticmethod
    def _term_groups(batches: dict) -> tuple:
        """The estimate's seeded terms as TermGroups, in the order the server added them: tensors whose
        (seed, ks, float32 coefficients) coincide share a group (per tensor the order is kept)."""
        groups: dict = {}
        for (h, name, seed, pid), (ks, cs) in batches.items():
            key = (seed, tuple(ks), tuple(float(c) for c in np.asarray(cs, dtype=np.float32)))
            groups.setdefault(key, []).append(pid)
        return tuple(TermGroup(seed, ks, cs, tuple(pids)) for (seed, ks, cs), pids in groups.items())

    def _record(self, step: Optional[Step], changed: frozenset):
        """Log a step (None: a dense step from weight uploads, which no client can redo from seeds)."""
        self.steps_log.append(_Record(self.model_version, step, frozenset(self.param_ids[n] for n in changed)))
        del self.steps_log[:-self.replay_window]

    # ------------------------------------------------------------------ downloads
    def _raw(self, name: str, dtype: str = "fp32") -> RawTensor:
        p = self.params[name]
        value = p.detach().float().cpu().numpy().astype(np.float16 if dtype == "fp16" else np.float32)
        state = {}
        opt = self._opt_of(name)
        if self.client_state and stateful(opt):
            state = {k: v.detach().float().cpu().numpy() for k, v in opt.state.get(name, {}).items()}
        return RawTensor(self.param_ids[name], value, state)

    def _raw_bytes(self, name: str) -> int:
        n = self.params[name].numel()
        opt = self._opt_of(name)
        return 4 * n * (1 + (len(opt.state.get(name, {})) if self.client_state and stateful(opt) else 0))

    def rule(self) -> dict:
        """The step rule a client needs to redo this server's steps."""
        return {"body": optimizer_spec(self.optimizer), "head": optimizer_spec(self.head_optimizer),
                "head_ids": [self.param_ids[n] for n in self.head]}

    def sync_message(self, base: Optional[int], first_contact: bool = False) -> SyncMessage:
        """What a client holding model version `base` (None: nothing it can build on) receives to hold
        the current one: per tensor the cheapest sufficient message -- nothing when it has not changed
        (and its optimizer state can be rolled forward without terms), the seeded terms of the steps
        since `base` when they are smaller than the tensor, else the tensor itself (with its optimizer
        state when clients keep one). `first_contact`: the client rebuilt version 0 from the run's seed,
        so the message carries the initial state's digest for it to check."""
        target = self.model_version
        by_version = {r.from_version: r for r in self.steps_log}
        recs = None
        if base is not None and 0 <= base <= target:
            recs = [by_version.get(v) for v in range(base, target)]
            if any(r is None for r in recs):
                recs = None
        roll, raw = [], []
        if recs is None or not self.client_state:
            # Nothing to build on (or clients keep no optimizer state): every tensor that differs goes raw.
            changed = set(self.params) if recs is None else {self.names_by_id[pid] for r in recs for pid in r.changed}
            raw = [n for n in self.params if n in changed]
        else:
            for n, pid in self.param_ids.items():
                if any(r.step is None and pid in r.changed for r in recs):
                    raw.append(n)  # a dense step changed it: no seeds to redo it from
                    continue
                chain = 0.0
                for r in recs:
                    for g in (r.step.groups if r.step is not None else ()):
                        if pid in g.pids:
                            chain += (12 + 8 * len(g.ks) + 4 * len(g.pids)) / len(g.pids) + 4
                (roll if chain <= self._raw_bytes(n) else raw).append(n)
        probe = self.pending["step"] if self.pending is not None else None
        steps = ()
        if roll and recs:
            roll_ids = {self.param_ids[n] for n in roll}
            steps = tuple(Step(r.from_version, r.step.t, tuple(
                TermGroup(g.seed, g.ks, g.coeffs, tuple(p for p in g.pids if p in roll_ids))
                for g in r.step.groups if roll_ids.intersection(g.pids)), r.step.scale)
                for r in recs if r.step is not None)
        raw_t = tuple(self._raw(n) for n in raw)
        needs_rule = self.client_state and (steps or any(t.state for t in raw_t))
        return SyncMessage(base_version=None if recs is None else base, target_version=target, steps=steps,
                           raw=raw_t, rule=self.rule() if needs_rule or probe is not None else None, dist=self.dist,
                           init_digest=self.init_digest if first_contact and recs is not None and base == 0
                           else None, probe=probe)

    # ------------------------------------------------------------------ weight-upload rounds
    def submit_weights(self, upload) -> bool:
        """Keep a weight-upload client's trained tensors (a fwdkern.fl.client.WeightUpload) for this
        round's average; False (and a logged reason) when it does not answer its plan sanely."""
        cid = getattr(upload, "client_id", None)
        try:
            plan = self.plans.get(cid) if isinstance(cid, str) else None
            if plan is None:
                raise UpdateRejected(f"client {cid!r} was not sampled this round")
            if upload.round != self.round or upload.model_version != self.model_version:
                raise UpdateRejected(f"late or stale upload: round {upload.round} version {upload.model_version}")
            if cid in self._weights_from:
                raise UpdateRejected(f"duplicate upload from {cid!r}")
            allowed = {self.names_by_id[pid] for pid in plan.param_ids} if plan.param_ids else set(self.params)
            for n, t in upload.tensors.items():
                if n not in allowed:
                    raise UpdateRejected(f"tensor {n!r} was not dealt to this client")
                if tuple(t.shape) != tuple(self.params[n].shape):
                    raise UpdateRejected(f"tensor {n!r}: shape {tuple(t.shape)}, expected "
                                         f"{tuple(self.params[n].shape)}")
            n_c = int(upload.num_samples)
            if n_c < 1 or (self.max_samples and n_c > self.max_samples):
                raise UpdateRejected(f"num_samples {n_c} outside [1, {self.max_samples or 'inf'}]")
        except UpdateRejected as e:
            self.reject(cid, str(e))
            return False
        with torch.no_grad():
            for n, t in upload.tensors.items():
                p = self.params[n]
                total = self._weights_in.setdefault(n, torch.zeros_like(p, dtype=torch.float32))
                total += n_c * (t.float() - p.float())
                self._weights_n[n] = self._weights_n.get(n, 0) + n_c
        self._weights_loss[0] += float(upload.loss_sum)
        self._weights_loss[1] += n_c
        self._weights_from.append(cid)
        return True

    def finish_weight_round(self) -> RoundResult:
        """Step the optimizer on minus the clients' sample-weighted mean change of each tensor (SGD lr 1:
        FedAvg); nothing is applied when no client answered or the step would go non-finite."""
        loss_sum, n_tot = self._weights_loss
        res = RoundResult(round=self.round, attempt=self.attempt, accepted=len(self._weights_from), rejected=0,
                          loss=loss_sum / max(1, n_tot))
        ok = False
        if self._weights_from:
            t = (self.optimizer.t, self.head_optimizer.t)
            changed = self._step({n: -(self._weights_in[n] / self._weights_n[n]) for n in self.params
                                  if n in self._weights_in})
            ok = changed is not None
            if ok:
                self._record(None, changed)
            else:
                res.reason = "the step would make weights or optimizer state non-finite"
                self.reject(None, f"round {self.round}: step rolled back (non-finite result)")
        else:
            res.reason = "no valid updates"
        res.rejected = self._round_rejected
        res.stepped = ok
        self.model_version += int(ok)
        self.plans = {}
        self._close_round()
        return res

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        """Everything a resumed server needs, as plain containers and tensors (no pickled objects)."""
        return {
            "params": {n: p.detach().clone() for n, p in self.params.items()},
            "optimizer": self.optimizer.state_dict(), "head_optimizer": self.head_optimizer.state_dict(),
            "round": self.round, "model_version": self.model_version, "attempt": self.attempt,
            "cache": [{"plans": {c: p.to_config() for c, p in plans.items()},
                       "updates": [u.to_bytes().decode() for u in updates]} for plans, updates in self.cache],
            "jvp_history": list(self.jvp_history),
            "prev_grad": self.prev_grad, "schedule": list(self.schedule),
            "pacing": self.pacing.state_dict() if self.pacing else None,
            "rejections": list(self.rejections), "rejected_total": self.rejected_total,
            "round_rejected": self._round_rejected,
            "steps_log": [r.to_json() for r in self.steps_log], "init_digest": self.init_digest.hex(),
            "guard": self.guard.state_dict() if self.guard is not None else None,
            "perturbations_per_client": self.K,
            "pending": None if self.pending is None else {
                "params": dict(self.pending["params"]), "state": self.pending["state"],
                "step": _Record(self.pending["step"].from_version, self.pending["step"], frozenset()).to_json()},
        }

    def load_state_dict(self, sd: dict):
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(sd["params"][n])
        self.optimizer.load_state_dict(sd["optimizer"])
        if "head_optimizer" in sd:
            self.head_optimizer.load_state_dict(sd["head_optimizer"])
        self.round, self.model_version, self.attempt = sd["round"], sd["model_version"], sd["attempt"]
        self.cache = [({c: RoundPlan.from_config(p) for c, p in a["plans"].items()},
                       [Update.from_bytes(u.encode()) for u in a["updates"]]) for a in sd["cache"]]
        self.jvp_history = list(sd["jvp_history"])
        self.prev_grad, self.schedule = sd["prev_grad"], list(sd["schedule"])
        if self.pacing and sd["pacing"]:
            self.pacing.load_state_dict(sd["pacing"])
        self.rejections = list(sd["rejections"])
        self.rejected_total = sd.get("rejected_total", len(self.rejections))
        self._round_rejected = sd.get("round_rejected", 0)
        self.steps_log = [_Record.from_json(r) for r in sd.get("steps_log", [])]
        if self.guard is not None and sd.get("guard"):
            self.guard.load_state_dict(sd["guard"])
        self.K = sd.get("perturbations_per_client", self.K)
        pending = sd.get("pending")
        self.pending = None if pending is None else {
            "params": {n: t.clone() for n, t in pending["params"].items()}, "state": pending["state"],
            "step": _Record.from_json(pending["step"]).step}
        if "init_digest" in sd:
            self.init_digest = bytes.fromhex(sd["init_digest"])

    def save(self, path: str):
        save_checkpoint(path, self.state_dict())

    def load(self, path: str):
        self.load_state_dict(load_checkpoint(path))
