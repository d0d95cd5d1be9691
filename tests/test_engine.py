"""Whole-model forward gradients (fwdkern.patch / jvp / perturbed_loss / adapters).

Reference: autograd through the patched model (plain forward), then ``∇L · v_k`` with the
materialized perturbation ``fwdkern.perturbation`` of each trainable tensor.
Tiny randomly initialised configs only (no downloads), default attention (sdpa).
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fwdkern  # noqa: E402
from fwdkern.dual import NoTangentRule  # noqa: E402

transformers = pytest.importorskip("transformers")

V, T, NL = 100, 9, 3
RTOL = 1e-4


def _config(family):
    T_ = transformers
    common = dict(vocab_size=V, max_position_embeddings=64)
    if family == "bert":
        return T_.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                             num_labels=NL, **common)
    if family == "roberta":
        return T_.RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                num_labels=NL, pad_token_id=1, **common)
    if family == "distilbert":
        return T_.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64, num_labels=NL, **common)
    if family == "albert":
        return T_.AlbertConfig(embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, num_labels=NL, **common)
    if family == "gpt2":
        return T_.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, **common)
    return {"llama": T_.LlamaConfig, "qwen2": T_.Qwen2Config, "mistral": T_.MistralConfig}[family](**kw)


CLS = ["bert", "roberta", "distilbert", "albert"]
LM = ["gpt2", "llama", "qwen2", "mistral"]


def _model(family, seed=0):
    torch.manual_seed(seed)
    cfg = _config(family)
    cls = transformers.AutoModelForSequenceClassification if family in CLS else transformers.AutoModelForCausalLM
    return cls.from_config(cfg).eval()


def _randomize(model, seed=1):
    """Non-zero LoRA B (B = 0 would make every A-derivative vanish) and a non-trivial head."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, p in fwdkern.trainable(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _batch(family, left_pad=False):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(2, V, (3, T), generator=g)
    am = torch.ones(3, T, dtype=torch.long)
    if left_pad:
        am[1, :3] = 0
        am[2, :1] = 0
    else:
        am[1, 6:] = 0
        am[2, 8:] = 0
    b = {"input_ids": ids, "attention_mask": am}
    if family in CLS:
        b["labels"] = torch.tensor([0, 2, 1])
    return b


def _autograd_loss(model, family, batch, label_smoothing=0.0):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits.float()
    if family in CLS:
        return F.cross_entropy(logits, batch["labels"], label_smoothing=label_smoothing)
    y = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)[:, 1:]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)


def _reference(model, family, batch, seed, ks, dist="rademacher", params=None, label_smoothing=0.0):
    model.zero_grad(set_to_none=True)
    loss = _autograd_loss(model, family, batch, label_smoothing)
    loss.backward()
    out = []
    for k in ks:
        s = torch.zeros((), dtype=torch.float64)
        for name, pid, p in fwdkern.trainable(model):
            if params is not None and name not in params:
                continue
            v = fwdkern.perturbation(p.shape, seed, pid, k, dist)
            s += (p.grad.double() * v.double()).sum()
        out.append(s)
    return loss.detach(), torch.stack(out)


def _check(jv, ref):
    scale = ref.abs().max().clamp_min(1e-3)
    assert torch.allclose(jv.double(), ref, rtol=RTOL, atol=RTOL * float(scale)), (jv, ref)


@pytest.mark.parametrize("family", CLS + LM)
def test_jvp_matches_autograd(family):
    model = fwdkern.patch(_model(family))
    assert model.config._attn_implementation == "sdpa"
    _randomize(model)
    batch = _batch(family)
    names = [n for n, _, _ in fwdkern.trainable(model)]
    # K = 4, all trainable tensors.
    L, jv = fwdkern.jvp(model, batch, seed=11, ks=[0, 1, 5, 9])
    L_ref, ref = _reference(model, family, batch, 11, [0, 1, 5, 9])
    assert jv.shape == (4,) and jv.dtype == torch.float32
    assert torch.allclose(L, L_ref, rtol=1e-5)
    _check(jv, ref)
    # K = 1, a subset given by names (SPRY splitting): every other tensor, so some layers have
    # an incoming tangent but no own perturbation (and vice versa).
    sub = names[1::2]
    L2, jv2 = fwdkern.jvp(model, batch, seed=11, ks=[3], params=sub)
    _, ref2 = _reference(model, family, batch, 11, [3], params=set(sub))
    _check(jv2, ref2)
    assert torch.equal(L2, L)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_a_block_estimate_is_its_closed_form_and_its_tangents_start_at_the_block(family, monkeypatch):
    # fwdkern's --split deals a client one block of consecutive layers (fwdkern.fl.splitting): its estimate
    # (1/K) sum_k (∇L·v_k) v_k must equal the closed form with the autograd gradient restricted to the block
    # -- zero on every tensor outside it -- and the layers below the block must run without tangents.
    model = fwdkern.patch(_model(family))
    _randomize(model)
    batch = _batch(family)
    tr = [(n, pid, p) for n, pid, p in fwdkern.trainable(model) if ".lora_" in n]
    top = max(int(n.split("layer.")[-1].split(".")[0]) if "layer." in n else int(n.split("layers.")[-1].split(".")[0])
              for n, _, _ in tr)
    block = [n for n, _, _ in tr if f"layer.{top}." in n or f"layers.{top}." in n]
    assert 0 < len(block) < len(tr)
    dual_calls = []
    orig = fwdkern.LoRALinear.forward_dual

    def counted(self, *a, **kw):
        dual_calls.append(self)
        return orig(self, *a, **kw)

    monkeypatch.setattr(fwdkern.LoRALinear, "forward_dual", counted)
    ks = list(range(6))
    _, jv = fwdkern.jvp(model, batch, seed=7, ks=ks, params=block)
    monkeypatch.undo()
    assert len(dual_calls) == len(block) // 2  # one LoRA module per A/B pair, all in the top layer
    model.zero_grad(set_to_none=True)
    _autograd_loss(model, family, batch).backward()
    v = {n: torch.stack([fwdkern.perturbation(p.shape, 7, pid, k).double() for k in ks]) for n, pid, p in tr}
    g = {n: p.grad.double() for n, _, p in tr}
    # the block's directional derivatives: the gradient dotted with v over the block's tensors only
    d = sum(torch.einsum("...,k...->k", g[n], v[n]) for n in block)
    scale = float(d.abs().max())
    assert torch.allclose(jv.double(), d, rtol=1e-4, atol=1e-4 * scale)
    # so on the block the estimate is the closed form (1/K) sum_k (g_b·v_k) v_k, and it is unbiased for g_b
    # only in expectation: with the whole body's dot product it would differ (the check has teeth)
    full = sum(torch.einsum("...,k...->k", g[n], v[n]) for n, _, _ in tr)
    assert (full - d).abs().max() > 10 * 1e-4 * scale
    for n in block:
        est = torch.einsum("k,k...->...", jv.double(), v[n]) / len(ks)
        closed = torch.einsum("k,k...->...", d, v[n]) / len(ks)
        assert torch.allclose(est, closed, rtol=1e-4, atol=1e-4 * float(closed.abs().max())), n


def test_trainable_and_ids():
    model = fwdkern.patch(_model("bert"))
    tr = fwdkern.trainable(model)
    names = [n for n, _, _ in tr]
    assert names[0] == "bert.encoder.layer.0.attention.self.query.lora_A.weight"
    assert "classifier.weight" in names and "classifier.bias" in names
    assert not any("key" in n for n in names)
    assert all(pid == fwdkern.nn.param_id(n) for n, pid, _ in tr)
    # Only trainable tensors require grad.
    assert sum(p.requires_grad for p in model.parameters()) == len(tr)
    # Subset by param id equals subset by name.
    _randomize(model)
    b = _batch("bert")
    sel = [tr[0][0], tr[-1][0]]
    _, a = fwdkern.jvp(model, b, 1, [0, 1], params=sel)
    _, c = fwdkern.jvp(model, b, 1, [0, 1], params=[tr[0][1], tr[-1][1]])
    assert torch.equal(a, c)
    with pytest.raises(ValueError, match="params"):
        fwdkern.jvp(model, b, 1, [0], params=["bert.embeddings.word_embeddings.weight"])


def test_jvp_left_padding_gaussian_llama():
    # Left padding makes query rows whose every key is masked (they must give 0, not NaN).
    model = fwdkern.patch(_model("llama"), r=2, alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    _randomize(model)
    batch = _batch("llama", left_pad=True)
    L, jv = fwdkern.jvp(model, batch, seed=2**40 + 3, ks=[0, 7], dist="gaussian")
    _, ref = _reference(model, "llama", batch, 2**40 + 3, [0, 7], dist="gaussian")
    assert torch.isfinite(L) and torch.isfinite(jv).all()
    _check(jv, ref)


def test_jvp_label_smoothing_and_explicit_labels():
    model = fwdkern.patch(_model("distilbert"))
    _randomize(model)
    batch = _batch("distilbert")
    L, jv = fwdkern.jvp(model, batch, seed=4, ks=[2, 3], label_smoothing=0.1)
    L_ref, ref = _reference(model, "distilbert", batch, 4, [2, 3], label_smoothing=0.1)
    assert torch.allclose(L, L_ref, rtol=1e-5)
    _check(jv, ref)
    # Causal LM with explicit labels (-100 ignored) equals the padding-derived labels.
    lm = fwdkern.patch(_model("qwen2"))
    _randomize(lm)
    b = _batch("qwen2")
    labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    L1, j1 = fwdkern.jvp(lm, b, 0, [0, 1])
    L2, j2 = fwdkern.jvp(lm, {**b, "labels": labels}, 0, [0, 1])
    assert torch.equal(L1, L2) and torch.equal(j1, j2)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_perturbed_matches_jvp(family):
    model = fwdkern.patch(_model(family))
    _randomize(model)
    batch = _batch(family)
    ks = [0, 1, 2]
    L, jv = fwdkern.jvp(model, batch, seed=9, ks=ks)
    before = [p.detach().clone() for _, _, p in fwdkern.trainable(model)]
    errs = []
    for eps in (4e-2, 1e-2, 2.5e-3):
        lp, lm = fwdkern.perturbed_loss(model, batch, seed=9, ks=ks, eps=eps)
        fd = (lp.double() - lm.double()) / (2 * eps)
        errs.append((fd - jv.double()).abs().max().item())
    # Restored exactly.
    assert all(torch.equal(a, p) for a, (_, _, p) in zip(before, fwdkern.trainable(model)))
    scale = jv.abs().max().item()
    # Central differences: error O(eps²), ~16x smaller at eps/4 while above fp32 rounding
    # (measured: bert 2.0e-3 -> 1.3e-4, llama 3.8e-2 -> 2.3e-3), then small.
    assert errs[0] / errs[1] > 8
    assert errs[2] < 1e-3 * scale


def test_peft_roundtrip(tmp_path):
    peft = pytest.importorskip("peft")
    base = _model("roberta")
    base_copy = _model("roberta")  # same seed: identical base weights
    model = fwdkern.patch(base, r=4, alpha=8)
    _randomize(model)
    batch = _batch("roberta")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        ours = model(**inputs).logits
    fwdkern.save_adapter(model, str(tmp_path))
    pm = peft.PeftModel.from_pretrained(base_copy, str(tmp_path)).eval()
    with torch.no_grad():
        theirs = pm(**inputs).logits
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=1e-5)
    # A PeftModel converts to fwdkern keeping its weights: same outputs, same jvps as ours.
    conv = fwdkern.patch(pm)
    with torch.no_grad():
        assert torch.allclose(conv(**inputs).logits, ours, atol=1e-6, rtol=1e-5)
    assert [n for n, _, _ in fwdkern.trainable(conv)] == [n for n, _, _ in fwdkern.trainable(model)]
    _, j1 = fwdkern.jvp(model, batch, 3, [0, 1])
    _, j2 = fwdkern.jvp(conv, batch, 3, [0, 1])
    assert torch.allclose(j1, j2, rtol=1e-5, atol=1e-6)
    # load_adapter into a fresh unpatched model.
    fresh = fwdkern.load_adapter(_model("roberta"), str(tmp_path))
    with torch.no_grad():
        assert torch.allclose(fresh(**inputs).logits, ours, atol=1e-6, rtol=1e-5)


def test_peft_roundtrip_gpt2_conv1d(tmp_path):
    peft = pytest.importorskip("peft")
    model = fwdkern.patch(_model("gpt2"), r=4, alpha=8)
    assert model.config.model_type == "gpt2" and fwdkern.trainable(model)[0][0].endswith("c_attn.lora_A.weight")
    _randomize(model)
    ids = _batch("gpt2")["input_ids"]
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    fwdkern.save_adapter(model, str(tmp_path))
    pm = peft.PeftModel.from_pretrained(_model("gpt2"), str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.allclose(pm(input_ids=ids).logits, ours, atol=1e-5, rtol=1e-5)


class _ZetaAct(torch.nn.Module):
    def forward(self, x):
        return torch.special.zeta(x * x + 2.0, 3.0)  # no forward-mode AD formula w.r.t. x


def test_missing_tangent_rule_names_op_and_module():
    model = fwdkern.patch(_model("llama"))
    model.model.layers[1].mlp.act_fn = _ZetaAct()
    _randomize(model)
    with pytest.raises(NoTangentRule, match=r"zeta.*model\.layers\.1\.mlp\.act_fn \(_ZetaAct\)"):
        fwdkern.jvp(model, _batch("llama"), 0, [0])


def test_training_mode_restored_and_errors():
    model = fwdkern.patch(_model("bert"))
    model.train()
    fwdkern.jvp(model, _batch("bert"), 0, [0])
    assert model.training
    with pytest.raises(ValueError, match="not patched"):
        fwdkern.jvp(_model("bert"), _batch("bert"), 0, [0])
    with pytest.raises(ValueError, match="labels"):
        b = _batch("bert")
        del b["labels"]
        fwdkern.jvp(model, b, 0, [0])


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_bf16_model_close_to_fp32(family):
    model = fwdkern.patch(_model(family))
    _randomize(model)
    batch = _batch(family)
    L, jv = fwdkern.jvp(model, batch, 9, [0, 1, 2, 3])
    model.to(torch.bfloat16)
    Lb, jvb = fwdkern.jvp(model, batch, 9, [0, 1, 2, 3])
    assert jvb.dtype == torch.float32
    # bf16 has 8 mantissa bits; measured deviation ~1e-3 absolute on jvps of size ~0.3.
    assert abs(Lb - L) < 2e-2 * abs(L)
    assert (jvb - jv).abs().max() < 2e-2 * jv.abs().max()


@pytest.mark.parametrize("family", ["llama", "bert", "gpt2"])
def test_bf16_tangent_matmuls_leave_the_loss_exact_and_the_jvps_within_bf16_rounding(family):
    """tangent_dtype=bf16 runs only the tangents' GEMMs with the frozen weights in bf16 (nn.Linear,
    GPT-2's Conv1D addmm, and the LoRA layers' dense part with s·BA folded in): the primal loss is
    bit-identical, every directional derivative stays within bf16 rounding of autograd's, and it does
    differ from the exact one (the bf16 path ran)."""
    model = fwdkern.patch(_model(family))
    _randomize(model)
    batch = _batch(family)
    ks = list(range(8))
    L, jv = fwdkern.jvp(model, batch, 9, ks)
    Lb, jvb = fwdkern.jvp(model, batch, 9, ks, tangent_dtype=torch.bfloat16)
    _, ref = _reference(model, family, batch, 9, ks)
    assert torch.equal(L, Lb) and jvb.dtype == torch.float32
    scale = float(ref.abs().max())
    # bf16 keeps 8 mantissa bits (relative rounding 2^-9 per product, accumulated in fp32):
    # measured deviations are 2e-3 to 5e-3 of the largest jvp; a dropped or doubled term is O(1) of it.
    assert (jvb.double() - ref).abs().max() < 1e-2 * scale, (jvb, ref)
    assert not torch.equal(jvb, jv)
    with pytest.raises(ValueError, match="tangent_matmuls"):
        fwdkern.jvp(model, batch, 9, ks, tangent_dtype=torch.int8)


def test_peft_causal_lm_conversion_jvp():
    peft = pytest.importorskip("peft")
    base = _model("mistral")
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"],
                                                   task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2)
    batch = _batch("mistral")
    with torch.no_grad():
        ref_logits = pm(**batch).logits
    model = fwdkern.patch(pm)
    assert isinstance(model, transformers.MistralForCausalLM)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, ref_logits, rtol=1e-5, atol=1e-5)
    names = [n for n, _, _ in fwdkern.trainable(model)]
    assert len(names) == 2 * 3 * 2 and names[0] == "model.layers.0.self_attn.q_proj.lora_A.weight"
    _, jv = fwdkern.jvp(model, batch, 5, [0, 1, 2])
    _, ref = _reference(model, "mistral", batch, 5, [0, 1, 2])
    _check(jv, ref)


def test_perturbed_lm_head_is_refused_not_dropped():
    # The LM head gets no tangent: perturbing it (directly, or through GPT-2's tied embedding) is refused,
    # never silently dropped.
    tied = fwdkern.patch(_model("gpt2"), modules_to_save=["wte"])
    assert tied.lm_head.weight is tied.transformer.wte.weight
    lm = fwdkern.patch(_model("qwen2"), modules_to_save=["lm_head"])
    for m, fam in ((tied, "gpt2"), (lm, "qwen2")):
        with pytest.raises(ValueError, match="LM head"):
            fwdkern.jvp(m, _batch(fam), 0, [0])
    # Excluding it with params= works.
    names = [n for n, _, _ in fwdkern.trainable(lm) if "lm_head" not in n]
    fwdkern.jvp(lm, _batch("qwen2"), 0, [0], params=names)


def _other(name):
    T_ = transformers
    lm = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)
    torch.manual_seed(0)
    if name == "llama_eager":
        return T_.AutoModelForCausalLM.from_config(_config("llama"), attn_implementation="eager"), "llama"
    if name == "electra":
        cfg = T_.ElectraConfig(vocab_size=V, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=64, num_labels=NL)
        return T_.AutoModelForSequenceClassification.from_config(cfg), "bert"
    cfg = {"qwen3": lambda: T_.Qwen3Config(head_dim=8, **lm), "gemma": lambda: T_.GemmaConfig(head_dim=8, **lm),
           "phi3": lambda: T_.Phi3Config(pad_token_id=0, **lm),
           "opt": lambda: T_.OPTConfig(vocab_size=V, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                       num_attention_heads=4, word_embed_proj_dim=32)}[name]()
    return T_.AutoModelForCausalLM.from_config(cfg), "llama"


@pytest.mark.parametrize("name", ["qwen3", "gemma", "phi3", "opt", "electra", "llama_eager"])
def test_other_architectures(name):
    # Beyond the families: default targets from DEFAULT_TARGETS, and eager attention.
    model, fam = _other(name)
    model = fwdkern.patch(model.eval())
    _randomize(model)
    batch = _batch(fam)
    _, jv = fwdkern.jvp(model, batch, 3, [0, 1, 2])
    _, ref = _reference(model, fam, batch, 3, [0, 1, 2])
    _check(jv, ref)


def _gemma3():
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                        max_position_embeddings=64, sliding_window=16)
    return transformers.Gemma3ForCausalLM(cfg).eval()


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("tangent_dtype", [None, torch.bfloat16])
def test_fused_mlp_and_rms_norm_rules_equal_the_op_by_op_rules(family, tangent_dtype, monkeypatch):
    """The module-level rules (gated MLP: three tangent GEMMs and two passes; RMSNorm: weight or
    1 + weight) compute the same directional derivatives as the op-by-op rules they replace: to fp32
    rounding with exact tangents, within bf16 rounding under bf16 tangent GEMMs. Both families' MLP
    and norm modules are found (the rules ran), and the loss is untouched."""
    from fwdkern.engine import forward as fwd

    model = fwdkern.patch(_gemma3() if family == "gemma3" else _model(family))
    _randomize(model)
    batch = _batch("llama")
    assert sum(fwd.is_gated_mlp(m) for m in model.modules()) == 2
    assert sum(fwd.rms_norm_form(m) is not None for m in model.modules()) >= 5  # 2 per layer + final
    ks = list(range(6))
    L, jv = fwdkern.jvp(model, batch, 4, ks, tangent_dtype=tangent_dtype)
    monkeypatch.setattr(fwd, "is_gated_mlp", lambda m: False)
    monkeypatch.setattr(fwd, "rms_norm_form", lambda m: None)
    L0, jv0 = fwdkern.jvp(model, batch, 4, ks, tangent_dtype=tangent_dtype)
    assert torch.equal(L, L0)
    tol = 1e-5 if tangent_dtype is None else 2e-2
    assert (jv - jv0).abs().max() <= tol * jv0.abs().max(), (jv, jv0)
    if tangent_dtype is None:
        _, ref = _reference(model, "llama", batch, 4, ks)
        _check(jv, ref)


def test_fused_rules_leave_patched_or_rewritten_modules_to_the_op_by_op_rules():
    """A gated MLP whose projections carry LoRA, or a subclass with its own forward, is not fused (its
    function may differ from the expression the rule computes); a norm with another forward neither."""
    from fwdkern.engine import forward as fwd

    model = fwdkern.patch(_model("llama"), target_modules=["gate_proj", "q_proj"])
    assert not any(fwd.is_gated_mlp(m) for m in model.modules())

    class Scaled(type(model.model.layers[0].mlp)):
        def forward(self, x):
            return 2 * self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    class Shifted(type(model.model.norm)):
        def forward(self, hidden_states):
            return super().forward(hidden_states) + 1

    plain = _model("llama")
    mlp, norm = plain.model.layers[0].mlp, plain.model.norm
    assert fwd.is_gated_mlp(mlp) and fwd.rms_norm_form(norm) is not None
    mlp.__class__, norm.__class__ = Scaled, Shifted
    assert not fwd.is_gated_mlp(mlp) and fwd.rms_norm_form(norm) is None
    patched = fwdkern.patch(plain)
    _randomize(patched)
    _, jv = fwdkern.jvp(patched, _batch("llama"), 2, [0, 1, 2])
    _, ref = _reference(patched, "llama", _batch("llama"), 2, [0, 1, 2])
    _check(jv, ref)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_batch_loss_is_the_loss_jvp_reports(family):
    """batch_loss (the guard's probe) computes jvp's loss from a plain forward: equal to it and to the
    HF model's own loss within fp32 rounding, for a causal LM (vocabulary blocks, no tokens × vocab
    logits) and a classifier; training mode untouched."""
    model = fwdkern.patch(_model(family))
    _randomize(model)
    batch = _batch(family)
    L, _ = fwdkern.jvp(model, batch, 3, [0, 1])
    lb = fwdkern.batch_loss(model, batch)
    hf_batch = dict(batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)) \
        if family == "llama" else batch
    with torch.no_grad():
        hf = model(**hf_batch).loss
    assert lb.dtype == torch.float32 and not model.training
    torch.testing.assert_close(lb, L, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lb, hf, rtol=1e-5, atol=1e-6)
    if family == "bert":
        with pytest.raises(ValueError, match="labels"):
            fwdkern.batch_loss(model, {k: v for k, v in batch.items() if k != "labels"})


def _share_reference(model, family, batch, seed, ks, samples, params, label_smoothing=0.0):
    """Per-sample tangents' closed form: jvps[i] = ∇(sample b's share of the loss) · v_{ks[i]}, b = i mod B."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = []
    for i, k in enumerate(ks):
        b = i % samples
        model.zero_grad(set_to_none=True)
        logits = model(**inputs).logits.float()
        if family in CLS:
            y = batch["labels"]
            ce = F.cross_entropy(logits, y, ignore_index=-100, reduction="none", label_smoothing=label_smoothing)
            share = ce[b] / (y != -100).sum()
        else:
            y = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)[:, 1:]
            ce = F.cross_entropy(logits[:, :-1].reshape(-1, V), y.reshape(-1), ignore_index=-100,
                                 reduction="none").view(y.shape)
            share = ce[b].sum() / (y != -100).sum()
        share.backward()
        s = torch.zeros((), dtype=torch.float64)
        for name, pid, p in fwdkern.trainable(model):
            if name in params:
                s += (p.grad.double() * fwdkern.perturbation(p.shape, seed, pid, k).double()).sum()
        out.append(s)
    return torch.stack(out)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("tangent_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("which", ["every_lora", "first_block"])
def test_per_sample_tangents_are_each_samples_share_of_the_loss_along_its_own_perturbations(family, tangent_dtype,
                                                                                           which):
    """jvp(per_sample=True): with B samples, ks[j*B + b] is sample b's j-th tangent and its value the
    derivative of sample b's share of the (padded, unequal-length) batch loss: the closed form from
    autograd, in one dual pass of len(ks) / B tangents; the loss is the batch's, exactly. first_block:
    only the first block's LoRA tensors are perturbed (a --split client), so the LoRA layers above carry
    the tangents without perturbing them."""
    model = fwdkern.patch(_model(family))
    _randomize(model)
    batch = _batch(family)
    lora = [n for n, _, _ in fwdkern.trainable(model) if "lora_" in n]
    if which == "first_block":
        lora = [n for n in lora if ".0." in n]
        assert lora and len(lora) < len([n for n, _, _ in fwdkern.trainable(model) if "lora_" in n])
    ks = [4, 9, 1, 7, 3, 12]  # 2 tangents for each of the 3 samples
    L, jv = fwdkern.jvp(model, batch, 11, ks, params=lora, per_sample=True, tangent_dtype=tangent_dtype)
    L0, _ = fwdkern.jvp(model, batch, 11, ks[:1], params=lora)
    ref = _share_reference(model, family, batch, 11, ks, 3, set(lora))
    assert torch.equal(L, L0) and jv.shape == (6,)
    if tangent_dtype is None:
        _check(jv, ref)
    else:  # bf16 rounding of the tangents' products, as in the whole-batch test above
        assert (jv.double() - ref).abs().max() < 1e-2 * float(ref.abs().max()), (jv, ref)


def test_per_sample_classifier_tangents_with_ignored_labels_and_label_smoothing():
    """The classifier loss's per-sample branch: a sample labelled -100 contributes 0 (its tangents read 0)
    and the others' shares are over the labelled count, with label smoothing, as autograd has them."""
    model = fwdkern.patch(_model("bert"))
    _randomize(model)
    batch = dict(_batch("bert"), labels=torch.tensor([2, -100, 1]))
    lora = [n for n, _, _ in fwdkern.trainable(model) if "lora_" in n]
    ks = [5, 6, 7, 8, 9, 10]
    L, jv = fwdkern.jvp(model, batch, 4, ks, params=lora, per_sample=True, label_smoothing=0.1)
    ref = _share_reference(model, "bert", batch, 4, ks, 3, set(lora), label_smoothing=0.1)
    _check(jv, ref)
    assert jv[[1, 4]].abs().max() == 0 and jv[[0, 2, 3, 5]].abs().min() > 0
    L_batch, _ = fwdkern.jvp(model, batch, 4, ks[:1], params=lora, label_smoothing=0.1)
    assert torch.equal(L, L_batch)


def test_per_sample_tangents_refuse_what_one_pass_cannot_do():
    model = fwdkern.patch(_model("bert"))
    batch = _batch("bert")
    with pytest.raises(fwdkern.engine.PerSampleUnsupported, match="5 tangents do not divide among 3 samples"):
        fwdkern.jvp(model, batch, 1, range(5), per_sample=True)
    full = [n for n, _, _ in fwdkern.trainable(model) if "lora_" not in n]
    assert full  # the classifier head: a full tensor, one perturbation per slot for the whole batch
    with pytest.raises(fwdkern.engine.PerSampleUnsupported, match="outside a LoRA layer"):
        fwdkern.jvp(model, batch, 1, range(6), per_sample=True)


def test_per_sample_tangents_fall_back_where_a_lora_layer_sees_flattened_tokens(monkeypatch):
    """A LoRA layer whose input is not [samples, ...] (tokens flattened before it) cannot carry each
    sample's tangents: PerSampleUnsupported (so a client runs one pass per sample instead), and the
    layer's dual forward is taken off again."""
    model = fwdkern.patch(_model("llama"))
    batch = _batch("llama")
    lora = next(m for m in model.modules() if isinstance(m, fwdkern.LoRALinear))
    orig = lora.forward_dual

    def flattening_call(x):  # what a module that flattens tokens before its projection passes on
        return lora.forward(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)

    owner = next(m for m in model.modules() if getattr(m, "q_proj", None) is lora)
    monkeypatch.setattr(owner, "q_proj", type("Flat", (torch.nn.Module,), {"forward": lambda s, x: flattening_call(x)})())
    owner.add_module("_lora_keep", lora)
    with pytest.raises(fwdkern.engine.PerSampleUnsupported, match=r"not \[samples, tokens \(3, 9\)"):
        fwdkern.jvp(model, batch, 3, range(6), per_sample=True)
    assert lora.forward_dual == orig and "forward" not in lora.__dict__
