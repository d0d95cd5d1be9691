"""Federated comparison under one protocol: every method tuned with the same effort and chosen on a
validation split, compared by client rounds, client compute, bytes both ways and client memory.

Every run goes through the embedded runner with the same data split, client sampling and held-out
sets: the test split (>= 400 examples or windows where the data has them) and a validation split
carved from the training data (10 %, no client holds it). Only the client computation, the uploads
and downloads and the server step differ. Per suite:

  sweep   every method's grid (>= 3 values of its learning rate; backprop also its local work) for
          `sweep_rounds` client rounds on seed 0; a grid whose best point sits at an edge is extended
          one step past it (up to twice) and run again;
  final   each method's best sweep setting -- chosen on the **validation** metric at the end of the
          sweep, never the test split -- on every seed of `seeds` to its final length (seed 0 extends
          its sweep run); `default` is the default recipe (no setting given) and is never tuned;
  memory  peak RSS growth of one client's round per final method and of one inference of the same
          batch, in a fresh process.

    python bench/fl_compare.py --suite bbc [--phase sweep|final|memory|report|all]

Run folders go to bench/runs/<suite>/ (not committed); the results go to bench/results/<suite>/:
runs.csv and summary.csv (bench/results.py: one row per run, round and metric, with provenance),
comparison.md (the tables and the targets, every number a summary.csv row) and comparison.png.

Method labels mean the same on every suite: default (the recipe), head_only (fwdkern, the head trained
exactly, no body perturbation), fwdkern (fwdkern with its body forward gradients and the guard, on a
classifier beside the exact head), backprop (LoRA FedAvg), backprop_fedadam (LoRA + FedAdam),
backprop_ckpt (backprop with activation checkpointing: memory and CPU only), mezo, fwdllm and spry
(as released).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from bench import results  # noqa: E402

RUNS = os.path.join(HERE, "runs")
COMMON = dict(clients=100, clients_per_round=10, partition="dirichlet", dirichlet_alpha=0.5, r=8, lora_alpha=16.0,
              batch_size=8, checkpoint_every=10, num_threads=1, validation=0.1)
MINILM_QV = ["layer.5.attention.self.query", "layer.5.attention.self.value"]
SMOL_QV = ["layers.29.self_attn.q_proj", "layers.29.self_attn.v_proj"]


def _classification_methods(mezo_K=4):
    """Per method: (fixed settings, grid). Learning-rate grids are geometric (extended at an edge)."""
    return {
        "default": (dict(), {}),
        "head_only": (dict(method="fwdkern", perturbations=0), {"head_lr": [2.0, 8.0, 32.0]}),
        "fwdkern": (dict(method="fwdkern", perturbations=16, optimizer="fedadam", guard="on"),
                    {"lr": [0.003, 0.01, 0.03]}),
        "backprop": (dict(method="backprop", optimizer="sgd", lr=1.0), {"local_lr": [0.1, 0.4, 1.6],
                                                                         "local_batches": [1, 3]}),
        "backprop_fedadam": (dict(method="backprop", optimizer="fedadam", local_batches=3, local_lr=0.4),
                             {"lr": [0.003, 0.01, 0.03]}),
        "mezo": (dict(method="mezo", perturbations=mezo_K, local_batches=1, optimizer="sgd", eps=1e-3),
                 {"lr": [1e-3, 1e-2, 1e-1]}),
        "fwdllm": (dict(method="fwdllm", perturbations=1, local_batches=1, optimizer="sgd", pacing="0.1",
                        max_pacing_attempts=4), {"lr": [0.01, 0.1, 1.0]}),
        "spry": (dict(method="spry", perturbations=1, optimizer="fedyogi", lr=0.01), {"local_lr": [1e-3, 1e-2, 0.1]}),
    }


def _lm_methods():
    return {
        "default": (dict(), {}),
        # the default with every tangent's derivative of the whole batch (K 16; the recipe's scope is "sample")
        "default_batch": (dict(tangent_scope="batch"), {}),
        # default_batch with its tangents' GEMMs in fp32 (where the default picks bf16)
        "default_fp32": (dict(tangent_precision="fp32", tangent_scope="batch"), {}),
        "fwdkern": (dict(method="fwdkern", perturbations=16, optimizer="fedadam", guard="on"), {"lr": [0.003, 0.01]}),
        "backprop": (dict(method="backprop", optimizer="sgd", lr=1.0, local_batches=1), {"local_lr": [0.25, 1.0, 4.0]}),
        "backprop_fedadam": (dict(method="backprop", optimizer="fedadam", local_batches=1, local_lr=1.0),
                             {"lr": [0.003, 0.01, 0.03]}),
        "mezo": (dict(method="mezo", perturbations=4, local_batches=1, optimizer="sgd", eps=1e-3),
                 {"lr": [1e-3, 1e-2, 1e-1]}),
        "fwdllm": (dict(method="fwdllm", perturbations=1, local_batches=1, optimizer="sgd", pacing="0.1",
                        max_pacing_attempts=4), {"lr": [1e-3, 1e-2, 1e-1]}),
        "spry": (dict(method="spry", perturbations=1, optimizer="fedyogi", lr=0.01), {"local_lr": [1e-4, 1e-3, 1e-2]}),
    }


MINILM = dict(model="all-minilm-l6-v2", max_length=64, eval_every=5, target_modules=MINILM_QV)
SUITES = {
    "fl_bbc": dict(common=dict(MINILM, data="bbc_news", max_test=445), metric="accuracy",
                   methods=_classification_methods(), sweep_rounds=20, seeds=[0, 1],
                   final_rounds={"default": 80, "head_only": 80, "fwdkern": 80, "backprop": 80,
                                 "backprop_fedadam": 40},
                   also=dict(backprop_ckpt=("backprop", dict(checkpointing=True)))),
    "fl_rt": dict(common=dict(MINILM, data="rotten_tomatoes", max_length=48, max_test=1000), metric="accuracy",
                  methods=_classification_methods(), sweep_rounds=20, seeds=[0, 1],
                  final_rounds={"default": 40, "head_only": 40, "fwdkern": 40, "backprop": 40,
                                "backprop_fedadam": 40}),
    # Word order: a task where the frozen encoder's features are not enough (fwdkern.fl.data). Scaled to
    # the CPU: the default (head only), head-only tuned, the body beside the head, backprop FedAvg and
    # FedAdam; 40 client rounds.
    "fl_word_order": dict(common=dict(MINILM, data="rt_word_order", max_length=48, max_test=1000, eval_every=10),
                          metric="accuracy", sweep_rounds=20, seeds=[0, 1],
                          methods={k: v for k, v in _classification_methods().items()
                                   if k in ("default", "head_only", "fwdkern", "backprop", "backprop_fedadam")},
                          final_rounds={"default": 40, "head_only": 40, "fwdkern": 40, "backprop": 40,
                                        "backprop_fedadam": 40}),
    # Causal-LM prompt classification: the LM head's label-word rows as the classifier head
    # (fwdkern.nn.verbalizer). Scaled to fit the CPU: 5 clients per round, sweep 10 client rounds.
    "fl_smollm2_prompt": dict(common=dict(model="smollm2-135m", data="bbc_news", task="prompt", max_length=64,
                                          max_test=400, clients_per_round=5, eval_every=10, target_modules=SMOL_QV),
                              metric="accuracy", sweep_rounds=10, seeds=[0, 1],
                              methods={k: v for k, v in _classification_methods(mezo_K=1).items()
                                       if k in ("default", "head_only", "fwdkern", "backprop", "mezo")},
                              final_rounds={"default": 20, "head_only": 20, "fwdkern": 20, "backprop": 20}),
    # Causal LM: SmolLM2-135M adapting to BBC News text (documents dealt to 20 clients, 5 per round, one
    # 4 x 64-token batch each), held-out token loss on 64 windows of documents no client holds. Scaled to
    # the CPU: 12 client rounds for the sweep and the finals (seed 0 of a final is its sweep run); the
    # default (the recipe: K = 16 tangents, FedAdam, the guard) is not tuned -- its learning-rate
    # exploration is fl_causal_lm_explore; FwdLLM and SPRY are left out of this scale.
    "fl_causal_lm": dict(common=dict(model="smollm2-135m", data="bbc_news", task="causal_lm", clients=20,
                                     clients_per_round=5, batch_size=4, max_length=64, local_batches=1, max_test=64,
                                     eval_every=4, samples=0),
                         metric="eval_loss", sweep_rounds=12, seeds=[0, 1],
                         methods={k: v for k, v in _lm_methods().items()
                                  if k in ("default", "default_batch", "default_fp32", "backprop", "backprop_fedadam",
                                           "mezo")},
                         final_rounds={}, also=dict(backprop_ckpt=("backprop", dict(checkpointing=True)))),
    # Gemma-3-270M with an int4 base: the client-memory column of the causal-LM comparison (its learning
    # runs do not fit the CPU); the recipe's settings, one client round per method.
    "fl_causal_lm_gemma": dict(common=dict(model="gemma3-270m", data="bbc_news", task="causal_lm", clients=20,
                                           clients_per_round=5, batch_size=4, max_length=64, local_batches=1,
                                           max_test=16, eval_every=0, samples=0, base_quant="int4"),
                               metric="eval_loss", sweep_rounds=1, seeds=[0],
                               methods={k: v for k, v in _lm_methods().items() if k in ("default", "backprop")},
                               final_rounds={}, also=dict(backprop_ckpt=("backprop", dict(checkpointing=True)))),
}


def _tag(setting: dict) -> str:
    return "_".join(f"{k}={v}" for k, v in sorted(setting.items())) or "default"


def _grid(grid: dict):
    keys = sorted(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        yield dict(zip(keys, values))


def _summary(out):
    try:
        with open(os.path.join(out, "summary.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _run(kw: dict, label: str):
    """Run (or resume / reuse) one configuration; returns its summary."""
    from fwdkern.fl.config import RunConfig
    from fwdkern.fl.simulation import build

    cfg = RunConfig(**kw)
    done = _summary(cfg.out)
    if done is not None and done.get("client_rounds", 0) >= cfg.max_client_rounds:
        free = {"rounds", "max_client_rounds", "eval_every", "out"} | cfg.unread_fields()
        cmp = {k: v for k, v in done["config"].items() if k not in free}
        if all(cmp.get(k) == v for k, v in cfg.to_json().items() if k in cmp and v not in (None, "auto")):
            return done
    print(f"[{label}] running {cfg.out}", flush=True)
    sim = build(cfg, log=lambda s: print(f"[{label}] {s}", flush=True))
    return sim.run()  # the checkpoint stays (final runs extend sweep runs) in bench/runs/ (not committed)


class Suite:
    def __init__(self, name: str):
        self.name, self.d = name, SUITES[name]
        self.runs = os.path.join(RUNS, name)
        self.results = os.path.join(results.RESULTS, name)
        self.metric = self.d["metric"]
        self.higher = self.metric == "accuracy"
        self.per_round = self.d["common"].get("clients_per_round", COMMON["clients_per_round"])
        self.grids_file = os.path.join(self.runs, "grids.json")  # grids as extended

    def config(self, method, setting, seed, rounds, out) -> dict:
        kw = dict(COMMON)
        kw.update(self.d["common"])
        kw.update(self.d["methods"][method][0])
        kw.update(setting)
        kw.update(seed=seed, rounds=10 * rounds, max_client_rounds=rounds, out=out)
        return kw

    # ------------------------------------------------------------------ sweep (validation selection)
    def grids(self) -> dict:
        base = {m: {k: list(v) for k, v in g.items()} for m, (_, g) in self.d["methods"].items()}
        try:
            with open(self.grids_file) as f:
                saved = json.load(f)
        except (OSError, ValueError):
            saved = {}
        for m, g in saved.items():  # extensions made by earlier sweeps
            if m in base:
                for k, v in g.items():
                    base[m][k] = sorted(set(base[m].get(k, [])) | set(v))
        return base

    def sweep_dir(self, method, setting) -> str:
        return os.path.join(self.runs, "sweep", method, _tag(setting))

    def val(self, out):
        """The validation metric at the end of a run (what settings are chosen on)."""
        s = _summary(out)
        v = None if s is None else s["final"].get(f"val_{self.metric}")
        return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v

    def best(self, method, grids=None) -> dict:
        grids = grids or self.grids()
        scored = [(self.val(self.sweep_dir(method, s)), i, s) for i, s in enumerate(_grid(grids[method]))]
        scored = [(v, i, s) for v, i, s in scored if v is not None]
        if not scored:
            return {}
        key = (lambda t: (t[0], -t[1])) if self.higher else (lambda t: (-t[0], -t[1]))
        return max(scored, key=key)[2]  # ties: the first in grid order

    def sweep(self, methods):
        grids = self.grids()
        for m in methods:
            if not grids[m]:
                continue
            for _ in range(3):  # the grid, then up to two extensions past an edge
                for s in _grid(grids[m]):
                    _run(self.config(m, s, 0, self.d["sweep_rounds"], self.sweep_dir(m, s)), f"sweep {m} {_tag(s)}")
                grown = self.extend(m, grids)
                if not grown:
                    break
        with open(self.grids_file, "w") as f:
            json.dump(grids, f, indent=1)

    def extend(self, method, grids) -> bool:
        """Add one step past the edge the best setting sits on, for every geometric numeric axis."""
        best = self.best(method, grids)
        grown = False
        for k, vals in grids[method].items():
            vals = sorted(vals)
            if len(vals) < 2 or not all(isinstance(v, float) and v > 0 for v in vals):
                continue
            ratio = vals[1] / vals[0]
            if best.get(k) == vals[-1]:
                vals.append(vals[-1] * ratio)
            elif best.get(k) == vals[0]:
                vals.insert(0, vals[0] / ratio)
            else:
                continue
            grids[method][k] = vals
            grown = True
            print(f"[sweep {method}] best {k}={best[k]} at the grid's edge: extending to {vals}", flush=True)
        return grown

    # ------------------------------------------------------------------ finals
    def final_runs(self, methods) -> list:
        """[(label, base method, setting, seed, rounds, out)] of the final phase."""
        grids = self.grids()
        out = []
        for m in methods:
            setting = self.best(m, grids)
            rounds = self.d["final_rounds"].get(m, self.d["sweep_rounds"])
            for seed in self.d["seeds"]:
                out.append((m, m, setting, seed, rounds, os.path.join(self.runs, "final", m, f"seed{seed}")))
        return out

    def final(self, methods):
        for label, base, setting, seed, rounds, out in self.final_runs(methods):
            src = self.sweep_dir(base, setting)
            if seed == 0 and self.d["methods"][base][1] and not os.path.exists(out) and \
                    os.path.exists(os.path.join(src, "checkpoint.safetensors")):
                shutil.copytree(src, out)  # seed 0 extends its sweep run (same config, more rounds)
            _run(self.config(base, setting, seed, rounds, out), f"final {label} s{seed}")

    # ------------------------------------------------------------------ memory
    def memory(self, methods) -> dict:
        """Peak RSS growth of one client's round per final method (and of one inference of its batch)."""
        from bench.common import peak_memory_subprocess
        from fwdkern.fl.metrics import provenance

        res = {}
        rows = [(m, m, s) for m, _, s, seed, _, _ in self.final_runs(methods) if seed == 0]
        rows += [(name, base, dict(self.best(base), **extra)) for name, (base, extra) in self.d.get("also", {}).items()
                 if base in methods]
        rows.append(("inference", "default", {}))
        for name, base, setting in rows:
            kw = self.config(base, setting, 0, 1, "/tmp/fwdkern_mem_run")
            run = ("    with torch.no_grad(): sim.model(**{k: v for k, v in sim.task.client_batches(3, 0)[0].items()})\n"
                   if name == "inference" else "    sim.task.answer(3, plans['client3'])\n")
            code = ("import json\nfrom fwdkern.fl.config import RunConfig\nfrom fwdkern.fl.simulation import build\n"
                    f"sim = build(RunConfig(**json.loads({json.dumps(json.dumps(kw))})), log=lambda *a: None)\n"
                    "def setup():\n    return sim.server.plan_round(['client3'])\n"
                    "def run(plans):\n" + run)
            res[name] = {"peak_rss_growth_bytes": peak_memory_subprocess(code), "setting": setting,
                         "config": kw, "provenance": provenance()}
            print(f"[memory] {name}: {res[name]}", flush=True)
        os.makedirs(self.runs, exist_ok=True)
        path = os.path.join(self.runs, "memory.json")
        try:  # the methods not measured this time keep their rows
            with open(path) as f:
                res = {**json.load(f), **res}
        except (OSError, ValueError):
            pass
        with open(path, "w") as f:
            json.dump(res, f, indent=1)
        return res

    # ------------------------------------------------------------------ report
    def report(self, methods):
        try:
            with open(os.path.join(self.runs, "memory.json")) as f:
                mem = json.load(f)
        except (OSError, ValueError):
            mem = {}
        rows = []
        grids = self.grids()
        for m in methods:
            for s in _grid(grids[m]):
                d = self.sweep_dir(m, s)
                if _summary(d) is not None:
                    rows += results.run_rows(self.name, "sweep", m, _tag(s), 0, d, self.per_round)
        with_rows = set()
        for label, base, setting, seed, rounds, out in self.final_runs(methods):
            if _summary(out) is not None:
                with_rows.add(label)
                extra = {}
                if label in mem and mem[label].get("peak_rss_growth_bytes") is not None:
                    extra["client_peak_mib"] = mem[label]["peak_rss_growth_bytes"] / 2**20
                rows += results.run_rows(self.name, "final", label, _tag(setting), seed, out, self.per_round, extra)
        for name, m in mem.items():  # memory of a method without final runs too (a memory-only suite)
            if name not in with_rows and m.get("peak_rss_growth_bytes") is not None:
                prov = m.get("provenance", {})
                rows.append(dict(suite=self.name, phase="extra", method=name, setting=_tag(m.get("setting", {})),
                                 seed=0, client_round="", metric="client_peak_mib",
                                 value=m["peak_rss_growth_bytes"] / 2**20, commit=prov.get("commit"),
                                 torch=prov.get("torch"), device=prov.get("device"), threads=prov.get("threads"),
                                 date=prov.get("date"), load=prov.get("load")))
        results.write(rows, self.results)
        summary = results.summarize(rows)
        text = markdown(self, summary, methods, grids)
        with open(os.path.join(self.results, "comparison.md"), "w") as f:
            f.write(text)
        print(text)
        _plot(self, methods)


def _value(summary, method, metric, rnd=""):
    for r in summary:
        if r["method"] == method and r["metric"] == metric and str(r["client_round"]) == str(rnd):
            return r
    return None


def _at(summary, method, metric, rnd):
    """The metric's summary row of `method` at client round `rnd`, or at its last evaluation before it."""
    best = None
    for r in summary:
        if r["method"] == method and r["metric"] == metric and r["client_round"] != "" and \
                0 < int(r["client_round"]) <= rnd and (best is None or int(r["client_round"]) > int(best["client_round"])):
            best = r
    return best


def _cell(r, digits=3):
    if r is None:
        return "-"
    s = f"{r['mean']:.{digits}f}"
    return s + (f" ±{r['half_spread']:.{digits}f}" if r["n"] > 1 else "") + (f" (n={r['n']})" if r["n"] != 2 else "")


def targets(suite_name: str, summary: list, marks) -> list:
    """The issues' targets computed from the summary rows: (name, value, text) per target."""
    out = []
    metric = "eval_loss" if suite_name == "fl_causal_lm" else "accuracy"
    initial = _value(summary, "default", metric, 0)
    if metric == "accuracy":
        # the default (with the body where the recipe turns it on) never below head-only by more than the spread
        for k in marks:
            d, h = _at(summary, "default", metric, k), _at(summary, "head_only", metric, k)
            if d and h and int(d["client_round"]) == k:
                spread = max(d["half_spread"], h["half_spread"])
                out.append((f"default_minus_head_only_at_{k}", d["mean"] - h["mean"],
                            f"default − head-only at {k}: {d['mean'] - h['mean']:+.3f} (seed spread ±{spread:.3f})"))
        # the gap to tuned backprop the body recovers (a task where backprop beats head-only)
        for k in (40, 80):
            d, h = _at(summary, "default", metric, k), _at(summary, "head_only", metric, k)
            b = max((x for x in (_at(summary, m, metric, k) for m in ("backprop", "backprop_fedadam")) if x),
                    key=lambda x: x["mean"], default=None)
            if d and h and b and b["mean"] - h["mean"] > 0:
                gap = b["mean"] - h["mean"]
                out.append((f"gap_recovered_at_{k}", (d["mean"] - h["mean"]) / gap,
                            f"gap to tuned backprop recovered at {k}: {(d['mean'] - h['mean']) / gap:.0%} "
                            f"(default {d['mean']:.3f}, head-only {h['mean']:.3f}, backprop {b['mean']:.3f})"))
    elif initial:
        for k in marks:
            d, b = _at(summary, "default", metric, k), None
            cands = [x for x in (_at(summary, m, metric, k) for m in ("backprop", "backprop_fedadam")) if x]
            if cands:
                b = min(cands, key=lambda x: x["mean"])
            if d and b and int(d["client_round"]) == k:
                drop_d, drop_b = initial["mean"] - d["mean"], initial["mean"] - b["mean"]
                out.append((f"loss_drop_ratio_at_{k}", drop_d / drop_b if drop_b else float("nan"),
                            f"held-out loss drop at {k} client rounds: default {drop_d:.3f} = "
                            f"{drop_d / drop_b:.0%} of tuned backprop's {drop_b:.3f}" if drop_b else ""))
        mz = _mezo_at_equal_passes(summary, metric, initial["mean"])
        if mz:
            out.append(mz)
        cd, cb = (_value(summary, m, "cpu_s_per_client_round") for m in ("default", "backprop"))
        if cd and cb:
            out.append(("cpu_ratio_to_backprop", cd["mean"] / cb["mean"],
                        f"client CPU per round: default {cd['mean']:.2f} s = {cd['mean'] / cb['mean']:.1f}x "
                        f"backprop's {cb['mean']:.2f} s"))
    for m in ("default",):
        up, down = _value(summary, m, "bytes_up_per_client_round"), _value(summary, m, "bytes_down_mean")
        if up and down:
            out.append((f"{m}_bytes", down["mean"], f"{m}: {up['mean']:.0f} B up, {down['mean']:.0f} B down per client "
                                                    "per round (mean)"))
    return out


def _passes(summary, method, rnd) -> float:
    """Forward passes per client up to client round `rnd` (the per-round means over seeds)."""
    return sum(float(r["mean"]) for r in summary if r["method"] == method and r["metric"] ==
               "forward_passes_per_client" and r["client_round"] != "" and 0 < int(r["client_round"]) <= rnd)


def _mezo_at_equal_passes(summary, metric, initial):
    """The default's held-out loss drop against tuned MeZO's at equal forward passes per client: MeZO at its
    last evaluation, the default at its last evaluation within the same forward-pass budget."""
    mezo, default = (sorted(int(r["client_round"]) for r in summary if r["method"] == m and r["metric"] == metric
                            and r["client_round"] not in ("", "0", 0)) for m in ("mezo", "default"))
    if not mezo or not default:
        return None
    rm = mezo[-1]
    budget = _passes(summary, "mezo", rm)
    fits = [r for r in default if _passes(summary, "default", r) <= budget]
    if not fits or not budget:
        return None
    rd = fits[-1]
    dm = initial - _at(summary, "mezo", metric, rm)["mean"]
    dd = initial - _at(summary, "default", metric, rd)["mean"]
    return ("drop_vs_mezo_at_equal_passes", dd / dm if dm > 0 else float("inf"),
            f"held-out loss drop at equal forward passes ({budget:.0f} per client): default {dd:.3f} (round {rd}) vs "
            f"tuned MeZO {dm:.3f} (round {rm})" + (f" = {dd / dm:.1f}x" if dm > 0 else " (MeZO did not lower it)"))


def markdown(suite: Suite, summary: list, methods, grids) -> str:
    metric = suite.metric
    evaluated = {int(r["client_round"]) for r in summary if r["metric"] == metric and r["client_round"] not in
                 ("", 0, "0")}
    # every evaluated round when there are few (a short causal-LM run), else every tenth and the sweep's end
    marks = sorted(evaluated if len(evaluated) <= 6 else
                   {k for k in evaluated if k % 10 == 0} | {suite.d["sweep_rounds"]})
    name = {"accuracy": "test accuracy", "eval_loss": "held-out token loss"}[metric]
    lines = [f"# {suite.name}", "", f"{name.capitalize()} (mean over seeds ± half the spread) at client rounds, chosen on "
             "the validation split; client cost per round; bytes per participating client per round "
             f"(`python bench/results.py show {suite.name} method=M metric=X client_round=N` prints any cell's row).", ""]
    head = "| " + " | ".join(["method", "setting"] + [f"@{k}" for k in marks] + [
        "CPU s / client round", "up B", "down B (mean / p95 / first)", "client peak MiB"]) + " |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    labels = [m for m in methods] + [n for n in suite.d.get("also", {}) if n not in methods] + ["inference"]
    for m in labels:
        rows = [r for r in summary if r["method"] == m]
        if not rows:
            continue
        setting = rows[0]["setting"]
        evals = [_cell(_at(summary, m, metric, k) if _at(summary, m, metric, k) and
                       int(_at(summary, m, metric, k)["client_round"]) == k else None) for k in marks]
        cpu, up = _value(summary, m, "cpu_s_per_client_round"), _value(summary, m, "bytes_up_per_client_round")
        dm, dp, df = (_value(summary, m, f"bytes_down_{k}") for k in ("mean", "p95", "first_contact_mean"))
        mib = _value(summary, m, "client_peak_mib")
        up_s = "-" if up is None else "%.0f" % up["mean"]
        down_s = "-" if dm is None else "%.0f / %.0f / %s" % (dm["mean"], dp["mean"] if dp else float("nan"),
                                                            "%.0f" % df["mean"] if df else "-")
        mib_s = "-" if mib is None else "%.1f" % mib["mean"]
        lines.append("| " + " | ".join([m, setting] + evals + [_cell(cpu, 2), up_s, down_s, mib_s]) + " |")
    lines += ["", "Grids swept (seed 0, validation-selected; * = the pick):", ""]
    for m in methods:
        if grids.get(m):
            best = suite.best(m, grids)
            pts = ", ".join(("*" if s == best else "") + _tag(s) + f" ({suite.val(suite.sweep_dir(m, s)):.4g})"
                            for s in _grid(grids[m]) if suite.val(suite.sweep_dir(m, s)) is not None)
            lines.append(f"- {m}: {pts}")
    t = targets(suite.name, summary, marks)
    if t:
        lines += ["", "Targets:", ""] + [f"- {text}" for _, _, text in t if text]
    return "\n".join(lines) + "\n"


def _plot(suite: Suite, methods):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(1, 3, figsize=(17, 4.5))
    for label, base, setting, seed, rounds, out in suite.final_runs(methods):
        if seed != 0 or _summary(out) is None:
            continue
        ms = _metrics(out)
        ev = [(i + 1, m) for i, m in enumerate(ms) if suite.metric in m]
        x = [i for i, _ in ev]
        y = [m[suite.metric] for _, m in ev]
        cum, tot = [], 0
        for m in ms:
            tot += m["bytes_up_per_client"] + m.get("bytes_down_per_client", 0)
            cum.append(tot)
        ax[0].plot(x, y, marker="o", label=label)
        ax[1].plot([m["cpu_time_s"] for _, m in ev], y, marker="o", label=label)
        ax[2].plot([cum[i - 1] for i in x], y, marker="o", label=label)
    ylabel = "test accuracy" if suite.metric == "accuracy" else "held-out token loss"
    ax[0].set(xlabel="client rounds", ylabel=ylabel, title=f"{suite.name}: vs client rounds (seed 0)")
    ax[1].set(xlabel="process CPU s (1 thread)", ylabel=ylabel, title="vs client compute", xscale="log")
    ax[2].set(xlabel="bytes per client, up + down (cumulative)", ylabel=ylabel, title="vs communication",
              xscale="log")
    for a in ax:
        a.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(suite.results, exist_ok=True)
    fig.savefig(os.path.join(suite.results, "comparison.png"), dpi=100)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=sorted(SUITES), required=True)
    ap.add_argument("--methods", nargs="+", default=None)
    ap.add_argument("--phase", choices=["sweep", "final", "memory", "report", "all"], default="all")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if "FWDKERN_COMMIT" not in os.environ:  # provenance of every run (a snapshot tree has no .git)
        from bench.common import git_commit

        os.environ["FWDKERN_COMMIT"] = git_commit(HERE) or ""
    suite = Suite(args.suite)
    methods = args.methods or list(suite.d["methods"])
    os.makedirs(suite.runs, exist_ok=True)
    if args.phase in ("sweep", "all"):
        suite.sweep(methods)
    if args.phase in ("final", "all"):
        suite.final(methods)
    if args.phase in ("memory", "all"):
        suite.memory(methods)
    if args.phase in ("report", "all", "final", "memory"):
        suite.report(methods)


if __name__ == "__main__":
    main()
