"""Flower records <-> fwdkern's wire records (plans, downloads, updates).

Each travels as its binary record in a ConfigRecord under the key "record" (the bytes fwdkern's
protocol encodes: :class:`RoundPlan`, :class:`SyncMessage`, :class:`Update`), so what a node
receives and sends is exactly what the accounting counts, and seeds and scalars need no arrays.
A client's own state between messages (its tensors, optimizer state, version) lives in its
``context.state`` (:func:`replica_to_state` / :func:`replica_from_state`).
"""
from __future__ import annotations

import json

from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from ..protocol import MAX_UPDATE_BYTES, RoundPlan, SyncMessage, UpdateRejected

__all__ = ["plan_to_record", "plan_from_record", "sync_to_record", "sync_from_record", "update_to_content",
           "update_from_content", "nbytes", "replica_to_state", "replica_from_state"]

STATE_WEIGHTS, STATE_OPT, STATE_INFO = "fwdkern.weights", "fwdkern.optimizer", "fwdkern.client"


def _record(rec, what: str) -> bytes:
    if not isinstance(rec, ConfigRecord) or not isinstance(rec.get("record"), bytes):
        raise ValueError(f"malformed {what}: expected a ConfigRecord holding bytes under 'record'")
    return rec["record"]


def plan_to_record(plan: RoundPlan) -> ConfigRecord:
    return ConfigRecord({"record": plan.to_bytes()})


def plan_from_record(rec: ConfigRecord) -> RoundPlan:
    return RoundPlan.from_bytes(_record(rec, "plan"))


def sync_to_record(record: bytes) -> ConfigRecord:
    return ConfigRecord({"record": bytes(record)})


def sync_from_record(rec: ConfigRecord) -> SyncMessage:
    return SyncMessage.from_bytes(_record(rec, "download"))


def update_to_content(record: bytes) -> RecordDict:
    """A reply's content: the Update's wire record (``Update.to_bytes``), as the client encoded it."""
    return RecordDict({"update": ConfigRecord({"record": bytes(record)})})


def update_from_content(content: RecordDict) -> bytes:
    """The Update wire record in a reply's content; UpdateRejected when the content is malformed
    (parsing and validation of the record are the Server's)."""
    try:
        rec = content["update"]
    except (KeyError, TypeError) as e:
        raise UpdateRejected(f"malformed reply: missing record {e}") from None
    if not isinstance(rec, ConfigRecord):
        raise UpdateRejected("malformed reply: 'update' must be a ConfigRecord")
    b = rec.get("record")
    if not isinstance(b, bytes):
        raise UpdateRejected(f"malformed reply: 'record' is {type(b).__name__}, not bytes")
    if len(b) > MAX_UPDATE_BYTES:
        raise UpdateRejected(f"oversized update ({len(b)} bytes > {MAX_UPDATE_BYTES})")
    return b


def nbytes(content: RecordDict) -> int:
    """Payload bytes of a message content as Flower counts them (records' count_bytes)."""
    return int(sum(r.count_bytes() for r in content.values()))


def replica_to_state(replica, state: RecordDict, **info):
    """Keep a client's Replica (fwdkern.fl.sync) in its ``context.state``: tensors, optimizer state,
    version and step rule (plus the integer bookkeeping `info`)."""
    sd = replica.state_dict()
    state[STATE_WEIGHTS] = ArrayRecord(torch_state_dict={n: p.detach().cpu().clone()
                                                         for n, p in replica.params.items()})
    opt = {f"{g}/{k}/{n}": t.detach().cpu().clone() for g, st in enumerate(sd["state"]) for n, ts in st.items()
           for k, t in ts.items()}
    state[STATE_OPT] = ArrayRecord(torch_state_dict=opt)
    state[STATE_INFO] = ConfigRecord({"version": -1 if sd["version"] is None else int(sd["version"]),
                                      "rule": json.dumps(sd["rule"]), **{k: int(v) for k, v in info.items()}})


def replica_from_state(replica, state: RecordDict) -> dict:
    """Restore a Replica from ``context.state`` (left as it is when the state holds none); returns the
    integer bookkeeping kept beside it."""
    if STATE_INFO not in state or STATE_WEIGHTS not in state:
        return {}
    info = dict(state[STATE_INFO])
    weights = state[STATE_WEIGHTS].to_torch_state_dict()
    if set(weights) != set(replica.params):
        raise ValueError("context.state holds weights of another model")
    for n, p in replica.params.items():
        p.data.copy_(weights[n])
    groups: list = [{}, {}]
    if STATE_OPT in state:
        for key, t in state[STATE_OPT].to_torch_state_dict().items():
            g, k, n = key.split("/", 2)
            groups[int(g)].setdefault(n, {})[k] = t
    version = int(info.pop("version"))
    replica.load_state_dict({"version": None if version < 0 else version, "rule": json.loads(info.pop("rule")),
                             "state": groups})
    return {k: v for k, v in info.items() if isinstance(v, int)}
