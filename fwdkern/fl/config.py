"""RunConfig: every setting of a federated run, with the help text and allowed values the CLI shows."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

from .methods import METHODS, NAMES as METHOD_NAMES

def _opt(default, help: str, choices=None, **extra):
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    meta.update(extra)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


class ConfigError(ValueError):
    """An impossible or unknown setting (the message names the option and what it accepts)."""


def _flag(name: str) -> str:
    return name.replace("_", "-")


OPTIMIZERS = ("auto", "sgd", "fedadam", "fedyogi")
TASKS = ("auto", "classification", "prompt", "causal_lm")
POOLINGS = ("auto", "hf", "mean", "cls", "max")


@dataclass
class RunConfig:
    model: str = _opt("all-minilm-l6-v2", "bundled model name (all-minilm-l6-v2, smollm2-135m, gemma3-270m) or a "
                      "local Hugging Face model folder")
    data: str = _opt("bbc_news", "bundled data set (bbc_news, rotten_tomatoes, rt_word_order, guardian_headlines, "
                                 "debates_2016) or a .csv / .jsonl / .txt file path")
    text_column: str = _opt("text", "column of --data holding the text (CSV/JSONL)")
    label_column: Optional[str] = _opt("label", "column of --data holding the label; 'none' for plain text (causal LM)")
    out: str = _opt("runs/demo", "output folder: metrics.jsonl, summary.json, checkpoint, curves.png; rerun the "
                    "same command to resume")
    method: str = _opt("fwdkern", "client computation: " + "; ".join(f"{m.name} ({m.summary})"
                                                                      for m in METHODS.values()), METHOD_NAMES)
    clients: int = _opt(100, "number of simulated clients")
    clients_per_round: int = _opt(10, "clients sampled per round (forward gradients learn more per round with "
                                           "more: a round's estimate pools K x clients directions)")
    rounds: int = _opt(30, "server optimizer steps to run (a pacing retry is a client round but not a step)")
    max_client_rounds: int = _opt(0, "stop after this many client rounds, pacing retries included (0: no limit)")
    seed: int = _opt(0, "run seed: data split, partitions, client sampling and every perturbation derive from it")
    partition: str = _opt("dirichlet", "how examples are dealt to clients", ("iid", "dirichlet", "quantity"))
    dirichlet_alpha: float = _opt(0.5, "Dirichlet concentration of the label (or quantity) skew; smaller = more skewed")
    test_fraction: float = _opt(0.2, "fraction of the data held out for testing")
    validation: float = _opt(0.0, "fraction of the training data held out from the clients as a validation split "
                             "(evaluated beside the test split, as val_*): what settings are chosen on")
    max_test: int = _opt(400, "test examples evaluated (a random prefix of the held-out split)")
    batch_size: int = _opt(8, "examples per client batch")
    max_length: int = _opt(128, "tokens per example (longer texts are truncated)")
    local_batches: Optional[int] = _opt(None, "batches per client per round (default: about one local epoch, "
                                        "1-4 batches)", type=int)
    peft: str = _opt("lora", "adapter method: lora, ia3 (peft's IA3), bitfit (biases) or adapter (FwdLLM's "
                     "bottleneck adapter, reduction 16)", ("lora", "ia3", "bitfit", "adapter"))
    r: int = _opt(8, "LoRA rank")
    lora_alpha: float = _opt(16.0, "LoRA alpha (scaling = alpha / r)")
    base_quant: str = _opt("none", "keep the frozen base quantized: none (float), int8 (per channel) or int4 (group-wise); "
                           "the LoRA layers' dense GEMMs run on the quantized weights (memory)", ("none", "int8", "int4"))
    lora_a: str = _opt("train", "LoRA's A matrices: train (with B), or frozen at their random init so only B trains "
                       "(LoRA-FA): every method then trains and perturbs B (and any head) only", ("train", "frozen"))
    target_modules: Optional[list] = _opt(None, "module names that get adapters (default: per model family)",
                                          nargs="+")
    layers: Optional[list] = _opt(None, "transformer blocks that get adapters, e.g. -1 for the last (default: all)",
                                  nargs="+", type=int)
    optimizer: str = _opt("auto", "server optimizer of the body (auto: per method, see fwdkern.fl.recipe)",
                          OPTIMIZERS)
    lr: Optional[float] = _opt(None, "server learning rate (default: per method and optimizer)", type=float)
    momentum: float = _opt(0.0, "server SGD momentum")
    warmup: int = _opt(0, "learning-rate warm-up steps")
    decay: str = _opt("constant", "learning-rate decay over --rounds", ("constant", "linear", "cosine"))
    perturbations: Optional[int] = _opt(None, "perturbations (tangents) of the body per client per round (0: only "
                                        "an exact head trains; default: per method -- fwdkern on a causal LM: 16 per "
                                        "sample of a batch, at most 128)", type=int)
    pacing: str = _opt("off", "variance pacing: off, auto (noise-to-signal ratio above 1 asks for more "
                       "perturbations) or a FwdLLM variance threshold; fwdllm defaults to FwdLLM's 0.1")
    max_pacing_attempts: int = _opt(4, "client rounds one step may take under pacing")
    candidates: int = _opt(1, "discriminative sampling: candidates per kept perturbation (1 = off)")
    guard: str = _opt("auto", "body guard: each body step is proposed, measured by the next round's clients (one more "
                      "forward each) and taken only if it does not raise their loss; rejected steps halve the next "
                      "proposal's lr (auto: on whenever the body trains by forward gradients)", ("auto", "on", "off"))
    guard_tolerance: float = _opt(0.0, "body guard: the relative rise of the clients' mean loss a body step may cause "
                                  "and still be taken")
    tangent_precision: str = _opt("auto", "dtype of the tangents' matrix products with the frozen weights (the "
                                  "loss and every weight stay fp32): fp32 (exact), bf16, or auto (bf16 where the "
                                  "device multiplies bf16 in hardware: AMX / AVX512-BF16 CPUs, CUDA GPUs that "
                                  "support it)", ("auto", "fp32", "bf16"))
    tangent_scope: str = _opt("auto", "what each body tangent's derivative is of: batch (the client's whole batch) or "
                              "sample (--perturbations are shared out among the batch's samples, each derivative of "
                              "its own sample's share of the loss: a tangent costs about a forward of what it runs "
                              "through, so B times the tangents at the same client compute); auto: sample where "
                              "the body trains by forward gradients with no exact head (a causal LM)",
                              ("auto", "batch", "sample"))
    split: bool = _opt(False, "deal the LoRA layers out to the round's clients (SPRY's split): with fwdkern each "
                              "client perturbs one block of consecutive layers, so its tangents start there")
    eps: float = _opt(1e-3, "finite-difference step of mezo / fwdllm")
    dist: str = _opt("rademacher", "perturbation distribution", ("rademacher", "gaussian"))
    eval_every: int = _opt(5, "evaluate the test set every N steps (0 = only at the end)")
    checkpoint_every: int = _opt(5, "checkpoint every N steps (0 = only at the end)")
    dropout: float = _opt(0.0, "fraction of sampled clients that never answer (simulated failures)")
    num_threads: int = _opt(0, "torch CPU threads (0 = torch's default)")
    local_lr: Optional[float] = _opt(None, "client learning rate of backprop (SGD) and spry (AdamW) local steps "
                                     "(default: per method)", type=float)
    task: str = _opt("auto", "auto (classification if labelled, else causal LM), classification, prompt "
                     "(a causal LM's label-word logits as the classifier) or causal_lm", TASKS)
    prompt_template: str = _opt("{text}\nTopic:", "task=prompt: the label word follows this prompt")
    prompt_column: Optional[str] = _opt(None, "causal LM on prompt/response pairs: the column of --data holding the "
                                        "prompt (the loss is on the response only)")
    response_column: Optional[str] = _opt(None, "causal LM on prompt/response pairs: the column holding the response")
    chat_template: str = _opt("auto", "prompt/response pairs: wrap the prompt in the tokenizer's chat template (auto: "
                              "when it has one)", ("auto", "off"))
    samples: int = _opt(4, "causal LM: held-out prompts continued (greedy) before training and at the end, in "
                        "samples.md (0: none)")
    pooling: str = _opt("auto", "classification model: auto (the pooling a sentence-transformers checkpoint declares, "
                        "else the Hugging Face classification head), hf, mean, cls or max", POOLINGS)
    head: str = _opt("auto", "classifier head: exact (each client trains it exactly on its own features -- no pass "
                     "through the body -- and uploads its update projected on --head-directions seeded directions), "
                     "perturb (forward gradients like the body), auto (exact for fwdkern classification)",
                     ("auto", "exact", "perturb"))
    head_directions: int = _opt(200, "seeded directions a client projects its head update on (scalars uploaded)")
    head_epochs: int = _opt(5, "local passes over the client's batches when training the head exactly")
    head_lr: float = _opt(8.0, "client learning rate of the exact head training (per unit of the features' "
                                "mean squared norm: scale-free)")
    head_server_lr: float = _opt(1.0, "server SGD learning rate on the head update (1 = FedAvg)")
    head_calibration: float = _opt(1.0, "label-skew calibration of the exact head's client training: tau * log of "
                                   "the client's label frequencies over the training split's is added to its "
                                   "logits (logit adjustment; 1 = the Bayes correction to the global label mix, "
                                   "0 = off)")
    head_centering: str = _opt("off", "on: centre the features of the exact head's client training on the client's "
                               "mean (a linear head with a bias absorbs it; helps a feature set dominated by a common "
                               "mode, such as a random HF pooler, and diverges on SmolLM2's hidden states)",
                               ("off", "on"))
    local_clip: float = _opt(1.0, "backprop's local steps: each batch's gradient is clipped to this global norm "
                             "(0: off), so a local lr tuned on one data set cannot blow up on another")
    checkpointing: bool = _opt(False, "backprop: activation checkpointing (recompute activations in the backward "
                               "pass; the memory-matched rival of forward gradients)")
    wire: str = _opt("fp32", "encoding of the clients' uploads: fp32 / fp16 binary, sign (1 bit per value, "
                     "FeedSign style) or json", ("fp32", "fp16", "sign", "json"))
    max_failed_rounds: int = _opt(10, "stop with an error after this many consecutive rounds without a valid update")

    def to_json(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "RunConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown RunConfig fields {unknown}")
        return cls(**d)

    def validate(self) -> "RunConfig":
        """Refuse impossible settings up front (ConfigError naming the field and what is allowed)."""
        for f, meta in fields_help():
            v = getattr(self, f.name)
            if v is None and f.type.startswith("Optional"):
                continue
            if "choices" in meta and v not in meta["choices"]:
                raise ConfigError(f"--{_flag(f.name)}: {v!r} is not one of {', '.join(map(str, meta['choices']))}")
            if not meta.get("nargs") and meta.get("type", f.type) in ("int", "float", int, float) and (
                    isinstance(v, bool) or not isinstance(v, (int, float))):  # (a list option checks its items below)
                raise ConfigError(f"--{_flag(f.name)}: expected a number, got {v!r}")
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"--{_flag(f.name)}: {v} is not finite")

        def need(ok, flag, what):
            if not ok:
                raise ConfigError(f"--{flag}: {what}")

        need(self.clients >= 1, "clients", f"needs at least 1 client, got {self.clients}")
        need(1 <= self.clients_per_round <= self.clients, "clients-per-round",
             f"must be between 1 and --clients ({self.clients}), got {self.clients_per_round}")
        need(self.rounds >= 1, "rounds", f"must be at least 1, got {self.rounds}")
        need(self.batch_size >= 1, "batch-size", f"must be at least 1, got {self.batch_size}")
        need(self.local_batches is None or self.local_batches >= 1, "local-batches",
             f"must be at least 1, got {self.local_batches}")
        need(self.max_length >= 2, "max-length", f"must be at least 2 tokens, got {self.max_length}")
        need(self.max_test >= 1, "max-test", f"must be at least 1, got {self.max_test}")
        need(0.0 < self.test_fraction < 1.0, "test-fraction", f"must be in (0, 1), got {self.test_fraction}")
        need(0.0 <= self.validation < 0.5, "validation", f"must be in [0, 0.5), got {self.validation}")
        need(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1) (1 = no client ever answers), got {self.dropout}")
        need(self.lr is None or self.lr > 0, "lr", f"must be positive, got {self.lr}")
        need(self.local_lr is None or self.local_lr > 0, "local-lr", f"must be positive, got {self.local_lr}")
        need(self.local_clip >= 0, "local-clip", f"must be >= 0, got {self.local_clip}")
        need(self.eps > 0, "eps", f"must be positive, got {self.eps}")
        need(0.0 <= self.momentum < 1.0, "momentum", f"must be in [0, 1), got {self.momentum}")
        need(self.warmup >= 0, "warmup", f"must be >= 0, got {self.warmup}")
        need(self.perturbations is None or 0 <= self.perturbations <= 4096, "perturbations",
             f"must be in [0, 4096], got {self.perturbations}")
        need(self.max_pacing_attempts >= 1, "max-pacing-attempts", f"must be at least 1, got {self.max_pacing_attempts}")
        need(self.candidates >= 1, "candidates", f"must be at least 1, got {self.candidates}")
        need(0.0 <= self.guard_tolerance <= 1.0, "guard-tolerance", f"must be in [0, 1], got {self.guard_tolerance}")
        need(not (self.guard == "on" and self.pacing != "off"), "guard", "the body guard and --pacing do not combine")
        need(self.r >= 1, "r", f"LoRA rank must be at least 1, got {self.r}")
        need(self.dirichlet_alpha > 0, "dirichlet-alpha", f"must be positive, got {self.dirichlet_alpha}")
        need(self.eval_every >= 0 and self.checkpoint_every >= 0, "eval-every/--checkpoint-every", "must be >= 0")
        need(self.num_threads >= 0, "num-threads", f"must be >= 0, got {self.num_threads}")
        need(self.max_failed_rounds >= 1, "max-failed-rounds", f"must be at least 1, got {self.max_failed_rounds}")
        need(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        need(self.max_client_rounds >= 0, "max-client-rounds", f"must be >= 0, got {self.max_client_rounds}")
        need(1 <= self.head_directions <= 4096, "head-directions", f"must be in [1, 4096], got {self.head_directions}")
        need(self.head_epochs >= 1, "head-epochs", f"must be at least 1, got {self.head_epochs}")
        need(self.head_lr > 0 and self.head_server_lr > 0, "head-lr/--head-server-lr", "must be positive")
        need(math.isfinite(self.head_calibration) and 0 <= self.head_calibration <= 4, "head-calibration",
             f"must be in [0, 4], got {self.head_calibration}")
        if self.pacing not in ("off", "auto"):
            try:
                thr = float(self.pacing)
            except ValueError:
                raise ConfigError(f"--pacing: expected off, auto or a positive number, got {self.pacing!r}") from None
            need(thr > 0 and math.isfinite(thr), "pacing", f"a threshold must be positive, got {self.pacing}")
        need("{text}" in self.prompt_template, "prompt-template", "must contain {text}")
        need(0 <= self.samples <= 64, "samples", f"must be in [0, 64], got {self.samples}")
        if self.layers is not None:
            need(isinstance(self.layers, list) and self.layers and all(
                isinstance(i, int) and not isinstance(i, bool) for i in self.layers), "layers", "expected block indices")
        if self.target_modules is not None:
            need(isinstance(self.target_modules, list) and self.target_modules
                 and all(isinstance(t, str) and t for t in self.target_modules), "target-modules",
                 "expected one or more module names")
        return self

    def resume_differences(self, saved: dict) -> list:
        """Fields of a saved run's config that this config may not change on resume ([] = compatible).

        Extending --rounds is allowed (unless a decaying lr schedule spans the old total), as are
        the evaluation/checkpoint cadence, the thread count and the failure limit."""
        mine = self.to_json()
        free = {"rounds", "max_client_rounds", "eval_every", "checkpoint_every", "num_threads", "max_failed_rounds",
                "out"}
        if self.decay != "constant":  # the schedule's length is --rounds
            free.discard("rounds")
        # A field the saved run does not name had the field's default (a run saved before the field
        # existed names it once migrated: fwdkern.fl.runstate.PREDATES).
        defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                    for f in dataclasses.fields(RunConfig)}
        keys = sorted(set(mine) | set(saved))
        if mine.get("method") == saved.get("method"):
            free |= self.unread_fields()
        return [k for k in keys if k not in free and mine.get(k) != saved.get(k, defaults.get(k))]

    def unread_fields(self) -> set:
        """Fields this config's method never reads: a change of their default between releases must
        not block resuming (or reusing) a run of another method."""
        row = METHODS.get(self.method)
        if row is None:
            return set()
        return (set() if row.exact_head else set(EXACT_HEAD_FIELDS)) | (
            set() if row.tangents and self.perturbations != 0 else {"tangent_precision"}) | (
            set() if self.reads_tangent_scope() else {"tangent_scope"})

    def reads_tangent_scope(self) -> bool:
        """Whether the clients read ``tangent_scope``: seed-and-scalar clients that answer body tangents
        (a weight-upload method, or no perturbations, never shares tangents out among samples)."""
        row = METHODS.get(self.method)
        return row is not None and row.server_step == "seeded" and self.perturbations != 0


EXACT_HEAD_FIELDS = ("head_directions", "head_epochs", "head_lr", "head_server_lr", "head_calibration", "head_centering")


def fields_help():
    """[(field, metadata)] in declaration order (the CLI builds its options from it)."""
    return [(f, dict(f.metadata)) for f in dataclasses.fields(RunConfig)]
