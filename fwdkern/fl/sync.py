"""Downloads: what a client applies to hold the round's model, and what the transports track.

The server chooses, per tensor, the cheapest sufficient message (:meth:`fwdkern.fl.Server.sync_message`):
nothing when the tensor has not changed since the client's version, the steps since then as seeds
and scalars when those are smaller (the client rebuilds each step's gradient estimate with the same
``seeded_axpy_`` calls and applies the same step rule to its own copy of the optimizer state), or
the tensor itself with its optimizer state. :class:`Replica` is the client's side: after a message
its tensors and optimizer state are bit-identical to the server's (same ops, same order, same device).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..ops import seeded_axpy_
from .optim import optimizer_from_spec
from .protocol import SyncMessage

__all__ = ["Replica", "SyncError", "state_digest", "Holdings", "Download", "swapped"]


class SyncError(RuntimeError):
    """A download that does not apply to what the client holds (the transport then sends everything)."""


def state_digest(params: dict) -> bytes:
    """8 bytes identifying the exact values of a set of tensors (name, dtype, shape and bits)."""
    h = hashlib.sha256()
    for n in sorted(params):
        t = params[n].detach().cpu().contiguous()
        h.update(f"{n}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.digest()[:8]


class Replica:
    """A client's copy of the trainable tensors (`params`, updated in place), its model version and
    its optimizer state, brought to each round's model by :meth:`apply`.

    `version` None: the client holds nothing it can build on (a full download is needed); 0: the
    initial state every participant rebuilds from the run's seed (:meth:`fresh`)."""

    def __init__(self, params: dict, param_ids: dict, version: Optional[int] = None):
        self.params = params
        self.names_by_id = {pid: n for n, pid in param_ids.items()}
        self.version = version
        self.rule: Optional[dict] = None
        self.opts: Optional[tuple] = None  # (body, head) optimizers; their .state is the client's copy
        self.head: set = set()

    @classmethod
    def fresh(cls, params: dict, param_ids: dict) -> "Replica":
        return cls(params, param_ids, version=0)

    def _name(self, pid: int) -> str:
        try:
            return self.names_by_id[pid]
        except KeyError:
            raise SyncError(f"download names tensor id {pid}, which this model does not have") from None

    def _set_rule(self, rule: dict):
        if rule == self.rule:
            return
        try:
            opts = (optimizer_from_spec(rule["body"]), optimizer_from_spec(rule["head"]))
            head = {self._name(int(pid)) for pid in rule.get("head_ids", [])}
        except (KeyError, TypeError, ValueError) as e:
            raise SyncError(f"download's step rule is malformed ({e})") from None
        if self.opts is not None:  # the state the client holds stays with the tensors
            for new, old in zip(opts, self.opts):
                new.state = old.state
        self.rule, self.opts, self.head = rule, opts, head

    def _opt(self, name: str):
        return self.opts[1] if name in self.head else self.opts[0]

    @torch.no_grad()
    def preview(self, step, dist: str = "rademacher") -> dict:
        """The body tensors as `step` (the guard's proposed body step, not applied) would leave them:
        computed on copies with a copy of the body optimizer's state, exactly as the server proposed it."""
        if self.opts is None:
            raise SyncError("a proposed body step arrived but no step rule is known")
        opt = copy.deepcopy(self.opts[0])
        body = [n for n in self.params if n not in self.head]
        out = {n: self.params[n].detach().clone() for n in body}
        grads = self._estimate(step, body, dist)
        opt.t = step.t[0]
        opt.step(out, grads, lr_scale=step.scale[0])
        return out

    def _estimate(self, step, names, dist: str) -> dict:
        """The step's gradient estimate of the tensors `names` (float32), rebuilt from its seeded terms
        with the same seeded_axpy_ calls in the same order as the server."""
        grads = {n: torch.zeros(self.params[n].shape, dtype=torch.float32, device=self.params[n].device)
                 for n in names}
        for g in step.groups:
            for pid in g.pids:
                n = self._name(pid)
                if n in grads:
                    seeded_axpy_(grads[n], g.seed, pid, list(g.ks), list(g.coeffs), dist)
        return grads

    def state_dict(self) -> dict:
        """The client's version, step rule and optimizer state (its tensors are `params`)."""
        return {"version": self.version, "rule": self.rule,
                "state": [] if self.opts is None else [{n: dict(st) for n, st in o.state.items()} for o in self.opts]}

    def load_state_dict(self, sd: dict):
        self.version = sd.get("version")
        if sd.get("rule") is not None:
            self._set_rule(sd["rule"])
            for o, st in zip(self.opts, sd.get("state", [])):
                o.state = {n: dict(v) for n, v in st.items()}

    @torch.no_grad()
    def apply(self, msg: SyncMessage) -> "Replica":
        """Bring the tensors and optimizer state to ``msg.target_version``; SyncError (nothing changed)
        when the message does not apply to what this client holds."""
        if msg.base_version is not None:
            if self.version is None or msg.base_version != self.version:
                raise SyncError(f"download applies to version {msg.base_version}, the client holds "
                                f"{'nothing' if self.version is None else self.version}")
            if msg.init_digest is not None and state_digest(self.params) != bytes(msg.init_digest):
                raise SyncError("the initial adapter rebuilt from the run's seed differs from the server's")
        else:
            have = {self._name(t.pid) for t in msg.raw}
            if have != set(self.params):
                raise SyncError(f"a full download lacks {sorted(set(self.params) - have)[:3]}")
        raw = [(self._name(t.pid), t) for t in msg.raw]
        roll = [n for n in self.params if n not in {n for n, _ in raw}] if msg.steps else []
        for n, t in raw:
            if t.value.size != self.params[n].numel():
                raise SyncError(f"tensor {n}: {t.value.size} values, the model has {self.params[n].numel()}")
        if msg.rule is not None:
            self._set_rule(msg.rule)
        if roll and self.opts is None:
            raise SyncError("download rolls tensors forward but no step rule is known")
        for step in msg.steps:
            grads = self._estimate(step, roll, msg.dist)
            for opt, t, scale in zip(self.opts, step.t, step.scale):
                mine = {n: g for n, g in grads.items() if self._opt(n) is opt}
                if mine and t is not None:  # (None: that optimizer did not step)
                    opt.t = t
                    opt.step(self.params, mine, lr_scale=scale)
        for n, t in raw:
            p = self.params[n]
            p.copy_(torch.from_numpy(np.array(t.value, dtype=np.float32)).reshape(p.shape).to(p.dtype))
            if self.opts is not None:
                opt = self._opt(n)
                if t.state:
                    opt.state[n] = {k: torch.from_numpy(np.array(a, dtype=np.float32)).reshape(p.shape)
                                    for k, a in t.state.items()}
                else:
                    opt.state.pop(n, None)
        self.version = msg.target_version
        return self


@dataclass(frozen=True)
class Download:
    """What one client receives in one round: its plan's record and its download record
    (``SyncMessage.to_bytes``); `kind` says what the download carries (for logs)."""

    plan: bytes
    sync: bytes
    kind: str

    @property
    def nbytes(self) -> int:
        return len(self.plan) + len(self.sync)

    @staticmethod
    def kind_of(msg: SyncMessage) -> str:
        parts = (["steps"] if msg.steps else []) + (["tensors"] if msg.raw else []) + (["probe"] if msg.probe else [])
        return "+".join(parts) or "none"


@contextlib.contextmanager
def swapped(params: dict, values: dict):
    """Within the block the tensors `params[n]` hold `values[n]` (the guard's probe); restored after."""
    saved = {n: params[n].detach().clone() for n in values}
    try:
        with torch.no_grad():
            for n, v in values.items():
                params[n].copy_(v)
        yield
    finally:
        with torch.no_grad():
            for n, v in saved.items():
                params[n].copy_(v)


class Holdings:
    """What each client holds, as a transport tracks it: a model version, or None (unknown: the next
    download carries everything). A client never seen holds `first` (0: it rebuilds the initial
    adapter from the run's seed; None: it must download it)."""

    def __init__(self, first: Optional[int] = 0):
        self.first = first
        self.versions: dict = {}

    def base(self, client) -> Optional[int]:
        return self.versions.get(client, self.first)

    def is_first_contact(self, client) -> bool:
        return client not in self.versions

    def synced(self, client, version: int):
        self.versions[client] = int(version)

    def lost(self, client):
        self.versions[client] = None

    def state_dict(self) -> dict:
        return {"first": self.first, "versions": {str(c): v for c, v in self.versions.items()}}

    def load_state_dict(self, sd: dict, key=int):
        self.first = sd.get("first", self.first)
        self.versions = {key(c): v for c, v in sd.get("versions", {}).items()}
