"""The engine with the models and inputs users bring: tied weights, hand-inserted LoRALinear, models
that are not Hugging Face classes, BatchEncoding batches, ignored labels, strict adapter loading,
and a model never left perturbed."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import fwdkern  # noqa: E402
from test_engine import _batch, _check, _model, _randomize, _reference  # noqa: E402

transformers = pytest.importorskip("transformers")


def _directional(model, loss_fn, seed, ks):
    """Autograd ∇L · v_k over fwdkern.trainable (materialized perturbations)."""
    tr = fwdkern.trainable(model)
    for _, _, p in tr:
        p.grad = None
    loss = loss_fn()
    loss.backward()
    out = []
    for k in ks:
        s = torch.zeros((), dtype=torch.float64)
        for _, pid, p in tr:
            s += (p.grad.double() * fwdkern.perturbation(p.shape, seed, pid, k).double()).sum()
        out.append(s)
    return torch.stack(out)


class TiedForSequenceClassification(nn.Module):
    """A head tied to another trainable layer: logits = W (tanh(W^T-free features)) with W shared."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 6)
        self.proj = nn.Linear(6, 6)
        self.classifier = nn.Linear(6, 6, bias=False)
        self.proj.weight = self.classifier.weight  # tied, both trainable

    def forward(self, input_ids, labels=None):
        h = self.emb(input_ids).mean(1)
        return self.classifier(torch.tanh(self.proj(h)))


def test_tied_trainable_weights_get_exact_tangents():
    model = fwdkern.patch(TiedForSequenceClassification(), target_modules=["proj"], modules_to_save=["classifier"])
    _randomize(model)
    batch = {"input_ids": torch.randint(0, 20, (4, 5)), "labels": torch.tensor([0, 1, 2, 3])}
    _, jv = fwdkern.jvp(model, batch, 7, [0, 1, 2])
    ref = _directional(model, lambda: F.cross_entropy(model(batch["input_ids"]), batch["labels"]), 7, [0, 1, 2])
    _check(jv, ref)
    assert model.proj.base_layer.weight is model.classifier.weight  # the tie survives the dual forward


class TinyNet(nn.Module):
    """Not a transformers class: returns a logits tensor."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.emb = nn.Embedding(30, 8)
        self.fc = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask=None):
        return self.out(torch.relu(self.fc(self.emb(input_ids).mean(1))))


def test_hand_inserted_lora_linear_works_without_patch(tmp_path):
    net = TinyNet()
    net.fc = fwdkern.LoRALinear.from_linear(net.fc, r=2, alpha=4)
    with torch.no_grad():
        net.fc.lora_B.weight.normal_()
    names = [n for n, _, _ in fwdkern.trainable(net)]
    assert names == ["fc.lora_A.weight", "fc.lora_B.weight"]  # the adapter only, not the user's other layers
    batch = {"input_ids": torch.randint(0, 30, (5, 4)), "labels": torch.tensor([0, 1, 2, 1, 0])}
    loss, jv = fwdkern.jvp(net, batch, 3, [0, 1], loss="classification")
    ref = _directional(net, lambda: F.cross_entropy(net(batch["input_ids"]), batch["labels"]), 3, [0, 1])
    _check(jv, ref)
    fwdkern.save_adapter(net, str(tmp_path))
    other = TinyNet()
    other.fc = fwdkern.LoRALinear.from_linear(other.fc, r=2, alpha=4)
    fwdkern.load_adapter(other, str(tmp_path))
    assert torch.equal(other.fc.lora_B.weight, net.fc.lora_B.weight)


def test_patch_keeps_already_wrapped_layers():
    model = _model("bert")
    layer = model.bert.encoder.layer[0].attention.self
    layer.query = fwdkern.LoRALinear.from_linear(layer.query, r=2, alpha=4)
    wrapped = layer.query
    model = fwdkern.patch(model, r=4, target_modules=["query", "value"])
    assert model.bert.encoder.layer[0].attention.self.query is wrapped and wrapped.r == 2
    assert isinstance(model.bert.encoder.layer[1].attention.self.query, fwdkern.LoRALinear)
    _randomize(model)
    batch = _batch("bert")
    _, jv = fwdkern.jvp(model, batch, 1, [0, 1])
    _check(jv, _reference(model, "bert", batch, 1, [0, 1])[1])


def test_batch_encoding_is_a_batch(tmp_path):
    from transformers import BatchEncoding

    model = fwdkern.patch(_model("bert"))
    _randomize(model)
    batch = _batch("bert")
    l1, j1 = fwdkern.jvp(model, batch, 2, [0, 1])
    l2, j2 = fwdkern.jvp(model, BatchEncoding(batch), 2, [0, 1])
    assert torch.equal(l1, l2) and torch.equal(j1, j2)
    with pytest.raises(TypeError, match="BatchEncoding"):
        fwdkern.jvp(model, [batch["input_ids"]], 2, [0])


def test_ignored_labels_and_bad_labels():
    model = fwdkern.patch(_model("bert"))
    _randomize(model)
    batch = _batch("bert")
    batch["labels"] = torch.tensor([0, -100, 1])
    loss, jv = fwdkern.jvp(model, batch, 4, [0, 1])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    ref = _directional(model, lambda: F.cross_entropy(model(**inputs).logits, batch["labels"], ignore_index=-100),
                       4, [0, 1])
    _check(jv, ref)
    for labels, msg in ((torch.tensor([0, 7, 1]), "outside"), (torch.tensor([-100] * 3), "every label"),
                        (torch.tensor([0.0, 1.0, 2.0]), "integer")):
        batch["labels"] = labels
        with pytest.raises((ValueError, TypeError), match=msg):
            fwdkern.jvp(model, batch, 4, [0])


def test_perturbed_loss_restores_the_model_on_errors():
    model = fwdkern.patch(_model("bert"))
    _randomize(model)
    before = {n: p.clone() for n, _, p in fwdkern.trainable(model)}
    batch = _batch("bert")
    batch["labels"] = torch.tensor([0, 9, 1])  # a bad label: raises inside the perturbed forward
    with pytest.raises(ValueError, match="outside"):
        fwdkern.perturbed_loss(model, batch, 0, [0, 1], 1e-2)
    assert all(torch.equal(before[n], p) for n, _, p in fwdkern.trainable(model))

    class Interrupt(BaseException):
        pass

    calls = {"n": 0}
    orig = model.bert.forward

    def interrupted(*a, **kw):  # Ctrl-C in the middle of the second perturbed forward
        calls["n"] += 1
        if calls["n"] == 2:
            raise Interrupt
        return orig(*a, **kw)

    model.bert.forward = interrupted
    with pytest.raises(Interrupt):
        fwdkern.perturbed_loss(model, _batch("bert"), 0, [0, 1], 1e-2)
    del model.bert.forward
    assert all(torch.equal(before[n], p) for n, _, p in fwdkern.trainable(model))


def _adapter_dir(tmp_path, r=4):
    model = fwdkern.patch(_model("bert"), r=r, alpha=8)
    _randomize(model)
    fwdkern.save_adapter(model, str(tmp_path))
    return model


def test_load_adapter_is_strict_and_writes_nothing_on_error(tmp_path):
    from safetensors.torch import load_file, save_file

    _adapter_dir(tmp_path / "r1", r=1)
    target = fwdkern.patch(_model("bert"), r=8, alpha=16)
    _randomize(target, seed=3)
    before = {k: v.clone() for k, v in target.state_dict().items()}

    def unchanged():
        return all(torch.equal(before[k], v) for k, v in target.state_dict().items())

    with pytest.raises(ValueError, match="shape"):  # an r=1 adapter into an r=8 model
        fwdkern.load_adapter(target, str(tmp_path / "r1"))
    assert unchanged()
    src = tmp_path / "r8"
    _adapter_dir(src, r=8)
    sd = load_file(str(src / "adapter_model.safetensors"))
    cases = {
        "partial": {k: v for i, (k, v) in enumerate(sorted(sd.items())) if i == 0},
        "base": dict(sd, **{"base_model.model.bert.embeddings.word_embeddings.weight": torch.zeros(100, 32)}),
        "unknown": dict(sd, **{"base_model.model.nope.weight": torch.zeros(1)}),
    }
    for name, tensors in cases.items():
        d = tmp_path / name
        d.mkdir()
        (d / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
        save_file(tensors, str(d / "adapter_model.safetensors"))
        with pytest.raises(ValueError, match="does not fit"):
            fwdkern.load_adapter(target, str(d))
        assert unchanged(), name
    fwdkern.load_adapter(target, str(src))  # the matching one loads
    assert not unchanged()


def test_default_targets_come_from_peft():
    pytest.importorskip("peft")
    assert fwdkern.default_targets("gemma3_text") == ["q_proj", "v_proj"]
    assert fwdkern.default_targets("gemma3") == ["q_proj", "v_proj"]
    assert fwdkern.default_targets("distilbert") == ["q_lin", "v_lin"]
    cfg = transformers.Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                        max_position_embeddings=32)
    torch.manual_seed(0)
    model = fwdkern.patch(transformers.Gemma3ForCausalLM(cfg).eval())
    assert any(n.endswith("q_proj.lora_A.weight") for n, _, _ in fwdkern.trainable(model))
    batch = {"input_ids": torch.randint(0, 64, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    _randomize(model)
    _, jv = fwdkern.jvp(model, batch, 0, [0, 1])
    assert torch.isfinite(jv).all()
    with pytest.raises(ValueError, match="no default for model_type"):
        fwdkern.default_targets("made-up")
