"""Runs under faults: bounded failed rounds, one run per --out, and kill -9 at random points
(inside checkpoint and metrics writes included) with every resume equal to an uninterrupted run."""
import json
import os
import random
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("transformers")

import fwdkern  # noqa: E402
from fwdkern.fl.checkpoint import RunLock, RunLocked, load_checkpoint  # noqa: E402
from fwdkern.fl.config import RunConfig  # noqa: E402
from fwdkern.fl.simulation import RunFailed, Simulation, build  # noqa: E402
from _tiny_models import save_tiny_bert, sentiment_rows, write_csv  # noqa: E402

WORDS = ["good", "great", "fine", "bad", "awful", "poor"] + [f"w{i}" for i in range(20)]
TIMING = ("wall_time_s", "cpu_time_s", "provenance")  # when and where a run ran, not what it computed


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = save_tiny_bert(tmp_path_factory.mktemp("tiny_faults"), WORDS, layers=1, max_positions=32)
    write_csv(d / "data.csv", ["sentence", "sentiment"], sentiment_rows(WORDS, 80))
    return d


def _cfg(tiny, out, **kw):
    base = dict(model=str(tiny), data=str(tiny / "data.csv"), text_column="sentence", label_column="sentiment",
                out=str(out), clients=6, clients_per_round=3, rounds=6, perturbations=3, lr=0.05, max_length=10,
                eval_every=2, checkpoint_every=1, max_test=16, pacing="off", num_threads=1)
    base.update(kw)
    return RunConfig(**base)


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _rows(out):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in open(os.path.join(out, "metrics.jsonl"))]


def test_run_stops_after_consecutive_failed_rounds(tiny, tmp_path, monkeypatch):
    cfg = _cfg(tiny, tmp_path / "dead", rounds=50, max_failed_rounds=4)
    sim = build(cfg, log=lambda *a: None)
    calls = {"n": 0}
    orig = Simulation._local_exchange

    def exchange(self, plans, downloads):
        calls["n"] += 1
        return orig(self, plans, downloads) if calls["n"] <= 2 else []  # two good rounds, then every client is gone

    monkeypatch.setattr(Simulation, "_local_exchange", exchange)
    with pytest.raises(RunFailed, match="4 consecutive rounds without a valid update"):
        sim.run()
    rows = _rows(tmp_path / "dead")
    assert len(rows) == 6 and [r["stepped"] for r in rows] == [True, True] + [False] * 4
    state = load_checkpoint(tmp_path / "dead" / "checkpoint.safetensors")  # state intact on disk
    assert state["server"]["model_version"] == 2 and len(state["metrics"]) == 6


def test_rejected_updates_count_as_failed_rounds(tiny, tmp_path, monkeypatch):
    cfg = _cfg(tiny, tmp_path / "nan", rounds=50, max_failed_rounds=3)
    sim = build(cfg, log=lambda *a: None)
    monkeypatch.setattr(Simulation, "_local_exchange", lambda self, plans, downloads: [b"garbage"] * len(plans))
    with pytest.raises(RunFailed):
        sim.run()
    assert sim.server.model_version == 0 and sim.server.rejected_total == 9


def test_two_runs_on_one_out_are_refused(tiny, tmp_path):
    cfg = _cfg(tiny, tmp_path / "busy", rounds=1)
    sim = build(cfg, log=lambda *a: None)
    with RunLock(cfg.out):  # another process (here: this one) holds the folder
        with pytest.raises(RunLocked):
            sim.run()
    sim.run()
    assert not os.path.exists(os.path.join(cfg.out, "metrics.jsonl.tmp"))


def test_finished_run_can_be_extended(tiny, tmp_path):
    build(_cfg(tiny, tmp_path / "ext", rounds=3), log=lambda *a: None).run()
    logs = []
    summary = build(_cfg(tiny, tmp_path / "ext", rounds=5), log=logs.append).run()
    assert summary["rounds"] == 5 and any("resumed" in m for m in logs)
    full = build(_cfg(tiny, tmp_path / "full", rounds=5), log=lambda *a: None).run()
    ext, ref = _rows(tmp_path / "ext"), _rows(tmp_path / "full")
    ext[2].pop("accuracy")  # the 3-round run evaluated its last round
    assert ext[:3] == ref[:3] and [r["round"] for r in ext] == [r["round"] for r in ref]
    assert full["rounds"] == 5
    with pytest.raises(ValueError, match=r"different configuration \(lr 0.05 -> 0.5\)"):
        build(_cfg(tiny, tmp_path / "ext", rounds=5, lr=0.5), log=lambda *a: None).run()


def test_final_round_is_always_evaluated(tiny, tmp_path):
    build(_cfg(tiny, tmp_path / "ev", rounds=3, eval_every=2), log=lambda *a: None).run()
    rows = _rows(tmp_path / "ev")
    assert "accuracy" in rows[-1] and rows[-1]["round"] == 2


def test_final_evaluation_reuses_the_last_rounds(tiny, tmp_path, monkeypatch):
    # eval_every divides the run: the last round's evaluation is the final one, the test set runs once
    from fwdkern.fl import simulation

    sim = build(_cfg(tiny, tmp_path / "once", rounds=4, eval_every=2), log=lambda *a: None)
    calls, evaluate = [], simulation.evaluate
    monkeypatch.setattr(simulation, "evaluate",
                        lambda task, data: calls.append(sim.server.model_version) or evaluate(task, data))
    summary = sim.run()
    assert calls == [0, 2, 4], calls
    assert summary["final"] == {"accuracy": _rows(tmp_path / "once")[-1]["accuracy"]}


_CHILD = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests!r})
    from fwdkern.fl.config import RunConfig
    from fwdkern.fl.simulation import build
    build(RunConfig(**json.loads(sys.argv[1])), log=lambda *a: None).run()
""")


@pytest.mark.parametrize("optimizer", ["sgd", "fedadam"])
def test_kill_minus_nine_anywhere_resumes_bit_identically(tiny, tmp_path, optimizer):
    """Processes killed with SIGKILL at random failpoints (mid checkpoint write, before its rename,
    mid metrics row) and at random times; resumed until done, the run's every metric (bytes down
    and the final evaluation included; timings excepted) and its weights equal an uninterrupted run."""
    extra = dict(optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 0.02, dropout=0.2)
    ref = build(_cfg(tiny, tmp_path / "ref", **extra), log=lambda *a: None)
    ref.run()
    cfg = _cfg(tiny, tmp_path / "killed", **extra)
    rng = random.Random(1234 if optimizer == "sgd" else 99)
    child = _CHILD.format(tests=os.path.dirname(__file__))
    env_base = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                    PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(fwdkern.__file__)))]
                                               + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    points = ["mid-write", "before-rename", "metrics-row"]
    kills = 0
    for attempt in range(40):
        if os.path.exists(os.path.join(cfg.out, "summary.json")):
            break
        env = dict(env_base)
        if attempt < 5:  # failpoints first, then let it finish
            env["FWDKERN_FAILPOINT"] = f"{rng.choice(points)}@{rng.randint(1, 4)}"
        p = subprocess.run([sys.executable, "-c", child, json.dumps(cfg.to_json())], env=env, capture_output=True,
                           timeout=120)
        if p.returncode == -9:
            kills += 1
        else:
            assert p.returncode == 0, p.stderr.decode()[-2000:]
    assert kills >= 3
    assert _rows(cfg.out) == _rows(ref.cfg.out)
    got = load_checkpoint(os.path.join(cfg.out, "checkpoint.safetensors"))["server"]["params"]
    assert all(torch.equal(got[n], t) for n, t in ref.server.params.items())
    a = json.load(open(os.path.join(cfg.out, "summary.json")))
    b = json.load(open(os.path.join(ref.cfg.out, "summary.json")))
    for s in (a, b):
        s["config"].pop("out")
    assert {k: v for k, v in a.items() if k not in TIMING} == {k: v for k, v in b.items() if k not in TIMING}
