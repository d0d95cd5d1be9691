"""RunConfig: every setting of a federated run, with the help text and allowed values the CLI shows."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional


def _opt(default, help: str, choices=None, **extra):
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    meta.update(extra)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


METHODS = ("fwdkern", "mezo", "fwdllm", "backprop")
OPTIMIZERS = ("sgd", "fedadam", "fedyogi")
TASKS = ("auto", "classification", "prompt", "causal_lm")


@dataclass
class RunConfig:
    model: str = _opt("all-minilm-l6-v2", "bundled model name (all-minilm-l6-v2, smollm2-135m) or a local Hugging "
                      "Face model folder")
    data: str = _opt("bbc_news", "bundled data set (bbc_news, rotten_tomatoes) or a .csv / .jsonl / .txt file path")
    text_column: str = _opt("text", "column of --data holding the text (CSV/JSONL)")
    label_column: Optional[str] = _opt("label", "column of --data holding the label; 'none' for plain text (causal LM)")
    out: str = _opt("runs/demo", "output folder: metrics.jsonl, summary.json, checkpoint, curves.png; rerun the "
                    "same command to resume")
    method: str = _opt("fwdkern", "client computation: fwdkern (exact jvp, seeds + scalars), mezo (zeroth order, "
                       "seeds + scalars), fwdllm (finite differences, full-gradient uploads), backprop (LoRA FedAvg)",
                       METHODS)
    clients: int = _opt(100, "number of simulated clients")
    clients_per_round: int = _opt(10, "clients sampled per round")
    rounds: int = _opt(30, "server optimizer steps to run (a pacing retry is a client round but not a step)")
    seed: int = _opt(0, "run seed: data split, partitions, client sampling and every perturbation derive from it")
    partition: str = _opt("dirichlet", "how examples are dealt to clients", ("iid", "dirichlet", "quantity"))
    dirichlet_alpha: float = _opt(0.5, "Dirichlet concentration of the label (or quantity) skew; smaller = more skewed")
    test_fraction: float = _opt(0.2, "fraction of the data held out for testing")
    max_test: int = _opt(400, "test examples evaluated (a random prefix of the held-out split)")
    batch_size: int = _opt(8, "examples per client batch")
    max_length: int = _opt(128, "tokens per example (longer texts are truncated)")
    local_batches: int = _opt(1, "batches per client per round")
    r: int = _opt(8, "LoRA rank")
    lora_alpha: float = _opt(16.0, "LoRA alpha (scaling = alpha / r)")
    target_modules: Optional[list] = _opt(None, "module names that get LoRA adapters (default: per model family)",
                                          nargs="+")
    optimizer: str = _opt("sgd", "server optimizer", OPTIMIZERS)
    lr: float = _opt(0.01, "server learning rate")
    momentum: float = _opt(0.0, "server SGD momentum")
    warmup: int = _opt(0, "learning-rate warm-up steps")
    decay: str = _opt("constant", "learning-rate decay over --rounds", ("constant", "linear", "cosine"))
    perturbations: int = _opt(1, "perturbations (tangents) per client per round")
    pacing: str = _opt("auto", "FwdLLM variance pacing: off, auto, or a variance threshold")
    max_pacing_attempts: int = _opt(4, "client rounds one step may take under pacing")
    candidates: int = _opt(1, "discriminative sampling: candidates per kept perturbation (1 = off)")
    split: bool = _opt(False, "SPRY splitting: deal LoRA layers out to the round's clients")
    eps: float = _opt(1e-3, "finite-difference step of mezo / fwdllm")
    dist: str = _opt("rademacher", "perturbation distribution", ("rademacher", "gaussian"))
    eval_every: int = _opt(5, "evaluate the test set every N steps (0 = only at the end)")
    checkpoint_every: int = _opt(5, "checkpoint every N steps (0 = only at the end)")
    dropout: float = _opt(0.0, "fraction of sampled clients that never answer (simulated failures)")
    num_threads: int = _opt(0, "torch CPU threads (0 = torch's default)")
    local_lr: float = _opt(0.05, "backprop baseline: client SGD learning rate")
    task: str = _opt("auto", "auto (classification if labelled, else causal LM), classification, prompt "
                     "(causal LM predicts the label word) or causal_lm", TASKS)
    prompt_template: str = _opt("{text}\nTopic:", "task=prompt: the label word follows this prompt")

    def to_json(self):
        return dataclasses.asdict(self)


def fields_help():
    """[(field, metadata)] in declaration order (the CLI builds its options from it)."""
    return [(f, dict(f.metadata)) for f in dataclasses.fields(RunConfig)]
