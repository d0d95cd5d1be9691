"""Flower ClientApp: one SuperNode is one simulated client (its ``partition-id``).

It builds only the client task (model, data, batching, local computation; no Server), keeps its
copy of the trainable tensors, their optimizer state and its model version in ``context.state``
(the SuperNode keeps a run's Context between messages, although each message runs in a fresh
``flwr-clientapp`` process), applies the round's download (fwdkern.fl.sync) and answers the plan
with its update's wire record.
"""
from __future__ import annotations

import logging

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from ..protocol import client_id
from ..sync import Replica, swapped
from ..task import ClientTask, load_task
from .codec import plan_from_record, replica_from_state, replica_to_state, sync_from_record, update_to_content
from .run_config import config_key, parse_run_config

log = logging.getLogger("fwdkern.fl")

_TASKS: dict = {}  # config JSON -> (ClientTask, its initial weights): repeated messages in one process do not rebuild


def client_task(cfg) -> tuple:
    """(ClientTask, its initial trainable weights: version 0, rebuilt from the run's seed)."""
    key = config_key(cfg)
    if key not in _TASKS:
        task = load_task(cfg, log=lambda *a: log.info(" ".join(map(str, a))))
        _TASKS[key] = (task, task.weights())
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
    """Apply the download to the client's copy of the tensors, then answer the plan."""
    cfg, _ = parse_run_config(context.run_config)
    c = partition_id(context)
    content = msg.content
    plan = plan_from_record(content["plan"])
    if plan.client_id != client_id(c):
        raise ValueError(f"plan for {plan.client_id!r} sent to the node with partition-id {c}")
    download = sync_from_record(content["sync"])
    task, initial = client_task(cfg)
    task.load_weights(initial)  # version 0; replaced by what context.state holds, if anything
    replica = Replica.fresh(task.params, task.param_ids)
    info = replica_from_state(replica, context.state) or {"messages": 0, "steps": 0, "tensors": 0}
    replica.apply(download)
    if replica.version != plan.model_version:
        raise RuntimeError(f"local weights at version {replica.version}, the plan needs {plan.model_version}")
    probe = None
    if download.probe is not None:  # the guard's proposed body step: the client measures its loss with it
        values = replica.preview(download.probe, download.dist)
        probe = lambda: swapped(task.params, values)  # noqa: E731
    record = task.answer(c, plan, probe=probe)
    info = {"messages": info.get("messages", 0) + 1, "steps": info.get("steps", 0) + len(download.steps),
            "tensors": info.get("tensors", 0) + len(download.raw)}
    replica_to_state(replica, context.state, **info)
    reply = update_to_content(record)
    # The client's bookkeeping after this message (shows whether Flower persisted its state).
    reply["client"] = ConfigRecord({"version": int(replica.version), **info})
    return Message(reply, reply_to=msg)


client_app = ClientApp()


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    return handle_train(msg, context)


@client_app.query()
def _query(msg: Message, context: Context) -> Message:
    return handle_query(msg, context)
