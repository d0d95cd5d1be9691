"""Flower ClientApp: one SuperNode is one simulated client (its ``partition-id``).

It builds only the client task (model, data, batching, local computation; no Server), keeps
its adapter weights and model version in ``context.state`` (the SuperNode keeps a run's
Context between messages, although each message runs in a fresh ``flwr-clientapp`` process),
brings them to the plan's version (downloaded weights, or the replay of missed SGD steps)
and answers with its jvp scalars.
"""
from __future__ import annotations

import logging

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from ..sync import apply_replay
from ..protocol import client_id
from ..task import ClientTask, load_task
from .codec import plan_from_record, replay_from_record, update_to_content
from .run_config import config_key, parse_run_config

log = logging.getLogger("fwdkern.fl")

STATE_WEIGHTS, STATE_INFO = "fwdkern.weights", "fwdkern.client"

_TASKS: dict = {}  # config JSON -> ClientTask: repeated messages in one process do not rebuild


def client_task(cfg) -> ClientTask:
    key = config_key(cfg)
    if key not in _TASKS:
        _TASKS[key] = load_task(cfg, log=lambda *a: log.info(" ".join(map(str, a))))
    return _TASKS[key]


def partition_id(context: Context) -> int:
    pid = context.node_config.get("partition-id")
    if isinstance(pid, bool) or not isinstance(pid, int):
        raise ValueError(f"SuperNode node_config needs an integer 'partition-id' (got {pid!r}); "
                         "start it with --node-config \"partition-id=<client index>\"")
    return pid


def handle_query(msg: Message, context: Context) -> Message:
    """Report this node's partition id (the server maps client indices to nodes with it)."""
    try:
        pid = partition_id(context)
    except ValueError:
        pid = -1
    return Message(RecordDict({"node": ConfigRecord({"partition-id": pid})}), reply_to=msg)


def handle_train(msg: Message, context: Context) -> Message:
    """Bring the local weights to the plan's model version, then answer the plan."""
    cfg, _ = parse_run_config(context.run_config)
    c = partition_id(context)
    content = msg.content
    plan = plan_from_record(content["plan"])
    if plan.client_id != client_id(c):
        raise ValueError(f"plan for {plan.client_id!r} sent to the node with partition-id {c}")
    task = client_task(cfg)
    state = context.state
    sync = content["sync"]
    if "weights" in content:
        weights, version = content["weights"].to_torch_state_dict(), int(sync["target_version"])
    elif STATE_WEIGHTS in state:
        weights, version = state[STATE_WEIGHTS].to_torch_state_dict(), int(state[STATE_INFO]["version"])
    else:
        raise RuntimeError("no local weights in context.state and none in the message")
    task.load_weights(weights)
    replayed = 0
    if "replay" in content:
        for rec in replay_from_record(content["replay"]):
            if rec.from_version < version:
                continue  # already applied (a reply that got lost)
            if rec.from_version != version:
                raise RuntimeError(f"replay gap: local version {version}, record from {rec.from_version}")
            apply_replay(task.params, task.names_by_id, rec, plan.dist)
            version += 1
            replayed += 1
    if version != plan.model_version:
        raise RuntimeError(f"local weights at version {version}, plan needs {plan.model_version}")
    update = task.answer(c, plan)
    state[STATE_WEIGHTS] = ArrayRecord(torch_state_dict=task.weights())
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
