"""What a federated method is: one row per method, read by every part of the federated layer.

The simulation, the client, the recipe, the run configuration, the Flower apps and the benchmark
suites read a method's behaviour from its :class:`Method` row; nothing else tests a method's name.
Adding a method is adding a row (and its client step in :mod:`fwdkern.fl.client` when it computes
something new).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from . import client


@dataclass(frozen=True)
class Method:
    """One federated method.

    name: the ``--method`` value. summary: one line for the help text.
    client_step: the client's computation, ``client_step(task, client index, plan)``: a seed-and-scalar
        answer (the Update's wire bytes) when ``server_step`` is "seeded", a :class:`fwdkern.fl.client.
        WeightUpload` when it is "weights".
    server_step: "seeded" -- the server rebuilds the gradient estimate from seeds and the clients'
        scalars; "weights" -- it averages the trained tensors the clients upload.
    upload: what the accounting counts per client: "scalars" (the Update record), "gradient" (a full
        trainable-size fp32 gradient, as the released FwdLLM uploads), "weights" (the trained tensors).
    download: "sync" -- the cheapest sufficient message from the version the client holds
        (fwdkern.fl.sync); "weights" -- every changed trainable tensor, as the released system sends the
        model to each client it samples.
    dist: the perturbation distribution the method always uses (None: the run's ``--dist``).
    passes_per_batch: client compute per local batch in forward-pass equivalents at K tangents (a primal
        forward 1, a LoRA tangent at most 1, a backward 2).
    perturbs: the body trains by perturbations (so K = 0 with no exact head trains nothing).
    exact_head: a classifier head may be trained exactly on the clients (fwdkern.fl.head).
    guard: its body steps may go through the body guard (fwdkern.fl.guard).
    pacing: variance pacing (more perturbations at the same model version) applies.
    deals_layers: the LoRA layers are always dealt out to the round's clients (SPRY).
    deal: how dealt layers (``deals_layers`` or ``--split``) go to clients: "blocks" (each client a run of
        consecutive layers, so its tangent work starts at its block) or "round_robin" (every C-th layer,
        SPRY as released).
    flower: the Flower ServerApp / ClientApp carry it (seed-and-scalar rounds only).
    tangents: its client carries exact tangents (fwdkern.jvp), so ``--tangent-precision`` applies.
    defaults: the recipe's value for each setting left unset (fwdkern.fl.recipe); "perturbations_no_head"
        replaces "perturbations" when no exact head trains; "tangent_scope_no_head" is the tangent scope then
        (every other case: "batch"), with "perturbations_no_head" tangents per sample.
    """

    name: str
    summary: str
    client_step: Callable
    server_step: str
    upload: str
    passes_per_batch: Callable[[int], int]
    download: str = "sync"
    dist: Optional[str] = None
    perturbs: bool = True
    exact_head: bool = False
    guard: bool = False
    pacing: bool = True
    deals_layers: bool = False
    deal: str = "blocks"
    flower: bool = True
    tangents: bool = False
    defaults: dict = field(default_factory=dict)

    def forward_passes(self, K: int, batches: int, per_sample_of: int = 0) -> int:
        """Forward-pass equivalents of `batches` local batches at K tangents; `per_sample_of` (tangent scope
        "sample", the batch size): the K tangents are shared out among that many samples, so a batch
        costs what ceil(K / per_sample_of) tangents over the whole batch would."""
        if per_sample_of > 1 and K:
            K = -(-K // min(per_sample_of, K))
        return batches * self.passes_per_batch(K)

    def perturbation_dist(self, requested: str) -> str:
        return self.dist or requested


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("fwdkern", "exact jvp (fwdkern.jvp) through the body + the head trained exactly on each client; seeds "
           "and scalars up", client.answer_jvp, "seeded", "scalars", lambda K: 1 + K, exact_head=True, guard=True,
           tangents=True,
           defaults=dict(optimizer="fedadam", lr=0.01, perturbations=0, perturbations_no_head=16, local_lr=None,
                         tangent_scope_no_head="sample")),
    Method("mezo", "zeroth order (MeZO / FedKSeed): (L(θ+εv) − L(θ−εv)) / 2ε per perturbation; seeds and scalars "
           "up", client.answer_finite_difference, "seeded", "scalars", lambda K: 2 * K,
           defaults=dict(optimizer="sgd", lr=0.01, perturbations=4, local_lr=None)),
    Method("fwdllm", "FwdLLM as released: finite differences along Gaussian v, variance pacing, full-gradient "
           "uploads", client.answer_finite_difference, "seeded", "gradient", lambda K: 2 * K, download="weights",
           dist="gaussian",
           defaults=dict(optimizer="sgd", lr=0.01, perturbations=1, local_lr=None)),
    Method("spry", "SPRY as released: LoRA layers dealt to the round's clients, forward-gradient AdamW local "
           "steps, weight uploads", client.train_spry, "weights", "weights", lambda K: 1 + K, download="weights",
           dist="gaussian",
           pacing=False, deals_layers=True, deal="round_robin", flower=False, tangents=True,
           defaults=dict(optimizer="fedyogi", lr=0.01, perturbations=1, local_lr=1e-3)),
    Method("backprop", "LoRA FedAvg with autograd: local SGD steps, full-adapter uploads", client.train_backprop,
           "weights", "weights", lambda K: 3, download="weights", perturbs=False, pacing=False, flower=False,
           defaults=dict(optimizer="sgd", lr=1.0, perturbations=0, local_lr=2.0)),
)}

NAMES = tuple(METHODS)


def method(name: str) -> Method:
    """The row of `name`; ValueError naming the known methods otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"method: unknown {name!r} ({', '.join(NAMES)})") from None


def exact_head_methods() -> list:
    return [m.name for m in METHODS.values() if m.exact_head]


def flower_methods() -> list:
    return [m.name for m in METHODS.values() if m.flower]
