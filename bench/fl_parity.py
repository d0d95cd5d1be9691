"""Fingerprints of federated runs on tiny random models: what a refactor of fwdkern.fl must keep.

Runs every method family of the embedded runner for a few rounds on tiny random models (a BERT
classifier, a LLaMA causal LM) and prints, per run, a SHA-256 of the final trainable tensors and
of the metrics rows (timings left out). Run it before and after a change that must not change
what is computed and compare the two files:

    python bench/fl_parity.py --out before.json      # at the old commit
    python bench/fl_parity.py --out after.json --compare before.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

TIMING = {"wall_time_s", "cpu_time_s"}

# name -> RunConfig overrides on the tiny BERT classifier (or the tiny LLaMA with task causal_lm)
RUNS = {
    "fwdkern_head_only": dict(method="fwdkern"),
    "fwdkern_body_fedadam_pacing": dict(method="fwdkern", perturbations=4, optimizer="fedadam", pacing="auto"),
    "fwdkern_body_sgd_momentum": dict(method="fwdkern", perturbations=4, optimizer="sgd", lr=0.05, momentum=0.9),
    "fwdkern_split_candidates": dict(method="fwdkern", perturbations=4, split=True, candidates=3, head="perturb"),
    "backprop": dict(method="backprop"),
    "backprop_fedadam": dict(method="backprop", optimizer="fedadam", local_batches=2),
    "spry": dict(method="spry"),
    "mezo": dict(method="mezo"),
    "fwdllm": dict(method="fwdllm", pacing="0.1"),
    "fwdkern_fp16_wire": dict(method="fwdkern", wire="fp16", perturbations=2),
    "causal_lm_fwdkern": dict(method="fwdkern", lm=True),
    "causal_lm_backprop": dict(method="backprop", lm=True, local_lr=0.05),
}


def _tiny_lm(d):
    from _tiny_models import save_tiny_llama, story_lines

    save_tiny_llama(d)
    with open(os.path.join(d, "text.txt"), "w") as f:
        f.write("\n".join(story_lines(80)) + "\n")
    return d


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def fingerprint(name, over, root, keys=None):
    import torch

    from _tiny_models import save_tiny_bert, sentiment_rows, write_csv
    from fwdkern.fl.config import RunConfig
    from fwdkern.fl.simulation import build

    over = dict(over)
    lm = over.pop("lm", False)
    if lm:
        d = os.path.join(root, "lm")
        if not os.path.exists(os.path.join(d, "config.json")):
            os.makedirs(d, exist_ok=True)
            _tiny_lm(d)
        base = dict(model=d, data=os.path.join(d, "text.txt"), label_column=None, max_length=16, clients=8,
                    clients_per_round=3, rounds=4, eval_every=2, checkpoint_every=2, max_test=16)
    else:
        from pathlib import Path

        d = Path(root) / "bert"
        if not (d / "config.json").exists():
            d.mkdir(parents=True, exist_ok=True)
            words = ["good", "great", "fine", "bad", "awful", "poor"] + [f"w{i}" for i in range(40)]
            save_tiny_bert(d, words)
            write_csv(d / "data.csv", ["sentence", "sentiment"], sentiment_rows(words, 200))
        base = dict(model=str(d), data=str(d / "data.csv"), text_column="sentence", label_column="sentiment",
                    max_length=12, clients=12, clients_per_round=4, rounds=5, eval_every=2, checkpoint_every=2,
                    max_test=40)
    base.update(over, out=os.path.join(root, "runs", name), num_threads=1)
    base.update(json.loads(os.environ.get("FL_PARITY_EXTRA", "{}")))  # e.g. a new setting at its old behaviour
    sim = build(RunConfig(**base), log=lambda *a: None)
    summary = sim.run()
    params = {n: hashlib.sha256(t.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
              for n, t in sorted(sim.server.params.items())}
    with open(os.path.join(base["out"], "metrics.jsonl")) as f:
        rows = [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]
    res = {"params": _digest(params), "metrics": _digest(rows), "final": summary["final"],
           "rounds": summary["rounds"], "client_rounds": summary["client_rounds"],
           "row_keys": sorted({k for r in rows for k in r})}
    if keys is not None:  # the digest over the reference's row fields (rows may have gained some since)
        res["metrics"] = _digest([{k: v for k, v in r.items() if k in keys} for r in rows])
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--compare", default=None, help="a fingerprint file to compare with (exit 1 on a difference)")
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--params-only", action="store_true", help="compare the trained tensors only (for a change that "
                    "alters what the metrics rows record, e.g. the byte accounting, but not what is computed)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    res = {}
    ref = json.load(open(args.compare)) if args.compare else {}
    with tempfile.TemporaryDirectory() as root:
        for name, over in RUNS.items():
            if args.only and name not in args.only:
                continue
            res[name] = fingerprint(name, over, root, set(ref[name]["row_keys"]) if name in ref else None)
            print(name, res[name]["params"], res[name]["metrics"], res[name]["final"], flush=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    if args.compare:
        fields = ("params",) if args.params_only else ("params", "metrics")
        bad = [n for n in res if n in ref and any(res[n][f] != ref[n][f] for f in fields)]
        print("identical" if not bad else f"DIFFERENT: {bad}")
        sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
