"""IA3, BitFit and bottleneck adapters in the dual engine: jvp equals autograd's directional
derivative on tiny families; IA3 round-trips with peft; every method saves and loads."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import fwdkern  # noqa: E402
from fwdkern.nn import BottleneckAdapter, IA3Linear  # noqa: E402
from test_engine import CLS, _batch, _check, _model, _randomize, _reference  # noqa: E402

pytest.importorskip("transformers")
FAMILIES = ["bert", "distilbert", "gpt2", "llama"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("peft", ["ia3", "bitfit", "adapter"])
def test_jvp_matches_autograd(family, peft):
    if peft == "bitfit" and family == "llama":  # LLaMA has no biases
        with pytest.raises(ValueError, match="no bias"):
            fwdkern.patch(_model(family), peft=peft)
        return
    model = fwdkern.patch(_model(family), peft=peft)
    layer = {"ia3": IA3Linear, "adapter": BottleneckAdapter}.get(peft)
    if layer is not None:
        assert any(isinstance(m, layer) for m in model.modules())
    _randomize(model)
    batch = _batch(family)
    loss, jv = fwdkern.jvp(model, batch, 11, [0, 1, 2])
    ref_loss, ref = _reference(model, family, batch, 11, [0, 1, 2])
    assert torch.allclose(loss, ref_loss.float(), rtol=1e-5, atol=1e-6)
    _check(jv, ref)
    # a subset of the tensors (SPRY-style): the others get zero tangent
    names = [n for n, _, _ in fwdkern.trainable(model)][:2]
    _, jv_sub = fwdkern.jvp(model, batch, 11, [0], params=names)
    _check(jv_sub, _reference(model, family, batch, 11, [0], params=names)[1])


def test_adapter_perturbations_are_the_seeded_stream():
    """The bottleneck matrices' tangents come from seeded_matmul: equal to materialized perturbations."""
    model = fwdkern.patch(_model("bert"), peft="adapter", reduction=8)
    _randomize(model)
    names = [n for n, _, _ in fwdkern.trainable(model) if "adapter_" in n and n.endswith("weight")]
    batch = _batch("bert")
    _, jv = fwdkern.jvp(model, batch, 5, [3, 4], dist="gaussian", params=names)
    _check(jv, _reference(model, "bert", batch, 5, [3, 4], dist="gaussian", params=names)[1])


def test_ia3_round_trips_with_peft(tmp_path):
    peft = pytest.importorskip("peft")
    model = fwdkern.patch(_model("bert"), peft="ia3")
    _randomize(model)
    batch = _batch("bert")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        ours = model(**inputs).logits
    fwdkern.save_adapter(model, str(tmp_path))
    pm = peft.PeftModel.from_pretrained(_model("bert"), str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.allclose(pm(**inputs).logits, ours, atol=1e-5, rtol=1e-5)
    fresh = fwdkern.load_adapter(_model("bert"), str(tmp_path))
    with torch.no_grad():
        assert torch.allclose(fresh(**inputs).logits, ours, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("peft", ["bitfit", "adapter"])
def test_other_methods_save_and_load(peft, tmp_path):
    model = fwdkern.patch(_model("gpt2"), peft=peft)
    _randomize(model)
    ids = _batch("gpt2")["input_ids"]
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    fwdkern.save_adapter(model, str(tmp_path))
    fresh = fwdkern.load_adapter(_model("gpt2"), str(tmp_path))
    with torch.no_grad():
        assert torch.allclose(fresh(input_ids=ids).logits, ours, atol=1e-6, rtol=1e-5)


def test_adapter_starts_as_identity_and_bad_peft_is_refused():
    base = _model("bert")
    batch = _batch("bert")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        before = base(**inputs).logits.clone()
        model = fwdkern.patch(base, peft="adapter", modules_to_save=[])
        assert torch.allclose(model(**inputs).logits, before, atol=1e-6)
    with pytest.raises(ValueError, match="peft"):
        fwdkern.patch(_model("bert"), peft="prefix")
