"""Flower records <-> fwdkern protocol messages (plans, replay records, updates).

Plans and replay records travel as ConfigRecord lists of ints and floats, an update as its binary
wire record (the bytes the client encoded, in a ConfigRecord), so seeds and scalars need no
arrays; weights (ArrayRecord) only travel when a client must download them.
"""
from __future__ import annotations

from flwr.app import ConfigRecord, RecordDict

from ..._seed import join_seed, split_seed
from ..protocol import MAX_UPDATE_BYTES, ReplayRecord, RoundPlan, SeededOp, UpdateRejected

__all__ = ["plan_to_record", "plan_from_record", "replay_to_record", "replay_from_record", "update_to_content",
           "update_from_content", "nbytes"]


def plan_to_record(plan: RoundPlan) -> ConfigRecord:
    return ConfigRecord(plan.to_config())


def plan_from_record(rec: ConfigRecord) -> RoundPlan:
    return RoundPlan.from_config(dict(rec))


def replay_to_record(records: list) -> ConfigRecord:
    """ReplayRecords (``Server.replay_chain``) as flat typed lists.

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
        for op in rec.ops:
            key = (int(op.seed), [int(k) for k in op.ks], [float(c) for c in op.coeffs])
            if groups and groups[-1][0] == key:
                groups[-1][1].append(int(op.pid))
            else:
                groups.append((key, [int(op.pid)]))
        out["versions"].append(int(rec.from_version))
        out["num_groups"].append(len(groups))
        for (seed, ks, coeffs), pids in groups:
            lo, hi = split_seed(seed)
            out["seed_lo"].append(lo)
            out["seed_hi"].append(hi)
            out["num_pids"].append(len(pids))
            out["num_ks"].append(len(ks))
            out["pids"].extend(pids)
            out["ks"].extend(ks)
            out["coeffs"].extend(coeffs)
    return ConfigRecord(out)


def replay_from_record(rec: ConfigRecord) -> list:
    """Inverse of `replay_to_record`: [ReplayRecord, ...]."""
    records, g, p, k = [], 0, 0, 0
    for version, n_groups in zip(rec["versions"], rec["num_groups"]):
        ops = []
        for _ in range(n_groups):
            seed = join_seed(rec["seed_lo"][g], rec["seed_hi"][g])
            n_p, n_k = rec["num_pids"][g], rec["num_ks"][g]
            ks = tuple(int(x) for x in rec["ks"][k:k + n_k])
            coeffs = tuple(float(x) for x in rec["coeffs"][k:k + n_k])
            ops.extend(SeededOp(seed, int(pid), ks, coeffs) for pid in rec["pids"][p:p + n_p])
            g, p, k = g + 1, p + n_p, k + n_k
        records.append(ReplayRecord(int(version), tuple(ops)))
    return records


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
