"""Benchmark result tables: one table per suite with provenance on every row, and the command that
traces a quoted number to the row it comes from.

Federated suites (bench/fl_compare.py) keep their run folders in bench/runs/<suite>/ (not committed);
their results are two CSV files in bench/results/<suite>/:

* runs.csv -- one row per (run, client round, metric): suite, phase (sweep / final / extra), method
  (the row label of fl_compare's suite), setting, seed, client_round (0 = before training; empty for
  a run-level value), metric, value, and the provenance of the run (fwdkern commit, torch, device,
  torch threads, date, machine load);
* summary.csv -- what tables and the README quote: per (method, setting, client round, metric) the
  mean over seeds, half the spread (max - min) / 2, the number of seeds and which.

    python bench/results.py show fl_bbc method=fwdkern metric=accuracy client_round=40
    python bench/results.py show fl_bbc --runs method=fwdkern metric=accuracy client_round=40
    python bench/results.py show seeded_cpu_2026-11-22.json "name=test_seeded[axpy-1048576-16-cpu]"
    python bench/results.py show trainer_cpu/results.json "path=runs.*"
    python bench/results.py collect fl_causal_lm_explore --phase explore --commit 09cd0e5+ RUN_DIR ...
    python bench/results.py collect fl_word_order_sample --merge RUN_DIR   # add runs to a committed suite

`show` prints the summary rows (or with --runs the per-run rows) matching every key=value filter;
for a pytest-benchmark JSON file it prints one row per benchmark (name, parameters, median,
extra_info), for any other JSON result one row per value (its key path). A filter value matches a
column exactly, or as a prefix when it ends in '*'.

`collect` turns run folders of `fwdkern train` (metrics.jsonl + summary.json) into a suite's runs.csv and
summary.csv: each run's label is its folder name (its parent's for a seedN folder), its setting the config
values that differ between the runs, its seed the config's; --commit names the code a run's provenance
lacks (a run from a working tree).
"""
from __future__ import annotations

import csv
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")

RUN_FIELDS = ["suite", "phase", "method", "setting", "seed", "client_round", "metric", "value", "commit", "torch",
              "device", "threads", "date", "load"]
SUMMARY_FIELDS = ["suite", "method", "setting", "client_round", "metric", "mean", "half_spread", "n", "seeds"]
# Per-round fields of metrics.jsonl that the tables keep (evaluations are added as they appear).
ROUND_METRICS = ("loss", "bytes_up_per_client", "bytes_down_per_client", "bytes_down_max", "cpu_time_s",
                 "forward_passes_per_client", "tangents_per_client", "head_projections_per_client", "guard_delta",
                 "guard_scale")
EVAL_METRICS = ("accuracy", "val_accuracy", "eval_loss", "val_eval_loss", "perplexity", "val_perplexity")


def run_rows(suite: str, phase: str, method: str, setting: str, seed, run_dir: str, per_round_clients: int,
             extra: dict = None) -> list:
    """The runs.csv rows of one run folder (metrics.jsonl + summary.json): its initial evaluation, every
    round's metrics, and run-level values (CPU s per client round, download distribution, `extra`)."""
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    prov = summary.get("provenance", {})
    base = dict(suite=suite, phase=phase, method=method, setting=setting, seed=seed, commit=prov.get("commit"),
                torch=prov.get("torch"), device=prov.get("device"), threads=prov.get("threads"),
                date=prov.get("date"), load=prov.get("load"))
    out = [dict(base, client_round=0, metric=k, value=v) for k, v in summary.get("initial", {}).items()]
    for i, r in enumerate(rows, 1):
        for k in ROUND_METRICS + EVAL_METRICS:
            if r.get(k) is not None:
                out.append(dict(base, client_round=i, metric=k, value=r[k]))
    n = max(1, len(rows))
    run_level = {"client_rounds": len(rows), "steps": summary.get("rounds"),
                 "cpu_s_per_client_round": summary.get("cpu_time_s", 0) / n / max(1, per_round_clients),
                 "bytes_up_per_client_round": summary.get("mean_bytes_up_per_client")}
    for k, v in (summary.get("bytes_down_per_client") or {}).items():
        run_level[f"bytes_down_{k}"] = v
    run_level.update(extra or {})
    out += [dict(base, client_round="", metric=k, value=v) for k, v in run_level.items() if v is not None]
    return out


def summarize(rows: list) -> list:
    """summary.csv rows: per (method, setting, client round, metric) the mean over seeds and half the spread."""
    groups: dict = {}
    for r in rows:
        if r["phase"] == "sweep":
            continue
        key = (r["suite"], r["method"], r["setting"], r["client_round"], r["metric"])
        groups.setdefault(key, {})[r["seed"]] = float(r["value"])
    out = []
    for (suite, method, setting, rnd, metric), by_seed in groups.items():
        vals = list(by_seed.values())
        out.append(dict(suite=suite, method=method, setting=setting, client_round=rnd, metric=metric,
                        mean=sum(vals) / len(vals), half_spread=(max(vals) - min(vals)) / 2, n=len(vals),
                        seeds=" ".join(str(s) for s in sorted(by_seed))))
    return out


def write(rows: list, folder: str):
    os.makedirs(folder, exist_ok=True)
    for name, fields, data in (("runs.csv", RUN_FIELDS, rows), ("summary.csv", SUMMARY_FIELDS, summarize(rows))):
        with open(os.path.join(folder, name), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            for r in data:
                w.writerow({k: _fmt(r.get(k)) for k in fields})


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v


def read(path: str) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _match(row: dict, filters: dict) -> bool:
    for k, want in filters.items():
        have = str(row.get(k, ""))
        if want.endswith("*") and have.startswith(want[:-1]):
            continue
        if have != want:
            return False
    return True


def _leaves(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, f"{prefix}{k}.")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, f"{prefix}{i}.")
    else:
        yield prefix[:-1], obj


def benchmark_rows(path: str) -> list:
    """One row per pytest-benchmark record (name, parameters, median seconds, extra_info); any other JSON
    result: one row per value (its key path, e.g. runs.0.accuracy)."""
    with open(path) as f:
        data = json.load(f)
    if not (isinstance(data, dict) and "benchmarks" in data):
        return [{"path": p, "value": v} for p, v in _leaves(data)]
    out = []
    for b in data.get("benchmarks", []):
        row = {"name": b.get("name"), "params": json.dumps(b.get("params"), sort_keys=True),
               "median_s": b.get("stats", {}).get("median")}
        row.update({k: v if isinstance(v, (int, float, str)) else json.dumps(v) for k, v in
                    (b.get("extra_info") or {}).items()})
        out.append(row)
    return out


def show(target: str, filters: dict, runs: bool = False) -> list:
    if target.endswith(".json"):
        rows = benchmark_rows(target if os.path.exists(target) else os.path.join(RESULTS, target))
    else:
        folder = target if os.path.isdir(target) else os.path.join(RESULTS, target)
        rows = read(os.path.join(folder, "runs.csv" if runs else "summary.csv"))
    hits = [r for r in rows if _match(r, filters)]
    if hits:
        cols = [c for c in hits[0] if any(h.get(c) not in ("", None) for h in hits)]
        print(" | ".join(cols))
        for h in hits:
            print(" | ".join(str(h.get(c, "")) for c in cols))
    else:
        print(f"no row of {target} matches {filters}")
    return hits


def _label(run_dir: str) -> str:
    """A run folder's label: its name, or its parent's for a seedN folder (fl_compare's METHOD/seedN
    layout: the seeds of one label are summarized together)."""
    d = os.path.normpath(run_dir)
    name = os.path.basename(d)
    return os.path.basename(os.path.dirname(d)) if re.fullmatch(r"seed\d+", name) else name


def collect(suite: str, run_dirs: list, phase: str = "explore", commit: str = None, merge: bool = False) -> list:
    """runs.csv / summary.csv of bench/results/<suite>/ from run folders (see the module's docstring).
    merge: keep the suite's committed rows but those of the (method, seed) pairs collected again (their
    run folders are not committed, so a suite grows one run at a time)."""
    configs = {}
    for d in run_dirs:
        with open(os.path.join(d, "summary.json")) as f:
            configs[d] = json.load(f)["config"]
    keys = sorted({k for c in configs.values() for k in c})
    path = os.path.join(RESULTS, suite, "runs.csv")
    committed = read(path) if merge and os.path.exists(path) else []
    # a field a run's code did not have yet is None there: only values that differ count, and a merged
    # run's setting also names the fields the committed settings name (each read as k=v pairs, the
    # longest key first: "head_lr=" names head_lr, not lr)
    pair = re.compile(r"(?:^|_)(" + "|".join(sorted(map(re.escape, keys), key=len, reverse=True)) + r")=")
    named = {m.group(1) for r in committed for m in pair.finditer(r["setting"])} if keys else set()
    varying = [k for k in keys if k not in ("out", "seed", "rounds", "max_client_rounds") and (k in named or
               len({json.dumps(c.get(k), sort_keys=True) for c in configs.values() if c.get(k) is not None}) > 1)]
    rows = []
    for d, c in configs.items():
        setting = "_".join(f"{k}={c[k]}".replace(" ", "") for k in varying if c.get(k) is not None) or "default"
        got = run_rows(suite, phase, _label(d), setting, c.get("seed", 0), d, c.get("clients_per_round") or 1)
        for r in got:
            r["commit"] = r["commit"] or commit
        rows += got
    if committed:  # one type per field (the committed rows read back as text)
        rows = [{k: str(_fmt(r.get(k))) for k in RUN_FIELDS} for r in rows]
        again = {(r["method"], r["seed"]) for r in rows}
        rows = [r for r in committed if (r["method"], r["seed"]) not in again] + rows
    write(rows, os.path.join(RESULTS, suite))
    return rows


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) >= 3 and argv[0] == "collect":
        opts = {"--phase": "explore", "--commit": None}
        merge = "--merge" in argv
        argv = [a for a in argv if a != "--merge"]
        rest, i = [], 2
        while i < len(argv):
            if argv[i] in opts and i + 1 < len(argv):
                opts[argv[i]] = argv[i + 1]
                i += 2
            else:
                rest.append(argv[i])
                i += 1
        rows = collect(argv[1], rest, opts["--phase"], opts["--commit"], merge)
        print(f"{len(rows)} rows from {len(rest)} runs -> {os.path.join(RESULTS, argv[1])}")
        return 0
    if len(argv) < 2 or argv[0] != "show":
        print(__doc__)
        return 2
    runs = "--runs" in argv
    argv = [a for a in argv if a != "--runs"]
    filters = dict(a.split("=", 1) for a in argv[2:])
    return 0 if show(argv[1], filters, runs) else 1


if __name__ == "__main__":
    sys.exit(main())
