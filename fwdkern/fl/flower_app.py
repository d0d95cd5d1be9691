"""Flower runner for the seed-and-scalar protocol (Flower >= 1.41 Message API).

The ServerApp builds exactly the `Simulation` the embedded runner builds (same
`RunConfig`, same seeds, same `Server`) and only swaps its transport: each round
`Simulation.run_round` hands the plans to :class:`FlowerExchange`, which sends every
sampled client a message and turns the replies back into `Update`s. So metrics.jsonl,
summary.json and checkpoint.pt in ``cfg.out`` are the embedded runner's files.

What travels per round (see ``flower.jsonl`` in ``cfg.out`` for the measured bytes):

  down  ConfigRecord "plan"    the RoundPlan (seed as two 32-bit halves, ks, tensor ids)
        ConfigRecord "replay"  the server steps the client missed since its last
                               contact, as (seed, tensor id, ks, coefficients) lists:
                               the client redoes them with ``seeded_axpy_`` (SGD only)
        ArrayRecord "weights"  the trainable tensors, only at first contact, after a
                               failed exchange, for non-linear server optimizers
                               (FedAdam/FedYogi, momentum), past ``max-replay`` steps
                               since the last download, or with ``sync = "weights"``
  up    ConfigRecord "update" + MetricRecord "metrics": client_id, round, model_version,
        ks, jvps (one float each), loss, num_samples

Clients keep their adapter weights and their model version in ``context.state``
(the SuperNode keeps a run's Context between messages, although each message runs in
a fresh ``flwr-clientapp`` process). Replay rebuilds the server's SGD step with a
different summation order, so replaying clients evaluate at weights within float32
rounding (~1e-7 relative) of the server's; ``sync = "weights"`` makes every client
evaluate at the server's exact weights (bit-identical to the embedded runner) at the
cost of a weights download whenever a client is behind.

Simulated client ``c`` is the SuperNode started with ``--node-config "partition-id=c"``:
there must be exactly one SuperNode per client, partition ids 0 .. clients-1.

Run it (one machine; Flower 1.41 reads SuperLink connections from
``$FLWR_HOME/config.toml``, default ``~/.flwr/config.toml``)::

    flower-superlink --insecure --port 9093 --disable-runtime-dependency-installation
    flower-supernode --insecure --superlink 127.0.0.1:9093 --port 9101 --node-config "partition-id=0"
    flower-supernode --insecure --superlink 127.0.0.1:9093 --port 9102 --node-config "partition-id=1"

    # ~/.flwr/config.toml (see examples/flower/flower-config.toml):
    #   [superlink.fwdkern-local]
    #   address = "127.0.0.1:9093"
    #   insecure = true

    # RunConfig as JSON (inline or a path to a .json file); clients = number of SuperNodes
    echo '{"clients": 2, "clients_per_round": 2, "rounds": 10, "out": "/abs/runs/flower"}' > /abs/cfg.json
    flwr run examples/flower fwdkern-local --stream --run-config 'run-config="/abs/cfg.json"'

``fwdkern`` must be importable by the SuperLink's and SuperNodes' Python (``pip install .``).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Callable, Optional

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from .protocol import RoundPlan, Update, UpdateRejected
from .simulation import RunConfig

log = logging.getLogger("fwdkern.fl")

TRAIN, QUERY = "train", "query"
STATE_WEIGHTS, STATE_INFO = "fwdkern.weights", "fwdkern.client"

# Flower run-config keys ([tool.flwr.app.config]) and their defaults.
FLOWER_DEFAULTS = {
    "run-config": "{}",  # RunConfig fields as JSON, or a path to a JSON file
    "sync": "replay",  # "replay": replay records when possible; "weights": always weights when behind
    "max-replay": 100,  # weights again after this many replayed steps since a client's last download
    "round-timeout": 600.0,  # seconds to wait for replies; a node that has not answered is a dropout
    "node-timeout": 120.0,  # seconds to wait for the SuperNodes to connect and report their partition id
    "poll-interval": 0.2,  # seconds between pulls for replies
}


# ---------------------------------------------------------------------- configuration
def parse_run_config(run_config) -> tuple:
    """(RunConfig, Flower options) from a Flower ``context.run_config``."""
    opts = dict(FLOWER_DEFAULTS)
    opts.update({k: v for k, v in dict(run_config).items() if k in FLOWER_DEFAULTS})
    raw = str(opts["run-config"]).strip()
    if raw.startswith("{"):
        fields = json.loads(raw)
    else:
        with open(raw) as f:
            fields = json.load(f)
    names = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(fields) - names)
    if unknown:
        raise ValueError(f"run-config: unknown RunConfig fields {unknown}")
    cfg = RunConfig(**fields)
    if cfg.method == "backprop":
        raise ValueError("the Flower runner carries seeds and scalars: method must be fwdkern, mezo or fwdllm")
    if opts["sync"] not in ("replay", "weights"):
        raise ValueError(f"sync: {opts['sync']!r} is neither 'replay' nor 'weights'")
    opts["max-replay"] = int(opts["max-replay"])
    for k in ("round-timeout", "node-timeout", "poll-interval"):
        opts[k] = float(opts[k])
    return cfg, opts


def config_key(cfg: RunConfig) -> str:
    return json.dumps(cfg.to_json(), sort_keys=True)


# ---------------------------------------------------------------------- (de)serialisation
def plan_to_record(plan: RoundPlan) -> ConfigRecord:
    return ConfigRecord(plan.to_config())


def plan_from_record(rec: ConfigRecord) -> RoundPlan:
    return RoundPlan.from_config(dict(rec))


def replay_to_record(records: list) -> ConfigRecord:
    """Replay records (``Server.replay_log`` entries) as flat typed lists.

    Consecutive ops of a record that share (seed, ks, coefficients) -- one update's ops
    over the tensors it perturbed, whose coefficients coincide whenever those tensors
    have the same total weight -- travel once with their list of tensor ids. Per record:
    from_version and group count; per group: seed halves, tensor and k counts; tensor
    ids, ks and coefficients (float64, bit-exact) concatenated.
    """
    out = {"versions": [], "num_groups": [], "seed_lo": [], "seed_hi": [], "num_pids": [], "num_ks": [],
           "pids": [], "ks": [], "coeffs": []}
    for rec in records:
        groups = []
        for seed, pid, ks, coeffs in rec["ops"]:
            key = (int(seed), [int(k) for k in ks], [float(c) for c in coeffs])
            if groups and groups[-1][0] == key:
                groups[-1][1].append(int(pid))
            else:
                groups.append((key, [int(pid)]))
        out["versions"].append(int(rec["from_version"]))
        out["num_groups"].append(len(groups))
        for (seed, ks, coeffs), pids in groups:
            out["seed_lo"].append(seed & 0xFFFFFFFF)
            out["seed_hi"].append(seed >> 32)
            out["num_pids"].append(len(pids))
            out["num_ks"].append(len(ks))
            out["pids"].extend(pids)
            out["ks"].extend(ks)
            out["coeffs"].extend(coeffs)
    return ConfigRecord(out)


def replay_from_record(rec: ConfigRecord) -> list:
    """Inverse of `replay_to_record`: [{"from_version", "ops": [(seed, pid, ks, coeffs), ...]}, ...]."""
    records, g, p, k = [], 0, 0, 0
    for version, n_groups in zip(rec["versions"], rec["num_groups"]):
        ops = []
        for _ in range(n_groups):
            seed = int(rec["seed_lo"][g]) | (int(rec["seed_hi"][g]) << 32)
            n_p, n_k = rec["num_pids"][g], rec["num_ks"][g]
            ks, coeffs = list(rec["ks"][k:k + n_k]), list(rec["coeffs"][k:k + n_k])
            ops.extend((seed, int(pid), list(ks), list(coeffs)) for pid in rec["pids"][p:p + n_p])
            g, p, k = g + 1, p + n_p, k + n_k
        records.append({"from_version": int(version), "ops": ops})
    return records


def update_to_content(update: Update) -> RecordDict:
    return RecordDict({
        "update": ConfigRecord({"client_id": update.client_id, "round": int(update.round),
                                "model_version": int(update.model_version), "ks": [int(k) for k in update.ks]}),
        "metrics": MetricRecord({"jvps": [float(j) for j in update.jvps], "loss": float(update.loss),
                                 "num_samples": int(update.num_samples)}),
    })


def _typed(d, key, kind=None, list_of=None):
    """d[key] when it has the expected type (bools are not numbers here), else UpdateRejected."""
    if key not in d:
        raise UpdateRejected(f"malformed reply: no {key!r}")
    v = d[key]

    def ok(x, t):
        return isinstance(x, t) and not isinstance(x, bool)

    def name(t):
        return " or ".join(x.__name__ for x in (t if isinstance(t, tuple) else (t,)))

    if list_of is not None:
        if not isinstance(v, list) or not all(ok(x, list_of) for x in v):
            raise UpdateRejected(f"malformed reply: {key!r} is not a list of {name(list_of)}")
        return v
    if not ok(v, kind):
        raise UpdateRejected(f"malformed reply: {key!r} is {type(v).__name__}, not {name(kind)}")
    return v


def update_from_content(content: RecordDict) -> Update:
    """The Update in a reply's content; UpdateRejected when it is malformed (validation is the Server's)."""
    try:
        upd, met = content["update"], content["metrics"]
    except (KeyError, TypeError) as e:
        raise UpdateRejected(f"malformed reply: missing record {e}") from None
    if not isinstance(upd, ConfigRecord) or not isinstance(met, MetricRecord):
        raise UpdateRejected("malformed reply: 'update' must be a ConfigRecord and 'metrics' a MetricRecord")
    jvps = _typed(met, "jvps", list_of=(int, float))
    return Update(client_id=_typed(upd, "client_id", str), round=_typed(upd, "round", int),
                  model_version=_typed(upd, "model_version", int), ks=tuple(_typed(upd, "ks", list_of=int)),
                  jvps=tuple(float(j) for j in jvps), num_samples=_typed(met, "num_samples", int),
                  loss=float(_typed(met, "loss", (int, float))))


def _nbytes(content: RecordDict) -> int:
    """Payload bytes of a message content as Flower counts them (records' count_bytes)."""
    return int(sum(r.count_bytes() for r in content.values()))


# ---------------------------------------------------------------------- client side
_SIMS: dict = {}  # config JSON -> Simulation: repeated messages in one process do not rebuild


def _client_sim(cfg: RunConfig):
    key = config_key(cfg)
    if key not in _SIMS:
        from .runner import build

        _SIMS[key] = build(cfg, log=lambda *a: log.info(" ".join(map(str, a))))
    return _SIMS[key]


def _partition_id(context: Context) -> int:
    pid = context.node_config.get("partition-id")
    if isinstance(pid, bool) or not isinstance(pid, int):
        raise ValueError(f"SuperNode node_config needs an integer 'partition-id' (got {pid!r}); "
                         "start it with --node-config \"partition-id=<client index>\"")
    return pid


def handle_query(msg: Message, context: Context) -> Message:
    """Report this node's partition id (the server maps client indices to nodes with it)."""
    try:
        pid = _partition_id(context)
    except ValueError:
        pid = -1
    return Message(RecordDict({"node": ConfigRecord({"partition-id": pid})}), reply_to=msg)


def handle_train(msg: Message, context: Context) -> Message:
    """Bring the local weights to the plan's model version, then run `Simulation.client_update`."""
    import torch

    from .server import apply_replay

    cfg, _ = parse_run_config(context.run_config)
    c = _partition_id(context)
    content = msg.content
    plan = plan_from_record(content["plan"])
    if plan.client_id != f"client{c}":
        raise ValueError(f"plan for {plan.client_id!r} sent to the node with partition-id {c}")
    sim = _client_sim(cfg)
    params = sim.server.params
    state = context.state
    sync = content["sync"]
    if "weights" in content:
        weights, version = content["weights"].to_torch_state_dict(), int(sync["target_version"])
    elif STATE_WEIGHTS in state:
        weights, version = state[STATE_WEIGHTS].to_torch_state_dict(), int(state[STATE_INFO]["version"])
    else:
        raise RuntimeError("no local weights in context.state and none in the message")
    if set(weights) != set(params):
        raise ValueError("weights do not match this model's trainable tensors")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(weights[n])
    replayed = 0
    if "replay" in content:
        for rec in replay_from_record(content["replay"]):
            if rec["from_version"] < version:
                continue  # already applied (a reply that got lost)
            if rec["from_version"] != version:
                raise RuntimeError(f"replay gap: local version {version}, record from {rec['from_version']}")
            apply_replay(params, sim.server.names_by_id, rec, plan.dist)
            version += 1
            replayed += 1
    if version != plan.model_version:
        raise RuntimeError(f"local weights at version {version}, plan needs {plan.model_version}")
    update = sim.client_update(c, plan)
    state[STATE_WEIGHTS] = ArrayRecord(torch_state_dict={n: p.detach().cpu().clone() for n, p in params.items()})
    info = dict(state[STATE_INFO]) if STATE_INFO in state else {"messages": 0, "replayed": 0, "downloads": 0}
    info.update(version=version, messages=int(info["messages"]) + 1, replayed=int(info["replayed"]) + replayed,
                downloads=int(info["downloads"]) + int("weights" in content))
    state[STATE_INFO] = ConfigRecord(info)
    reply = update_to_content(update)
    # The client's context.state bookkeeping after this message (shows whether Flower persisted the state).
    reply["client"] = ConfigRecord({k: int(v) for k, v in info.items()})
    return Message(reply, reply_to=msg)


client_app = ClientApp()


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    return handle_train(msg, context)


@client_app.query()
def _query(msg: Message, context: Context) -> Message:
    return handle_query(msg, context)


# ---------------------------------------------------------------------- server side
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
    """`Simulation.exchange` over a Flower Grid: plans out, Updates back, in client order."""

    def __init__(self, grid: Grid, sim, node_of: dict, opts: Optional[dict] = None,
                 record: Optional[Callable] = None):
        self.grid, self.sim, self.node_of = grid, sim, dict(node_of)
        self.opts = dict(FLOWER_DEFAULTS, **(opts or {}))
        self.known: dict = {}  # client -> model version of its stored weights (absent: unknown)
        self.downloaded: dict = {}  # client -> model version of its last weights download
        self.record = record or (lambda row: None)

    def _replay_chain(self, start: int, stop: int) -> Optional[list]:
        srv = self.sim.server
        if not (srv.optimizer.linear and not getattr(srv.optimizer, "momentum", 0.0)):
            return None
        by_version = {rec["from_version"]: rec for rec in srv.replay_log}
        chain = [by_version.get(v) for v in range(start, stop)]
        return None if any(r is None for r in chain) else chain

    def content_for(self, c: int, plan: RoundPlan) -> tuple:
        """(RecordDict, sync mode) for client c: the plan plus what brings it to plan.model_version."""
        srv = self.sim.server
        target = plan.model_version
        have = self.known.get(c)
        mode = "none"
        chain = None
        if have != target:
            mode = "weights"
            if (self.opts["sync"] == "replay" and have is not None and have < target
                    and target - self.downloaded.get(c, have) <= self.opts["max-replay"]):
                chain = self._replay_chain(have, target)
                if chain is not None:
                    mode = "replay"
        content = RecordDict({"plan": plan_to_record(plan),
                              "sync": ConfigRecord({"mode": mode, "base_version": -1 if have is None else have,
                                                    "target_version": target})})
        if mode == "replay":
            content["replay"] = replay_to_record(chain)
        elif mode == "weights":
            content["weights"] = ArrayRecord(
                torch_state_dict={n: p.detach().cpu().clone() for n, p in srv.params.items()})
        return content, mode

    def __call__(self, plans: dict) -> list:
        srv = self.sim.server
        t0 = time.perf_counter()
        row = {"round": srv.round, "attempt": srv.attempt, "clients": {}}
        msgs = {}
        for c, plan in plans.items():
            content, mode = self.content_for(c, plan)
            msgs[c] = Message(content, dst_node_id=self.node_of[c], message_type=TRAIN,
                              group_id=f"{srv.round}.{srv.attempt}", ttl=self.opts["round-timeout"])
            row["clients"][c] = {"sync": mode, "bytes_down": _nbytes(content)}
        replies = _send_and_collect(self.grid, msgs, self.opts["round-timeout"], self.opts["poll-interval"])
        out = []
        for c, plan in plans.items():  # client order, not arrival order: aggregation is order-sensitive
            info = row["clients"][c]
            r = replies.get(c)
            if r is None or r.has_error():
                # Dropout: the round proceeds without it; its local state is unknown from now on.
                self.known.pop(c, None)
                info["status"] = "timeout" if r is None else "error"
                if r is not None:
                    info["error"] = f"{r.error.code}: {r.error.reason}"
                log.warning("client %d dropped out (%s)", c, info.get("error", "no reply before the timeout"))
                continue
            try:
                if not r.has_content():
                    raise UpdateRejected("malformed reply: neither content nor error")
                info["bytes_up"] = _nbytes(r.content)
                upd = update_from_content(r.content)
                if upd.client_id != plan.client_id:
                    raise UpdateRejected(f"node of {plan.client_id!r} answered as {upd.client_id!r}")
                state = dict(r.content["client"]) if "client" in r.content else None
            except Exception as e:  # noqa: BLE001 -- whatever a node sends must not stop the ServerApp
                reason = str(e) if isinstance(e, UpdateRejected) else f"malformed reply: {e!r}"
                self.known.pop(c, None)
                srv.rejections.append({"round": srv.round, "client": plan.client_id, "reason": reason})
                log.warning("rejected reply from client %d: %s", c, reason)
                info.update(status="malformed", error=reason)
                continue
            # Validation (stale version, NaN, ...) is Server.submit's; here only the client's sync state.
            if upd.model_version == plan.model_version:
                self.known[c] = plan.model_version
                if info["sync"] == "weights":
                    self.downloaded[c] = plan.model_version
            else:
                self.known.pop(c, None)
            if state is not None:
                info["state"] = state
            info.update(status="ok", jvps=list(upd.jvps), loss=upd.loss)
            out.append(upd)
        row["wall_s"] = round(time.perf_counter() - t0, 3)
        self.record(row)
        return out


def run_server(grid: Grid, context: Context) -> dict:
    """ServerApp body: the embedded runner's `Simulation.run` with Flower as the transport."""
    from .runner import build

    cfg, opts = parse_run_config(context.run_config)
    built = []  # the model is built while the SuperNodes answer the partition-id query
    node_of = discover_partitions(grid, cfg.clients, opts["node-timeout"], opts["poll-interval"],
                                  while_waiting=lambda: built.append(build(cfg, log=print)))
    sim = built[0]
    os.makedirs(cfg.out, exist_ok=True)
    path = os.path.join(cfg.out, "flower.jsonl")
    if not os.path.exists(os.path.join(cfg.out, "checkpoint.pt")):
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


__all__ = ["client_app", "server_app", "FlowerExchange", "parse_run_config", "discover_partitions",
           "handle_train", "handle_query", "plan_to_record", "plan_from_record", "replay_to_record",
           "replay_from_record", "update_to_content", "update_from_content"]
