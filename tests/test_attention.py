"""Dual attention (fwdkern.ops.attention) vs eager attention under torch.func.jvp.

Hostile shapes: T in {1, 17, 129} (129 > one key chunk when chunk=64), head dims 32/64/80,
GQA, causal, bool and additive padding masks, fully masked rows, absent tangents.
"""
import pytest
import torch
import torch.nn.functional as F

from fwdkern.dual import Dual, NoTangentRule
from fwdkern.ops.attention import dual_attention, reference_attention


def _inputs(B, Hq, Hkv, Tq, Tk, D, K, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    q, k, v = r(B, Hq, Tq, D), r(B, Hkv, Tk, D), r(B, Hkv, Tk, D)
    return (q, k, v), (r(K, B, Hq, Tq, D), r(K, B, Hkv, Tk, D), r(K, B, Hkv, Tk, D))


def _ref_jvp(prims, tans, **kw):
    f = lambda q, k, v: reference_attention(q, k, v, **kw)  # noqa: E731
    outs = [torch.func.jvp(f, prims, tuple(t[i] for t in tans)) for i in range(tans[0].shape[0])]
    return outs[0][0], torch.stack([o[1] for o in outs])


def _padding_mask(B, Tq, Tk, kind):
    keep = torch.ones(B, 1, Tq, Tk, dtype=torch.bool)
    keep[-1, ..., max(1, Tk - 5):] = False  # last batch row: right padding (keeps >= 1 key)
    if kind == "bool":
        return keep
    return torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)


CASES = [
    # (T, D, Hq, Hkv, causal, mask)
    (1, 32, 4, 4, False, None),
    (1, 64, 4, 2, True, None),
    (17, 32, 4, 1, True, None),
    (17, 64, 6, 2, False, "bool"),
    (17, 80, 4, 4, False, "float"),
    (129, 32, 4, 2, True, None),
    (129, 64, 2, 2, False, "bool"),
    (129, 80, 4, 2, False, "float"),
]


@pytest.mark.parametrize("T,D,Hq,Hkv,causal,mask", CASES)
@pytest.mark.parametrize("backend,chunk", [("reference", 64), ("cpu", 64), ("cpu", 256)],
                         ids=["chunked", "cpu_chunked_past_64", "cpu_one_block"])
def test_dual_attention_matches_forward_ad(T, D, Hq, Hkv, causal, mask, backend, chunk):
    # Both torch paths against forward AD: the reference's online-softmax chunks, and the cpu
    # backend's one-block form (every key at once when Tk <= chunk, chunked past it).
    B, K = 2, 3
    prims, tans = _inputs(B, Hq, Hkv, T, T, D, K, seed=T * D + Hq)
    am = _padding_mask(B, T, T, mask) if mask else None
    ref_o, ref_t = _ref_jvp(prims, tans, attn_mask=am, is_causal=causal)
    o, ot = dual_attention(*prims, *tans, attn_mask=am, is_causal=causal, chunk=chunk, backend=backend)
    torch.testing.assert_close(o, ref_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ot, ref_t, rtol=1e-4, atol=1e-4)
    # Primal also equals torch's own SDPA (GQA via enable_gqa).
    sd = F.scaled_dot_product_attention(*prims, attn_mask=am, is_causal=causal, enable_gqa=Hq != Hkv)
    torch.testing.assert_close(o, sd, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("which", [(0,), (1,), (2,), (0, 2), (1, 2)])
@pytest.mark.parametrize("chunk", [8, 64], ids=["chunked", "one_block"])
def test_dual_attention_partial_tangents(which, chunk):
    # Absent tangents (None) are zero: e.g. LoRA on q,v of the first layer leaves k without a tangent.
    B, Hq, Hkv, T, D, K = 1, 4, 2, 17, 32, 2
    prims, tans = _inputs(B, Hq, Hkv, T, T, D, K, seed=7)
    tans_used = tuple(t if i in which else None for i, t in enumerate(tans))
    tans_zero = tuple(t if i in which else torch.zeros_like(t) for i, t in enumerate(tans))
    ref_o, ref_t = _ref_jvp(prims, tans_zero, is_causal=True)
    o, ot = dual_attention(*prims, *tans_used, is_causal=True, chunk=chunk)
    torch.testing.assert_close(ot, ref_t, rtol=1e-4, atol=1e-4)
    o2, none = dual_attention(*prims, None, None, None, is_causal=True)
    assert none is None
    torch.testing.assert_close(o2, ref_o, rtol=1e-5, atol=1e-5)


def test_fully_masked_rows_give_zero():
    B, H, T, D, K = 1, 2, 5, 32, 2
    prims, tans = _inputs(B, H, H, T, T, D, K, seed=3)
    keep = torch.ones(B, 1, T, T, dtype=torch.bool)
    keep[..., 1, :] = False  # query row 1 sees no key
    o, ot = dual_attention(*prims, *tans, attn_mask=keep)
    assert torch.all(o[:, :, 1] == 0) and torch.all(ot[:, :, :, 1] == 0)
    ref_o, ref_t = _ref_jvp(prims, tans, attn_mask=keep)
    rows = [0, 2, 3, 4]
    torch.testing.assert_close(o[:, :, rows], ref_o[:, :, rows], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ot[:, :, :, rows], ref_t[:, :, :, rows], rtol=1e-4, atol=1e-4)


def test_cross_lengths_and_bf16():
    # Tq != Tk (no causal), then a bf16 run against the fp32 result.
    prims, tans = _inputs(2, 4, 2, 3, 17, 64, 2, seed=11)
    ref_o, ref_t = _ref_jvp(prims, tans)
    o, ot = dual_attention(*prims, *tans, chunk=16)
    torch.testing.assert_close(ot, ref_t, rtol=1e-4, atol=1e-4)
    ob, otb = dual_attention(*(p.bfloat16() for p in prims), *(t.bfloat16() for t in tans))
    assert ob.dtype == torch.bfloat16 and otb.dtype == torch.bfloat16
    torch.testing.assert_close(otb.float(), ref_t, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("causal", [True, False])
def test_bf16_tangent_products(causal):
    # tangent_dtype=bf16: fp32 inputs, the tangents' four products on bf16 operands. The primal is
    # bit-identical to the fp32 call; the tangents stay within bf16 rounding of the exact ones
    # (bf16 keeps 8 bits: 0.4 % per operand, so 1 % on average and 2 % of the largest value at
    # worst) and differ from them by far more than fp32 rounding (the bf16 products ran); the
    # reference backend ignores the setting.
    prims, tans = _inputs(2, 9, 3, 33, 33, 64, 4, seed=5)
    ref_o, ref_t = _ref_jvp(prims, tans, is_causal=causal)
    o32, t32 = dual_attention(*prims, *tans, is_causal=causal)
    o, t = dual_attention(*prims, *tans, is_causal=causal, tangent_dtype=torch.bfloat16)
    assert torch.equal(o, o32) and t.dtype == torch.float32
    err = (t - ref_t).abs()
    assert err.mean() < 1e-2 * ref_t.abs().mean() and err.max() < 2e-2 * ref_t.abs().max()
    assert (t32 - ref_t).abs().max() < err.max() / 10
    _, tr = dual_attention(*prims, *tans, is_causal=causal, tangent_dtype=torch.bfloat16, backend="reference")
    _, tr32 = dual_attention(*prims, *tans, is_causal=causal, backend="reference")
    assert torch.equal(tr, tr32)


def test_sdpa_on_dual_tensors_dispatches_to_dual_attention():
    prims, tans = _inputs(1, 4, 2, 17, 17, 32, 2, seed=5)
    q, k, v = (Dual(p, t) for p, t in zip(prims, tans))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert isinstance(out, Dual)
    ref_o, ref_t = _ref_jvp(prims, tans, is_causal=True)
    torch.testing.assert_close(out.tangent, ref_t, rtol=1e-4, atol=1e-4)
    with pytest.raises(NoTangentRule, match="dropout_p"):
        F.scaled_dot_product_attention(q, k, v, dropout_p=0.1, enable_gqa=True)


# ----------------------------------------------------------------------------- Triton (interpreter on CPU)

TRITON_CASES = [
    (1, 64, 2, 1, False, None),
    (17, 32, 4, 2, True, None),
    (17, 80, 2, 2, False, "bool"),
    (129, 64, 2, 1, False, "float"),
]


def _triton_ok():
    import os

    from fwdkern import backends

    return backends.has_triton() and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


@pytest.mark.skipif(not _triton_ok(), reason="needs triton (GPU, or TRITON_INTERPRET=1 on CPU)")
@pytest.mark.parametrize("T,D,Hq,Hkv,causal,mask", TRITON_CASES)
def test_triton_dual_attention_matches_forward_ad(T, D, Hq, Hkv, causal, mask):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    B, K = 1, 2
    prims, tans = _inputs(B, Hq, Hkv, T, T, D, K, seed=T + D)
    am = _padding_mask(B + 1, T, T, mask)[1:] if mask else None  # the last row is the padded one
    ref_o, ref_t = _ref_jvp(prims, tans, attn_mask=am, is_causal=causal)
    to = lambda t: t.to(dev) if t is not None else None  # noqa: E731
    o, ot = dual_attention(*map(to, prims), *map(to, tans), attn_mask=to(am), is_causal=causal, backend="triton")
    torch.testing.assert_close(o.cpu(), ref_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ot.cpu(), ref_t, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not _triton_ok(), reason="needs triton (GPU, or TRITON_INTERPRET=1 on CPU)")
def test_triton_dual_attention_partial_tangents_fp16():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    prims, tans = _inputs(1, 2, 1, 17, 17, 32, 2, seed=9)
    ref_o, ref_t = _ref_jvp(prims, (torch.zeros_like(tans[0]), tans[1], torch.zeros_like(tans[2])), is_causal=True)
    h = lambda t: t.to(dev, torch.float16)  # noqa: E731
    o, ot = dual_attention(*map(h, prims), None, h(tans[1]), None, is_causal=True, backend="triton")
    assert ot.dtype == torch.float16
    torch.testing.assert_close(ot.float().cpu(), ref_t, rtol=2e-2, atol=2e-2)
    _, none = dual_attention(*map(h, prims), None, None, None, backend="triton")
    assert none is None


# ----------------------------------------------------------------------------- custom op


def _attention_backends():
    return ["reference", "cpu"] + (["triton"] if _triton_ok() else [])


@pytest.mark.parametrize("backend", _attention_backends())
@pytest.mark.parametrize("masked", [False, True], ids=["causal", "mask"])
def test_opcheck(backend, masked):
    dev = "cuda" if torch.cuda.is_available() and backend == "triton" else "cpu"
    prims, tans = _inputs(1, 2, 1, 5, 5, 16, 2, seed=1)
    prims, tans = tuple(t.to(dev) for t in prims), tuple(t.to(dev) for t in tans)
    mask = _padding_mask(1, 5, 5, "bool").to(dev) if masked else None
    torch.library.opcheck(torch.ops.fwdkern.dual_attention.default,
                          (*prims, tans[0], None, tans[2], mask, not masked, 0.25, 2, None, backend))
    torch.library.opcheck(torch.ops.fwdkern.dual_attention.default,
                          (*prims, None, tans[1], tans[2], mask, not masked, 0.25, 8, torch.bfloat16, backend))


def test_torch_compile_fullgraph():
    prims, tans = _inputs(1, 4, 2, 17, 17, 32, 2, seed=2)

    def f(q, k, v, qt):
        o, ot = dual_attention(q, k, v, qt, None, None, is_causal=True, chunk=8)
        return o * 2, ot.sum(0)

    eager = f(*prims, tans[0])
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(*prims, tans[0])
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)


def test_bad_inputs_raise():
    prims, tans = _inputs(1, 4, 2, 5, 5, 16, 2, seed=3)
    q, k, v = prims
    bad = [
        (ValueError, "multiple", lambda: dual_attention(q, torch.randn(1, 3, 5, 16), torch.randn(1, 3, 5, 16), None, None,
                                                         None)),
        (ValueError, "is_causal", lambda: dual_attention(q, k, v, None, None, None,
                                                          attn_mask=torch.ones(5, 5, dtype=torch.bool), is_causal=True)),
        (ValueError, "q_t", lambda: dual_attention(q, k, v, tans[0][:, :, :2], None, None)),
        (ValueError, "k_t", lambda: dual_attention(q, k, v, tans[0], tans[1][:1], None)),
        (ValueError, "attn_mask", lambda: dual_attention(q, k, v, None, None, None, attn_mask=torch.ones(3, 5))),
        (ValueError, "v:", lambda: dual_attention(q, k, v[:, :, :4], None, None, None)),
        (TypeError, "q:", lambda: dual_attention(q.long(), k, v, None, None, None)),
        (TypeError, "chunk", lambda: dual_attention(q, k, v, None, None, None, chunk=2.5)),
        (ValueError, "chunk", lambda: dual_attention(q, k, v, None, None, None, chunk=0)),
        (ValueError, "backend", lambda: dual_attention(q, k, v, None, None, None, backend="flash")),
        (ValueError, "tangent_dtype", lambda: dual_attention(q, k, v, None, None, None, tangent_dtype=torch.int8)),
    ]
    for exc, match, call in bad:
        with pytest.raises(exc, match=match):
            call()
