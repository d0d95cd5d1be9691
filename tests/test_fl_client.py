"""The client's seed-and-scalar answers (fwdkern.fl.client.seeded_answer) with per-sample tangents.

Tangent scope "sample" shares a plan's tangents out among a batch's samples: each value must be the
closed form (len(ks) / K_g) * ∇((n_g / N) L_g) · v_k -- the autograd gradient of its group's share of
the batch loss along the materialized perturbation -- so the server's mean of value x v is unbiased for
the batch loss's gradient. Tiny randomly initialised models, padded batches with unequal token counts.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fwdkern  # noqa: E402
from fwdkern.fl.client import sample_groups, seeded_answer  # noqa: E402
from fwdkern.fl.protocol import RoundPlan, Update  # noqa: E402

transformers = pytest.importorskip("transformers")

V, T = 60, 10
SEED = 23


def _llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return _randomized(fwdkern.patch(transformers.AutoModelForCausalLM.from_config(cfg).eval()))


def _bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, num_labels=3, max_position_embeddings=64)
    return _randomized(fwdkern.patch(transformers.AutoModelForSequenceClassification.from_config(cfg).eval()))


def _randomized(model):
    g = torch.Generator().manual_seed(1)  # LoRA B != 0, so A's derivatives do not vanish
    with torch.no_grad():
        for _, _, p in fwdkern.trainable(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def _lm_batch(B=3):
    g = torch.Generator().manual_seed(5)
    am = torch.ones(B, T, dtype=torch.long)
    for i in range(1, B):
        am[i, T - 2 * i:] = 0  # right padding: every sample predicts a different number of tokens
    return {"input_ids": torch.randint(2, V, (B, T), generator=g), "attention_mask": am}


def _plan(model, ks):
    return RoundPlan("c0", 1, 0, SEED, tuple(ks), tuple(pid for _, pid, _ in fwdkern.trainable(model)))


def _values(model, batches, ks, **kw):
    u = Update.from_bytes(seeded_answer(model, batches, _plan(model, ks), wire="json", **kw))
    return torch.tensor(u.jvps, dtype=torch.float64), u.loss


def _token_losses(model, batch):
    """(per-token CE [B, T-1] with 0 where ignored, valid mask) through a plain autograd forward."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    y = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)[:, 1:]
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, V), y.reshape(-1), ignore_index=-100, reduction="none")
    return ce.view(y.shape), y != -100


def _directional(model, loss, k):
    model.zero_grad(set_to_none=True)
    loss.backward()
    s = torch.zeros((), dtype=torch.float64)
    for _, pid, p in fwdkern.trainable(model):
        s += (p.grad.double() * fwdkern.perturbation(p.shape, SEED, pid, k).double()).sum()
    return s


def _closed_form(model, batch, ks, group_loss):
    """Each value's closed form: (len(ks) / K_g) ∇(group g's share of the batch loss) · v_k."""
    bs = batch["input_ids"].shape[0]
    want = torch.zeros(len(ks), dtype=torch.float64)
    for i0, i1, pos in sample_groups(bs, len(ks)):
        for p in pos:
            want[p] = _directional(model, group_loss(i0, i1), ks[p]) * len(ks) / len(pos)
    return want


def _close(got, want):
    scale = float(want.abs().max())
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * scale), (got, want)


@pytest.mark.parametrize("bs,K", [(3, 7), (3, 3), (3, 2), (4, 8)])
def test_per_sample_values_are_the_closed_form_of_each_groups_share_of_the_causal_lm_loss(bs, K):
    """Unequal token counts and groups (7 tangents over 3 samples: 3, 2, 2; 2 tangents: samples 0 and
    1-2 pooled): every value equals its closed form, and the reported loss is the batch's."""
    model = _llama()
    batch = _lm_batch(bs)
    ks = [3 * i + 1 for i in range(K)]
    got, loss = _values(model, [batch], ks, tangent_scope="sample")

    def group_loss(i0, i1):
        ce, valid = _token_losses(model, batch)
        return ce[i0:i1].sum() / valid.sum()

    _close(got, _closed_form(model, batch, ks, group_loss))
    with torch.no_grad():
        ce, valid = _token_losses(model, batch)
    assert loss == pytest.approx(float(ce.sum() / valid.sum()), rel=1e-5)
    # the batch scope's answer reports the same loss (and its own, whole-batch directional derivatives)
    assert _values(model, [batch], ks, tangent_scope="batch")[1] == pytest.approx(loss, rel=1e-5)


def test_per_sample_values_are_unbiased_for_the_batch_gradient_in_closed_form():
    """Summed over a group's tangents with weight K_g / len(ks) (what the server's mean gives each), the
    closed forms add up to the batch loss's directional derivative along any shared direction: with every
    group answering the same k, the server's estimate is exactly the batch scope's."""
    model = _llama()
    batch = _lm_batch(3)
    ks = [5, 5, 5]  # one tangent per sample, all along v_5
    got, _ = _values(model, [batch], ks, tangent_scope="sample")
    whole, _ = _values(model, [batch], [5], tangent_scope="batch")
    assert float(got.mean()) == pytest.approx(float(whole[0]), rel=1e-4)


def test_per_sample_classifier_values_skip_samples_with_nothing_to_predict():
    """A classifier: one loss term per labelled sample; a group whose labels are all -100 contributes
    0 (its tangents' values are 0) and the rest keep the closed form over the labelled count."""
    model = _bert()
    g = torch.Generator().manual_seed(3)
    batch = {"input_ids": torch.randint(2, V, (4, T), generator=g), "attention_mask": torch.ones(4, T, dtype=torch.long),
             "labels": torch.tensor([0, -100, 2, 1])}
    ks = [0, 1, 2, 3, 4, 5, 6, 7]
    got, loss = _values(model, [batch], ks, tangent_scope="sample")

    def group_loss(i0, i1):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        y = batch["labels"]
        ce = F.cross_entropy(logits, y, ignore_index=-100, reduction="none")
        return ce[i0:i1].sum() / (y != -100).sum()

    _close(got, _closed_form(model, batch, ks, group_loss))
    assert got[[1, 5]].abs().max() == 0  # sample 1's tangents (positions 1 and 5)
    full, _ = _values(model, [batch], ks, tangent_scope="batch")
    assert full[[1, 5]].abs().min() > 0  # while its tangents carry the whole batch's derivative there


def test_per_sample_answers_average_over_batches_like_the_batch_scope():
    """Several local batches (the last one short): values are averaged weighted by batch size, and a
    batch of one sample is answered exactly as the batch scope answers it."""
    model = _llama()
    b1, b2 = _lm_batch(3), _lm_batch(1)
    ks = [2, 4, 6, 8]
    got, loss = _values(model, [b1, b2], ks, tangent_scope="sample")
    v1, l1 = _values(model, [b1], ks, tangent_scope="sample")
    v2, l2 = _values(model, [b2], ks, tangent_scope="batch")
    torch.testing.assert_close(got, (3 * v1 + v2) / 4, rtol=1e-6, atol=1e-9)
    assert loss == pytest.approx((3 * l1 + l2) / 4, rel=1e-6)
    assert torch.equal(_values(model, [b2], ks, tangent_scope="sample")[0], v2)


def test_a_split_clients_per_sample_answer_is_the_closed_form():
    """A client perturbing one block (--split: the plan lists only its tensors) answers in one pass; the
    LoRA layers above carry the tangents without perturbing them."""
    model = _llama()
    batch = _lm_batch(2)
    block = tuple(pid for n, pid, _ in fwdkern.trainable(model) if ".layers.0." in n)
    names = {n for n, pid, _ in fwdkern.trainable(model) if pid in block}
    ks = [7, 8, 9, 10]
    plan = RoundPlan("c0", 1, 0, SEED, tuple(ks), block)
    got = torch.tensor(Update.from_bytes(seeded_answer(model, [batch], plan, wire="json", tangent_scope="sample")).jvps,
                       dtype=torch.float64)
    want = torch.zeros(len(ks), dtype=torch.float64)
    for p_, k in enumerate(ks):
        b = p_ % 2
        model.zero_grad(set_to_none=True)
        ce, valid = _token_losses(model, batch)
        (ce[b].sum() / valid.sum()).backward()
        d = sum((p.grad.double() * fwdkern.perturbation(p.shape, SEED, pid, k).double()).sum()
                for n, pid, p in fwdkern.trainable(model) if n in names)
        want[p_] = d * 2  # len(ks) / K_g
    _close(got, want)


def test_sample_groups_deal_every_tangent_once_to_consecutive_samples():
    for bs in (1, 2, 3, 4, 7, 8):
        for K in (1, 2, 3, 5, 8, 16, 64):
            groups = sample_groups(bs, K)
            assert len(groups) == min(bs, K)
            assert groups[0][0] == 0 and groups[-1][1] == bs
            assert all(a[1] == b[0] and a[1] > a[0] for a, b in zip(groups, groups[1:]))
            sizes = [i1 - i0 for i0, i1, _ in groups]
            assert max(sizes) - min(sizes) <= 1
            assert sorted(p for _, _, pos in groups for p in pos) == list(range(K))


def test_an_unknown_tangent_scope_is_refused():
    model = _llama()
    with pytest.raises(ValueError, match="tangent_scope: unknown 'token'"):
        seeded_answer(model, [_lm_batch(2)], _plan(model, [1]), tangent_scope="token")


@pytest.mark.parametrize("tangent_precision", ["fp32", "bf16"])
def test_the_one_pass_per_sample_answer_equals_one_pass_per_sample_group(tangent_precision, monkeypatch):
    """Tangents dividing evenly take fwdkern.jvp's per_sample pass (each sample's own tangents in one
    dual forward); it answers what running each sample alone answers."""
    import fwdkern.fl.client as client
    from fwdkern.engine import PerSampleUnsupported

    model = _llama()
    batch = _lm_batch(4)
    ks = list(range(3, 19))
    calls, force = [], []

    def spy(*a, per_sample=False, **kw):
        calls.append(per_sample)
        if per_sample and force:
            raise PerSampleUnsupported("forced")
        return fwdkern.jvp(*a, per_sample=per_sample, **kw)

    monkeypatch.setattr(client, "jvp", spy)
    one_pass, loss = _values(model, [batch], ks, tangent_scope="sample", tangent_precision=tangent_precision)
    assert calls == [True]  # answered by the one pass
    calls.clear()
    force.append(True)
    grouped, loss_g = _values(model, [batch], ks, tangent_scope="sample", tangent_precision=tangent_precision)
    assert calls == [True, False, False, False, False]
    tol = 1e-5 if tangent_precision == "fp32" else 2e-2  # bf16: the tangents' products round differently
    torch.testing.assert_close(one_pass, grouped, rtol=tol, atol=tol * float(grouped.abs().max()))
    assert loss == pytest.approx(loss_g, rel=1e-6)
