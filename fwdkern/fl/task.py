"""A client's view of a federated run: the model and tokenizer, its partition of the training split,
its batches, and the trainable tensors it holds. Needs no Server (Flower's ClientApp builds only
this; the embedded simulation shares one among its clients).

What a client computes is :mod:`fwdkern.fl.client` (the method's row says which step), the exact
head's training :mod:`fwdkern.fl.head`, the test metrics :mod:`fwdkern.fl.evaluation`.
"""
from __future__ import annotations

import numpy as np
import torch

from .._seed import derive_seed
from ..engine import trainable
from .data import federated_split, load_dataset
from .head import ExactHead, find_head
from .methods import method as method_row
from .lm import LMData, check_model_takes
from .models import load_model, load_tokenizer, resolve_model_path, resolve_task

__all__ = ["ClientTask", "load_task"]


class ClientTask:
    """Model + tokenizer, the run's split and the client partitions, batching and the trainable tensors.

    `cfg` is the resolved configuration (fwdkern.fl.recipe: no setting left unset); `head_at`: the
    (path, names) of the head trained exactly (:func:`fwdkern.fl.head.find_head`), or None."""

    def __init__(self, cfg, model, tokenizer, dataset, task: str = "classification", head_at=None, split=None,
                 lm=None):
        self.cfg, self.model, self.tok, self.task = cfg, model, tokenizer, task
        self.method = method_row(cfg.method)
        self.dataset = dataset
        split = split if split is not None else federated_split(dataset, cfg)
        self.train, self.test, self.parts, self.validation = split
        self.model.eval()
        tr = trainable(model)
        if cfg.lora_a == "frozen":  # LoRA-FA: A keeps its random init; no method trains or perturbs it
            tr = [(n, pid, t) for n, pid, t in tr if not n.endswith("lora_A.weight")]
        self.params = {n: t for n, _, t in tr}
        self.param_ids = {n: pid for n, pid, _ in tr}
        self.names_by_id = {pid: n for n, pid in self.param_ids.items()}
        self.n_trainable = sum(t.numel() for t in self.params.values())
        self.head = None
        if head_at is not None:
            self.head = ExactHead.from_config(cfg, model, self.params, self.names_by_id, *head_at, self.train.labels,
                                              getattr(dataset, "label_names", None))
        self.prompt = None
        if task == "prompt":  # label-word logits of a causal LM (fwdkern.fl.prompt)
            from .prompt import PromptTask

            self.prompt = PromptTask(tokenizer, dataset.label_names, cfg.prompt_template, cfg.max_length)
        # causal LM: (training, held-out test, validation) windows of fwdkern.fl.lm, built before the model loads
        self.lm, self.lm_test, self.lm_val = lm if lm is not None else lm_data(cfg, tokenizer, split, task)
        if self.lm is not None:
            self.client_windows = [[w for d in part for w in self.lm.windows[d]] for part in self.parts]
            empty = [c for c, w in enumerate(self.client_windows) if not w]
            if empty:
                raise ValueError(f"--data: clients {empty[:5]} hold no text after tokenization (empty documents); "
                                 "drop the empty rows or use fewer --clients")

    def heldout_windows(self, validation: bool = False) -> list:
        """The fixed held-out windows of a causal LM: round-robin over the test (or validation) documents
        (no client holds them), at most max_test."""
        lm = self.lm_val if validation else self.lm_test
        if lm is None:
            return []
        out, depth = [], 0
        while len(out) < self.cfg.max_test and any(len(w) > depth for w in lm.windows):
            out += [w[depth] for w in lm.windows if len(w) > depth]
            depth += 1
        return out[:self.cfg.max_test]

    @property
    def head_names(self) -> list:
        """The tensors trained exactly on the clients ([] when none)."""
        return self.head.names if self.head is not None else []

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def load_weights(self, weights: dict):
        if set(weights) != set(self.params):
            raise ValueError("weights do not match this model's trainable tensors")
        for n, p in self.params.items():
            p.copy_(weights[n])

    def weights(self) -> dict:
        return {n: p.detach().cpu().clone() for n, p in self.params.items()}

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
        """The `local_batches` batches client `client` trains on in round `rnd` (drawn from its partition:
        its examples, or for a causal LM the windows of its documents)."""
        rng = np.random.default_rng(derive_seed(self.cfg.seed, rnd, client, 7) % (2**63))
        if self.lm is not None:
            wins = self.client_windows[client]
            return [self.lm.batch([wins[i] for i in rng.choice(len(wins), size=min(self.cfg.batch_size, len(wins)),
                                                               replace=False)])
                    for _ in range(self.cfg.local_batches)]
        idx = self.parts[client]
        out = []
        for _ in range(self.cfg.local_batches):
            pick = rng.choice(idx, size=min(self.cfg.batch_size, len(idx)), replace=False)
            out.append(self.batch([self.train.texts[i] for i in pick],
                                  [self.train.labels[i] for i in pick] if self.train.labels else None))
        return out

    def answer(self, client: int, plan, probe=None):
        """The method's client step for `plan` (wire bytes or a WeightUpload); `probe`: see
        fwdkern.fl.client.seeded_answer."""
        return self.method.client_step(self, client, plan, probe=probe)


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed blocks of up to 32 MiB in the heap instead of handing them back
    to the kernel (True where it took effect; a no-op on other C libraries).

    A client's step allocates and frees the same activation- and tangent-sized buffers every layer of
    every round; glibc serves blocks above its mmap threshold with fresh mappings, so each of them is
    page-faulted and zeroed again, in kernel time (getrusage's ru_stime on the causal-LM client step
    of bench/bench_fl.py). The freed blocks stay counted in the process's RSS."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    ok = mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1  # glibc's largest allowed threshold on 64-bit
    ok &= mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1
    ok &= mallopt(M_TOP_PAD, 64 << 20) == 1
    return bool(ok)


def load_task(cfg, log=print) -> ClientTask:
    """Data + model for `cfg`, as every participant of the run builds them. The default recipe
    (:mod:`fwdkern.fl.recipe`) fills in every setting left unset before the task is built, from the
    model (whether it has a head to train exactly), the training split's size and the clients."""
    from .recipe import resolve

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    keep_freed_memory()
    data = load_dataset(cfg.data, cfg.text_column, cfg.label_column, cfg.prompt_column, cfg.response_column)
    task = resolve_task(cfg.task, data)
    split = federated_split(data, cfg)
    path = resolve_model_path(cfg.model)
    tok = load_tokenizer(path)
    if task == "causal_lm":
        check_model_takes(path, cfg.max_length)
    lm = lm_data(cfg, tok, split, task)  # bad data is refused here, before the model loads
    model, tok = load_model(cfg, data, task, tok)
    head_at = find_head(cfg, model, task, method_row(cfg.method))
    resolved = resolve(cfg, len(split[0]), head_at is not None, next(model.parameters()).device.type)
    what = f"{len(data)} examples" if lm[0] is None else (
        f"{len(data)} documents, {sum(map(len, lm[0].windows))} training windows of <= {cfg.max_length} tokens")
    log(f"model {cfg.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), data {data.name} "
        f"({what}), method {cfg.method}, {cfg.clients} clients / {cfg.clients_per_round} per round")
    return ClientTask(resolved, model, tok, data, task=task, head_at=head_at, split=split, lm=lm)


def lm_data(cfg, tok, split, task: str) -> tuple:
    """(training, test, validation) LMData of a causal-LM run (validation None without a validation
    split), (None, None, None) otherwise."""
    if task != "causal_lm":
        if split.train.prompts is not None:
            raise ValueError("--prompt-column / --response-column are for causal LM fine-tuning (--task causal_lm)")
        return None, None, None
    return (LMData(tok, split.train, cfg.max_length, cfg.chat_template),
            LMData(tok, split.test, cfg.max_length, cfg.chat_template, where="--data (held-out split)"),
            None if split.validation is None else
            LMData(tok, split.validation, cfg.max_length, cfg.chat_template, where="--data (validation split)"))
