"""Flower records <-> fwdkern protocol messages (plans, replay records, updates).

Everything travels as ConfigRecord / MetricRecord lists of ints and floats, so seeds and
scalars need no arrays; weights (ArrayRecord) only travel when a client must download them.
"""
from __future__ import annotations

from flwr.app import ConfigRecord, MetricRecord, RecordDict

from ..._seed import join_seed, split_seed
from ..protocol import RoundPlan, Update, UpdateRejected

__all__ = ["plan_to_record", "plan_from_record", "replay_to_record", "replay_from_record", "update_to_content",
           "update_from_content", "nbytes"]


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
    """Inverse of `replay_to_record`: [{"from_version", "ops": [(seed, pid, ks, coeffs), ...]}, ...]."""
    records, g, p, k = [], 0, 0, 0
    for version, n_groups in zip(rec["versions"], rec["num_groups"]):
        ops = []
        for _ in range(n_groups):
            seed = join_seed(rec["seed_lo"][g], rec["seed_hi"][g])
            n_p, n_k = rec["num_pids"][g], rec["num_ks"][g]
            ks, coeffs = list(rec["ks"][k:k + n_k]), list(rec["coeffs"][k:k + n_k])
            ops.extend((seed, int(pid), list(ks), list(coeffs)) for pid in rec["pids"][p:p + n_p])
            g, p, k = g + 1, p + n_p, k + n_k
        records.append({"from_version": int(version), "ops": ops})
    return records


def update_to_content(update: Update) -> RecordDict:
    metrics = {"jvps": [float(j) for j in update.jvps], "loss": float(update.loss),
               "num_samples": int(update.num_samples)}
    if update.head:
        metrics["head"] = [float(h) for h in update.head]
    return RecordDict({
        "update": ConfigRecord({"client_id": update.client_id, "round": int(update.round),
                                "model_version": int(update.model_version), "ks": [int(k) for k in update.ks]}),
        "metrics": MetricRecord(metrics),
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
    head = _typed(met, "head", list_of=(int, float)) if "head" in met else []
    return Update(client_id=_typed(upd, "client_id", str), round=_typed(upd, "round", int),
                  model_version=_typed(upd, "model_version", int), ks=tuple(_typed(upd, "ks", list_of=int)),
                  jvps=tuple(float(j) for j in jvps), num_samples=_typed(met, "num_samples", int),
                  loss=float(_typed(met, "loss", (int, float))), head=tuple(float(h) for h in head))


def nbytes(content: RecordDict) -> int:
    """Payload bytes of a message content as Flower counts them (records' count_bytes)."""
    return int(sum(r.count_bytes() for r in content.values()))
