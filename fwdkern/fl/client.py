"""The client's computation of each federated method (the ``client_step`` of a
:class:`fwdkern.fl.methods.Method` row).

Seed-and-scalar steps answer a :class:`RoundPlan` with an :class:`Update`'s wire record (encoded
once, here); weight steps train the client's copy of the trainable tensors and return a
:class:`WeightUpload`. Every step reads the model, its trainable tensors and the client's batches
from a task (:class:`fwdkern.fl.task.ClientTask`); :func:`seeded_answer` needs only a model and
batches, so an app with its own data pipeline (``fwdkern.fl.flower.strategy.answer_plan``) runs the
same code.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from .._seed import derive_seed
from ..engine import PerSampleUnsupported, batch_loss, capture_input, jvp, loss_terms, perturbed_loss
from ..ops import seeded_axpy_
from .protocol import RoundPlan, Update

__all__ = ["seeded_answer", "jvp_values", "sample_groups", "answer_jvp", "answer_finite_difference", "train_backprop", "train_spry",
           "WeightUpload"]


@dataclass
class WeightUpload:
    """A weight-upload client's answer: the tensors it trained (fp32 on the wire), its sample count and
    the sum of its batches' losses (weighted by batch size)."""

    client_id: str
    round: int
    model_version: int
    num_samples: int
    loss_sum: float
    tensors: dict

    @property
    def nbytes(self) -> int:
        return 4 * sum(t.numel() for t in self.tensors.values())


TANGENT_DTYPES = {"fp32": None, "bf16": torch.bfloat16}


TANGENT_SCOPES = ("batch", "sample")


def seeded_answer(model, batches, plan: RoundPlan, *, estimator: str = "jvp", eps: float = 1e-3, head=None,
                  wire: str = "fp32", probe=None, tangent_precision: str = "fp32",
                  tangent_scope: str = "batch") -> bytes:
    """The wire record (``Update.to_bytes(wire)``) answering `plan` on `batches`.

    estimator "jvp": one exact directional derivative per planned k (fwdkern.jvp); "finite_difference":
    the central difference (L(θ+εv) − L(θ−εv)) / 2ε. Values are averaged over samples. `head` (an
    :class:`fwdkern.fl.head.ExactHead`) answers the plan's head block from the features captured at
    its input during the same forward passes. `tangent_precision` ("fp32" | "bf16"): the dtype of the
    tangents' GEMMs with the frozen weights (fwdkern.dual.tangent_matmuls). `tangent_scope`: "batch" --
    every tangent's derivative is of the whole batch's loss; "sample" -- the plan's tangents are shared
    out among the batch's samples (:func:`sample_groups`) and each one's derivative is of its own
    sample's share of the batch loss, scaled so the server's estimate stays unbiased for the batch
    loss's gradient. A tangent costs about one forward of what it runs through, so "sample" answers
    B times as many tangents as "batch" at the same client compute. `probe`: when the plan asks for
    it, a context manager in which the model holds the guard's proposed body step (fwdkern.fl.guard);
    the client's loss on the same batches with it is reported as ``extra["probe_loss"]`` (one more
    forward per batch)."""
    if estimator not in ("jvp", "finite_difference"):
        raise ValueError(f"estimator: unknown {estimator!r} (jvp, finite_difference)")
    if tangent_scope not in TANGENT_SCOPES:
        raise ValueError(f"tangent_scope: unknown {tangent_scope!r} ({', '.join(TANGENT_SCOPES)})")
    jv = np.zeros(len(plan.ks))
    loss, n = 0.0, 0
    feats = []
    capture = capture_input(head.module) if (head is not None and plan.head_ks) else None

    def directional(b, ks, per_sample=False):
        if estimator == "jvp":
            return jvp_values(model, b, plan.seed, ks, dist=plan.dist, params=list(plan.param_ids),
                              tangent_precision=tangent_precision, per_sample=per_sample)
        if per_sample:
            raise PerSampleUnsupported("per_sample: finite differences run one sample group at a time")
        lp, lm = perturbed_loss(model, b, plan.seed, ks, eps, dist=plan.dist, params=list(plan.param_ids))
        return float(((lp + lm) / 2).mean()), np.asarray(((lp - lm) / (2 * eps)).double())

    for batch in batches:
        bs = int(batch["input_ids"].shape[0])
        if not plan.ks:  # the head block only: one plain forward
            with torch.no_grad(), capture or contextlib.nullcontext():
                l = float(model(**batch).loss)
            j = np.zeros(0)
            if capture is not None:
                feats.append((capture.x, batch["labels"]))
        elif tangent_scope == "batch" or bs == 1:
            with capture or contextlib.nullcontext():
                l, j = directional(batch, list(plan.ks))
            if capture is not None:
                feats.append((capture.x, batch["labels"]))
        else:
            l, j, x = per_sample_values(model, batch, list(plan.ks), directional, capture)
            if capture is not None:
                feats.append((x, batch["labels"]))
        jv += j * bs
        loss += l * bs
        n += bs
    if n == 0:
        raise ValueError("seeded_answer: no batches")
    head_vals = head.project(plan, feats) if capture is not None else ()
    extra = {}
    if plan.probe and probe is not None:
        with torch.no_grad(), probe():
            # the loss jvp reported above, computed the same way (a causal LM's never holds tokens × vocab)
            extra["probe_loss"] = sum(float(batch_loss(model, b)) * int(b["input_ids"].shape[0]) for b in batches) / n
    return Update(plan.client_id, plan.round, plan.model_version, plan.ks, tuple(float(x) for x in jv / n), n,
                  loss / n, extra=extra, head=head_vals).to_bytes(wire)


def jvp_values(model, batch, seed: int, ks, *, dist: str = "rademacher", params=None,
               tangent_precision: str = "fp32", per_sample: bool = False) -> tuple:
    """(primal loss, directional derivatives as float64 numpy) of one exact dual forward
    (:func:`fwdkern.jvp`): the `directional` callable :func:`per_sample_values` takes, shared by the
    client and the profiler so both measure the same estimate."""
    l, j = jvp(model, batch, seed, ks, dist=dist, params=params, tangent_dtype=TANGENT_DTYPES[tangent_precision],
               per_sample=per_sample)
    return float(l), np.asarray(torch.as_tensor(j, dtype=torch.float64))


def sample_groups(batch_size: int, num_tangents: int) -> list:
    """How "sample"-scoped tangents are shared out: ``[(first sample, end sample, tangent positions)]``.

    G = min(batch_size, num_tangents) groups of consecutive samples (sizes differing by at most one);
    group g answers the tangents at positions g, g + G, g + 2G, ... of the plan's ks."""
    G = min(batch_size, num_tangents)
    edges = np.linspace(0, batch_size, G + 1).round().astype(int)
    return [(int(edges[g]), int(edges[g + 1]), list(range(g, num_tangents, G))) for g in range(G)]


def per_sample_values(model, batch, ks, directional, capture=None):
    """(batch loss, scaled directional derivatives [len(ks)], captured features or None) for tangent
    scope "sample". Group g's derivatives are of its samples' share of the batch loss,
    (n_g / N) L_g, times len(ks) / K_g (its K_g tangents stand for all of them): the server's mean over
    the tangents of value x v is then unbiased for the batch loss's gradient. One sample per group and
    the tangents dividing evenly: one dual pass with each sample's own tangents (fwdkern.jvp's
    per_sample); otherwise, or where that pass does not apply, one pass per group."""
    bs = int(batch["input_ids"].shape[0])
    if len(ks) % bs == 0:
        try:
            with capture or contextlib.nullcontext():
                l, j = directional(batch, ks, per_sample=True)
            return l, j * bs, (capture.x if capture is not None else None)
        except PerSampleUnsupported:
            pass
    terms = loss_terms(model, batch)
    N = int(terms.sum())
    if N == 0:
        raise ValueError("labels: every target is -100 (nothing to predict)")
    j = np.zeros(len(ks))
    loss, xs = 0.0, []
    for i0, i1, pos in sample_groups(bs, len(ks)):
        sub = {k: (v[i0:i1] if torch.is_tensor(v) and v.dim() and v.shape[0] == bs else v) for k, v in batch.items()}
        n_g = int(terms[i0:i1].sum())
        if n_g == 0:  # nothing to predict here: the batch loss's gradient gets nothing from these samples
            if capture is not None:
                with torch.no_grad(), capture:
                    model(**sub)
                xs.append(capture.x)
            continue
        with capture or contextlib.nullcontext():
            l_g, j_g = directional(sub, [ks[p] for p in pos])
        if capture is not None:
            xs.append(capture.x)
        w = n_g / N
        j[pos] = j_g * (w * len(ks) / len(pos))
        loss += l_g * w
    return loss, j, (torch.cat(xs) if xs else None)


def answer_jvp(task, client: int, plan: RoundPlan, probe=None) -> bytes:
    """fwdkern: exact forward gradients through the planned tensors, and the exact head's projections."""
    return seeded_answer(task.model, task.client_batches(client, plan.round), plan, estimator="jvp", head=task.head,
                         wire=task.cfg.wire, probe=probe, tangent_precision=task.cfg.tangent_precision,
                         tangent_scope=task.cfg.tangent_scope)


def answer_finite_difference(task, client: int, plan: RoundPlan, probe=None) -> bytes:
    """Zeroth order (MeZO, FwdLLM): central finite differences along each planned perturbation."""
    return seeded_answer(task.model, task.client_batches(client, plan.round), plan, estimator="finite_difference",
                         eps=task.cfg.eps, wire=task.cfg.wire, probe=probe, tangent_scope=task.cfg.tangent_scope)


def train_backprop(task, client: int, plan: RoundPlan, probe=None) -> WeightUpload:
    """LoRA FedAvg's client: SGD steps (autograd) from the downloaded weights on the client's batches, each
    batch's gradient clipped to ``local_clip`` in global norm."""
    params = task.params
    n_c, loss_tot = 0, 0.0
    for batch in task.client_batches(client, plan.round):
        for p in params.values():
            p.requires_grad_(True)
        with _checkpointing(task.model, task.cfg.checkpointing):
            out = task.model(**batch)
            grads = torch.autograd.grad(out.loss, list(params.values()), allow_unused=True)
        clip, scale = task.cfg.local_clip, 1.0
        if clip:  # (0: off -- no norm to compute)
            norm = math.sqrt(sum(float(g.float().pow(2).sum()) for g in grads if g is not None))
            scale = clip / norm if norm > clip else 1.0
        with torch.no_grad():
            for p, g in zip(params.values(), grads):
                p.requires_grad_(False)
                if g is not None:
                    p.sub_((task.cfg.local_lr * scale) * g)
        bs = int(batch["input_ids"].shape[0])
        loss_tot += float(out.loss.detach()) * bs
        n_c += bs
    return WeightUpload(plan.client_id, plan.round, plan.model_version, n_c, loss_tot,
                        {n: p.detach().clone() for n, p in params.items()})


def train_spry(task, client: int, plan: RoundPlan, probe=None) -> WeightUpload:
    """SPRY as released: per local batch one forward-gradient estimate (jvp x v, K tangents) of the
    tensors the plan deals this client, and an AdamW step on them; uploads those tensors."""
    names = [task.names_by_id[pid] for pid in plan.param_ids]
    tensors = [task.params[n] for n in names]
    opt = torch.optim.AdamW(tensors, lr=task.cfg.local_lr)
    n_c, loss_tot = 0, 0.0
    for step, batch in enumerate(task.client_batches(client, plan.round)):
        seed = derive_seed(plan.seed, step, 11)
        loss, jv = jvp(task.model, batch, seed, list(plan.ks), dist=plan.dist, params=list(plan.param_ids),
                       tangent_dtype=TANGENT_DTYPES[task.cfg.tangent_precision])
        coeffs = (jv.double() / len(plan.ks)).tolist()
        for n, p in zip(names, tensors):
            g = torch.zeros_like(p, dtype=torch.float32)
            seeded_axpy_(g, seed, task.param_ids[n], list(plan.ks), coeffs, plan.dist)
            p.grad = g.to(p.dtype)
        with torch.no_grad():
            opt.step()
        for p in tensors:
            p.grad = None
        bs = int(batch["input_ids"].shape[0])
        loss_tot += float(loss) * bs
        n_c += bs
    return WeightUpload(plan.client_id, plan.round, plan.model_version, n_c, loss_tot,
                        {n: task.params[n].detach().clone() for n in names})


@contextlib.contextmanager
def _checkpointing(model, on: bool):
    """Activation checkpointing for one forward + backward. transformers checkpoints a layer stack
    only while that stack module is in training mode, so only the stacks are flipped (not
    recursively): dropout stays off and the numbers equal those without checkpointing."""
    if not on:
        yield
        return
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    stacks = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for m in stacks:
        m.training = True
    try:
        yield
    finally:
        for m in stacks:
            m.training = False
        disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        disable()
