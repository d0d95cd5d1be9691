"""Flower ServerApp: the embedded runner's `Simulation` with Flower as its transport.

The ServerApp builds exactly the `Simulation` the embedded runner builds (same `RunConfig`,
same seeds, same `Server`) and only swaps its transport: each round `Simulation.run_round`
hands the plans to :class:`FlowerExchange`, which sends every sampled client a message and
turns the replies back into `Update`s. So metrics.jsonl, summary.json and the checkpoint in
``cfg.out`` are the embedded runner's files.

What travels per round (``flower.jsonl`` in ``cfg.out`` logs each client's bytes):

  down  ConfigRecord "plan"  the RoundPlan's binary record (seed, ks, tensor ids, head block)
        ConfigRecord "sync"  the client's download (fwdkern.fl.sync): per tensor nothing, the
                             steps since the version it holds as seeds and scalars (it redoes
                             them with ``seeded_axpy_`` and the step rule, FedAdam/FedYogi and
                             momentum included, on its own optimizer state), or the tensor
                             itself -- whichever is smaller; a client seen for the first time
                             rebuilds the initial adapter from the run's seed
  up    ConfigRecord "update": the Update's binary wire record (client_id, round,
        model_version, ks, one jvp per k and the head projections in the run's --wire
        encoding, loss, num_samples)

A client's tensors after its download are bit-identical to the server's, so a Flower run
computes what the embedded runner computes. Whatever a node sends (errors, timeouts,
malformed replies) counts as a dropout or a rejection and never stops the ServerApp; the
next download of such a client carries every tensor.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Callable, Optional

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from ..protocol import Update, UpdateRejected
from ..simulation import CHECKPOINT, build
from .codec import nbytes, update_from_content
from .run_config import FLOWER_DEFAULTS, parse_run_config

log = logging.getLogger("fwdkern.fl")

TRAIN, QUERY = "train", "query"


def _send_and_collect(grid: Grid, messages: dict, timeout: float, poll: float) -> dict:
    """Push {key: Message}; {key: reply} of the replies that arrived before the timeout."""
    keys = list(messages)
    ids = list(grid.push_messages([messages[k] for k in keys]))
    return _collect(grid, messages, dict(zip(keys, ids)), timeout, poll)


def _collect(grid: Grid, messages: dict, sent: dict, timeout: float, poll: float) -> dict:
    """Pull the replies to {key: message id} until all arrived or `timeout` seconds passed."""
    key_of = {mid: k for k, mid in sent.items() if mid}  # a None id: the push failed (a dropout)
    key_of_node = {messages[k].metadata.dst_node_id: k for k in key_of.values()}
    pending = dict(key_of)
    replies: dict = {}
    deadline = time.monotonic() + timeout
    while pending:
        for r in grid.pull_messages(list(pending)):
            k = key_of.get(r.metadata.reply_to_message_id)
            if k is None:
                k = key_of_node.get(r.metadata.src_node_id)
            if k is not None and k not in replies:
                replies[k] = r
                pending = {mid: kk for mid, kk in pending.items() if kk != k}
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(poll)
    return replies


def discover_partitions(grid: Grid, clients: int, timeout: float, poll: float = 0.2,
                        while_waiting: Optional[Callable] = None) -> dict:
    """{client index: node id} from the SuperNodes' ``partition-id``; ValueError unless it is a bijection.

    Waits (up to `timeout`) for `clients` nodes, asks each for its partition id with a
    "query" message and runs `while_waiting()` (e.g. building the model) before collecting.
    """
    deadline = time.monotonic() + timeout
    nodes = sorted(grid.get_node_ids())
    while len(nodes) < clients and time.monotonic() < deadline:
        time.sleep(poll)
        nodes = sorted(grid.get_node_ids())
    msgs = {nid: Message(RecordDict({"query": ConfigRecord({"want": "partition-id"})}), dst_node_id=nid,
                         message_type=QUERY, ttl=max(timeout, 1.0)) for nid in nodes}
    ids = list(grid.push_messages([msgs[n] for n in nodes]))
    if while_waiting is not None:
        while_waiting()
    replies = _collect(grid, msgs, dict(zip(nodes, ids)), max(poll, deadline - time.monotonic()), poll)
    by_pid: dict = {}
    unset = []
    for nid in nodes:
        r = replies.get(nid)
        if r is None or r.has_error():
            continue
        try:
            pid = r.content["node"]["partition-id"]
        except (KeyError, TypeError, ValueError):
            continue
        if pid == -1:
            unset.append(nid)
        else:
            by_pid.setdefault(pid, []).append(nid)
    dup = {p: n for p, n in by_pid.items() if len(n) > 1}
    missing = [c for c in range(clients) if c not in by_pid]
    extra = sorted(p for p in by_pid if not (isinstance(p, int) and 0 <= p < clients))
    if dup or missing or extra or unset:
        raise ValueError(
            f"SuperNode partition ids must be exactly 0..{clients - 1} (clients = {clients}), one node each: "
            f"{len(nodes)} nodes, {len(replies)} answered; duplicated {dup or 'none'}, missing {missing or 'none'}, "
            f"out of range {extra or 'none'}, nodes without a partition-id {unset or 'none'}. Start one SuperNode "
            "per client with --node-config \"partition-id=<c>\".")
    return {c: by_pid[c][0] for c in range(clients)}


class FlowerExchange:
    """`Simulation.exchange` over a Flower Grid: plans and downloads out, update records back, in client
    order."""

    def __init__(self, grid: Grid, sim, node_of: dict, opts: Optional[dict] = None,
                 record: Optional[Callable] = None):
        self.grid, self.sim, self.node_of = grid, sim, dict(node_of)
        self.opts = dict(FLOWER_DEFAULTS, **(opts or {}))
        self.record = record or (lambda row: None)

    def __call__(self, plans: dict, downloads: dict) -> list:
        srv = self.sim.server
        t0 = time.perf_counter()
        row = {"round": srv.round, "attempt": srv.attempt, "clients": {}}
        msgs = {}
        for c, plan in plans.items():
            d = downloads[c]
            content = RecordDict({"plan": ConfigRecord({"record": d.plan}), "sync": ConfigRecord({"record": d.sync})})
            msgs[c] = Message(content, dst_node_id=self.node_of[c], message_type=TRAIN,
                              group_id=f"{srv.round}.{srv.attempt}", ttl=self.opts["round-timeout"])
            row["clients"][c] = {"sync": d.kind, "bytes_down": nbytes(content), "download_bytes": d.nbytes}
        replies = _send_and_collect(self.grid, msgs, self.opts["round-timeout"], self.opts["poll-interval"])
        out = []
        for c, plan in plans.items():  # client order, not arrival order: aggregation is order-sensitive
            info = row["clients"][c]
            r = replies.get(c)
            if r is None or r.has_error():
                # Dropout: the round proceeds without it; what it holds is unknown from now on.
                self.sim.holdings.lost(c)
                info["status"] = "timeout" if r is None else "error"
                if r is not None:
                    info["error"] = f"{r.error.code}: {r.error.reason}"
                log.warning("client %d dropped out (%s)", c, info.get("error", "no reply before the timeout"))
                continue
            try:
                if not r.has_content():
                    raise UpdateRejected("malformed reply: neither content nor error")
                info["bytes_up"] = nbytes(r.content)
                record = update_from_content(r.content)
                upd = Update.from_bytes(record)
                if upd.client_id != plan.client_id:
                    raise UpdateRejected(f"node of {plan.client_id!r} answered as {upd.client_id!r}")
                state = dict(r.content["client"]) if "client" in r.content else None
            except Exception as e:  # noqa: BLE001 -- whatever a node sends must not stop the ServerApp
                reason = str(e) if isinstance(e, UpdateRejected) else f"malformed reply: {e!r}"
                self.sim.holdings.lost(c)
                srv.reject(plan.client_id, reason)
                info.update(status="malformed", error=reason)
                continue
            # Validation (stale version, NaN, ...) is Server.submit's; here only what the client holds.
            if upd.model_version != plan.model_version:
                self.sim.holdings.lost(c)
            if state is not None:
                info["state"] = state
            info.update(status="ok", jvps=list(upd.jvps), loss=upd.loss)
            out.append(record)
        row["wall_s"] = round(time.perf_counter() - t0, 3)
        self.record(row)
        return out


def run_server(grid: Grid, context: Context) -> dict:
    """ServerApp body: the embedded runner's `Simulation.run` with Flower as the transport."""
    cfg, opts = parse_run_config(context.run_config)
    built = []  # the model is built while the SuperNodes answer the partition-id query
    node_of = discover_partitions(grid, cfg.clients, opts["node-timeout"], opts["poll-interval"],
                                  while_waiting=lambda: built.append(build(cfg, log=print)))
    sim = built[0]
    os.makedirs(cfg.out, exist_ok=True)
    path = os.path.join(cfg.out, "flower.jsonl")
    if not os.path.exists(os.path.join(cfg.out, CHECKPOINT)):
        open(path, "w").close()

    def record(row):
        with open(path, "a") as f:
            f.write(json.dumps(row, allow_nan=True) + "\n")

    sim.exchange = FlowerExchange(grid, sim, node_of, opts, record=record)
    summary = sim.run()
    print(f"fwdkern: done, {summary['rounds']} steps, final {summary['final']}, outputs in {cfg.out}")
    return summary


server_app = ServerApp()


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
    run_server(grid, context)
