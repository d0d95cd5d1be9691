"""Client side of a federated run: the model, the client's batches, its local computation and
replay. Needs no Server (Flower's ClientApp builds only this; the embedded simulation shares one).

Methods of the client computation:

  fwdkern  exact forward gradients (fwdkern.jvp), seeds + scalars up
  mezo     zeroth order (FedKSeed/MeZO style): (L(θ+εv) − L(θ−εv)) / 2ε, seeds + scalars up
  fwdllm   FwdLLM as released: finite differences, Gaussian v, full-gradient uploads
  backprop LoRA FedAvg with autograd: `local_batches` SGD steps per client, full-adapter uploads
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from ..engine import capture_input
from ..ops import seeded_axpy_
from .data import federated_split, load_dataset
from .models import load_model, resolve_task
from .protocol import Update
from .server import derive_seed

__all__ = ["ClientTask", "load_task", "apply_replay"]


def label_prior(labels, C: int):
    """Laplace-smoothed frequencies of the labels in [0, C) (padding and other ids are ignored)."""
    ys = torch.as_tensor(labels).reshape(-1).long()
    ys = ys[(ys >= 0) & (ys < C)]
    return (torch.bincount(ys, minlength=C).float() + 1) / (ys.numel() + C)


@torch.no_grad()
def apply_replay(params: dict, names_by_id: dict, record: dict, dist: str = "rademacher"):
    """Reproduce a server SGD step from its replay record (``Server.replay_chain``)."""
    for seed, pid, ks, coeffs in record["ops"]:
        seeded_axpy_(params[names_by_id[pid]], seed, pid, ks, coeffs, dist)


class ClientTask:
    """A client's view of the run: model + tokenizer, its partition of the training split, batching,
    local computation (``client_update``, ``local_backprop``), replay and evaluation."""

    def __init__(self, cfg, model, tokenizer, dataset, task: str = "classification"):
        import fwdkern

        self.cfg, self.model, self.tok, self.task = cfg, model, tokenizer, task
        self.dataset = dataset
        self.train, self.test, self.parts = federated_split(dataset, cfg)
        self.model.eval()
        self.trainable = fwdkern.trainable(model)
        self.params = {n: t for n, _, t in self.trainable}
        self.param_ids = {n: pid for n, pid, _ in self.trainable}
        self.names_by_id = {pid: n for n, pid in self.param_ids.items()}
        self.n_trainable = sum(t.numel() for t in self.params.values())
        self.head_path, self.head_names = self._exact_head(cfg, model, task)
        # the global label mix that --head-calibration corrects the clients' own toward
        self.train_prior = label_prior(self.train.labels, len(dataset.label_names)) \
            if self.head_names and self.train.labels and getattr(dataset, "label_names", None) else None
        self.prompt = None
        if task == "prompt":  # label-word logits of a causal LM (fwdkern.fl.prompt)
            from .prompt import PromptTask

            self.prompt = PromptTask(tokenizer, dataset.label_names, cfg.prompt_template, cfg.max_length)

    def _exact_head(self, cfg, model, task):
        """(module path, trainable tensor names) of the head trained exactly on the clients, or (None, [])."""
        if cfg.head == "perturb" or task not in ("classification", "prompt"):
            return None, []
        info = getattr(model, "fwdkern_config", None)
        for path in (info.modules_to_save if info is not None else []):
            names = [n for n in self.params if n.startswith(path + ".")]
            if names:
                if cfg.method != "fwdkern":
                    if cfg.head == "exact":
                        raise ValueError(f"--head exact needs --method fwdkern (got {cfg.method})")
                    return None, []
                return path, names
        if cfg.head == "exact":
            raise ValueError("--head exact: the model has no trainable classifier head (modules_to_save)")
        return None, []

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def load_weights(self, weights: dict):
        if set(weights) != set(self.params):
            raise ValueError("weights do not match this model's trainable tensors")
        for n, p in self.params.items():
            p.copy_(weights[n])

    def weights(self) -> dict:
        return {n: p.detach().cpu().clone() for n, p in self.params.items()}

    def apply_replay(self, record: dict, dist: str):
        apply_replay(self.params, self.names_by_id, record, dist)

    # ------------------------------------------------------------------ batches
    def batch(self, texts, labels):
        if self.prompt is not None:
            return self.prompt.batch(texts, labels)
        enc = self.tok(list(texts), padding=True, truncation=True, max_length=self.cfg.max_length, return_tensors="pt")
        batch = dict(enc)
        if self.task == "classification":
            batch["labels"] = torch.tensor(labels, dtype=torch.long)
        else:
            lab = enc["input_ids"].clone()
            lab[enc["attention_mask"] == 0] = -100
            batch["labels"] = lab
        return batch

    def client_batches(self, client: int, rnd: int):
        rng = np.random.default_rng(derive_seed(self.cfg.seed, rnd, client, 7) % (2**63))
        idx = self.parts[client]
        out = []
        for _ in range(self.cfg.local_batches):
            pick = rng.choice(idx, size=min(self.cfg.batch_size, len(idx)), replace=False)
            out.append(self.batch([self.train.texts[i] for i in pick],
                                  [self.train.labels[i] for i in pick] if self.train.labels else None))
        return out

    # ------------------------------------------------------------------ local computation
    def client_update(self, client: int, plan) -> Update:
        """The seed-and-scalar answer to `plan`: one (sample-averaged) directional derivative per k,
        and, when the plan has a head block, the projections of the exact head update."""
        import fwdkern

        jv = np.zeros(len(plan.ks))
        loss = 0.0
        n = 0
        feats = []
        capture = capture_input(self.model.get_submodule(self.head_path)) if plan.head_ks else None
        for batch in self.client_batches(client, plan.round):
            bs = int(batch["input_ids"].shape[0])
            if self.cfg.method == "fwdkern" and not plan.ks:  # the head block only: one plain forward
                with torch.no_grad(), capture or _nullcontext():
                    l = self.model(**batch).loss
                j = np.zeros(0)
            elif self.cfg.method == "fwdkern":
                with capture or _nullcontext():
                    l, j = fwdkern.jvp(self.model, batch, plan.seed, list(plan.ks), dist=plan.dist,
                                       params=list(plan.param_ids))
            else:  # zeroth order: central finite difference per perturbation
                lp, lm = fwdkern.perturbed_loss(self.model, batch, plan.seed, list(plan.ks), self.cfg.eps,
                                                dist=plan.dist, params=list(plan.param_ids))
                j = (lp - lm) / (2 * self.cfg.eps)
                l = (lp + lm) / 2
                l = l.mean()
            jv += np.asarray(torch.as_tensor(j, dtype=torch.float64)) * bs
            loss += float(l) * bs
            n += bs
            if capture is not None:
                feats.append((capture.x, batch["labels"]))
        head = self._head_values(plan, feats) if capture is not None else ()
        return Update(plan.client_id, plan.round, plan.model_version, plan.ks, tuple(float(x) for x in jv / n), n,
                      loss / n, head=head).as_sent(self.cfg.wire)

    def _head_values(self, plan, feats) -> tuple:
        """Train the head exactly on the captured features (its inputs: no pass through the body), then
        project its pseudo-gradient (minus the local update) on the plan's head directions."""
        from ..ops import seeded_dot

        head = self.model.get_submodule(self.head_path)
        prefix = self.head_path + "."
        start = {n[len(prefix):]: self.params[n].detach() for n in self.head_names}
        local = {k: v.clone().float().requires_grad_(True) for k, v in start.items()}
        # The step is divided by the features' mean squared norm (the curvature scale of a linear
        # head's cross-entropy), so one head_lr fits any encoder: sentence-transformers embeddings
        # are unit-norm (scale 1), a causal LM's last hidden state has a squared norm in the
        # thousands (~2200 for SmolLM2-135M), which would multiply an unscaled step by as much.
        rows = torch.cat([x.float().reshape(-1, x.shape[-1]) for x, _ in feats])
        center = self._head_center(rows, local)
        if center is not None:
            # Train W and c = b + W mean on centred features: the same head (b = c - W mean), but
            # the step along the classes' differences is no longer scaled down by a common mode.
            rows = rows - center
            local = {"weight": local["weight"],
                     "c": (local["bias"] + local["weight"] @ center).detach().requires_grad_(True)}
        scale = max(1.0, float(rows.pow(2).sum(-1).mean()))
        lr = self.cfg.head_lr / scale
        shift = None

        def as_head(p):
            return p if center is None else {"weight": p["weight"], "bias": p["c"] - p["weight"] @ center}

        for _ in range(self.cfg.head_epochs):
            for x, y in feats:
                keep = y != -100
                with torch.enable_grad():
                    logits = torch.func.functional_call(head, as_head(local), (x.float(),))
                    if shift is None:
                        shift = self._label_shift(feats, logits.shape[-1])
                    loss = torch.nn.functional.cross_entropy(logits.float()[keep] + shift, y[keep])
                    grads = torch.autograd.grad(loss, list(local.values()))
                with torch.no_grad():
                    for t, g in zip(local.values(), grads):
                        t.sub_(lr * g)
        with torch.no_grad():
            local = {k: v.detach() for k, v in as_head(local).items()}
        vals = torch.zeros(len(plan.head_ks), dtype=torch.float64)
        for pid in plan.head_ids:
            n = self.names_by_id[pid][len(prefix):]
            pg = (start[n].float() - local[n]).contiguous()
            vals += seeded_dot(pg, plan.seed, pid, list(plan.head_ks), plan.dist).double()
        return tuple(float(v) for v in vals)

    def _head_center(self, rows, local):
        """The client's mean feature when the head's local training centres its inputs (--head-centering
        on, a linear head with a bias: the bias absorbs the mean), else None.

        NOTE (measured, why it is opt-in): a random tiny BERT's HF pooler (CLS + tanh) puts 99 % of
        E|x|^2 in the mean (0.066 of 6.6 separates the classes); uncentred, the default recipe stays
        at 0.48-0.54 for 16 rounds on seed 1 and swings between 0.48 and 0.92 on seed 2; centred,
        seeds 0-3 end at 0.96-1.0. On all-MiniLM-L6-v2 (10-37 % of E|x|^2 in a client's mean) it is
        neutral: 0.926 vs 0.933 (BBC News) and 0.710 vs 0.715 (Rotten Tomatoes) after 20 client
        rounds, 1 seed. On SmolLM2-135M (85-92 % in the mean) it diverges at head lr 8: loss 4 -> 27
        and accuracy 0.42 after 10 rounds (bench/results/fl_smollm2_cpu/centering_probe/). The step
        grows ~9x there; our reading (not measured separately) is that the bias's update (minus the
        weight's update times a mean of norm ~45) then dominates the 200 projections, whose sketch
        noise lands on the weight."""
        if self.cfg.head_centering != "on" or set(local) != {"weight", "bias"}:
            return None
        return rows.mean(0)

    def _label_shift(self, feats, C: int):
        """tau * (log of the client's label prior - log of the training split's), over C classes
        (both Laplace-smoothed), or 0 (calibration off).

        Logit adjustment for label shift: the client fits logits + this shift, so the raw logits it
        learns are those of the global label mix, not its own (at tau 1 exactly: the Bayes correction
        from the client's prior to the global one; FedLC's local-prior-only form aims at balanced
        error instead, which costs accuracy on globally imbalanced labels). Evaluation adds nothing.
        The global prior is the label mix of the training split that every client of this runner
        loads (its partitions are a split of it)."""
        if not self.cfg.head_calibration:
            return 0.0
        ys = torch.cat([y.reshape(-1) for _, y in feats])
        client = label_prior(ys, C)
        train = self.train_prior
        if train is None or train.numel() != C:
            train = torch.full((C,), 1.0 / C)
        return self.cfg.head_calibration * (client.log() - train.log())

    def local_backprop(self, client: int, rnd: int) -> tuple:
        """Backprop baseline: SGD steps (autograd) from the current weights on the client's batches.
        Leaves the trained weights in place; returns (samples, loss sum)."""
        params = self.params
        n_c, loss_tot = 0, 0.0
        for batch in self.client_batches(client, rnd):
            for p in params.values():
                p.requires_grad_(True)
            with _checkpointing(self.model, self.cfg.checkpointing):
                out = self.model(**batch)
                grads = torch.autograd.grad(out.loss, list(params.values()), allow_unused=True)
            with torch.no_grad():
                for p, g in zip(params.values(), grads):
                    p.requires_grad_(False)
                    if g is not None:
                        p.sub_(self.cfg.local_lr * g)
            bs = int(batch["input_ids"].shape[0])
            loss_tot += float(out.loss.detach()) * bs
            n_c += bs
        return n_c, loss_tot

    def local_spry(self, client: int, plan) -> tuple:
        """SPRY as released: per local batch one forward-gradient estimate (jvp x v, K tangents) of the
        tensors the plan assigns this client, and an AdamW step on them. Leaves the trained weights in
        place; returns (samples, loss sum, names of the trained tensors)."""
        import fwdkern

        names = [self.names_by_id[pid] for pid in plan.param_ids]
        tensors = [self.params[n] for n in names]
        opt = torch.optim.AdamW(tensors, lr=self.cfg.local_lr)
        n_c, loss_tot = 0, 0.0
        for step, batch in enumerate(self.client_batches(client, plan.round)):
            seed = derive_seed(plan.seed, step, 11)
            loss, jv = fwdkern.jvp(self.model, batch, seed, list(plan.ks), dist=plan.dist, params=list(plan.param_ids))
            coeffs = (jv.double() / len(plan.ks)).tolist()
            for n, p in zip(names, tensors):
                g = torch.zeros_like(p, dtype=torch.float32)
                seeded_axpy_(g, seed, self.param_ids[n], list(plan.ks), coeffs, plan.dist)
                p.grad = g.to(p.dtype)
            with torch.no_grad():
                opt.step()
            for p in tensors:
                p.grad = None
            bs = int(batch["input_ids"].shape[0])
            loss_tot += float(loss) * bs
            n_c += bs
        return n_c, loss_tot, names

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, data) -> dict:
        """Accuracy of the current weights on `data` (a labelled TextDataset); {} when not applicable."""
        if self.task not in ("classification", "prompt") or not data.labels:
            return {}
        correct, tot = 0, 0
        step = 16 if self.prompt is not None else 32
        for i in range(0, len(data), step):
            texts, labels = data.texts[i:i + step], torch.tensor(data.labels[i:i + step])
            correct += int((self._predict(texts, labels) == labels).sum())
            tot += len(labels)
        return {"accuracy": correct / max(1, tot)}

    def _predict(self, texts, labels) -> torch.Tensor:
        b = self.batch(texts, labels.tolist())
        b.pop("labels")
        return self.model(**b).logits.argmax(-1)


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


def _nullcontext():
    return contextlib.nullcontext()


def load_task(cfg, log=print) -> ClientTask:
    """Data + model for `cfg`, as every participant of the run builds them; the task's ``cfg`` has
    every setting left unset filled in by the default recipe (:mod:`fwdkern.fl.recipe`)."""
    from .recipe import resolve

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    data = load_dataset(cfg.data, cfg.text_column, cfg.label_column)
    task = resolve_task(cfg.task, data)
    model, tok = load_model(cfg, data, task)
    client = ClientTask(cfg, model, tok, data, task=task)
    client.cfg = resolve(cfg, len(client.train), bool(client.head_names))
    log(f"model {cfg.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), data {data.name} "
        f"({len(data)} examples), method {cfg.method}, {cfg.clients} clients / {cfg.clients_per_round} per round")
    return client
