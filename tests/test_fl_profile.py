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


@pytest.mark.parametrize("scope", ["batch", "sample"])
def test_profile_estimate_points_at_the_true_gradient_when_tangents_outnumber_the_values(tmp_path, scope):
    """With many more tangents than body values the estimate's cosine with the autograd gradient nears 1
    in both tangent scopes: the sample-scoped derivatives (each of one sample's share of the batch loss,
    as a client computes them) add up to the batch gradient's direction, not a reweighted one."""
    from fwdkern.fl.config import RunConfig
    from fwdkern.fl.profile import profile

    d = save_tiny_bert(tmp_path, WORDS, initializer_range=0.1)
    write_csv(d / "data.csv", ["sentence", "sentiment"], sentiment_rows(WORDS, 60))
    cfg = RunConfig(model=str(d), data=str(d / "data.csv"), text_column="sentence", label_column="sentiment",
                    max_length=12, batch_size=4, clients=2, clients_per_round=1).validate()
    rep = profile(cfg, perturbations=16384, batches=1, repeats=1, log=lambda s: None, tangent_scope=scope,
                  candidates=[dict(name="lora r=1 last layer", peft="lora", r=1, placement="last")])
    (row,) = rep["candidates"]
    assert rep["tangent_scope"] == scope and row["d_body"] <= 256, row
    assert row["cosine_body"] > 0.95, row
    with pytest.raises(ValueError, match="tangent_scope"):
        profile(cfg, tangent_scope="token")
