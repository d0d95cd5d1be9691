"""fwdkern.trainer.ForwardGradientTrainer: a transformers.Trainer without backprop, on tiny models."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import fwdkern  # noqa: E402
from fwdkern.trainer import ForwardGradientTrainer  # noqa: E402


class _DS(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _cls_data(n=96, V=40, T=8, seed=0):
    """Label = whether token 5 appears: learnable by the head from pooled features."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(6, V, (T,), generator=g)
        y = int(torch.randint(0, 2, (1,), generator=g))
        if y:
            ids[: T // 2] = 5
        rows.append({"input_ids": ids, "attention_mask": torch.ones(T, dtype=torch.long), "labels": torch.tensor(y)})
    return _DS(rows)


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=16, learning_rate=3e-2,
                num_train_epochs=1, max_steps=30, logging_steps=5, save_strategy="no", report_to=[],
                use_cpu=True, seed=0, lr_scheduler_type="linear", disable_tqdm=True)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def _bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=16, num_labels=2,
                                  initializer_range=0.1)
    return fwdkern.patch(transformers.BertForSequenceClassification(cfg).eval(), r=4, alpha=8)


def _eval_loss(model, ds):
    with torch.no_grad():
        b = {k: torch.stack([r[k] for r in ds.rows]) for k in ds.rows[0]}
        return float(model(**b).loss)


def test_sequence_classification_loss_falls_and_saves_peft(tmp_path):
    model = _bert()
    ds = _cls_data()
    before = _eval_loss(model, ds)
    tr = ForwardGradientTrainer(model=model, args=_args(tmp_path), train_dataset=ds, perturbations=16)
    out = tr.train()
    after = _eval_loss(model, ds)
    assert after < before - 0.05, (before, after)
    assert out.training_loss > 0
    tr.save_model(str(tmp_path / "adapter"))
    assert os.path.exists(tmp_path / "adapter" / "adapter_model.safetensors")
    fresh = fwdkern.load_adapter(_bert(), str(tmp_path / "adapter"))
    assert abs(_eval_loss(fresh, ds) - after) < 1e-5


def test_causal_lm_loss_falls(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = fwdkern.patch(transformers.LlamaForCausalLM(cfg).eval(), r=4, alpha=8,
                          target_modules=["q_proj", "v_proj", "up_proj"])
    seq = torch.arange(12) % 6 + 3  # a repeating pattern to learn
    rows = [{"input_ids": seq.clone(), "attention_mask": torch.ones(12, dtype=torch.long), "labels": seq.clone()}
            for _ in range(64)]
    ds = _DS(rows)
    before = _eval_loss(model, ds)
    ForwardGradientTrainer(model=model, args=_args(tmp_path, learning_rate=2e-2, max_steps=25), train_dataset=ds,
                           perturbations=16).train()
    assert _eval_loss(model, ds) < before - 0.05


def test_gradient_accumulation_adds_tangents(tmp_path):
    model = _bert()
    ds = _cls_data(n=32)
    tr = ForwardGradientTrainer(model=model, args=_args(tmp_path, gradient_accumulation_steps=2, max_steps=1),
                                train_dataset=ds, perturbations=4, head="perturb")
    batches = [{k: torch.stack([r[k] for r in ds.rows[i:i + 16]]) for k in ds.rows[0]} for i in (0, 16)]
    for b in batches:
        tr.training_step(model, b)
    got = {n: p.grad.clone() for n, _, p in fwdkern.trainable(model)}
    # the same two micro-batches by hand: each its own seed, estimates averaged over the 2 x 4 tangents
    from fwdkern.trainer import _seed

    ref = {n: torch.zeros_like(p) for n, _, p in fwdkern.trainable(model)}
    for micro, b in enumerate(batches):
        seed = _seed(0, 0, micro)
        _, jv = fwdkern.jvp(model, b, seed, range(4))
        for n, pid, p in fwdkern.trainable(model):
            for k in range(4):
                ref[n] += jv[k] / 8 * fwdkern.perturbation(p.shape, seed, pid, k)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-6)


def test_exact_head_gradient_and_body_estimate(tmp_path):
    model = _bert()
    ds = _cls_data(n=16)
    tr = ForwardGradientTrainer(model=model, args=_args(tmp_path, max_steps=1), train_dataset=ds, perturbations=4)
    assert tr.head_path == "classifier"
    b = {k: torch.stack([r[k] for r in ds.rows]) for k in ds.rows[0]}
    tr.training_step(model, b)
    params = [p for _, _, p in fwdkern.trainable(model)]
    names = [n for n, _, _ in fwdkern.trainable(model)]
    got = {n: p.grad.clone() for n, p in zip(names, params)}
    with torch.enable_grad():
        ref = torch.autograd.grad(model(**b).loss, params)
    for n, g in zip(names, ref):
        if n.startswith("classifier."):  # exact
            torch.testing.assert_close(got[n], g, rtol=1e-4, atol=1e-6)
    # the body got the K=4 forward-gradient estimate of its own tensors only
    from fwdkern.trainer import _seed

    body = [n for n in names if not n.startswith("classifier.")]
    _, jv = fwdkern.jvp(model, b, _seed(0, 0, 0), range(4), params=body)
    for n, pid, p in fwdkern.trainable(model):
        if n in body:
            est = sum(jv[k] / 4 * fwdkern.perturbation(p.shape, _seed(0, 0, 0), pid, k) for k in range(4))
            torch.testing.assert_close(got[n], est, rtol=1e-4, atol=1e-6)


def test_unpatched_model_is_refused(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=16, num_labels=2)
    with pytest.raises(ValueError, match="not patched"):
        ForwardGradientTrainer(model=transformers.BertForSequenceClassification(cfg), args=_args(tmp_path),
                               train_dataset=_cls_data())


def test_per_sample_tangents_write_the_closed_form_estimate(tmp_path):
    """tangent_scope="sample": K tangents for each sample (ks[j*B + b] is sample b's j-th), each derivative
    of its sample's share of the loss; the gradient written is sum_b (1/K) sum_j (∇share_b · v) v, from
    autograd per sample and the materialized perturbations (padded samples of unequal length)."""
    import torch.nn.functional as F

    from fwdkern.trainer import _seed

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = fwdkern.patch(transformers.LlamaForCausalLM(cfg).eval(), r=4, alpha=8)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, _, p in fwdkern.trainable(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    ids = torch.randint(3, 32, (3, 10), generator=g)
    am = torch.ones(3, 10, dtype=torch.long)
    am[1, 7:], am[2, 4:] = 0, 0
    labels = ids.masked_fill(am == 0, -100)
    batch = {"input_ids": ids, "attention_mask": am, "labels": labels}
    K, B = 2, 3
    tr = ForwardGradientTrainer(model=model, args=_args(tmp_path, max_steps=1), train_dataset=_DS([]),
                                perturbations=K, tangent_scope="sample")
    tr.training_step(model, batch)
    got = {n: p.grad.double().clone() for n, _, p in fwdkern.trainable(model)}
    seed = _seed(0, 0, 0)
    want = {n: torch.zeros_like(v) for n, v in got.items()}
    for b in range(B):
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, attention_mask=am).logits.float()
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, 32), labels[:, 1:].reshape(-1), ignore_index=-100,
                             reduction="none").view(3, 9)
        (ce[b].sum() / (labels[:, 1:] != -100).sum()).backward()
        for j in range(K):
            k = j * B + b
            vs = {n: fwdkern.perturbation(p.shape, seed, pid, k).double() for n, pid, p in fwdkern.trainable(model)}
            d = sum((p.grad.double() * vs[n]).sum() for n, _, p in fwdkern.trainable(model))
            for n in want:
                want[n] += d * vs[n] / K
    for n in got:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-5 * float(want[n].abs().max()))
    with pytest.raises(ValueError, match="tangent_scope"):
        ForwardGradientTrainer(model=model, args=_args(tmp_path), train_dataset=_DS([]), tangent_scope="token")
