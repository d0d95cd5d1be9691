"""bench/fl_compare.py and bench/results.py: settings are chosen on the validation split, grids grow past an
edge, and the tables (with the targets the README quotes) come from per-run rows with provenance."""
import importlib.util
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name, rel):
    # Load by path: the suite runs from tests/ against the installed package, so bench/ is not importable,
    # and a bench module's own sys.path entry (the repo root) must not leak into other tests.
    saved = list(sys.path)
    try:
        sys.path.insert(0, ROOT)
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, rel))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path[:] = saved
    return mod


_fl = _load("_fl_compare_under_test", os.path.join("bench", "fl_compare.py"))
_results = _load("_results_under_test", os.path.join("bench", "results.py"))


def _write_run(d, evals, final, val=None, cpu=10.0, rounds=4, up=800, down=None):
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        for i in range(rounds):
            row = {"round": i, "loss": 1.0 / (i + 1), "bytes_up_per_client": up, "bytes_down_per_client": 5000,
                   "cpu_time_s": cpu * (i + 1) / rounds}
            row.update(evals.get(i + 1, {}))
            f.write(json.dumps(row) + "\n")
    summary = {"initial": {"accuracy": 0.2}, "final": dict(final, **({"val_accuracy": val} if val is not None else {})),
               "rounds": rounds, "cpu_time_s": cpu, "mean_bytes_up_per_client": up,
               "bytes_down_per_client": down or {"mean": 5000.0, "p95": 8000.0, "first_contact_mean": 100.0},
               "provenance": {"commit": "abc1234", "torch": "2.13.0", "device": "cpu", "threads": 1,
                              "date": "2026-12-06T00:00:00", "load": 1.0}}
    with open(os.path.join(d, "summary.json"), "w") as f:
        json.dump(summary, f)


def test_rows_carry_provenance_and_the_summary_is_the_mean_over_seeds(tmp_path):
    rows = []
    for seed, acc in ((0, 0.9), (1, 0.8)):
        d = str(tmp_path / f"s{seed}")
        _write_run(d, {2: {"accuracy": acc - 0.1}, 4: {"accuracy": acc}}, {"accuracy": acc})
        rows += _results.run_rows("x", "final", "head_only", "head_lr=8.0", seed, d, per_round_clients=10)
    r = [r for r in rows if r["metric"] == "accuracy" and r["client_round"] == 4 and r["seed"] == 0][0]
    assert r["commit"] == "abc1234" and r["device"] == "cpu" and r["value"] == 0.9
    s = {(x["metric"], x["client_round"]): x for x in _results.summarize(rows)}
    acc = s[("accuracy", 4)]
    assert abs(acc["mean"] - 0.85) < 1e-12 and abs(acc["half_spread"] - 0.05) < 1e-12 and acc["n"] == 2
    assert abs(s[("cpu_s_per_client_round", "")]["mean"] - 10.0 / 4 / 10) < 1e-12
    assert s[("bytes_down_p95", "")]["mean"] == 8000.0 and s[("accuracy", 0)]["mean"] == 0.2
    _results.write(rows, str(tmp_path / "table"))
    hits = _results.show(str(tmp_path / "table"), {"method": "head_only", "metric": "accuracy", "client_round": "4"})
    assert len(hits) == 1 and float(hits[0]["mean"]) == 0.85


def test_a_sweep_picks_on_the_validation_split_and_grows_past_an_edge(tmp_path, monkeypatch):
    monkeypatch.setattr(_fl, "RUNS", str(tmp_path))
    suite = _fl.Suite("fl_bbc")
    grids = suite.grids()
    # test accuracy would pick head_lr 32; the validation split picks 8
    for lr, test, val in ((2.0, 0.80, 0.85), (8.0, 0.85, 0.90), (32.0, 0.95, 0.86)):
        _write_run(suite.sweep_dir("head_only", {"head_lr": lr}), {}, {"accuracy": test}, val=val)
    assert suite.best("head_only", grids) == {"head_lr": 8.0}
    assert not suite.extend("head_only", grids)  # the pick is inside the grid
    _write_run(suite.sweep_dir("head_only", {"head_lr": 32.0}), {}, {"accuracy": 0.95}, val=0.95)
    assert suite.best("head_only", grids) == {"head_lr": 32.0}
    assert suite.extend("head_only", grids) and grids["head_only"]["head_lr"] == [2.0, 8.0, 32.0, 128.0]


def test_targets_from_the_summary_rows():
    def row(method, metric, rnd, mean, spread=0.0, n=2):
        return dict(suite="s", method=method, setting="", client_round=rnd, metric=metric, mean=mean,
                    half_spread=spread, n=n, seeds="0 1")

    cls = [row("default", "accuracy", 0, 0.5), row("default", "accuracy", 40, 0.93, 0.01),
           row("head_only", "accuracy", 40, 0.85, 0.02), row("backprop", "accuracy", 40, 0.95),
           row("backprop_fedadam", "accuracy", 40, 0.91)]
    t = {k: v for k, v, _ in _fl.targets("fl_word_order", cls, [40])}
    assert abs(t["default_minus_head_only_at_40"] - 0.08) < 1e-12
    assert abs(t["gap_recovered_at_40"] - 0.8) < 1e-9  # (0.93 - 0.85) / (0.95 - 0.85): the better backprop
    lm = [row("default", "eval_loss", 0, 4.0), row("default", "eval_loss", 12, 3.8), row("backprop", "eval_loss", 12, 3.75),
          row("backprop_fedadam", "eval_loss", 12, 3.9), row("default", "cpu_s_per_client_round", "", 6.0),
          row("backprop", "cpu_s_per_client_round", "", 2.0)]
    t = {k: v for k, v, _ in _fl.targets("fl_causal_lm", lm, [12])}
    assert abs(t["loss_drop_ratio_at_12"] - 0.2 / 0.25) < 1e-9 and abs(t["cpu_ratio_to_backprop"] - 3.0) < 1e-12
    # MeZO at equal forward passes: 12 rounds x 8 = 96 passes; the default (17 per round) fits 4 rounds (68),
    # not 8 (136), so its round-4 drop (0.05) is set against MeZO's round-12 drop (0.01)
    lm += [row("mezo", "eval_loss", 12, 3.99), row("default", "eval_loss", 4, 3.95), row("default", "eval_loss", 8, 3.9)]
    lm += [row("mezo", "forward_passes_per_client", r, 8) for r in range(1, 13)]
    lm += [row("default", "forward_passes_per_client", r, 17) for r in range(1, 13)]
    t = {k: v for k, v, _ in _fl.targets("fl_causal_lm", lm, [12])}
    assert abs(t["drop_vs_mezo_at_equal_passes"] - 0.05 / 0.01) < 1e-6


def test_collect_labels_runs_by_folder_and_setting_by_what_differs(tmp_path, monkeypatch):
    # Ad-hoc run folders become a suite's tables: the label is the folder, the setting only the config values
    # that differ (a field one run's code lacked, None there, does not count), and --commit fills provenance.
    monkeypatch.setattr(_results, "RESULTS", str(tmp_path / "results"))
    for name, lr, extra in (("a", 0.1, {}), ("b", 0.3, {"guard": "on"})):
        d = str(tmp_path / name)
        _write_run(d, {4: {"accuracy": 0.5 + lr}}, {"accuracy": 0.5 + lr})
        with open(os.path.join(d, "summary.json")) as f:
            s = json.load(f)
        s["config"] = dict({"lr": lr, "seed": 0, "clients_per_round": 5, "out": d, "guard": None}, **extra)
        s["provenance"]["commit"] = None
        with open(os.path.join(d, "summary.json"), "w") as f:
            json.dump(s, f)
    rows = _results.collect("explore", [str(tmp_path / "a"), str(tmp_path / "b")], commit="wt")
    acc = {r["method"]: r for r in rows if r["metric"] == "accuracy" and r["client_round"] == 4}
    assert acc["a"]["setting"] == "lr=0.1" and acc["b"]["setting"] == "lr=0.3"  # guard: on or absent
    assert acc["a"]["commit"] == "wt" and acc["b"]["value"] == 0.8
    cpu = [r for r in rows if r["method"] == "a" and r["metric"] == "cpu_s_per_client_round"][0]
    assert abs(cpu["value"] - 10.0 / 4 / 5) < 1e-12
    hits = _results.show("explore", {"method": "b", "metric": "accuracy", "client_round": "4"})
    assert len(hits) == 1 and float(hits[0]["mean"]) == 0.8


def test_collect_summarizes_seed_folders_under_their_parent(tmp_path, monkeypatch):
    # fl_compare's METHOD/seedN layout: both seeds carry the label METHOD and are summarized together.
    monkeypatch.setattr(_results, "RESULTS", str(tmp_path / "results"))
    dirs = []
    for seed in (0, 1):
        d = str(tmp_path / "k48" / f"seed{seed}")
        _write_run(d, {4: {"accuracy": 0.5 + seed / 10}}, {"accuracy": 0.5 + seed / 10})
        with open(os.path.join(d, "summary.json")) as f:
            s = json.load(f)
        s["config"] = {"perturbations": 48, "seed": seed, "clients_per_round": 5, "out": d}
        with open(os.path.join(d, "summary.json"), "w") as f:
            json.dump(s, f)
        dirs.append(d)
    rows = _results.collect("explore", dirs)
    assert {r["method"] for r in rows} == {"k48"} and {r["seed"] for r in rows} == {0, 1}
    hits = _results.show("explore", {"method": "k48", "metric": "accuracy", "client_round": "4"})
    assert len(hits) == 1 and hits[0]["n"] == "2" and abs(float(hits[0]["mean"]) - 0.55) < 1e-9


def test_collect_merge_adds_a_run_beside_the_committed_rows_and_replaces_one_collected_again(tmp_path, monkeypatch):
    # A suite's run folders are not committed: --merge keeps the committed rows, names the new run's setting
    # by the fields the committed settings name (one run alone varies in nothing), and replaces the rows of
    # a (method, seed) collected again instead of doubling them in the summary.
    monkeypatch.setattr(_results, "RESULTS", str(tmp_path / "results"))

    def run(name, lr, acc):
        d = str(tmp_path / name)
        _write_run(d, {4: {"accuracy": acc}}, {"accuracy": acc})
        with open(os.path.join(d, "summary.json")) as f:
            s = json.load(f)
        s["config"] = {"lr": lr, "guard": "off", "seed": 0, "clients_per_round": 5, "out": d}
        with open(os.path.join(d, "summary.json"), "w") as f:
            json.dump(s, f)
        return d

    _results.collect("explore", [run("a", 0.01, 0.6), run("b", 0.03, 0.7)])
    _results.collect("explore", [run("c", 0.1, 0.4)], merge=True)
    hits = {r["method"]: r for r in _results.show("explore", {"metric": "accuracy", "client_round": "4"})}
    assert set(hits) == {"a", "b", "c"} and hits["c"]["setting"] == "lr=0.1" and float(hits["a"]["mean"]) == 0.6
    _results.collect("explore", [run("a", 0.01, 0.65)], merge=True)
    hits = {r["method"]: r for r in _results.show("explore", {"metric": "accuracy", "client_round": "4"})}
    assert float(hits["a"]["mean"]) == 0.65 and float(hits["b"]["mean"]) == 0.7
    assert len(_results.show("explore", {"method": "a", "metric": "accuracy", "client_round": "4"}, True)) == 1


def test_collect_merge_reads_committed_settings_by_whole_keys(tmp_path, monkeypatch):
    # "head_lr=0.1" names head_lr, not lr: a merged run's setting names only the committed settings' keys.
    monkeypatch.setattr(_results, "RESULTS", str(tmp_path / "results"))
    dirs = []
    for name, head_lr in (("a", 0.1), ("b", 0.3), ("c", 0.5)):
        d = str(tmp_path / name)
        _write_run(d, {4: {"accuracy": 0.5}}, {"accuracy": 0.5})
        with open(os.path.join(d, "summary.json")) as f:
            s = json.load(f)
        s["config"] = {"head_lr": head_lr, "lr": 1.0, "seed": 0, "clients_per_round": 5, "out": d}
        with open(os.path.join(d, "summary.json"), "w") as f:
            json.dump(s, f)
        dirs.append(d)
    _results.collect("explore", dirs[:2])
    rows = _results.collect("explore", dirs[2:], merge=True)
    assert {r["setting"] for r in rows if r["method"] == "c"} == {"head_lr=0.5"}
