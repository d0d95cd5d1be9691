"""Embedded federated simulation end to end on a tiny random BERT (no downloads)."""
import json
import os

import pytest
import torch

pytest.importorskip("transformers")

from fwdkern.fl.simulation import build  # noqa: E402
from fwdkern.fl.checkpoint import load_checkpoint  # noqa: E402
from fwdkern.fl.config import RunConfig  # noqa: E402
from fwdkern.fl.simulation import Interrupted, Simulation  # noqa: E402
from _tiny_models import save_learnable, save_tiny_bert, sentiment_rows, write_csv  # noqa: E402

WORDS = ["good", "great", "fine", "bad", "awful", "poor"] + [f"w{i}" for i in range(40)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = save_tiny_bert(tmp_path_factory.mktemp("tiny"), WORDS)
    write_csv(d / "data.csv", ["sentence", "sentiment"], sentiment_rows(WORDS, 200))
    return d


def _cfg(tiny, out, **kw):
    base = dict(model=str(tiny), data=str(tiny / "data.csv"), text_column="sentence", label_column="sentiment",
                out=str(out), clients=12, clients_per_round=4, rounds=4, perturbations=4, lr=0.05, max_length=12,
                eval_every=2, checkpoint_every=2, max_test=40, pacing="off")
    base.update(kw)
    return RunConfig(**base)


def _params(sim):
    return {n: t.detach().clone() for n, t in sim.server.params.items()}


def test_run_writes_metrics_and_summary(tiny, tmp_path):
    sim = build(_cfg(tiny, tmp_path / "run", pacing="auto"), log=lambda *a: None)
    summary = sim.run()
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert summary["rounds"] == 4 and len(rows) >= 4
    for key in ("round", "loss", "perturbations", "bytes_up_per_client", "bytes_down_per_client", "wall_time_s"):
        assert all(key in r for r in rows), key
    assert any("accuracy" in r for r in rows) and 0.0 <= summary["final"]["accuracy"] <= 1.0
    # Seeds and scalars only: a few hundred bytes per client per round.
    assert all(0 < r["bytes_up_per_client"] < 1024 for r in rows if r["accepted"])
    assert summary["perturbation_schedule"] and all(k > 0 for k in summary["perturbation_schedule"])
    assert os.path.exists(tmp_path / "run" / "summary.json") and os.path.exists(tmp_path / "run" / "checkpoint.safetensors")


def test_kill_and_resume_is_bit_identical(tiny, tmp_path, monkeypatch):
    full = build(_cfg(tiny, tmp_path / "full"), log=lambda *a: None)
    full.run()
    expected = _params(full)

    calls = {"n": 0}
    orig = Simulation.run_round

    def dying(self):
        calls["n"] += 1
        if calls["n"] == 4:  # killed after the step-2 checkpoint, mid-run
            raise KeyboardInterrupt
        return orig(self)

    monkeypatch.setattr(Simulation, "run_round", dying)
    first = build(_cfg(tiny, tmp_path / "killed"), log=lambda *a: None)
    with pytest.raises(Interrupted, match="rerun the same command to resume"):
        first.run()
    monkeypatch.setattr(Simulation, "run_round", orig)
    resumed = build(_cfg(tiny, tmp_path / "killed"), log=lambda *a: None)
    resumed.run()
    got = _params(resumed)
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    rows = [json.loads(line) for line in open(tmp_path / "killed" / "metrics.jsonl")]
    assert [r["round"] for r in rows] == [json.loads(line)["round"] for line in open(tmp_path / "full" / "metrics.jsonl")]


def test_resume_refuses_a_different_config(tiny, tmp_path):
    build(_cfg(tiny, tmp_path / "r", rounds=2), log=lambda *a: None).run()
    with pytest.raises(ValueError, match="different configuration"):
        build(_cfg(tiny, tmp_path / "r", rounds=2, lr=0.5), log=lambda *a: None).run()


@pytest.mark.parametrize("method", ["mezo", "fwdllm", "backprop"])
def test_baseline_methods_run(tiny, tmp_path, method):
    sim = build(_cfg(tiny, tmp_path / method, rounds=2, eval_every=1, method=method), log=lambda *a: None)
    before = _params(sim)
    summary = sim.run()
    rows = [json.loads(line) for line in open(tmp_path / method / "metrics.jsonl")]
    assert summary["rounds"] == 2
    assert any(not torch.equal(before[n], t) for n, t in _params(sim).items())
    if method == "mezo":
        assert all(r["bytes_up_per_client"] < 1024 for r in rows if r["accepted"])
    else:  # full trainable-size uploads
        assert all(r["bytes_up_per_client"] == 4 * sim.n_trainable for r in rows if r["accepted"])


def test_dropouts_do_not_block(tiny, tmp_path):
    sim = build(_cfg(tiny, tmp_path / "drop", rounds=3, dropout=0.5), log=lambda *a: None)
    summary = sim.run()
    assert summary["rounds"] == 3


@pytest.fixture(scope="module")
def learnable(tmp_path_factory):
    """(The `tiny` fixture's features are near-constant: nothing can learn there.)"""
    return save_learnable(tmp_path_factory.mktemp("learnable"))


def test_accuracy_rises_end_to_end(learnable, tmp_path):
    # Seed-and-scalar forward-gradient training only (no autograd anywhere): 12 clients,
    # 4 per round, 16 perturbations each, FedAdam with cosine decay. Measured (2-core CPU):
    # accuracy 0.56 -> 0.875 after 60 steps, ~10 s.
    cfg = _cfg(learnable, tmp_path / "rise", rounds=60, eval_every=10, checkpoint_every=0, max_test=100,
               batch_size=16, perturbations=16, optimizer="fedadam", lr=0.05, decay="cosine")
    sim = build(cfg, log=lambda *a: None)
    before = sim.evaluate()["accuracy"]
    summary = sim.run()
    accs = [r.evaluation["accuracy"] for r in sim.metrics if r.evaluation]
    after = summary["final"]["accuracy"]
    assert before < 0.65, before  # starts near chance (balanced binary task)
    assert after >= 0.75 and after >= before + 0.2, (before, accs, after)
    losses = [r.loss for r in sim.metrics if r.loss is not None]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10  # training loss falls too


def test_demo_replaces_a_stale_demo_run_but_train_refuses(tiny, tmp_path):
    out = tmp_path / "demo"
    build(_cfg(tiny, out, rounds=2), log=lambda *a: None).run()
    logs = []
    build(_cfg(tiny, out, rounds=2), log=logs.append).run(replace_other_run=True)
    assert any("resumed" in m for m in logs)  # same settings: kept (it resumes)
    other = _cfg(tiny, out, rounds=2, lr=0.5)
    with pytest.raises(ValueError, match="different configuration"):
        build(other, log=lambda *a: None).run()  # train: refuses
    replaced = build(other, log=lambda *a: None)
    replaced.run(replace_other_run=True)  # demo: replaced
    saved = load_checkpoint(out / "checkpoint.safetensors")["config"]
    assert saved == replaced.cfg.to_json() and saved["lr"] == 0.5  # the resolved settings of the new run


def test_validation_metrics_are_recorded_beside_the_test_metrics(tiny, tmp_path):
    sim = build(_cfg(tiny, tmp_path / "val", rounds=2, eval_every=1, validation=0.1), log=lambda *a: None)
    summary = sim.run()
    assert set(summary["final"]) == {"accuracy", "val_accuracy"} and set(summary["initial"]) == set(summary["final"])
    assert all("val_accuracy" in r.evaluation for r in sim.metrics)


def test_keep_freed_memory_is_a_safe_process_setting():
    """glibc takes the malloc settings (True); elsewhere it is a no-op that returns False, never an error."""
    import ctypes.util

    from fwdkern.fl.task import keep_freed_memory

    ok = keep_freed_memory()
    assert isinstance(ok, bool)
    if ctypes.util.find_library("c") and "glibc" in " ".join(__import__("platform").libc_ver()):
        assert ok
