"""Messages of the seed-and-scalar protocol, their wire formats and their validation.

A :class:`RoundPlan` tells a client what to compute; its :class:`Update` answers with scalars
only. Two blocks of perturbation indices may be planned:

* ``ks`` over the tensors ``param_ids``: the client returns one directional derivative
  (jvp) of its loss per index -- forward gradients through the body of the model;
* ``head_ks`` over the tensors ``head_ids`` (optional): the client returns the projection of
  its exact head pseudo-gradient on each seeded direction (the head's gradient needs no pass
  through the body, see :mod:`fwdkern.fl.task`).

Updates travel as a compact binary record (:data:`ENCODINGS`: ``fp32``, ``fp16`` with one fp32
scale per block, or ``sign``: 1 bit per value plus one fp32 scale, FeedSign style) or as JSON
(debugging; ~27 B per value). Whatever arrives is parsed strictly: types, sizes and ranges
are checked at the boundary and anything invalid is an :class:`UpdateRejected`, never another
exception.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Optional, Sequence

import numpy as np

from .._seed import join_seed, split_seed

U32 = 1 << 32
MAX_UPDATE_BYTES = 64 * 1024  # an update is scalars: anything larger is refused before parsing
MAX_VALUES = 16384  # scalars per block
MAX_CLIENT_ID = 128  # characters
MAX_SAMPLES = (1 << 31) - 1
# |jvp| above this is refused outright: the estimate's squares (FedAdam's second moment)
# must stay finite in float32 whatever the weights and the number of terms.
MAX_ABS_VALUE = 1e15
MAX_EXTRA_KEYS = 16
ENCODINGS = ("fp32", "fp16", "sign", "json")


class UpdateRejected(ValueError):
    """A client update that must not be applied (the reason names the problem)."""


def client_id(index: int) -> str:
    """The protocol's id of the simulated client with partition `index`."""
    return f"client{int(index)}"


def client_index(cid: str) -> int:
    """The partition index of a simulated client's id (inverse of :func:`client_id`)."""
    if not (isinstance(cid, str) and cid.startswith("client") and cid[6:].isdigit()):
        raise ValueError(f"client id {cid!r} is not 'client<index>'")
    return int(cid[6:])


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_num(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def _int(value, name: str, lo: int, hi: int) -> int:
    if not _is_int(value):
        raise UpdateRejected(f"malformed update: {name} is {type(value).__name__}, not int")
    value = int(value)
    if not lo <= value <= hi:
        raise UpdateRejected(f"{name} {value} is outside [{lo}, {hi}]")
    return value


def _ints(values, name: str, limit: int = MAX_VALUES) -> tuple:
    if not isinstance(values, (list, tuple)):
        raise UpdateRejected(f"malformed update: {name} is {type(values).__name__}, not a list of ints")
    if len(values) > limit:
        raise UpdateRejected(f"{name}: {len(values)} entries (at most {limit})")
    return tuple(_int(v, f"{name} entry", 0, U32 - 1) for v in values)


def _floats(values, name: str) -> tuple:
    if not isinstance(values, (list, tuple)):
        raise UpdateRejected(f"malformed update: {name} is {type(values).__name__}, not a list of floats")
    if len(values) > MAX_VALUES:
        raise UpdateRejected(f"{name}: {len(values)} entries (at most {MAX_VALUES})")
    out = []
    for v in values:
        if not _is_num(v):
            raise UpdateRejected(f"malformed update: {name} entry is {type(v).__name__}, not float")
        v = float(v)
        if not math.isfinite(v):
            raise UpdateRejected(f"non-finite {name[:-1] if name.endswith('s') else name} (NaN/Inf)")
        if abs(v) > MAX_ABS_VALUE:
            raise UpdateRejected(f"{name} entry {v:.3g} exceeds {MAX_ABS_VALUE:.0e} in magnitude")
        out.append(v)
    return tuple(out)


def _client_id(value) -> str:
    if not isinstance(value, str):
        raise UpdateRejected(f"malformed update: client_id is {type(value).__name__}, not str")
    if not 0 < len(value) <= MAX_CLIENT_ID:
        raise UpdateRejected(f"client_id: length {len(value)} (1 to {MAX_CLIENT_ID} characters)")
    return value


def _extra(value) -> dict:
    if not isinstance(value, dict):
        raise UpdateRejected(f"malformed update: extra is {type(value).__name__}, not a dict")
    if len(value) > MAX_EXTRA_KEYS:
        raise UpdateRejected(f"extra: {len(value)} keys (at most {MAX_EXTRA_KEYS})")
    for k, v in value.items():
        if not isinstance(k, str) or not (v is None or isinstance(v, (str, bool, int, float))):
            raise UpdateRejected("malformed update: extra holds only str keys and scalar values")
    return dict(value)


@dataclass(frozen=True)
class RoundPlan:
    """What one client must compute in one round.

    round / model_version: the server state the client must evaluate at.
    seed: uint64 perturbation seed. ks: perturbation indices to evaluate.
    param_ids: ids of the tensors to perturb (SPRY splitting; all trainable
    tensors when the split is off). num_batches: local batches to average over.
    max_samples: most samples an update may claim (0: no cap).
    head_ks / head_ids: indices and tensors of the projected exact head pseudo-gradient (optional).
    probe: the client also reports its loss with the body step the guard proposes (fwdkern.fl.guard).
    """

    client_id: str
    round: int
    model_version: int
    seed: int
    ks: tuple
    param_ids: tuple
    num_batches: int = 1
    dist: str = "rademacher"
    max_samples: int = 0
    head_ks: tuple = ()
    head_ids: tuple = ()
    probe: bool = False

    def to_config(self) -> dict:
        """Flat dict of ints/strings/int lists (fits a Flower ConfigRecord)."""
        d = asdict(self)
        for k in ("ks", "param_ids", "head_ks", "head_ids"):
            d[k] = list(getattr(self, k))
        # ConfigRecord ints are signed 64-bit: ship the seed as two 32-bit halves.
        d["seed_lo"], d["seed_hi"] = split_seed(self.seed)
        del d["seed"]
        for k in ("head_ks", "head_ids"):  # Flower cannot size an empty list; absent means empty
            if not d[k]:
                del d[k]
        return d

    def to_bytes(self) -> bytes:
        """The plan's binary wire record (what a client downloads; :meth:`from_bytes` parses it)."""
        cid = self.client_id.encode("utf-8")
        return b"".join([_PLAN_MAGIC, struct.pack("<BB", _VERSION, len(cid)), cid,
                         struct.pack("<IIQIBIB", self.round, self.model_version, self.seed, self.num_batches,
                                     _DIST_CODE[self.dist], self.max_samples, int(self.probe)),
                         _pack_ints(self.ks), _pack_ints(self.param_ids), _pack_ints(self.head_ks),
                         _pack_ints(self.head_ids)])

    @classmethod
    def from_bytes(cls, b) -> "RoundPlan":
        """Inverse of :meth:`to_bytes`; ValueError naming the problem when the record is malformed."""
        try:
            r = _Reader(bytes(b) if isinstance(b, (bytes, bytearray, memoryview)) else _not_bytes(b))
            if r.take(2) != _PLAN_MAGIC:
                raise UpdateRejected("not a plan record")
            version, n_id = r.unpack("<BB")
            if version != _VERSION:
                raise UpdateRejected(f"record version {version} not understood")
            cid = _client_id(r.take(n_id).decode("utf-8"))
            rnd, mv, seed, nb, dist, ms, probe = r.unpack("<IIQIBIB")
            if dist not in _DIST_NAME or nb < 1 or ms > MAX_SAMPLES or nb > MAX_SAMPLES or probe > 1:
                raise UpdateRejected("dist, num_batches or max_samples out of range")
            ks, pids, hks, hids = (_read_ints(r, MAX_VALUES) for _ in range(4))
            if r.i != len(r.b):
                raise UpdateRejected(f"{len(r.b) - r.i} trailing bytes")
        except (UpdateRejected, UnicodeDecodeError) as e:
            raise ValueError(f"malformed plan: {e}") from None
        return cls(cid, rnd, mv, seed, ks, pids, nb, _DIST_NAME[dist], ms, hks, hids, bool(probe))

    @classmethod
    def from_config(cls, d: dict) -> "RoundPlan":
        """Inverse of :meth:`to_config`; ValueError naming the field when it is malformed."""
        try:
            dist = d.get("dist", "rademacher")
            if dist not in ("rademacher", "gaussian"):
                raise UpdateRejected(f"dist {dist!r}")
            return cls(client_id=_client_id(d["client_id"]), round=_int(d["round"], "round", 0, U32 - 1),
                       model_version=_int(d["model_version"], "model_version", 0, U32 - 1),
                       seed=join_seed(_int(d["seed_lo"], "seed_lo", 0, U32 - 1), _int(d["seed_hi"], "seed_hi", 0, U32 - 1)),
                       ks=_ints(d["ks"], "ks"), param_ids=_ints(d["param_ids"], "param_ids"),
                       num_batches=_int(d.get("num_batches", 1), "num_batches", 1, MAX_SAMPLES), dist=dist,
                       max_samples=_int(d.get("max_samples", 0), "max_samples", 0, MAX_SAMPLES),
                       head_ks=_ints(list(d.get("head_ks", [])), "head_ks"),
                       head_ids=_ints(list(d.get("head_ids", [])), "head_ids"), probe=bool(d.get("probe", False)))
        except KeyError as e:
            raise ValueError(f"malformed plan: no {e}") from None
        except UpdateRejected as e:
            raise ValueError(f"malformed plan: {e}") from None


@dataclass(frozen=True)
class Update:
    """A client's answer: one directional derivative per planned perturbation (and one head
    projection per planned head index)."""

    client_id: str
    round: int
    model_version: int
    ks: tuple
    jvps: tuple
    num_samples: int
    loss: float
    extra: dict = field(default_factory=dict)
    head: tuple = ()

    # ------------------------------------------------------------------ encodings
    def to_bytes(self, encoding: str = "json") -> bytes:
        """The wire record (see the module docstring); ``encoding`` in :data:`ENCODINGS`. The
        default, JSON, round-trips every float exactly; the binary encodings are what transports send."""
        if encoding == "json":
            return self.to_json()
        if encoding not in _ENC_CODE:
            raise ValueError(f"encoding: {encoding!r} is not one of {', '.join(ENCODINGS)}")
        cid = self.client_id.encode("utf-8")
        extra = json.dumps(self.extra, separators=(",", ":")).encode() if self.extra else b""
        parts = [_MAGIC, struct.pack("<BBIIIfB", _VERSION, _ENC_CODE[encoding], self.round, self.model_version,
                                     self.num_samples, self.loss, len(cid)), cid,
                 _pack_ks(self.ks), _pack_values(self.jvps, encoding), struct.pack("<H", len(self.head)),
                 _pack_values(self.head, encoding) if self.head else b"", struct.pack("<H", len(extra)), extra]
        return b"".join(parts)

    def as_sent(self, encoding: str) -> "Update":
        """This update with its values as the receiver decodes them from `encoding` (fp32/fp16/sign
        round them), so every transport hands the server the same numbers."""
        return self if encoding == "json" else Update.from_bytes(self.to_bytes(encoding))

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, b: bytes) -> "Update":
        """Parse a binary or JSON record strictly; UpdateRejected (only) when it is malformed."""
        if not isinstance(b, (bytes, bytearray, memoryview)):
            raise UpdateRejected(f"malformed update: {type(b).__name__}, not bytes")
        b = bytes(b)
        if len(b) > MAX_UPDATE_BYTES:
            raise UpdateRejected(f"oversized update ({len(b)} bytes > {MAX_UPDATE_BYTES})")
        try:
            if b[:2] == _MAGIC:
                return _unpack(b)
            d = json.loads(b.decode("utf-8"))
        except UpdateRejected:
            raise
        except (ValueError, UnicodeDecodeError, RecursionError, struct.error, OverflowError, TypeError) as e:
            raise UpdateRejected(f"malformed update: {type(e).__name__}: {str(e)[:120]}") from None
        return cls.from_dict(d)

    @classmethod
    def from_dict(cls, d) -> "Update":
        if not isinstance(d, dict):
            raise UpdateRejected(f"malformed update: {type(d).__name__}, not an object")
        allowed = {"client_id", "round", "model_version", "ks", "jvps", "num_samples", "loss", "extra", "head"}
        unknown = sorted(str(k)[:40] for k in d if k not in allowed)
        if unknown:
            raise UpdateRejected(f"malformed update: unknown fields {unknown[:5]}")
        missing = sorted({"client_id", "round", "model_version", "ks", "jvps", "num_samples", "loss"} - set(d))
        if missing:
            raise UpdateRejected(f"malformed update: missing fields {missing}")
        u = cls(client_id=d["client_id"], round=d["round"], model_version=d["model_version"], ks=d["ks"],
                jvps=d["jvps"], num_samples=d["num_samples"], loss=d["loss"], extra=d.get("extra", {}),
                head=d.get("head", ()))
        return u.checked()

    def checked(self) -> "Update":
        """This update with every field type-, size- and range-checked (UpdateRejected otherwise)."""
        if not _is_num(self.loss) or not math.isfinite(float(self.loss)):
            if not _is_num(self.loss):
                raise UpdateRejected(f"malformed update: loss is {type(self.loss).__name__}, not float")
            raise UpdateRejected("non-finite loss")
        return Update(client_id=_client_id(self.client_id),
                      round=_int(self.round, "late or early update: round", 0, U32 - 1),
                      model_version=_int(self.model_version, "model_version", 0, U32 - 1),
                      ks=_ints(self.ks, "ks"), jvps=_floats(self.jvps, "jvps"),
                      num_samples=_int(self.num_samples, "num_samples", 1, MAX_SAMPLES), loss=float(self.loss),
                      extra=_extra(self.extra), head=_floats(self.head, "head"))

    @property
    def nbytes(self) -> int:
        """Size of the JSON record (``len(u.to_bytes(encoding))`` for another encoding)."""
        return len(self.to_bytes())


# ---------------------------------------------------------------------- binary record
_MAGIC = b"FK"
_VERSION = 1
_ENC_CODE = {"fp32": 0, "fp16": 1, "sign": 2}
_ENC_NAME = {v: k for k, v in _ENC_CODE.items()}


def _pack_ks(ks) -> bytes:
    """A contiguous run (the usual plan) as (start, count); otherwise the explicit list."""
    ks = [int(k) for k in ks]
    if ks and ks == list(range(ks[0], ks[0] + len(ks))):
        return struct.pack("<BIH", 0, ks[0], len(ks))
    return struct.pack("<BH", 1, len(ks)) + np.asarray(ks, dtype="<u4").tobytes()


def _pack_values(values, encoding: str) -> bytes:
    v = np.asarray(values, dtype=np.float64)
    if encoding == "fp32":
        return v.astype("<f4").tobytes()
    scale = float(np.abs(v).max()) if v.size else 0.0
    if encoding == "fp16":  # one fp32 scale: no fp16 overflow, ~1e-3 relative precision
        q = v / scale if scale > 0 else v
        return struct.pack("<f", scale) + q.astype("<f2").tobytes()
    # sign: 1 bit per value (1 = negative) and the mean magnitude as the common scale
    mag = float(np.abs(v).mean()) if v.size else 0.0
    return struct.pack("<f", mag) + np.packbits(v < 0, bitorder="little").tobytes()


class _Reader:
    def __init__(self, b: bytes):
        self.b, self.i = b, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.i + n > len(self.b):
            raise UpdateRejected("malformed record: truncated")
        out = self.b[self.i:self.i + n]
        self.i += n
        return out

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))


def _read_ks(r: _Reader) -> tuple:
    mode, = r.unpack("<B")
    if mode == 0:
        start, count = r.unpack("<IH")
        if start + count > U32:
            raise UpdateRejected("ks: range beyond 2^32")
        return tuple(range(start, start + count))
    if mode == 1:
        count, = r.unpack("<H")
        return tuple(int(k) for k in np.frombuffer(r.take(4 * count), dtype="<u4"))
    raise UpdateRejected(f"malformed update: unknown ks mode {mode}")


_PLAN_MAGIC, _SYNC_MAGIC = b"FP", b"FS"
_DIST_CODE = {"rademacher": 0, "gaussian": 1}
_DIST_NAME = {v: k for k, v in _DIST_CODE.items()}


def _not_bytes(b):
    raise UpdateRejected(f"{type(b).__name__}, not bytes")


def _pack_ints(values) -> bytes:
    """Unsigned 32-bit ints as runs (start, count) or as a list, whichever is shorter."""
    vals = [int(v) for v in values]
    runs = []
    for v in vals:
        if runs and runs[-1][0] + runs[-1][1] == v:
            runs[-1][1] += 1
        else:
            runs.append([v, 1])
    if 8 * len(runs) < 4 * len(vals):
        return struct.pack("<BI", 0, len(runs)) + b"".join(struct.pack("<II", a, n) for a, n in runs)
    return struct.pack("<BI", 1, len(vals)) + np.asarray(vals, dtype="<u4").tobytes()


def _read_ints(r: "_Reader", limit: int) -> tuple:
    mode, n = r.unpack("<BI")
    if mode == 0:
        out = []
        for _ in range(n):
            a, c = r.unpack("<II")
            if a + c > U32 or len(out) + c > limit:
                raise UpdateRejected("int runs beyond range or limit")
            out.extend(range(a, a + c))
        return tuple(out)
    if mode == 1:
        if n > limit:
            raise UpdateRejected(f"{n} ints (at most {limit})")
        return tuple(int(v) for v in np.frombuffer(r.take(4 * n), dtype="<u4"))
    raise UpdateRejected(f"unknown int list mode {mode}")


def _read_values(r: _Reader, count: int, encoding: str) -> tuple:
    if encoding == "fp32":
        return tuple(float(x) for x in np.frombuffer(r.take(4 * count), dtype="<f4"))
    scale, = r.unpack("<f")
    if encoding == "fp16":
        q = np.frombuffer(r.take(2 * count), dtype="<f2").astype(np.float64)
        return tuple(float(x) for x in (q * scale if scale > 0 else q))
    bits = np.unpackbits(np.frombuffer(r.take((count + 7) // 8), dtype=np.uint8), bitorder="little")[:count]
    return tuple(float(x) for x in np.where(bits == 1, -scale, scale))


def _unpack(b: bytes) -> Update:
    r = _Reader(b)
    r.take(2)
    version, enc, rnd, mv, n, loss, idlen = r.unpack("<BBIIIfB")
    if version != _VERSION or enc not in _ENC_NAME:
        raise UpdateRejected(f"malformed update: record version {version} / encoding {enc} not understood")
    encoding = _ENC_NAME[enc]
    cid = r.take(idlen).decode("utf-8")
    ks = _read_ks(r)
    jvps = _read_values(r, len(ks), encoding)
    n_head, = r.unpack("<H")
    head = _read_values(r, n_head, encoding) if n_head else ()
    n_extra, = r.unpack("<H")
    extra = json.loads(r.take(n_extra).decode("utf-8")) if n_extra else {}
    if r.i != len(b):
        raise UpdateRejected(f"malformed update: {len(b) - r.i} trailing bytes")
    return Update(cid, rnd, mv, ks, jvps, n, loss, extra, head).checked()


# ---------------------------------------------------------------------- validation
def validate_update(update: Update, plan: Optional[RoundPlan], *, current_round: int, model_version: int,
                    jvp_bound: Optional[float] = None) -> Update:
    """The checked `update` when it answers `plan` exactly and sanely; UpdateRejected otherwise."""
    if not isinstance(update, Update):
        raise UpdateRejected(f"not an Update: {type(update).__name__}")
    update = update.checked()
    size = update.nbytes
    if size > MAX_UPDATE_BYTES:
        raise UpdateRejected(f"oversized update ({size} bytes > {MAX_UPDATE_BYTES})")
    if plan is None:
        raise UpdateRejected(f"client {update.client_id!r} was not sampled this round")
    if update.client_id != plan.client_id:
        raise UpdateRejected(f"client id {update.client_id!r} does not match the plan's {plan.client_id!r}")
    if update.round != current_round:
        raise UpdateRejected(f"late or early update: round {update.round}, current round {current_round}")
    if update.model_version != model_version or plan.model_version != model_version:
        raise UpdateRejected(f"stale model version {update.model_version} (current {model_version})")
    if tuple(update.ks) != tuple(plan.ks):
        raise UpdateRejected("ks differ from the plan")
    if len(update.jvps) != len(plan.ks):
        raise UpdateRejected(f"{len(update.jvps)} jvps for {len(plan.ks)} planned perturbations")
    if len(update.head) != len(plan.head_ks):
        raise UpdateRejected(f"{len(update.head)} head values for {len(plan.head_ks)} planned head directions")
    if plan.max_samples and update.num_samples > plan.max_samples:
        raise UpdateRejected(f"num_samples {update.num_samples} above the plan's {plan.max_samples}")
    if jvp_bound is not None and any(abs(j) > jvp_bound for j in update.jvps):
        raise UpdateRejected(f"jvp magnitude above the robust bound {jvp_bound:.3g}")
    return update


def robust_bound(values: Sequence[float], factor: float = 10.0, floor: float = 1e-12,
                 min_count: int = 8) -> Optional[float]:
    """|x| bound: median + factor * max(MAD, median / 2) of |values| (None below min_count values)."""
    vals = sorted(abs(v) for v in values)
    if len(vals) < min_count:
        return None
    med = vals[len(vals) // 2]
    mad = sorted(abs(v - med) for v in vals)[len(vals) // 2]
    return med + factor * max(mad, floor, 0.5 * med)


# ---------------------------------------------------------------------- round results and rows
@dataclass
class RoundResult:
    """What the server did with one round (or pacing attempt): ``Server.finish_round`` and
    ``Server.finish_weight_round`` return it.

    accepted / rejected: updates kept / refused this attempt. stepped: the optimizer stepped (the model
    version advanced); reason: why not. loss: the sample-weighted mean of the clients' losses.
    perturbations: scalars in the estimate (jvps + head projections). variance / noise_ratio: the
    pacing measures of the estimate (None below two updates); threshold: the pacing threshold.
    guard / guard_delta / guard_scale: the body guard's decision on the pending body step ("accepted",
    "rejected"; None: no proposal was pending), the clients' measured relative loss change with it, and
    the lr scale it was proposed with (fwdkern.fl.guard)."""

    round: int
    attempt: int
    accepted: int
    rejected: int
    stepped: bool = False
    reason: Optional[str] = None
    loss: Optional[float] = None
    perturbations: int = 0
    variance: Optional[float] = None
    noise_ratio: Optional[float] = None
    threshold: Optional[float] = None
    guard: Optional[str] = None
    guard_delta: Optional[float] = None
    guard_scale: Optional[float] = None


@dataclass
class RoundRow(RoundResult):
    """One row of metrics.jsonl: one client round (or pacing attempt) of a run -- what the server did
    (the RoundResult's fields) and what it cost the clients.

    perturbations: scalars in the round's estimate over all its clients (and pacing attempts).
    tangents_per_client / head_projections_per_client: what one client evaluates: forward-gradient
    tangents through the body, and seeded projections of its exact head update.
    bytes_up_per_client / bytes_down_per_client: the mean bytes a participating client sends / receives
    (bytes_down_max: the most one received).
    forward_passes_per_client: client compute in forward-pass equivalents. evaluation: the test metrics
    when the round was evaluated. wall_time_s / cpu_time_s: the run's training time so far."""

    bytes_up_per_client: int = 0
    bytes_down_per_client: int = 0
    bytes_down_max: int = 0
    forward_passes_per_client: int = 0
    tangents_per_client: int = 0
    head_projections_per_client: int = 0
    evaluation: dict = field(default_factory=dict)
    wall_time_s: float = 0.0
    cpu_time_s: float = 0.0

    _OPTIONAL = ("reason", "noise_ratio", "guard", "guard_delta", "guard_scale")  # written only when set

    @classmethod
    def of(cls, result: RoundResult, **kw) -> "RoundRow":
        return cls(**{f.name: getattr(result, f.name) for f in fields(RoundResult)}, **kw)

    def to_json(self) -> dict:
        d = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "evaluation":
                d.update(v)
            elif not (f.name in self._OPTIONAL and v is None):
                d[f.name] = v
        return d

    @classmethod
    def from_json(cls, d: dict) -> "RoundRow":
        """A row as :meth:`to_json` writes it (keys that are not fields are evaluation metrics)."""
        known = {f.name for f in fields(cls)} - {"evaluation"}
        missing = sorted(f.name for f in fields(cls) if f.name in known and f.name not in d
                         and f.default is MISSING and f.default_factory is MISSING)
        if missing:
            raise ValueError(f"metrics row: missing fields {missing}")
        return cls(**{k: v for k, v in d.items() if k in known},
                   evaluation={k: v for k, v in d.items() if k not in known})


# ---------------------------------------------------------------------- downloads
MAX_SYNC_BYTES = 1 << 31  # a download holds at most the whole trainable state: refused beyond 2 GiB
MAX_TERMS = 1 << 22  # ks of one term group
NO_VERSION = U32 - 1


@dataclass(frozen=True)
class TermGroup:
    """``grad[pid] += sum_j coeffs[j] * v(seed, pid, ks[j])`` for every pid: seeded terms of a gradient
    estimate that tensors share when their coefficients coincide (coeffs are float32 values)."""

    seed: int
    ks: tuple
    coeffs: tuple
    pids: tuple


@dataclass(frozen=True)
class Step:
    """One server step as a client redoes it: the version it starts from, the optimizers' step counts
    before it (body, head; None: that optimizer did not step, its tensors and state stay as they are),
    the estimate's seeded terms in the order the server added them, and each optimizer's lr scale (the
    body guard's shrink factor)."""

    from_version: int
    t: tuple
    groups: tuple
    scale: tuple = (1.0, 1.0)


@dataclass(frozen=True)
class RawTensor:
    """A tensor sent as it is (numpy array, float32 or float16) with its optimizer state (name -> float32
    array), so the client can roll it forward from here."""

    pid: int
    value: object
    state: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SyncMessage:
    """What a client receives to hold the round's model: from ``base_version`` (its copy; None: it keeps
    nothing) to ``target_version``, every tensor not in ``raw`` is rolled forward through ``steps`` (the
    client rebuilds each step's gradient estimate from seeds and scalars and applies the step rule to
    its tensors and optimizer state; a step with no terms for a tensor still moves its state) and the
    ``raw`` tensors are replaced. ``rule``: the step rule (optimizer specs and the head's tensor ids),
    ``dist``: the perturbation distribution; ``init_digest``: 8 bytes of the version-0 state a client
    seen for the first time rebuilds from the run's seed instead of downloading it; ``probe``: the body
    step the guard proposes (not applied: the client measures its loss with it, fwdkern.fl.guard)."""

    base_version: Optional[int]
    target_version: int
    steps: tuple = ()
    raw: tuple = ()
    rule: Optional[dict] = None
    dist: str = "rademacher"
    init_digest: Optional[bytes] = None
    probe: Optional[Step] = None

    def to_bytes(self) -> bytes:
        flags = (1 if self.init_digest is not None else 0) | (2 if self.rule is not None else 0)
        parts = [_SYNC_MAGIC, struct.pack("<BIIBB", _VERSION, NO_VERSION if self.base_version is None
                                          else self.base_version, self.target_version, _DIST_CODE[self.dist], flags)]
        if self.init_digest is not None:
            parts.append(bytes(self.init_digest)[:8].ljust(8, b"\0"))
        if self.rule is not None:
            rule = json.dumps(self.rule, separators=(",", ":")).encode()
            parts += [struct.pack("<I", len(rule)), rule]
        steps = list(self.steps) + ([self.probe] if self.probe is not None else [])
        parts.append(struct.pack("<IB", len(self.steps), self.probe is not None))
        for st in steps:
            parts.append(struct.pack("<IIIddI", st.from_version, *(NO_VERSION if t is None else t for t in st.t),
                                     *st.scale, len(st.groups)))
            for g in st.groups:
                parts += [struct.pack("<Q", g.seed), _pack_ints(g.ks), np.asarray(g.coeffs, dtype="<f4").tobytes(),
                          _pack_ints(g.pids)]
        parts.append(struct.pack("<I", len(self.raw)))
        for t in self.raw:
            v = np.ascontiguousarray(t.value)
            code = {np.dtype("float32"): 0, np.dtype("float16"): 1}[v.dtype]
            parts += [struct.pack("<IBI", t.pid, code, v.size), v.astype("<f4" if code == 0 else "<f2").tobytes(),
                      struct.pack("<B", len(t.state))]
            for name, arr in t.state.items():
                nb = name.encode()
                a32 = np.ascontiguousarray(arr, dtype="<f4")
                parts += [struct.pack("<B", len(nb)), nb, struct.pack("<I", a32.size), a32.tobytes()]
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, b) -> "SyncMessage":
        """Parse a download strictly; ValueError naming the problem when it is malformed."""
        try:
            if not isinstance(b, (bytes, bytearray, memoryview)):
                _not_bytes(b)
            if len(b) > MAX_SYNC_BYTES:
                raise UpdateRejected(f"{len(b)} bytes (at most {MAX_SYNC_BYTES})")
            r = _Reader(bytes(b))
            if r.take(2) != _SYNC_MAGIC:
                raise UpdateRejected("not a download record")
            version, base, target, dist, flags = r.unpack("<BIIBB")
            if version != _VERSION or dist not in _DIST_NAME or flags > 3:
                raise UpdateRejected("record version, dist or flags not understood")
            digest = r.take(8) if flags & 1 else None
            rule = None
            if flags & 2:
                n, = r.unpack("<I")
                rule = json.loads(r.take(n).decode("utf-8"))
                if not isinstance(rule, dict):
                    raise UpdateRejected("the step rule is not an object")
            n_steps, has_probe = r.unpack("<IB")
            if n_steps > len(r.b) or has_probe > 1:
                raise UpdateRejected(f"{n_steps} steps in {len(r.b)} bytes")
            steps = []
            for _ in range(n_steps + has_probe):
                fv, t0, t1, s0, s1, n_groups = r.unpack("<IIIddI")
                if not (math.isfinite(s0) and math.isfinite(s1) and 0 < s0 <= 1 and 0 < s1 <= 1):
                    raise UpdateRejected("lr scale outside (0, 1]")
                if n_groups > len(r.b):
                    raise UpdateRejected(f"{n_groups} term groups in {len(r.b)} bytes")
                groups = []
                for _ in range(n_groups):
                    seed, = r.unpack("<Q")
                    ks = _read_ints(r, MAX_TERMS)
                    coeffs = np.frombuffer(r.take(4 * len(ks)), dtype="<f4")
                    if not np.isfinite(coeffs).all():
                        raise UpdateRejected("non-finite coefficient")
                    groups.append(TermGroup(seed, ks, tuple(float(c) for c in coeffs), _read_ints(r, MAX_VALUES)))
                steps.append(Step(fv, tuple(None if t == NO_VERSION else t for t in (t0, t1)), tuple(groups),
                                  (s0, s1)))
            n_raw, = r.unpack("<I")
            if n_raw > len(r.b):
                raise UpdateRejected(f"{n_raw} tensors in {len(r.b)} bytes")
            raw = []
            for _ in range(n_raw):
                pid, code, n = r.unpack("<IBI")
                if code not in (0, 1):
                    raise UpdateRejected(f"tensor dtype code {code}")
                value = np.frombuffer(r.take((4 if code == 0 else 2) * n), dtype="<f4" if code == 0 else "<f2")
                n_state, = r.unpack("<B")
                state = {}
                for _ in range(n_state):
                    ln, = r.unpack("<B")
                    name = r.take(ln).decode("utf-8")
                    m, = r.unpack("<I")
                    state[name] = np.frombuffer(r.take(4 * m), dtype="<f4")
                if not np.isfinite(value).all() or not all(np.isfinite(a).all() for a in state.values()):
                    raise UpdateRejected(f"tensor {pid}: non-finite values")
                raw.append(RawTensor(pid, value, state))
            if r.i != len(r.b):
                raise UpdateRejected(f"{len(r.b) - r.i} trailing bytes")
        except (ValueError, struct.error, RecursionError, KeyError) as e:
            raise ValueError(f"malformed download: {e}") from None
        return cls(None if base == NO_VERSION else base, target, tuple(steps[:n_steps]), tuple(raw), rule,
                   _DIST_NAME[dist], digest, steps[n_steps] if has_probe else None)
