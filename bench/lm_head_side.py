"""How much of backprop's held-out loss drop on the causal-LM suite a head-side component alone gets.

A component trained exactly on the final hidden states needs no pass back through the body, the way
the exact head of a classifier does (fwdkern.fl.head). This measures whether such a component could
carry a causal LM's learning: each variant trains only its own tensors by autograd, the body frozen
(the LoRA's B starts at 0, so the body is the base model).

    HF_HUB_OFFLINE=1 python bench/lm_head_side.py [--variants lora bias ...] [--threads 1]

The setting is bench/fl_compare.py's fl_causal_lm (SmolLM2-135M, BBC News documents dealt to 20
clients, 5 per round, one 4 x 64-token batch each, 12 rounds, 64 held-out windows and a validation
split). A round is FedAvg with one local SGD step, each client's gradient clipped to global norm 1
(backprop's defaults), server lr 1: SGD on the mean of the 5 clients' clipped gradients. Clients are
drawn by this script's own generator (seed 0), not the simulation's.

Variants (what trains): lora -- the body's LoRA (the suite's backprop); bias -- a vocabulary bias on
the logits; norm -- the final RMSNorm's weight; hidden -- a rank-1 residual adapter on the final
hidden state, h + U Vᵀ h; head_lora -- a rank-4 LoRA on the (tied) LM head. Each lr grid is extended
until its best point (by the validation drop) is inside. Output: bench/results/fl_causal_lm_explore/
head_side.json, one row per (variant, lr) with the held-out and validation loss every 4 rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import best_by_validation, causal_lm_loss, environment, git_commit  # noqa: E402

GRIDS = {"lora": [0.25, 1.0], "bias": [1.0, 3.0, 10.0, 100.0, 1000.0], "norm": [0.03, 0.1, 0.3, 1.0],
         "hidden": [0.03, 0.1, 0.3], "head_lora": [0.1, 0.3, 1.0, 10.0, 100.0]}
OUT = os.path.join(HERE, "results", "fl_causal_lm_explore", "head_side.json")


def load(threads: int):
    from fwdkern.fl.config import RunConfig
    from fwdkern.fl.task import load_task

    cfg = RunConfig(model="smollm2-135m", data="bbc_news", task="causal_lm", clients=20, clients_per_round=5,
                    batch_size=4, max_length=64, local_batches=1, rounds=12, max_test=64, method="backprop",
                    num_threads=threads, samples=0, validation=0.1, out="/tmp/fwdkern_lm_head_side")
    return load_task(cfg, log=lambda *a: None)


def run(task, variant: str, lr: float, rounds: int = 12, clip: float = 1.0) -> dict:
    torch.manual_seed(0)
    model = task.model
    for p in model.parameters():
        p.requires_grad_(False)
    start = {n: p.detach().clone() for n, p in task.params.items()}
    inner, W = model.model, model.lm_head.weight  # W is tied to the embeddings
    d, V = W.shape[1], W.shape[0]
    norm0 = inner.norm.weight.detach().clone()
    trained = {}
    if variant == "lora":
        trained = dict(task.params)
    elif variant == "bias":
        trained["bias"] = torch.zeros(V)
    elif variant == "norm":
        trained["norm"] = inner.norm.weight
    elif variant == "hidden":
        trained["U"], trained["V"] = torch.zeros(d, 1), torch.randn(d, 1) / d ** 0.5
    elif variant == "head_lora":
        trained["A"], trained["B"] = torch.randn(4, d) / d ** 0.5, torch.zeros(V, 4)
    for t in trained.values():
        t.requires_grad_(True)
    body_grad = variant in ("lora", "norm")

    def loss_of(batch):
        with torch.set_grad_enabled(body_grad and torch.is_grad_enabled()):
            h = inner(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        if variant == "hidden":
            h = h + (h @ trained["V"]) @ trained["U"].T
        logits = h @ W.T
        if variant == "head_lora":
            logits = logits + (h @ trained["A"].T) @ trained["B"].T
        if variant == "bias":
            logits = logits + trained["bias"]
        return causal_lm_loss(logits, batch["labels"])

    def heldout(validation: bool) -> float:
        wins = task.heldout_windows(validation=validation)
        tot, n = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(wins), 16):
                b = task.lm.batch(wins[i:i + 16])
                k = int((b["labels"][:, 1:] != -100).sum())
                tot += float(loss_of(b)) * k
                n += k
        return tot / n

    rng = np.random.default_rng(0)
    curve = [(0, heldout(False), heldout(True))]
    cpu = time.process_time()
    for rnd in range(1, rounds + 1):
        clients = rng.choice(task.cfg.clients, size=task.cfg.clients_per_round, replace=False)
        step = {k: torch.zeros_like(v) for k, v in trained.items()}
        for c in clients:
            g = torch.autograd.grad(loss_of(task.client_batches(int(c), rnd)[0]), list(trained.values()))
            norm = float(torch.sqrt(sum((x.float() ** 2).sum() for x in g)))
            scale = min(1.0, clip / max(norm, 1e-12))
            for k, x in zip(trained, g):
                step[k] += scale * x / len(clients)
        with torch.no_grad():
            for k, v in trained.items():
                v -= lr * step[k]
        if rnd % 4 == 0:
            curve.append((rnd, heldout(False), heldout(True)))
    cpu = time.process_time() - cpu
    with torch.no_grad():  # leave the model as loaded for the next variant
        for n, p in task.params.items():
            p.copy_(start[n])
        inner.norm.weight.copy_(norm0)
    return {"variant": variant, "lr": lr, "trained_values": sum(v.numel() for v in trained.values()),
            "curve": [{"round": r, "eval_loss": t, "val_eval_loss": v} for r, t, v in curve],
            "drop_at_12": curve[0][1] - curve[-1][1], "val_drop_at_12": curve[0][2] - curve[-1][2],
            "cpu_s": cpu, "load": os.getloadavg()[0]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", nargs="+", default=list(GRIDS), choices=list(GRIDS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lrs", type=float, nargs="+", help="learning rates to run instead of each variant's grid")
    ap.add_argument("--merge", action="store_true", help="add the rows to --out's (a grid extended at its edge)")
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args(argv)
    task = load(args.threads)
    commit = git_commit(HERE)
    rows = []
    if args.merge and os.path.exists(args.out):
        with open(args.out) as f:
            rows = json.load(f)["rows"]
    for v in args.variants:
        for lr in args.lrs or GRIDS[v]:
            row = run(task, v, lr)
            row.update(commit=commit, date=environment()["date"])
            print(json.dumps({k: row[k] for k in ("variant", "lr", "drop_at_12", "val_drop_at_12", "cpu_s")}),
                  flush=True)
            rows.append(row)
    rows.sort(key=lambda r: (list(GRIDS).index(r["variant"]), r["lr"]))
    best = best_by_validation(rows, lambda r: r["variant"])
    summary = {v: {"lr": r["lr"], "drop_at_12": r["drop_at_12"], "trained_values": r["trained_values"],
                   "share_of_lora": r["drop_at_12"] / best["lora"]["drop_at_12"] if "lora" in best else None}
               for v, r in best.items()}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"environment": environment(), "script": "bench/lm_head_side.py",
                   "best_by_validation": summary, "rows": rows}, f, indent=1)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
