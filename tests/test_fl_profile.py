"""The PEFT profiler on a tiny model: measured cosines follow sqrt(K / (K + d)), one recommendation."""
import json

import pytest

pytest.importorskip("transformers")

from fwdkern import cli  # noqa: E402
from _tiny_models import save_tiny_bert, sentiment_rows, write_csv  # noqa: E402

WORDS = ["good", "great", "fine", "bad", "awful", "poor"] + [f"w{i}" for i in range(20)]


def test_profile_reports_and_recommends(tmp_path, capsys):
    d = save_tiny_bert(tmp_path, WORDS, initializer_range=0.1)
    write_csv(d / "data.csv", ["sentence", "sentiment"], sentiment_rows(WORDS, 60))
    out = tmp_path / "profile.json"
    rc = cli.main(["profile", "--model", str(d), "--data", str(d / "data.csv"), "--text-column", "sentence",
                   "--label-column", "sentiment", "--max-length", "12", "--perturbations", "32", "--out", str(out)])
    assert rc == 0
    rep = json.load(open(out))
    names = [r["name"] for r in rep["candidates"]]
    assert rep["recommended"] in names and len(names) == 6 and rep["head_trained_exactly"]
    for r in rep["candidates"]:
        assert r["d_body"] < r["d"] and r["step_cpu_s"] > 0
        # the measured cosine of the body estimate is the theory's within the draws' noise
        assert abs(r["cosine_body"] - r["expected_cosine_body"]) < 0.15, r
    assert "recommended:" in capsys.readouterr().out
