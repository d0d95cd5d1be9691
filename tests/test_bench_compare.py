"""bench/fl_compare.py's target arithmetic: the numbers the README quotes come from it."""
import importlib.util
import os
import sys


def _load_fl_compare():
    # Load by path: the suite runs from tests/ against the installed package, so bench/ is not
    # importable, and fl_compare's own sys.path entry (the repo root) must not leak into other tests.
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "fl_compare.py")
    saved = list(sys.path)
    try:
        spec = importlib.util.spec_from_file_location("_fl_compare_under_test", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path[:] = saved
    return mod


_fl = _load_fl_compare()
_curve, targets = _fl._curve, _fl.targets


def _row(curves, rounds):
    seeds = {s: {"curve": c} for s, c in curves.items()}
    mean = {}
    for k in rounds:
        vals = [next(a for r, _, a in reversed(c) if r <= k) for c in curves.values()]
        mean[str(k)] = {"mean": sum(vals) / len(vals), "n": len(vals), "spread": max(vals) - min(vals)}
    return {"seeds": seeds, "mean_acc": mean}


def test_curve_accumulates_forward_passes_and_keeps_evaluations():
    ms = [{"forward_passes_per_client": 3}, {"forward_passes_per_client": 3, "accuracy": 0.5},
          {"forward_passes_per_client": 3}, {"forward_passes_per_client": 3, "accuracy": 0.7}]
    assert _curve(ms) == [(2, 6, 0.5), (4, 12, 0.7)]


def test_mezo_is_compared_at_an_equal_forward_pass_budget():
    # fwdkern: 3 passes per round, MeZO: 8. MeZO's run ends at 160 passes (20 rounds), so fwdkern is
    # read at its last evaluation within 160 passes (round 50, not its round 80), MeZO at round 20.
    fk = _row({0: [(10, 30, 0.9), (50, 150, 0.94), (80, 240, 0.95)],
               1: [(10, 30, 0.8), (50, 150, 0.92), (80, 240, 0.96)]}, [10, 80])
    mz = _row({0: [(10, 80, 0.3), (20, 160, 0.4)], 1: [(10, 80, 0.2), (20, 160, 0.5)]}, [10, 20])
    t = targets({"fwdkern": fk, "mezo": mz})["fwdkern_minus_mezo_at_equal_forward_passes"]
    assert t["forward_passes_per_client"] == 160 and t["n"] == 2
    assert t["fwdkern"]["client_rounds"] == [50, 50] and t["mezo"]["client_rounds"] == [20, 20]
    assert abs(t["delta"] - (0.93 - 0.45)) < 1e-9


def test_backprop_and_default_targets():
    fk = _row({0: [(40, 120, 0.94), (80, 240, 0.95)]}, [40, 80])
    bp = _row({0: [(40, 360, 0.95), (80, 720, 0.96)]}, [40, 80])
    d = _row({0: [(40, 120, 0.93)]}, [40])
    t = targets({"fwdkern": fk, "backprop": bp, "default": d})
    assert abs(t["fwdkern_minus_backprop_at_40"]["delta"] + 0.01) < 1e-9
    assert abs(t["fwdkern_minus_backprop_at_80"]["delta"] + 0.01) < 1e-9
    assert t["default_over_fwdkern"]["at"] == 40 and abs(t["default_over_fwdkern"]["ratio"] - 0.93 / 0.94) < 1e-3
    assert targets({"backprop": bp}) == {}  # nothing to compare without fwdkern
    # a better tuned variant (here the calibrated head) is the one the default is measured against
    cal = _row({0: [(40, 120, 0.98)]}, [40])
    t = targets({"fwdkern": fk, "fwdkern_calibrated": cal, "default": d})["default_over_fwdkern"]
    assert t["best"] == "fwdkern_calibrated" and abs(t["ratio"] - 0.93 / 0.98) < 1e-3
