"""A Flower strategy for seed-and-scalar forward-gradient training, for apps that keep their own
ServerApp / ClientApp (Flower ships no zeroth-order or seed-based strategy).

Server side::

    from fwdkern.fl.flower.strategy import SeedStrategy
    strategy = SeedStrategy.from_model(model, perturbations=16, clients_per_round=10, lr=0.01)
    result = strategy.start(grid=grid, initial_arrays=SeedStrategy.arrays_of(model), num_rounds=50)

Client side (inside ``@app.train()``)::

    from fwdkern.fl.flower.strategy import answer_plan
    return answer_plan(msg, model, batches)   # batches: the client's list of model-input dicts

Per round the strategy sends each sampled node its plan (ConfigRecord "plan": the seed, perturbation
indices, tensor ids) and its download (ConfigRecord "sync": per tensor nothing, the steps it missed as
seeds and scalars, or the tensor itself, whichever is smaller -- the whole trainable state at a node's
first contact; fwdkern.fl.sync); the node answers with one jvp per perturbation (ConfigRecord
"update": the Update's binary wire record, a few hundred bytes). Aggregation, validation and the
optimizer step are :class:`fwdkern.fl.Server`'s: malformed, stale or poisoned replies are
rejected with a reason and never stop the ServerApp; pacing, when configured, turns a round into
a retry at the same model version. Only ``flwr.app``, ``flwr.serverapp`` and ``flwr.clientapp``
are imported (tested with flwr 1.21.0, the oldest claimed, and 1.41.0, the newest installable here).
"""
from __future__ import annotations

import logging
import time
from typing import Iterable, Optional

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from ..._seed import derive_seed
from ..client import seeded_answer
from ..optim import SGD, FedAdam, FedYogi
from ..protocol import UpdateRejected
from ..server import Server
from ..sync import Holdings, Replica, state_digest
from .codec import (nbytes, plan_from_record, plan_to_record, replica_from_state, replica_to_state, sync_from_record,
                    sync_to_record, update_from_content, update_to_content)

log = logging.getLogger("fwdkern.fl")

__all__ = ["SeedStrategy", "answer_plan"]


class SeedStrategy(Strategy):
    """Forward-gradient federated training over Flower's Message API.

    Args:
        params: name -> tensor of the trainable tensors (their initial values; the strategy keeps its
            own copy, updated every round). param_ids: name -> fwdkern param id (``fwdkern.trainable``).
        optimizer: a fwdkern.fl.optim server optimizer (default FedAdam lr 0.01).
        perturbations: K per client per round. clients_per_round: nodes sampled per round (all when None).
        seed: run seed (plans and client sampling derive from it). dist: "rademacher" | "gaussian".
        server_kwargs: passed on to :class:`fwdkern.fl.Server` (pacing, groups, max_samples, ...).
    """

    def __init__(self, params: dict, param_ids: dict, optimizer=None, *, perturbations: int = 16,
                 clients_per_round: Optional[int] = None, seed: int = 0, dist: str = "rademacher",
                 min_available_nodes: Optional[int] = None, node_timeout: float = 120.0, **server_kwargs):
        self.server = Server({n: t.detach().float() for n, t in params.items()}, param_ids,
                             optimizer or FedAdam(0.01), seed=seed, perturbations_per_client=perturbations, dist=dist,
                             **server_kwargs)
        self.clients_per_round = clients_per_round
        self.min_available_nodes = min_available_nodes or clients_per_round or 1
        self.node_timeout = float(node_timeout)
        self.seed = seed
        self.history: list = []  # Server.finish_round's RoundResult per round
        # What each node holds. A node's first download carries every tensor: its model is the app's own,
        # so nothing says it starts from the strategy's initial arrays.
        self.holdings = Holdings(first=None)
        self.bytes_down: list = []  # (round, node id, bytes of its plan + download)
        self._sent: list = []

    @classmethod
    def from_model(cls, model, optimizer: str = "fedadam", lr: float = 0.01, **kw) -> "SeedStrategy":
        """A strategy for a patched model's trainable tensors (``fwdkern.trainable(model)``)."""
        import fwdkern

        tr = fwdkern.trainable(model)
        opt = {"sgd": SGD, "fedadam": FedAdam, "fedyogi": FedYogi}[optimizer](lr)
        return cls({n: p for n, _, p in tr}, {n: pid for n, pid, _ in tr}, opt, **kw)

    @staticmethod
    def arrays_of(model) -> ArrayRecord:
        import fwdkern

        return ArrayRecord(torch_state_dict={n: p.detach().cpu().clone() for n, _, p in fwdkern.trainable(model)})

    # ------------------------------------------------------------------ Strategy API
    def summary(self) -> None:
        log.info("SeedStrategy: %d trainable tensors (%d values), K=%d per client, optimizer %s",
                 len(self.server.params), sum(p.numel() for p in self.server.params.values()), self.server.K,
                 type(self.server.optimizer).__name__)

    def _load(self, arrays: ArrayRecord):
        sd = arrays.to_torch_state_dict()
        if set(sd) != set(self.server.params):
            raise ValueError(f"arrays: tensors {sorted(set(sd) ^ set(self.server.params))[:5]} do not match the strategy's")
        with torch.no_grad():
            for n, p in self.server.params.items():
                p.copy_(sd[n])
        self.server.init_digest = state_digest(self.server.params)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if server_round == 1:
            self._load(arrays)
        deadline = time.monotonic() + self.node_timeout
        nodes = sorted(grid.get_node_ids())
        while len(nodes) < self.min_available_nodes and time.monotonic() < deadline:
            time.sleep(0.2)
            nodes = sorted(grid.get_node_ids())
        n = len(nodes) if self.clients_per_round is None else min(self.clients_per_round, len(nodes))
        rng = np.random.default_rng(derive_seed(self.seed, self.server.round, self.server.attempt, 1) % 2**63)
        # Sample positions, not the ids: numpy turns a list of uint64 node ids above 2**63 into float64,
        # and the rounded id then addresses no node.
        chosen = sorted(nodes[int(i)] for i in rng.choice(len(nodes), size=n, replace=False)) if n else []
        plans = self.server.plan_round([str(nid) for nid in chosen])
        out = []
        for nid in chosen:
            # Per tensor the cheapest sufficient download from what the node holds (fwdkern.fl.sync).
            msg = self.server.sync_message(self.holdings.base(nid), first_contact=self.holdings.is_first_contact(nid))
            self.holdings.synced(nid, self.server.model_version)
            content = RecordDict({"plan": plan_to_record(plans[str(nid)]), "sync": sync_to_record(msg.to_bytes()),
                                  "config": config})
            self.bytes_down.append((self.server.round, nid, nbytes(content)))
            out.append(Message(content, dst_node_id=nid, message_type="train"))
        self._sent = list(chosen)
        return out

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        answered = set()
        for r in replies:
            node = getattr(r.metadata, "src_node_id", None)
            try:
                if r.has_error():
                    self.holdings.lost(node)
                    raise UpdateRejected(f"error reply: {r.error.reason}")
                answered.add(node)
                self.server.submit(update_from_content(r.content))
            except UpdateRejected as e:
                self.holdings.lost(node)
                self.server.reject(str(node if node is not None else "?"), str(e))
            except Exception as e:  # noqa: BLE001 -- whatever a node sends must not stop the ServerApp
                self.holdings.lost(node)
                self.server.reject(str(node if node is not None else "?"), f"malformed reply: {e!r}"[:200])
        for nid in self._sent:  # no reply: what it holds is unknown
            if nid not in answered:
                self.holdings.lost(nid)
        res = self.server.finish_round()
        self.history.append(res)
        metrics = {k: float(getattr(res, k)) for k in ("accepted", "rejected", "perturbations", "loss")
                   if getattr(res, k) is not None}
        metrics["stepped"] = float(res.stepped)
        arrays = ArrayRecord(torch_state_dict=self.server.weights())
        return arrays, MetricRecord(metrics)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []  # evaluate centrally with Strategy.start(evaluate_fn=...), or on nodes with a subclass

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Optional[MetricRecord]:
        return None


def answer_plan(msg: Message, model, batches, state=None, wire: str = "fp32", tangent_scope: str = "batch") -> Message:
    """Client side: apply the strategy's download to `model`'s trainable tensors, run one jvp per batch for
    the plan in `msg` (the client step of fwdkern.fl.client), and reply with the sample-averaged
    directional derivatives in the `wire` encoding.

    `state`: the node's ``context.state``, where the client keeps its tensors, optimizer state and
    version between messages, so later downloads carry only seeds and scalars (without it every
    download must carry the whole trainable state: a partial one fails, and the strategy then sends
    everything). `tangent_scope`: "sample" shares the plan's tangents out among each batch's samples
    (fwdkern.fl.client.seeded_answer); the strategy's estimate is unbiased either way."""
    import fwdkern

    content = msg.content
    plan = plan_from_record(content["plan"])
    download = sync_from_record(content["sync"])
    tr = fwdkern.trainable(model)
    replica = Replica({n: p for n, _, p in tr}, {n: pid for n, pid, _ in tr})
    if state is not None:
        replica_from_state(replica, state)
    replica.apply(download)
    if replica.version != plan.model_version:
        raise ValueError(f"the model is at version {replica.version}, the plan needs {plan.model_version}")
    record = seeded_answer(model, list(batches), plan, estimator="jvp", wire=wire, tangent_scope=tangent_scope)
    if state is not None:
        replica_to_state(replica, state)
    return Message(update_to_content(record), reply_to=msg)
