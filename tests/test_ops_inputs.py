"""Argument checking of the ops: every backend refuses the same inputs with the same clear error,
or answers like the reference (overlapping targets, stream limits, compiled vs eager, zero-size
and K=0 calls, non-integers, scalars past float32, autograd leaves, meta tensors), plus a
hypothesis fuzz of the seeded ops' and the LoRA ops' arguments."""
import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import fwdkern
from fwdkern.ops import reference_lora as RL
from fwdkern.ops._validate import overlaps
from fwdkern.ops.attention import dual_attention
from fwdkern.ops.reference import reference_seeded_axpy_, reference_seeded_dot

from conftest import available_backends

BACKENDS = available_backends()
REFUSED = (TypeError, ValueError, fwdkern.BackendUnavailable)
F32_MAX = torch.finfo(torch.float32).max


# ----------------------------------------------------------------------------- overlapping targets


def _brute_overlaps(sizes, strides):
    offs = [sum(i * s for i, s in zip(idx, strides)) for idx in itertools.product(*(range(n) for n in sizes))]
    return len(offs) != len(set(offs))


def test_overlap_check_is_exact():
    for sizes in itertools.product(range(1, 5), repeat=2):
        for strides in itertools.product(range(0, 7), repeat=2):
            v = torch.empty(64).as_strided(sizes, strides)
            assert overlaps(v) == _brute_overlaps(sizes, strides), (sizes, strides)


@pytest.mark.parametrize("backend", BACKENDS)
def test_overlapping_view_is_refused(backend):
    base = torch.zeros(16)
    rows = torch.as_strided(base, (3, 4), (2, 1))  # rows overlap by two elements
    with pytest.raises(ValueError, match="overlapping"):
        fwdkern.seeded_axpy_(rows, 1, 2, [0], [1.0], backend=backend)
    assert torch.count_nonzero(base) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_interleaved_view_without_overlap_is_updated(backend):
    # strides (3, 2) of a [2, 3] view interleave rows without sharing an element
    base = torch.arange(16, dtype=torch.float32)
    v = torch.as_strided(base, (2, 3), (3, 2))
    expected = reference_seeded_axpy_(v.clone(), 1, 2, [0, 5], [1.0, -0.5], alpha=0.25)
    fwdkern.seeded_axpy_(v, 1, 2, [0, 5], [1.0, -0.5], alpha=0.25, backend=backend)
    torch.testing.assert_close(v, expected)


# ----------------------------------------------------------------------------- stream limits


def test_gaussian_column_limit_is_enforced():
    wide = torch.zeros(1).expand(2**34 + 1)  # no allocation
    with pytest.raises(ValueError, match="2\\^34"):
        fwdkern.seeded_dot(wide, 1, 2, [0], dist="gaussian")
    with pytest.raises(ValueError, match="2\\^34"):
        fwdkern.perturbation((2, 2**34 + 1), 1, 2, 0, dist="gaussian")
    with pytest.raises(ValueError, match="2\\^34"):
        fwdkern.seeded_matmul(torch.zeros(1, 1).expand(3, 2**34 + 1), 1, 2, [0], 4, dist="gaussian")
    with pytest.raises(ValueError, match="2\\^36"):
        fwdkern.perturbation((2**36 + 1,), 1, 2, 0)
    # at the limit: fine (meta: shapes only)
    assert fwdkern.perturbation((2**34,), 1, 2, 0, dist="gaussian", device="meta").shape == (2**34,)
    with pytest.raises(ValueError, match="rows"):
        fwdkern.perturbation((2**32, 1), 1, 2, 0, device="meta")


# ----------------------------------------------------------------------------- compiled == eager


def _compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, backend="aot_eager", fullgraph=True)


def test_compiled_and_eager_refuse_the_same_values():
    nan_t = torch.tensor([1.0, float("nan"), 2.0])

    def dot(t):
        return fwdkern.seeded_dot(t, 7, 1, [0, 1])

    def axpy(p, c):
        fwdkern.seeded_axpy_(p, 7, 1, torch.tensor([0, 1]), c)
        return p

    def axpy_ks(p, ks):
        fwdkern.seeded_axpy_(p, 7, 1, ks, [1.0, 2.0])
        return p

    cases = [
        (dot, (nan_t,), "NaN"),
        (axpy, (torch.zeros(5), torch.tensor([1.0, float("inf")])), "coeffs"),
        (axpy, (torch.zeros(5), torch.tensor([1.0, 1e39], dtype=torch.float64)), "coeffs"),
        (axpy_ks, (torch.zeros(5), torch.tensor([0, 2**32])), "ks"),
        (axpy_ks, (torch.zeros(5), torch.tensor([-1, 0])), "ks"),
    ]
    for fn, args, match in cases:
        with pytest.raises(ValueError, match=match):
            fn(*(a.clone() for a in args))
        with pytest.raises(ValueError, match=match):
            _compiled(fn)(*(a.clone() for a in args))


def test_fullgraph_compile_of_the_seeded_ops():
    def step(p, t, ks, c):
        v = fwdkern.perturbation((3, 130), 9, 4, 2, dist="gaussian")
        fwdkern.seeded_axpy_(p, 9, 4, ks, c, alpha=-0.5)
        return fwdkern.seeded_dot(t, 9, 4, ks) + v.sum()

    ks, c = torch.tensor([0, 3, 2**32 - 1]), torch.tensor([0.5, -1.0, 2.0])
    t = torch.randn(7, 33)
    p1, p2 = torch.randn(300), None
    p2 = p1.clone()
    out = _compiled(step)(p1, t, ks, c)
    torch.testing.assert_close(out, step(p2, t, ks, c))
    assert torch.equal(p1, p2)


# ----------------------------------------------------------------------------- zero sizes and K = 0


def _lora_layer(batch, in_f, out_f, r, K, dtype=torch.float32):
    g = torch.Generator().manual_seed(in_f + 3 * out_f + r)
    rnd = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return rnd(*batch, in_f), rnd(K, *batch, in_f), rnd(out_f, in_f), rnd(out_f), rnd(r, in_f), rnd(out_f, r)


def _close(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(3, 0, 5, 2, 2), (0, 4, 5, 2, 2), (3, 4, 0, 2, 2), (3, 4, 5, 0, 2),
                                   (3, 4, 5, 2, 0), (3, 0, 5, 0, 0)], ids=lambda s: "M{}-in{}-out{}-r{}-K{}".format(*s))
def test_zero_sizes_match_the_reference(shape, backend):
    M, in_f, out_f, r, K = shape
    x, xt, W, b, A, B = _lora_layer((M,), in_f, out_f, r, K)
    ks, perturb, pids = list(range(K)), ("A", "B", "bias"), (1, 2, 3)
    got = fwdkern.lora_linear_dual(x, xt, W, b, A, B, 1.5, 5, pids, ks, perturb=perturb, backend=backend)
    ref = RL.reference_lora_dual(x, xt, W, b, A, B, 1.5, 5, pids, torch.tensor(ks, dtype=torch.int64), "rademacher",
                                 (True, True, True))
    for g_, r_ in zip(got, ref):
        _close(g_, r_)
    got = fwdkern.lora_linear_perturbed(x, W, b, A, B, 1.5, 5, pids, ks, 0.1, perturb=perturb, backend=backend)
    ref = RL.reference_lora_perturbed(x, W, b, A, B, 1.5, 5, pids, torch.tensor(ks, dtype=torch.int64), 0.1,
                                      "rademacher", (True, True, True))
    for g_, r_ in zip(got, ref):
        _close(g_, r_)
    out = fwdkern.seeded_matmul(x, 5, 6, ks, out_f, backend=backend)
    _close(out, RL.reference_seeded_matmul(x, 5, 6, torch.tensor(ks, dtype=torch.int64), out_f, "rademacher"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_zero_everywhere(backend):
    p = torch.randn(4, 5)
    before = p.clone()
    assert fwdkern.seeded_axpy_(p, 1, 2, [], [], backend=backend) is p and torch.equal(p, before)
    fwdkern.seeded_axpy_(p, 1, 2, torch.zeros(0, dtype=torch.int64), torch.zeros(0), backend=backend)
    assert torch.equal(p, before)
    d = fwdkern.seeded_dot(p, 1, 2, [], backend=backend)
    assert d.shape == (0,) and d.dtype == torch.float32
    assert fwdkern.seeded_matmul(p, 1, 2, [], 3, backend=backend).shape == (0, 4, 3)
    x, _, W, b, A, B = _lora_layer((2, 3), 5, 4, 2, 0)
    y, yt = fwdkern.lora_linear_dual(x, None, W, b, A, B, 1.0, 1, (1, 2), [], backend=backend)
    assert yt.shape == (0, 2, 3, 4)
    yp, ym = fwdkern.lora_linear_perturbed(x, W, b, A, B, 1.0, 1, (1, 2), [], 0.1, backend=backend)
    assert yp.shape == ym.shape == (0, 2, 3, 4)
    with pytest.raises(TypeError, match="ks"):  # an empty *float* tensor is still a float tensor
        fwdkern.seeded_dot(p, 1, 2, torch.tensor([]), backend=backend)


# ----------------------------------------------------------------------------- integers and scalars


def test_non_integers_are_refused():
    bad = [
        (lambda: fwdkern.perturbation((2.7, 3), 1, 2, 0), "shape"),
        (lambda: fwdkern.perturbation((True, 3), 1, 2, 0), "shape"),
        (lambda: fwdkern.perturbation("23", 1, 2, 0), "shape"),
        (lambda: fwdkern.perturbation((3,), 1, 2, 1.0), "k"),
        (lambda: fwdkern.perturbation((3,), 1, 2.0, 0), "param_id"),
        (lambda: fwdkern.perturbation((3,), True, 2, 0), "seed"),
        (lambda: fwdkern.seeded_dot(torch.ones(3), 1, 2, [1.0]), "ks"),
        (lambda: fwdkern.seeded_dot(torch.ones(3), 1, 2, [True]), "ks"),
        (lambda: fwdkern.seeded_dot(torch.ones(3), 1, 2, np.array([0.5])), "ks"),
        (lambda: fwdkern.seeded_dot(torch.ones(3), 1, 2, "01"), "ks"),
        (lambda: fwdkern.seeded_matmul(torch.ones(3), 1, 2, [0], 2.0), "n"),
    ]
    for call, match in bad:
        with pytest.raises((TypeError, ValueError), match=match):
            call()
    # numpy and 0-d tensor integers are integers
    v = fwdkern.perturbation((np.int64(3), 4), np.uint64(2**63), np.int32(5), torch.tensor(7))
    assert torch.equal(v, fwdkern.perturbation((3, 4), 2**63, 5, 7))
    assert torch.equal(fwdkern.seeded_dot(torch.ones(5), 1, 2, np.array([3, 4])),
                       fwdkern.seeded_dot(torch.ones(5), 1, 2, [3, 4]))


def test_scalars_past_float32_are_refused():
    x, _, W, b, A, B = _lora_layer((2,), 5, 4, 2, 1)
    big = 1e39
    with pytest.raises(ValueError, match="alpha.*overflows float32"):
        fwdkern.seeded_axpy_(torch.zeros(3), 1, 2, [0], [1.0], alpha=big)
    with pytest.raises(ValueError, match="scaling.*overflows float32"):
        fwdkern.lora_linear_dual(x, None, W, b, A, B, big, 1, (1, 2), [0])
    with pytest.raises(ValueError, match="eps.*overflows float32"):
        fwdkern.lora_linear_perturbed(x, W, b, A, B, 1.0, 1, (1, 2), [0], big)
    with pytest.raises(ValueError, match="coeffs"):
        fwdkern.seeded_axpy_(torch.zeros(3), 1, 2, [0], [big])
    p = torch.zeros(3)
    fwdkern.seeded_axpy_(p, 1, 2, [0], [1.0], alpha=float(F32_MAX) / 2**200)  # in range
    fwdkern.seeded_axpy_(p, 1, 2, [0], [1.0], alpha=big, check_finite=False)  # opted out


# ----------------------------------------------------------------------------- autograd and meta


def test_leaf_requiring_grad_is_refused_like_torch():
    p = torch.zeros(5, requires_grad=True)
    with pytest.raises(RuntimeError) as torch_err:
        p.add_(1.0)
    with pytest.raises(RuntimeError, match="a leaf Variable that requires grad is being used in an in-place"):
        fwdkern.seeded_axpy_(p, 1, 2, [0], [1.0])
    assert "a leaf Variable that requires grad" in str(torch_err.value)
    with pytest.raises(RuntimeError, match="view of a leaf Variable"):
        fwdkern.seeded_axpy_(p[1:], 1, 2, [0], [1.0])
    assert torch.count_nonzero(p) == 0
    with torch.no_grad():
        fwdkern.seeded_axpy_(p, 1, 2, [0], [1.0])
    assert torch.count_nonzero(p) == 5
    fwdkern.seeded_axpy_(p.data, 1, 2, [0], [-1.0])  # .data, as the engine and the README use
    assert torch.count_nonzero(p) == 0


def test_meta_tensors_give_shapes():
    m = torch.empty(4, 130, device="meta")
    assert fwdkern.seeded_dot(m, 1, 2, [0, 1, 2]).shape == (3,)
    assert fwdkern.seeded_axpy_(m, 1, 2, [0], [1.0]) is m
    assert fwdkern.perturbation((2, 3), 1, 2, 0, device="meta").device.type == "meta"
    assert fwdkern.seeded_matmul(m, 1, 2, [0, 1], 7).shape == (2, 4, 7)
    x, xt, W, b, A, B = (t.to("meta") for t in _lora_layer((2, 3), 5, 4, 2, 2))
    y, yt = fwdkern.lora_linear_dual(x, xt, W, b, A, B, 1.0, 1, (1, 2, 3), [0, 1], perturb=("A", "B", "bias"))
    assert y.shape == (2, 3, 4) and yt.shape == (2, 2, 3, 4) and y.device.type == "meta"
    yp, _ = fwdkern.lora_linear_perturbed(x, W, b, A, B, 1.0, 1, (1, 2), [0, 1], 0.1)
    assert yp.shape == (2, 2, 3, 4)
    q = torch.empty(1, 4, 5, 16, device="meta")
    o, ot = dual_attention(q, q[:, :2], q[:, :2], torch.empty(3, 1, 4, 5, 16, device="meta"), None, None)
    assert o.shape == (1, 4, 5, 16) and ot.shape == (3, 1, 4, 5, 16)


# ----------------------------------------------------------------------------- fuzz

FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

def mostly(good, bad, weight=9):
    """`good` about weight/(weight+1) of the time, so that many examples get far enough to be compared
    (st.one_of would merge repeated branches)."""
    return st.sampled_from(range(weight + 1)).flatmap(lambda i: bad if i == weight else good)


BAD_INTS = st.one_of(st.integers(-3, -1), st.sampled_from([2**32, 2**64, 2**65]), st.floats(-2, 5), st.booleans(),
                     st.just("3"), st.just(None))
SEEDS = mostly(st.one_of(st.integers(0, 2**64 - 1), st.integers(0, 2**31).map(np.int64),
                         st.integers(0, 9).map(lambda v: torch.tensor(v))), BAD_INTS)
U32S = mostly(st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 2**32 - 1])), BAD_INTS)
GOOD_KS = st.one_of(
    st.lists(st.integers(0, 2**32 - 1), max_size=4),
    st.lists(st.sampled_from([0, 3, 2**32 - 1]), max_size=3).map(lambda v: torch.tensor(v, dtype=torch.int64)),
    st.lists(st.integers(0, 9), max_size=3).map(lambda v: torch.tensor(v, dtype=torch.int32)),
    st.lists(st.integers(0, 9), max_size=3).map(lambda v: np.array(v, dtype=np.int64)),
)
KS = mostly(GOOD_KS, st.one_of(
    st.lists(st.integers(-2, 2**33), min_size=1, max_size=4),
    st.sampled_from([[1.0], [True], torch.tensor([0.5]), torch.tensor([[1]]), "12", 5, None, torch.tensor([-1]),
                     torch.tensor([2**32])])))
COEF_VALUES = mostly(st.floats(-4, 4), st.sampled_from([float("nan"), float("inf"), 1e39]), weight=15)
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32]
DISTS = mostly(st.sampled_from(["rademacher", "gaussian"]), st.sampled_from(["uniform", 3]))
SHAPES = [(), (0,), (1,), (7,), (129,), (3, 5), (2, 0, 4), (2, 3, 4)]


@st.composite
def tensors(draw):
    shape = draw(st.sampled_from(SHAPES))
    dtype = draw(st.sampled_from(DTYPES))
    kind = draw(st.sampled_from(["contiguous"] * 3 + ["transposed", "sliced", "expanded", "overlapping", "list"]))
    base = torch.randn(shape).to(dtype) if dtype != torch.int32 else torch.zeros(shape, dtype=dtype)
    if kind == "transposed" and base.dim() >= 2:
        return base.transpose(-1, -2)
    if kind == "sliced" and base.dim() >= 1:
        return torch.randn(*shape[:-1], shape[-1] + 3).to(dtype)[..., 1:1 + shape[-1]]
    if kind == "expanded" and base.dim() >= 1:
        return base.reshape(-1)[:1].expand(*shape) if base.numel() else base
    if kind == "overlapping":
        return torch.randn(20).to(dtype).as_strided((3, 4), (2, 1))
    if kind == "list":
        return base.tolist()
    return base


def _backend(draw):
    return draw(mostly(st.sampled_from(["cpu", "reference", None]), st.just("bogus")))


@FUZZ
@given(data=st.data())
def test_fuzz_seeded_ops(data):
    op = data.draw(st.sampled_from(["axpy", "dot", "perturbation", "matmul"]))
    seed, pid = data.draw(SEEDS), data.draw(U32S)
    ks = data.draw(KS)
    dist = data.draw(DISTS)
    backend = _backend(data.draw)
    try:
        if op == "perturbation":
            shape = data.draw(mostly(st.sampled_from(SHAPES), st.sampled_from([(2.5,), (-1, 2), "x", (True,)])))
            k = data.draw(U32S)
            dtype = data.draw(mostly(st.sampled_from(DTYPES[:3]), st.just(torch.int8)))
            got = fwdkern.perturbation(shape, seed, pid, k, dist=dist, dtype=dtype, backend=backend)
            ref = fwdkern.perturbation(shape, seed, pid, k, dist=dist, dtype=dtype, backend="reference")
            assert got.shape == ref.shape and got.dtype == ref.dtype
            torch.testing.assert_close(got.float(), ref.float(), rtol=0, atol=0 if dist == "rademacher" else 1e-6)
            event(f"{op}: accepted")
            return
        t = data.draw(tensors())
        if op == "axpy":
            n_c = len(ks) if isinstance(ks, (list, torch.Tensor, np.ndarray)) and np.ndim(ks) == 1 else 1
            n_c = data.draw(mostly(st.just(n_c), st.integers(0, 4)))
            coeffs = data.draw(st.one_of(st.lists(COEF_VALUES, min_size=n_c, max_size=n_c),
                                         st.lists(COEF_VALUES, min_size=n_c, max_size=n_c).map(torch.tensor)))
            alpha = data.draw(mostly(st.floats(-2, 2), st.sampled_from([float("nan"), 1e39, "1", True])))
            before = t.clone() if isinstance(t, torch.Tensor) else None
            out = fwdkern.seeded_axpy_(t, seed, pid, ks, coeffs, dist=dist, alpha=alpha, backend=backend)
            assert out is t
            ref = reference_seeded_axpy_(before.contiguous(), int(seed), int(pid), ks, coeffs, dist, alpha)
            scale = float(torch.as_tensor(coeffs, dtype=torch.float64).abs().sum()) * abs(alpha) * 6 + 1
            tol = 1e-5 * scale if t.dtype == torch.float32 else 1e-2 * scale
            torch.testing.assert_close(t.double(), ref.double(), rtol=tol, atol=tol)
        elif op == "dot":
            out = fwdkern.seeded_dot(t, seed, pid, ks, dist=dist, backend=backend)
            ref = reference_seeded_dot(t.contiguous(), int(seed), int(pid), ks, dist)
            n = max(1, t.numel())
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * n)
        else:
            n = data.draw(mostly(st.integers(0, 5), st.sampled_from([-1, 2.0, True])))
            out = fwdkern.seeded_matmul(t, seed, pid, ks, n, dist=dist, backend=backend)
            ref = RL.reference_seeded_matmul(t.to(torch.float64), int(seed), int(pid), ks, n, dist)
            scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
            assert out.shape == ref.shape and out.dtype == torch.float32
            torch.testing.assert_close(out.double(), ref.double(), rtol=1e-2, atol=1e-2 * scale)
        event(f"{op}: accepted")
    except REFUSED as e:
        assert str(e), f"{type(e).__name__} without a message"
        event(f"{op}: refused ({type(e).__name__})")


LORA_PERTURBS = mostly(st.sampled_from([("A", "B"), ("A",), ("B", "bias"), (), "A", ("A", "B", "bias")]),
                       st.just(("C",)))


@FUZZ
@given(data=st.data())
def test_fuzz_lora_ops(data):
    M, in_f, out_f, r, K = (data.draw(st.integers(0, n)) for n in (3, 9, 9, 3, 3))
    dtype = data.draw(mostly(st.sampled_from([torch.float32, torch.float16]), st.just(torch.float64)))
    x, xt, W, b, A, B = _lora_layer((M,), in_f, out_f, r, K, dtype if dtype != torch.float64 else torch.float32)
    if dtype == torch.float64:  # one tensor of another dtype
        W = W.double()
    if data.draw(st.booleans()):
        x = x.unsqueeze(0)
        xt = xt.unsqueeze(1)
    if data.draw(st.booleans()):
        W = W.t().contiguous().t()  # strided weight
    mutate = data.draw(st.sampled_from(["none"] * 4 + ["xt_shape", "A_shape", "no_bias", "xt_none", "bias_shape"]))
    if mutate == "xt_shape":
        xt = xt[:, :1] if xt.dim() > 1 and xt.shape[1] > 1 else xt.unsqueeze(0)
    elif mutate == "A_shape":
        A = A[:, :-1] if in_f else A.unsqueeze(0)
    elif mutate == "no_bias":
        b = None
    elif mutate == "xt_none":
        xt = None
    elif mutate == "bias_shape":
        b = b[:-1] if out_f else b.unsqueeze(0)
    ks = data.draw(mostly(st.just(list(range(K))), KS))
    perturb = data.draw(LORA_PERTURBS)
    param_ids = data.draw(mostly(st.sampled_from([(1, 2, 3), {"A": 1, "B": 2, "bias": 3}]),
                                 st.sampled_from([(1, 1), {"A": 1}, 5, (1, 2)])))
    scaling = data.draw(mostly(st.floats(-2, 2), st.sampled_from([float("inf"), 1e39, "2"])))
    dist = data.draw(DISTS)
    backend = _backend(data.draw)
    which = data.draw(st.sampled_from(["dual", "perturbed"]))
    try:
        if which == "dual":
            got = fwdkern.lora_linear_dual(x, xt, W, b, A, B, scaling, 11, param_ids, ks, dist=dist, perturb=perturb,
                                           backend=backend)
        else:
            eps = data.draw(mostly(st.floats(1e-3, 1.0), st.sampled_from([0.0, -1.0, float("nan")])))
            got = fwdkern.lora_linear_perturbed(x, W, b, A, B, scaling, 11, param_ids, ks, eps, dist=dist,
                                                perturb=perturb, backend=backend)
    except REFUSED as e:
        assert str(e), f"{type(e).__name__} without a message"
        event(f"{which}: refused ({type(e).__name__})")
        return
    event(f"{which}: accepted")
    # Accepted: the reference agrees (the wrapper's conversions, then the materialized formula).
    flags = tuple(n in ((perturb,) if isinstance(perturb, str) else perturb) for n in ("A", "B", "bias"))
    ids = param_ids if isinstance(param_ids, tuple) else tuple(param_ids.get(n) or 0 for n in ("A", "B", "bias"))
    ids = tuple(ids) + (0,) * (3 - len(ids))
    kt = torch.as_tensor(ks, dtype=torch.int64).reshape(-1)
    if which == "dual":
        ref = RL.reference_lora_dual(x, xt, W, b, A, B, scaling, 11, ids, kt, dist, flags, compute_dtype=torch.float64)
    else:
        ref = RL.reference_lora_perturbed(x, W, b, A, B, scaling, 11, ids, kt, eps, dist, flags,
                                          compute_dtype=torch.float64)
    tol = 1e-4 if x.dtype == torch.float32 else 2e-2
    for g_, r_ in zip(got, ref):
        assert g_.shape == r_.shape and g_.dtype == x.dtype
        scale = max(1.0, float(r_.double().abs().max())) if r_.numel() else 1.0
        torch.testing.assert_close(g_.double(), r_.double(), rtol=tol, atol=tol * scale)


# ----------------------------------------------------------------------------- GPU (skip without CUDA)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_inputs_behave_like_cpu(backend):
    if not fwdkern.backends.available(backend, "cuda"):
        pytest.skip(f"{backend} unavailable")
    base = torch.zeros(16, device="cuda")
    with pytest.raises(ValueError, match="overlapping"):
        fwdkern.seeded_axpy_(torch.as_strided(base, (3, 4), (2, 1)), 1, 2, [0], [1.0], backend=backend)
    with pytest.raises(ValueError, match="ks"):
        fwdkern.seeded_axpy_(base, 1, 2, torch.tensor([2**32], device="cuda"), [1.0], backend=backend)
    with pytest.raises(ValueError, match="NaN"):
        fwdkern.seeded_dot(torch.tensor([1.0, math.nan], device="cuda"), 1, 2, [0], backend=backend)
    x = torch.randn(3, 0, device="cuda")
    assert torch.count_nonzero(fwdkern.seeded_matmul(x, 1, 2, [0, 1], 4, backend=backend)) == 0
    assert fwdkern.seeded_dot(base, 1, 2, [], backend=backend).shape == (0,)
