"""The saved run's layout version: older layouts migrate with a notice (keeping their own meaning),
newer ones and foreign files are refused with one line naming what to do, nothing is passed over."""
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from fwdkern.fl.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from fwdkern.fl.config import RunConfig  # noqa: E402
from fwdkern.fl.runstate import LAYOUT, LayoutError  # noqa: E402
from fwdkern.fl.simulation import build  # noqa: E402
from _tiny_models import save_tiny_bert, sentiment_rows, write_csv  # noqa: E402

WORDS = ["good", "great", "fine", "bad", "awful", "poor"] + [f"w{i}" for i in range(20)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = save_tiny_bert(tmp_path_factory.mktemp("tiny_runstate"), WORDS, layers=1)
    write_csv(d / "data.csv", ["sentence", "sentiment"], sentiment_rows(WORDS, 80))
    return d


def _cfg(tiny, out, **kw):
    base = dict(model=str(tiny), data=str(tiny / "data.csv"), text_column="sentence", label_column="sentiment",
                out=str(out), clients=4, clients_per_round=2, rounds=2, max_length=12, eval_every=0, max_test=16,
                num_threads=1)
    base.update(kw)
    return RunConfig(**base)


def _saved_run(tiny, out, **kw):
    build(_cfg(tiny, out, **kw), log=lambda *a: None).run()
    return out / "checkpoint.safetensors"


def test_the_saved_state_names_its_layout(tiny, tmp_path):
    assert load_checkpoint(_saved_run(tiny, tmp_path / "run"))["layout"] == LAYOUT


def test_a_layout_1_run_is_migrated_with_its_old_meaning_never_todays_default(tiny, tmp_path):
    """A run saved before --head-calibration existed trained without calibration: migrated, it resumes
    with tau 0 when asked to, and today's default (tau 1) is refused with the difference named."""
    ckpt = _saved_run(tiny, tmp_path / "old", head_calibration=0.0)
    state = load_checkpoint(ckpt)
    del state["layout"], state["config"]["head_calibration"]  # what a fwdkern of that time wrote
    save_checkpoint(ckpt, state)
    logs = []
    with pytest.raises(ValueError, match=r"head_calibration 0\.0 -> 1\.0"):
        build(_cfg(tiny, tmp_path / "old", rounds=3), log=logs.append).run()
    assert any("migrated" in m and "head_calibration=0.0" in m for m in logs), logs
    logs = []
    summary = build(_cfg(tiny, tmp_path / "old", rounds=3, head_calibration=0.0), log=logs.append).run()
    assert summary["rounds"] == 3 and any("resumed" in m for m in logs)
    assert load_checkpoint(ckpt)["layout"] == LAYOUT  # saved again in the current layout


def test_a_newer_layout_is_refused_with_what_to_do(tiny, tmp_path):
    ckpt = _saved_run(tiny, tmp_path / "new")
    state = load_checkpoint(ckpt)
    state["layout"] = LAYOUT + 1
    save_checkpoint(ckpt, state)
    with pytest.raises(LayoutError, match=f"newer fwdkern.*layout {LAYOUT + 1}.*upgrade fwdkern"):
        build(_cfg(tiny, tmp_path / "new", rounds=3), log=lambda *a: None).run()


def test_an_older_pickle_checkpoint_is_never_passed_over(tiny, tmp_path):
    """checkpoint.pt (a torch pickle of an older fwdkern) is not loaded, and a run does not start
    silently beside it: train refuses; the canned demo starts over and says so."""
    out = tmp_path / "pickle"
    out.mkdir()
    torch.save({"step": 3}, out / "checkpoint.pt")
    with pytest.raises(LayoutError, match="checkpoint.pt.*older fwdkern.*move it away"):
        build(_cfg(tiny, out), log=lambda *a: None).run()
    logs = []
    build(_cfg(tiny, out), log=logs.append).run(replace_other_run=True)
    assert any("checkpoint.pt" in m and "fresh run" in m for m in logs)


def test_cli_reports_a_foreign_checkpoint_in_one_line(tiny, tmp_path):
    out = tmp_path / "foreign"
    out.mkdir()
    (out / "checkpoint.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1}      ")
    args = ["--model", str(tiny), "--data", str(tiny / "data.csv"), "--text-column", "sentence", "--label-column",
            "sentiment", "--out", str(out), "--clients", "4", "--clients-per-round", "2", "--rounds", "1",
            "--max-length", "12", "--max-test", "16"]
    p = subprocess.run([sys.executable, "-m", "fwdkern", "train", *args], capture_output=True, text=True,
                       timeout=300)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1 and "corrupt checkpoint" in err[0], p.stderr[-2000:]
