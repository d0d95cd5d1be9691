"""Quantized frozen base (int8 per channel, int4 group-wise): the quantizer, the ops on a quantized
weight against the float reference on the dequantized weight, and whole models.

* Format: |W - dequantize(quantize(W))| <= step / 2 per element (the quantizer's own error), for
  group sizes that divide in_features and ones that do not (a shorter last group).
* Ops (cpu, reference, triton under the interpreter): ``lora_linear_dual`` / ``lora_linear_perturbed``
  with a QuantizedWeight and ``quant_linear_dual`` equal the float64 reference on
  ``weight.dequantize()`` at the fp32 tolerance of tests/test_lora.py (rtol 1e-5, atol 1e-5·max|ref|):
  the quantized model's outputs and tangents are exact up to fp32 rounding; against the *unquantized*
  float weight the error stays within the quantizer's bound ``|x| · (step / 2)``.
* Models (LLaMA, GPT-2 with Conv1D, BERT; tiny random configs): ``jvp`` of the model patched with
  ``base_quant`` equals autograd's ``∇L · v_k`` through the float model that holds the dequantized
  weights (fwdkern.engine.dequantize_base), within 1e-4 (the tolerance of tests/test_engine.py).
"""
import copy
import os

import pytest
import torch
import torch.nn.functional as F

import fwdkern
from fwdkern.engine import dequantize_base, quantize_base
from fwdkern.nn import QuantEmbedding, QuantLinear, quantized_bytes
from fwdkern.ops import _qformat as QF
from fwdkern.ops import quant as Q
from fwdkern.ops import reference_lora as R
from fwdkern.ops._qformat import dequantize_reference, step_size
from test_lora import _assert_close32, _layer as _float_layer  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

F64 = torch.float64
SEED = 0x1234_5678_9ABC_DEF0
PIDS = {"A": 11, "B": 22, "bias": 33}
FLAGS = {"A": (True, False, False), "B": (False, True, False), "A+B+bias": (True, True, True)}
TRITON_ON_CPU = fwdkern.backends.available("triton", "cpu")
INTERPRETED = TRITON_ON_CPU and not torch.cuda.is_available()


def _backends():
    skip = pytest.mark.skipif(not TRITON_ON_CPU, reason="triton backend unavailable on CPU (TRITON_INTERPRET=1)")
    return ["cpu", "reference", pytest.param("triton", marks=skip)]


# (bits, group size): int8 per channel; int4 with a group size that divides every in_features of the
# cases (in 1 -> one short group), one that does not (1031, 7), and an odd-sized tail (64 % 6).
FORMATS = [(8, 0), (4, 64), (4, 6)]
# (batch dims, in, out, r, K): the hostile shapes of tests/test_lora.py (odd in/out, rank 1, 0-3 batch dims).
CASES = [
    ((), 1, 1, 1, 1),
    ((3,), 7, 1031, 8, 3),
    ((2, 3), 64, 7, 64, 16),
    ((2, 1, 3), 1031, 64, 1, 3),
    ((4, 5), 7, 64, 64, 1),
    ((2, 3, 2), 64, 1, 8, 16),
]


def _fmt_id(f):
    return "int8" if f[0] == 8 else f"int4g{f[1]}"


def _case_id(c):
    return "b{}-i{}-o{}-r{}-K{}".format("x".join(map(str, c[0])) or "0", *c[1:])


def _layer(batch, in_f, out_f, r, K, with_bias, with_xt, bits, gs, dtype=torch.float32, seed=0):
    """test_lora's float layer (same draws) plus W quantized; W itself stays fp32 (the reference's input)."""
    x, xt, W, b, A, B = _float_layer(batch, in_f, out_f, r, K, with_bias, with_xt, seed=seed)
    qw = Q.quantize_weight(W, bits, gs or 64)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(x), cast(xt), W, qw, cast(b), cast(A), cast(B)


# The interpreter runs every program in Python: there the triton backend gets three shapes, one per
# format (a single element; odd widths with a rank chunk of 64 and a short last group (7 = 6 + 1); in = 1031
# = 16 groups of 64 + 7), with every flag on (the dense loop is what the quantized kernels change).
TRITON_INTERPRETED_CASES = {(0, 0), (4, 2), (3, 1)}


def _subset(backend, case, fmt, perturb):
    i, j = CASES.index(case), FORMATS.index(fmt)
    if backend == "triton" and INTERPRETED and ((i, j) not in TRITON_INTERPRETED_CASES or perturb != "A+B+bias"):
        pytest.skip("interpreter: a subset of the shapes on the triton backend (CI time)")
    if backend == "cpu" and perturb != "A+B+bias" and fmt != (4, 6):
        pytest.skip("cpu: single-tensor perturbations with one format (the low-rank parts are the float op's)")


# ----------------------------------------------------------------------------- the format


@pytest.mark.parametrize("fmt", FORMATS, ids=_fmt_id)
@pytest.mark.parametrize("shape", [(1, 1), (7, 1031), (33, 65), (16, 64), (5, 2), (3, 0)])
def test_quantizer_error_bound(shape, fmt):
    bits, gs = fmt
    W = torch.randn(*shape) * 3
    if shape[1] > 3:
        W[0] = 0.0  # an all-zero row / group: scale 1, exact
        W[1, 1:] = W[1, 0]  # a constant row
    qw = Q.quantize_weight(W, bits, gs or 64)
    Wd = dequantize_reference(qw)
    step = step_size(qw)
    assert Wd.shape == W.shape and step.shape == W.shape
    assert bool(((Wd - W).abs() <= step / 2 + 1e-6 * W.abs() + 1e-7).all())
    if shape[1] > 3:
        assert torch.equal(Wd[0], W[0]) and torch.allclose(Wd[1], W[1], rtol=1e-6, atol=0)
    # The C++ dequantization (fused multiply-add) agrees with torch's to fp32 rounding.
    top = float(W.abs().max()) if W.numel() else 1.0
    torch.testing.assert_close(qw.dequantize(), Wd, rtol=0, atol=2.5e-7 * top)
    for dt in (torch.float16, torch.bfloat16):
        torch.testing.assert_close(qw.dequantize(dt).float(), Wd, rtol=torch.finfo(dt).eps, atol=1e-6 * top)
    expected = W.shape[0] * ((W.shape[1] + 1) // 2 + 8 * -(-W.shape[1] // gs)) if bits == 4 else \
        W.shape[0] * (W.shape[1] + 4)
    assert qw.nbytes == expected


def test_quantizer_refusals():
    with pytest.raises(ValueError, match="group_size: expected an even"):
        Q.quantize_weight(torch.randn(4, 8), 4, 7)
    with pytest.raises(ValueError, match="bits"):
        Q.quantize_weight(torch.randn(4, 8), 3)
    with pytest.raises(ValueError, match="inf or nan"):
        Q.quantize_weight(torch.tensor([[1.0, float("nan")]]), 8)
    with pytest.raises(TypeError, match="2-D float"):
        Q.quantize_weight(torch.ones(4, dtype=torch.int64), 8)


# ----------------------------------------------------------------------------- ops vs the dequantized reference


def _op_backends():
    # The reference backend is the definition itself (dequantize, then the float reference that
    # tests/test_lora.py checks); it runs in the smaller tests below.
    return [b for b in _backends() if (b.values[0] if hasattr(b, "values") else b) != "reference"]


@pytest.mark.parametrize("backend", _op_backends())
@pytest.mark.parametrize("perturb", list(FLAGS), ids=list(FLAGS))
@pytest.mark.parametrize("fmt", FORMATS, ids=_fmt_id)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_dual_and_perturbed_match_dequantized_reference(case, fmt, perturb, backend):
    _subset(backend, case, fmt, perturb)
    batch, in_f, out_f, r, K = case
    flags = FLAGS[perturb]
    x, xt, W, qw, b, A, B = _layer(batch, in_f, out_f, r, K, True, True, *fmt)
    Wd = qw.dequantize().to(F64)
    ks = [3 + 5 * j for j in range(K)]
    names = [n for n, on in zip(("A", "B", "bias"), flags) if on]
    low = _low_rank_reference(CASES.index(case), perturb)
    for with_xt in (True, False):
        xt_ = xt if with_xt else None
        y, yt = fwdkern.lora_linear_dual(x, xt_, qw, b, A, B, 1.7, SEED, PIDS, ks, perturb=names, backend=backend)
        ry, ryt = low["dual_xt" if with_xt else "dual"]
        ry = ry + x.to(F64) @ Wd.t()
        if with_xt:
            ryt = ryt + xt.to(F64) @ Wd.t()
        assert y.dtype == x.dtype and yt.dtype == x.dtype
        _assert_close32(y, ry, "y")
        _assert_close32(yt, ryt, "y_tangents")
    yp, ym = fwdkern.lora_linear_perturbed(x, qw, b, A, B, 0.8, SEED, PIDS, ks, 0.05, perturb=names, backend=backend)
    rp, rm = low["perturbed"]
    dense = x.to(F64) @ Wd.t()
    _assert_close32(yp, rp + dense, "y_plus")
    _assert_close32(ym, rm + dense, "y_minus")
    # Against the unquantized weight: within the quantizer's own error, |x| · (step / 2)ᵀ per output.
    fy = low["dual"][0] + x.to(F64) @ W.to(F64).t()
    bound = x.abs().to(F64) @ (step_size(qw).to(F64) / 2).t()
    assert bool(((y.to(F64) - fy).abs() <= bound * (1 + 1e-5) + 1e-5 * fy.abs().max()).all())


_LOW_RANK: dict = {}


def _low_rank_reference(i, perturb):
    """The float64 reference with W = 0 (everything but the dense GEMM) for case i: the layer is linear
    in W, so the reference on any dequantized weight is this plus x Wᵀ (and ẋ_k Wᵀ). Shared by the
    formats and backends of a case (materializing the perturbations is the slow part)."""
    key = (i, perturb)
    if key not in _LOW_RANK:
        batch, in_f, out_f, r, K = CASES[i]
        x, xt, W, _, b, A, B = _layer(batch, in_f, out_f, r, K, True, True, 8, 0)
        Z, ks, flags = torch.zeros_like(W), torch.tensor([3 + 5 * j for j in range(K)]), FLAGS[perturb]
        common = dict(compute_dtype=F64, out_dtype=F64)
        _LOW_RANK[key] = {
            "dual_xt": R.reference_lora_dual(x, xt, Z, b, A, B, 1.7, SEED, (11, 22, 33), ks, "rademacher", flags,
                                             **common),
            "dual": R.reference_lora_dual(x, None, Z, b, A, B, 1.7, SEED, (11, 22, 33), ks, "rademacher", flags,
                                          **common),
            "perturbed": R.reference_lora_perturbed(x, Z, b, A, B, 0.8, SEED, (11, 22, 33), ks, 0.05, "rademacher",
                                                    flags, **common),
        }
    return _LOW_RANK[key]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("fmt", FORMATS, ids=_fmt_id)
def test_quant_linear_dual(fmt, backend):
    """The frozen layer's dual op: y = x Wqᵀ + b and ẏ_k = ẋ_k Wqᵀ; without tangents, None."""
    shapes = (((3, 5), 65, 33, 3), ((), 7, 1, 1), ((2,), 1, 17, 2))
    for batch, in_f, out_f, K in shapes[:2 if backend == "triton" else 3]:
        x, xt, _, qw, b, _, _ = _layer(batch, in_f, out_f, 1, K, out_f % 2 == 1, True, *fmt)
        Wd = qw.dequantize().to(F64)
        y, yt = Q.quant_linear_dual(x, xt, qw, b, backend=backend)
        _assert_close32(y, F.linear(x.to(F64), Wd, None if b is None else b.to(F64)), "y")
        _assert_close32(yt, xt.to(F64) @ Wd.t(), "y_tangents")
        y2, none = Q.quant_linear_dual(x, None, qw, b, backend=backend)
        assert none is None and torch.equal(y2, y)


def test_quant_linear_dual_row_blocks(monkeypatch):
    """A weight larger than one dequantization block (an LM head) is walked in row blocks."""
    monkeypatch.setattr(QF, "CHUNK_ELEMENTS", 64 * 10)
    x, xt, _, qw, b, _, _ = _layer((4,), 64, 45, 1, 2, True, True, 4, 16)
    ref_y, ref_t = Q.quant_linear_dual(x, xt, qw, b, backend="reference")
    y, yt = Q.quant_linear_dual(x, xt, qw, b, backend="cpu")
    assert len(list(QF.dense_chunks(qw, torch.float32))) == 5
    _assert_close32(y, ref_y.to(F64), "y")
    _assert_close32(yt, ref_t.to(F64), "y_tangents")


@pytest.mark.parametrize("backend", _backends())
def test_gaussian_and_empty(backend):
    x, xt, _, qw, b, A, B = _layer((2, 5), 200, 130, 8, 3, True, True, 4, 32)
    ks = [0, 9, 4]
    y, yt = fwdkern.lora_linear_dual(x, xt, qw, b, A, B, 0.5, 99, PIDS, ks, dist="gaussian",
                                     perturb=("A", "B", "bias"), backend=backend)
    ry, ryt = R.reference_lora_dual(x, xt, qw.dequantize(), b, A, B, 0.5, 99, (11, 22, 33), torch.tensor(ks),
                                    "gaussian", (True, True, True), compute_dtype=F64, out_dtype=F64)
    _assert_close32(y, ry, "y")
    _assert_close32(yt, ryt, "y_tangents")
    x0 = torch.zeros(0, 3, 200)
    y, yt = fwdkern.lora_linear_dual(x0, None, qw, b, A, B, 0.5, 99, PIDS, ks, backend=backend)
    assert y.shape == (0, 3, 130) and yt.shape == (3, 0, 3, 130)


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision(dtype, backend):
    """fp16/bf16 activations on a quantized base: error vs the float64 result on the dequantized weight
    at most 2x that of torch's own low-precision evaluation of the same float layer."""
    if backend == "triton" and (dtype == torch.bfloat16 or not TRITON_ON_CPU):
        pytest.skip("triton interpreter: no bf16 / not available")
    x, xt, _, qw, b, A, B = _layer((4, 9), 256, 96, 8, 3, True, True, 4, 64, dtype=dtype)
    ks, flags = list(range(3)), (True, True, True)
    Wd = qw.dequantize()

    def ref(cd):
        return R.reference_lora_dual(*(t.to(cd) for t in (x, xt, Wd, b, A, B)), 2.0, SEED, (11, 22, 33),
                                     torch.tensor(ks), "rademacher", flags, compute_dtype=cd)

    lowp, exact = ref(dtype), ref(F64)
    outs = fwdkern.lora_linear_dual(x, xt, qw, b, A, B, 2.0, SEED, PIDS, ks, perturb=("A", "B", "bias"),
                                    backend=backend)
    for name, out, lo, ex in zip(("y", "y_tangents"), outs, lowp, exact):
        assert out.dtype == dtype
        rel = lambda a: ((a.to(F64) - ex).abs().max() / ex.abs().max()).item()  # noqa: E731
        assert rel(out) <= 2 * max(rel(lo), torch.finfo(dtype).eps), (name, rel(out), rel(lo))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_opcheck(backend):
    """Schema, fake kernels and dispatch of the three custom ops (backend-independent; the triton
    backend's registration is exercised by every triton test above)."""
    x, xt, _, qw, b, A, B = _layer((3,), 24, 16, 4, 2, True, True, 4, 8)
    ks = torch.tensor([0, 7])
    q = (*qw.tensors(), qw.bits, qw.group_size)
    torch.library.opcheck(torch.ops.fwdkern.quant_lora_linear_dual.default,
                          (x, xt, *q, b, A, B, 1.5, 123, 11, 22, 33, ks, "rademacher", True, True, True, backend))
    torch.library.opcheck(torch.ops.fwdkern.quant_lora_linear_perturbed.default,
                          (x, *q, b, A, B, 1.5, 123, 11, 22, 33, ks, 0.01, "rademacher", True, True, True, backend))
    torch.library.opcheck(torch.ops.fwdkern.quant_linear_dual.default, (x, xt, *q, b, backend))


def test_bad_quantized_inputs():
    x, _, W, qw, b, A, B = _layer((3,), 8, 6, 2, 2, True, False, 4, 4)
    d = fwdkern.lora_linear_dual
    with pytest.raises(ValueError, match="x: last dimension"):
        d(x[:, :5], None, qw, b, A, B, 1.0, 0, PIDS, [0])
    with pytest.raises(ValueError, match="int4 expects scales"):
        bad = Q.QuantizedWeight(qw.qdata, qw.scales[:, :1].contiguous(), qw.offsets, 4, 4, 8)
        d(x, None, bad, b, A, B, 1.0, 0, PIDS, [0])
    with pytest.raises(TypeError, match="float32"):
        d(x, None, Q.QuantizedWeight(qw.qdata, qw.scales.half(), qw.offsets, 4, 4, 8), b, A, B, 1.0, 0, PIDS, [0])
    with pytest.raises(ValueError, match="lora_B"):
        d(x, None, qw, b, A, B[:, :1], 1.0, 0, PIDS, [0])
    with pytest.raises(TypeError, match="bias: dtype"):
        Q.quant_linear_dual(x, None, qw, b.double())
    with pytest.raises(TypeError, match="QuantizedWeight"):
        Q.quant_linear_dual(x, None, W, b)
    with pytest.raises(fwdkern.BackendUnavailable):
        Q.quant_linear_dual(x, None, qw, b, backend="cuda")


# ----------------------------------------------------------------------------- modules


def test_quant_linear_module_and_backprop():
    """QuantLinear forward = x Wqᵀ + b; autograd reaches x and a trainable bias, matching the float layer
    holding the dequantized weight (backprop LoRA baselines on a quantized base)."""
    lin = torch.nn.Linear(40, 24)
    ql = QuantLinear.from_linear(lin, 4, 16)
    assert ql.bias is lin.bias and not hasattr(ql, "weight")
    ref = torch.nn.Linear(40, 24)
    with torch.no_grad():
        ref.weight.copy_(ql.dequantize())
        ref.bias.copy_(lin.bias)
    x = torch.randn(3, 5, 40, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y, yr = ql(x), ref(x2)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    yr.backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lin.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-5)


def test_lora_linear_on_quantized_base():
    lin = torch.nn.Linear(33, 20)
    lora = fwdkern.LoRALinear.from_linear(lin, r=4, alpha=8)
    fwdkern.nn.assign_param_ids(lora)
    with torch.no_grad():
        lora.lora_B.weight.normal_()
    lora.base_layer = QuantLinear.from_linear(lin, 8)
    assert lora.quantized and lora.bias is lin.bias
    x, xt = torch.randn(4, 33), torch.randn(2, 4, 33)
    y, yt = lora.forward_dual(x, xt, 5, [0, 1])
    Wd = lora.base_layer.dequantize()
    ry, ryt = R.reference_lora_dual(x, xt, Wd, lin.bias.detach(), lora.lora_A.weight.detach(),
                                    lora.lora_B.weight.detach(), lora.scaling, 5,
                                    (lora.param_ids["A"], lora.param_ids["B"], 0), torch.tensor([0, 1]), "rademacher",
                                    (True, True, False), compute_dtype=F64, out_dtype=F64)
    _assert_close32(y, ry, "y")
    _assert_close32(yt, ryt, "y_tangents")
    _assert_close32(lora(x).detach(), ry, "plain forward")
    yp, ym = lora.forward_perturbed(x, 5, [0, 1], 0.01)
    _, ref_t = lora.forward_dual(x, None, 5, [0, 1], backend="reference")
    torch.testing.assert_close((yp - ym) / 0.02, ref_t, rtol=1e-3, atol=1e-3 * float(ref_t.abs().max()))
    with pytest.raises(RuntimeError, match="quantized"):
        lora.merge()
    # the dense weight of a quantized base: the dequantized W + s·BA
    dense = Wd + lora.scaling * lora.lora_B.weight.detach() @ lora.lora_A.weight.detach()
    _assert_close32(lora.effective_weight(), dense.to(F64), "effective_weight")


def test_embedding_tied_head_and_scale():
    """A tied embedding / LM head is quantized once (shared tensors); embed_scale (Gemma 3) is kept."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    emb = model.get_input_embeddings()
    quantize_base(model, "int4", 16, embed_quant="int8")
    qe, qh = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(qe, QuantEmbedding) and isinstance(qh, QuantLinear) and qe.bits == qh.bits == 8
    assert qe.qweight is qh.qweight  # one copy of the table
    ids = torch.tensor([[0, 5, 99]])
    torch.testing.assert_close(qe(ids), qe.dequantize()[ids])
    assert bool(((qe(ids) - emb.weight[ids]).abs() <= step_size(qe.quantized_weight())[ids] / 2 + 1e-6).all())
    scaled = torch.nn.Embedding(10, 8)
    scaled.embed_scale = torch.tensor(3.0)
    qs = QuantEmbedding.from_embedding(scaled, 8)
    torch.testing.assert_close(qs(torch.tensor([1, 2])), 3.0 * qs.dequantize()[[1, 2]])


# ----------------------------------------------------------------------------- whole models


def _tiny(family, seed=0):
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=100, max_position_embeddings=64)
    if family == "bert":
        cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, num_labels=3, **common)
        return transformers.AutoModelForSequenceClassification.from_config(cfg).eval()
    if family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    else:
        cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, **common)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def _batch(family):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(2, 100, (3, 9), generator=g)
    am = torch.ones(3, 9, dtype=torch.long)
    am[1, 6:] = 0
    b = {"input_ids": ids, "attention_mask": am}
    if family == "bert":
        b["labels"] = torch.tensor([0, 2, 1])
    return b


def _autograd_jvps(model, family, batch, seed, ks):
    """(loss, [∇L · v_k]) by backprop through `model` (float64 accumulation of the dots)."""
    model.zero_grad(set_to_none=True)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits.float()
    if family == "bert":
        loss = F.cross_entropy(logits, batch["labels"])
    else:
        y = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)[:, 1:]
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)
    loss.backward()
    out = []
    for k in ks:
        s = torch.zeros((), dtype=F64)
        for _, pid, p in fwdkern.trainable(model):
            s += (p.grad.double() * fwdkern.perturbation(p.shape, seed, pid, k).double()).sum()
        out.append(s)
    return loss.detach(), torch.stack(out)


@pytest.mark.parametrize("family,base_quant", [("llama", "int8"), ("llama", "int4"), ("gpt2", "int4"),
                                               ("bert", "int8")])
def test_jvp_exact_for_quantized_model(family, base_quant):
    model = fwdkern.patch(_tiny(family), base_quant=base_quant, quant_group_size=16)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for _, _, p in fwdkern.trainable(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    floats = [p for p, m in model.named_modules() if type(m) is torch.nn.Linear]
    assert all(p.endswith(("lora_A", "lora_B", "classifier")) for p in floats), floats  # the base is quantized
    assert not any(isinstance(m, torch.nn.Embedding) for m in model.modules())
    ref = dequantize_base(copy.deepcopy(model))
    batch = _batch(family)
    ks = [0, 1, 5, 9]
    L, jv = fwdkern.jvp(model, batch, seed=11, ks=ks)
    L_ref, jv_ref = _autograd_jvps(ref, family, batch, 11, ks)
    assert torch.allclose(L, L_ref, rtol=1e-5)
    scale = jv_ref.abs().max().clamp_min(1e-3)
    assert torch.allclose(jv.double(), jv_ref, rtol=1e-4, atol=1e-4 * float(scale)), (jv, jv_ref)
    # Backprop through the quantized model itself (QuantLinear's autograd) gives the same gradients.
    _, jv_q = _autograd_jvps(model, family, batch, 11, ks)
    assert torch.allclose(jv_q, jv_ref, rtol=1e-4, atol=1e-4 * float(scale))
    if family == "llama":  # perturbed inference on the quantized base: central differences -> jvp
        lp, lm = fwdkern.perturbed_loss(model, batch, 11, ks[:2], 1e-3)
        assert torch.allclose((lp - lm) / 2e-3, jv[:2], rtol=0.05, atol=0.01 * float(scale))


def test_patch_base_quant_memory_and_options():
    model = _tiny("llama")
    float_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    fwdkern.patch(model, base_quant="int4", quant_group_size=32)
    sizes = quantized_bytes(model)
    # int4 body + int8 tied table: well under a third of the fp32 model (norms and adapters stay float)
    assert sizes["quantized"] + sizes["float"] < float_bytes / 3, (sizes, float_bytes)
    assert all(p.dtype == torch.float32 for _, _, p in fwdkern.trainable(model))
    bert = fwdkern.patch(_tiny("bert"), base_quant="int8", embed_quant=None)
    assert type(bert.classifier) is torch.nn.Linear and bert.classifier.weight.requires_grad
    assert type(bert.bert.embeddings.word_embeddings) is torch.nn.Embedding
    bitfit = fwdkern.patch(_tiny("bert"), peft="bitfit", base_quant="int8")
    assert isinstance(bitfit.bert.encoder.layer[0].output.dense, QuantLinear)
    L, jv = fwdkern.jvp(bitfit, _batch("bert"), 3, [0, 1])
    _, ref = _autograd_jvps(dequantize_base(copy.deepcopy(bitfit)), "bert", _batch("bert"), 3, [0, 1])
    assert torch.allclose(jv.double(), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    with pytest.raises(ValueError, match="ia3"):
        fwdkern.patch(_tiny("bert"), peft="ia3", base_quant="int8")
    with pytest.raises(ValueError, match="base_quant"):
        fwdkern.patch(_tiny("bert"), base_quant="int3")
    with pytest.raises(ValueError, match="quant_group_size"):
        fwdkern.patch(_tiny("bert"), base_quant="int4", quant_group_size=33)
    with pytest.raises(ValueError, match="no frozen"):
        quantize_base(torch.nn.Sequential(torch.nn.Linear(3, 3)), "int8")


# ----------------------------------------------------------------------------- GPU (skip without CUDA)

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@GPU
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("fmt", FORMATS, ids=_fmt_id)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_gpu_quant_lora_ops_match_reference(case, fmt, backend):
    if not fwdkern.backends.available(backend, "cuda"):
        pytest.skip(f"backend {backend!r} unavailable on this GPU machine")
    batch, in_f, out_f, r, K = case
    x, xt, _, qw, b, A, B = _layer(batch, in_f, out_f, r, K, True, True, *fmt)
    Wd = qw.dequantize()
    ks = [3 + 5 * j for j in range(K)]
    qc = Q.QuantizedWeight(*(t.cuda() if t is not None else None for t in qw.tensors()), qw.bits, qw.group_size,
                           qw.in_features)
    c = lambda t: t.cuda() if t is not None else None  # noqa: E731
    y, yt = fwdkern.lora_linear_dual(c(x), c(xt), qc, c(b), c(A), c(B), 1.7, SEED, PIDS, ks,
                                     perturb=("A", "B", "bias"), backend=backend)
    ry, ryt = R.reference_lora_dual(x, xt, Wd, b, A, B, 1.7, SEED, (11, 22, 33), torch.tensor(ks), "rademacher",
                                    (True, True, True), compute_dtype=F64, out_dtype=F64)
    torch.backends.cuda.matmul.allow_tf32 = False
    _assert_close32(y.cpu(), ry, "y")
    _assert_close32(yt.cpu(), ryt, "y_tangents")
    yp, ym = fwdkern.lora_linear_perturbed(c(x), qc, c(b), c(A), c(B), 0.8, SEED, PIDS, ks, 0.05,
                                           perturb=("A", "B", "bias"), backend=backend)
    rp, rm = R.reference_lora_perturbed(x, Wd, b, A, B, 0.8, SEED, (11, 22, 33), torch.tensor(ks), 0.05, "rademacher",
                                        (True, True, True), compute_dtype=F64, out_dtype=F64)
    _assert_close32(yp.cpu(), rp, "y_plus")
    _assert_close32(ym.cpu(), rm, "y_minus")
    fy, fyt = Q.quant_linear_dual(c(x), c(xt), qc, c(b), backend=backend)
    _assert_close32(fy.cpu(), F.linear(x.to(F64), Wd.to(F64), b.to(F64)), "frozen y")
    _assert_close32(fyt.cpu(), xt.to(F64) @ Wd.to(F64).t(), "frozen y_tangents")


@GPU
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("fmt", FORMATS, ids=_fmt_id)
def test_gpu_quant_bf16(fmt, backend):
    """bf16 activations on the GPU (the interpreter has no bf16): within 2x torch's bf16 error."""
    if not fwdkern.backends.available(backend, "cuda"):
        pytest.skip(f"backend {backend!r} unavailable on this GPU machine")
    x, xt, _, qw, b, A, B = _layer((8, 33), 1024, 1031, 16, 8, True, True, *fmt, dtype=torch.bfloat16)
    Wd = qw.dequantize()
    qc = Q.QuantizedWeight(*(t.cuda() if t is not None else None for t in qw.tensors()), qw.bits, qw.group_size,
                           qw.in_features)
    ks = list(range(8))
    flags = (True, True, True)

    def ref(cd, dev):
        return R.reference_lora_dual(*(t.to(dev, cd) for t in (x, xt, Wd, b, A, B)), 2.0, SEED, (11, 22, 33),
                                     torch.tensor(ks), "rademacher", flags, compute_dtype=cd)

    lowp, exact = ref(torch.bfloat16, "cuda"), ref(F64, "cpu")
    outs = fwdkern.lora_linear_dual(x.cuda(), xt.cuda(), qc, b.cuda(), A.cuda(), B.cuda(), 2.0, SEED, PIDS, ks,
                                    perturb=("A", "B", "bias"), backend=backend)
    for name, out, lo, ex in zip(("y", "y_tangents"), outs, lowp, exact):
        rel = lambda a: ((a.cpu().to(F64) - ex).abs().max() / ex.abs().max()).item()  # noqa: E731
        assert rel(out) <= 2 * max(rel(lo), torch.finfo(torch.bfloat16).eps), (name, rel(out), rel(lo))
