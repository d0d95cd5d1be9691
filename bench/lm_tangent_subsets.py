"""Where the causal-LM suite's gradient lives, and whether tangents confined there learn more per round.

A central simulation of the default's rounds on bench/fl_compare.py's fl_causal_lm setting (SmolLM2-135M,
BBC News documents dealt to 20 clients, 5 per round, one 4 x 64-token batch each, 12 rounds, LoRA r 8 on
q/v, 64 held-out windows and a validation split): each client's directional derivatives are g . v for its
exact autograd gradient g (what an exact jvp computes, without its cost), along K Rademacher tangents v
drawn only on the chosen tensors; the server averages (1/K) sum_j (g . v_j) v_j over the round's clients
and steps with FedAdam (the recipe's betas and tau) or SGD. Clients and tangents are drawn by this
script's own generators (seed 0), not the simulation's.

    HF_HUB_OFFLINE=1 python bench/lm_tangent_subsets.py [--variants all vB ...] [--merge]

Tangent placements (what is perturbed and trained): all -- every LoRA tensor (the default); B -- the
B matrices (LoRA-FA: A stays at its random init); vB -- the value projections' B only. `all:fedadam:exact`
(K 0): the server steps on the round's exact mean gradient, the estimate's limit as K grows. `energy` first
records each tensor's share of the round-1 mean gradient's squared norm (5 clients), which is where the
placements come from. Guides (`...:seq:guide_last`, `...:seq:guide_total`, --guide-lrs): one more
tangent a client along a direction the weights define, and a FedAdam step along it (GUIDE_LRS). Output:
bench/results/fl_causal_lm_explore/tangent_subsets.json, one row per (placement, optimizer, K, lr[, guide,
guide_lr]) with the held-out and validation loss every 4 rounds and its machine; the best row of each
variant by the validation drop is in best_by_validation.
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
from bench.lm_head_side import load  # noqa: E402

PLACEMENTS = {"all": lambda n: True, "B": lambda n: "lora_B" in n,
              "vB": lambda n: "lora_B" in n and "v_proj" in n}
# (placement, optimizer, K) -> lrs. The K 16 grids reach past their validation-best points on both sides;
# B (LoRA-FA) runs at the lr that is best for all and for vB. K 64, 256 and 1024: more directions per round
# (K 1024: 5,120 a round; 256 per sample: as many, at K 256's compute). K 0 ("exact"): the round's exact
# mean gradient under the same FedAdam, the limit of the estimate as K grows; its grid sits lower, because
# with an exact gradient FedAdam's per-coordinate normalised step moves every coordinate by about lr.
# Scope "seq": each tangent's directional derivative is taken on one sequence of the client's batch (K per
# sequence), which an exact jvp computes at the cost of K tangents over the whole batch, for B x K directions.
# Guide ":guide_G": one more tangent a client, along a direction every client can compute from the weights
# it holds -- "last": the last round's step, "total": the adapter's displacement from its initial values --
# whose exact derivative a (mean over the round's clients) moves the weights along it, by FedAdam's rule
# on that one scalar (the step's length is GUIDE_LRS' value times the direction's). "last" is the
# hypergradient of the server's lr; "total" is a line search along the whole trajectory.
# Both at the per-sample default's setting (16 per sample, FedAdam 0.01); the grids as extended past their
# validation-best points ("last" is best at its smallest, and at 0 it is the plain row).
GUIDE_LRS = {"last": [0.1, 0.3, 1.0], "total": [0.03, 0.1, 0.3, 1.0]}
GUIDED = {("all", "fedadam", 16, "seq", g): 0.01 for g in GUIDE_LRS}
GRIDS = {("all", "fedadam", 16, "batch"): [0.003, 0.01, 0.03], ("vB", "fedadam", 16, "batch"): [0.003, 0.01, 0.03],
         ("B", "fedadam", 16, "batch"): [0.01], ("all", "sgd", 16, "batch"): [0.01, 0.03, 0.1, 0.3],
         ("vB", "sgd", 16, "batch"): [0.1, 0.3, 1.0],
         ("all", "fedadam", 64, "batch"): [0.003, 0.01, 0.03],
         ("all", "fedadam", 256, "batch"): [0.003, 0.01, 0.03],
         ("all", "fedadam", 1024, "batch"): [0.003, 0.01, 0.03],
         ("all", "fedadam", 0, "batch"): [0.001, 0.003, 0.005, 0.01],
         ("all", "fedadam", 16, "seq"): [0.003, 0.01, 0.03], ("all", "fedadam", 256, "seq"): [0.003, 0.01, 0.03]}
OUT = os.path.join(HERE, "results", "fl_causal_lm_explore", "tangent_subsets.json")


class Sim:
    def __init__(self, task):
        self.task, self.model = task, task.model
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.names = list(task.params)
        self.P = [task.params[n] for n in self.names]
        for p in self.P:
            p.requires_grad_(True)
        self.start = [p.detach().clone() for p in self.P]

    def loss(self, b):
        out = self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        return causal_lm_loss(out.logits, b["labels"])

    def grad(self, client: int, rnd: int) -> list:
        return [g.detach() for g in torch.autograd.grad(self.loss(self.task.client_batches(client, rnd)[0]), self.P)]

    def sequence_grads(self, client: int, rnd: int) -> list:
        """Per sequence b, the gradient of B x (its tokens' summed loss / the batch's tokens): their mean is
        the batch loss's gradient."""
        from fwdkern.engine import loss_terms

        b = self.task.client_batches(client, rnd)[0]
        terms = loss_terms(self.model, b)
        n, B = int(terms.sum()), len(terms)
        out = []
        for i in range(B):
            one = {k: b[k][i:i + 1] for k in ("input_ids", "attention_mask", "labels")}
            m = int(terms[i])
            if m == 0:
                out.append([torch.zeros_like(p) for p in self.P])
                continue
            loss = self.loss(one) * (B * m / n)
            out.append([g.detach() for g in torch.autograd.grad(loss, self.P)])
        return out

    def heldout(self, validation: bool) -> float:
        from fwdkern.fl.evaluation import heldout_loss

        return heldout_loss(self.task, validation=validation)["eval_loss"]

    def energy(self) -> dict:
        """Each tensor's share of the round-1 mean gradient's squared norm, and each placement's."""
        cs = range(self.task.cfg.clients_per_round)
        gs = [self.grad(c, 1) for c in cs]
        g = [sum(x[i] for x in gs) / len(gs) for i in range(len(self.P))]
        tot = sum(float((x ** 2).sum()) for x in g)
        share = {n: float((x ** 2).sum()) / tot for n, x in zip(self.names, g)}
        d = sum(p.numel() for p in self.P)
        flat, _ = torch.cat([x.flatten() for x in g]).pow(2).sort(descending=True)
        cum = flat.cumsum(0) / flat.sum()
        placements = {}
        for k, f in PLACEMENTS.items():
            values = sum(p.numel() for n, p in zip(self.names, self.P) if f(n))
            placements[k] = {"energy": sum(s for n, s in share.items() if f(n)), "values": values,
                             "share_of_values": values / d}
        return {"tensors": share, "placements": placements,
                "top_coordinates": {str(q): float(cum[int(q * len(flat))]) for q in (0.001, 0.01, 0.05, 0.1)}}

    def run(self, placement: str, opt_name: str, lr: float, K: int = 16, rounds: int = 12, seed: int = 0,
            scope: str = "batch", guide: str = None, guide_lr: float = 0.0) -> dict:
        from fwdkern.fl.optim import SGD, FedAdam

        task, P, names = self.task, self.P, self.names
        mask = [PLACEMENTS[placement](n) for n in names]
        opt = FedAdam(lr) if opt_name == "fedadam" else SGD(lr)
        rng = np.random.default_rng(seed)
        gen = torch.Generator().manual_seed(1000 + seed)
        cpr = task.cfg.clients_per_round
        curve = [(0, self.heldout(False), self.heldout(True))]
        cpu = time.process_time()
        sel = [i for i, m in enumerate(mask) if m]
        flat = lambda: torch.cat([P[i].detach().flatten() for i in sel])  # noqa: E731
        theta0, last = (flat() if guide else None), None
        g_opt = FedAdam(guide_lr) if guide else None
        guided = []
        for rnd in range(1, rounds + 1):
            est = torch.zeros(sum(P[i].numel() for i in sel))
            before = flat() if guide else None
            u = (last if guide == "last" else before - theta0) if guide else None
            a = 0.0
            for c in rng.choice(task.cfg.clients, size=cpr, replace=False):
                gs = [self.grad(int(c), rnd)] if scope == "batch" else self.sequence_grads(int(c), rnd)
                for g in gs:
                    g = torch.cat([g[i].flatten() for i in sel])
                    if u is not None:  # the guide's exact derivative (the mean over sequences is the batch's)
                        a += float(g @ u) / (cpr * len(gs))
                    if K == 0:  # the exact gradient: the limit of the estimate as the tangents grow
                        est.add_(g, alpha=1.0 / (cpr * len(gs)))
                    for j in range(0, K, 16):  # 16 tangents at a time: V holds them as rows
                        V = torch.randint(0, 2, (min(16, K - j), g.numel()), generator=gen).float().mul_(2).sub_(1)
                        est.add_(V.T @ (V @ g), alpha=1.0 / (K * cpr * len(gs)))
            parts = est.split([P[i].numel() for i in sel])
            with torch.no_grad():
                opt.step({names[i]: P[i] for i in sel}, {names[i]: x.view_as(P[i]) for i, x in zip(sel, parts)})
                if u is not None and float(u.norm()) > 0:  # theta += alpha u, alpha stepped by FedAdam on a
                    alpha = torch.zeros(1)
                    g_opt.step({"alpha": alpha}, {"alpha": torch.tensor([a])})
                    for i, x in zip(sel, u.split([P[i].numel() for i in sel])):
                        P[i].add_(x.view_as(P[i]), alpha=float(alpha))
                    guided.append({"round": rnd, "derivative": a, "alpha": float(alpha)})
            if guide:
                last = flat() - before
            if rnd % 4 == 0:
                curve.append((rnd, self.heldout(False), self.heldout(True)))
        cpu = time.process_time() - cpu
        with torch.no_grad():  # leave the model as loaded for the next row
            for p, s in zip(P, self.start):
                p.copy_(s)
        return {"placement": placement, "optimizer": opt_name, "lr": lr, "K": K, "scope": scope,
                "guide": guide, "guide_lr": guide_lr, "guided": guided,
                "values": sum(p.numel() for p, m in zip(P, mask) if m),
                "curve": [{"round": r, "eval_loss": t, "val_eval_loss": v} for r, t, v in curve],
                "drop_at_12": curve[0][1] - curve[-1][1], "val_drop_at_12": curve[0][2] - curve[-1][2],
                "cpu_s": cpu, "load": os.getloadavg()[0]}


def name(placement: str, optimizer: str, K: int, scope: str, guide: str = None) -> str:
    return f"{placement}:{optimizer}:{K or 'exact'}" + ("" if scope == "batch" else f":{scope}") + (f":guide_{guide}" if guide else "")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", nargs="+", default=None,
                    help="placement:optimizer:K[:seq] grids to run (default: every grid), e.g. vB:sgd:16 or all:fedadam:exact")
    ap.add_argument("--lrs", type=float, nargs="+", help="learning rates to run instead of each grid")
    ap.add_argument("--guide-lrs", type=float, nargs="+", help="guide learning rates to run instead of GUIDE_LRS")
    ap.add_argument("--no-energy", action="store_true", help="keep the energy table --out already holds")
    ap.add_argument("--merge", action="store_true", help="add the rows to --out's")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args(argv)
    known = {name(*k): k for k in list(GRIDS) + list(GUIDED)}
    for v in args.variants or []:
        if v not in known:
            ap.error(f"--variants: unknown {v} (known: {', '.join(known)})")
    keys = [known[v] for v in args.variants] if args.variants else list(GRIDS)
    sim = Sim(load(args.threads))
    commit = git_commit(HERE)
    old = {}
    if (args.merge or args.no_energy) and os.path.exists(args.out):
        with open(args.out) as f:
            old = json.load(f)
    rows = old.get("rows", []) if args.merge else []
    energy = old.get("energy") if args.no_energy else sim.energy()
    runs = [(k, dict(lr=lr)) for k in keys if k in GRIDS for lr in args.lrs or GRIDS[k]]
    runs += [(k, dict(lr=GUIDED[k], guide=k[4], guide_lr=glr)) for k in keys if k in GUIDED
             for glr in args.guide_lrs or GUIDE_LRS[k[4]]]
    for k, kw in runs:
        row = sim.run(k[0], k[1], K=k[2], scope=k[3], **kw)
        env = environment()  # per row: a merged file holds rows from several machines
        row.update(commit=commit, date=env["date"], cpu=env.get("cpu"), torch=env.get("torch"),
                   threads=env.get("torch_threads"))
        print(json.dumps({x: row[x] for x in ("placement", "optimizer", "K", "scope", "lr", "guide", "guide_lr",
                                              "drop_at_12", "val_drop_at_12")}), flush=True)
        rows.append(row)
    best = best_by_validation(rows, lambda r: name(r["placement"], r["optimizer"], r["K"], r.get("scope", "batch"),
                                                   r.get("guide")))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"environment": environment(), "script": "bench/lm_tangent_subsets.py", "energy": energy,
                   "best_by_validation": {k: {x: r.get(x) for x in ("lr", "guide_lr", "values", "drop_at_12",
                                                                     "val_drop_at_12")}
                                          for k, r in best.items()},
                   "rows": rows}, f, indent=1)
    print(json.dumps({k: (r["lr"], round(r["drop_at_12"], 4)) for k, r in best.items()}, indent=1))


if __name__ == "__main__":
    main()
