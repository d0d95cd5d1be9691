"""Seeded-perturbation ops: every backend against the pure-PyTorch reference.

Tolerance table (see docs/perturbations.md):
  Rademacher values (any dtype)              bit-identical on every backend
  Gaussian values, C++ vs reference (CPU)    bit-identical (both evaluate in float64)
  Gaussian values, CUDA / Triton interpreter |diff| <= 2e-6 * max(1, |z|)   (fp32 transcendentals)
  Gaussian values, Triton on GPU             |diff| <= 1e-5 * max(1, |z|)   (approximate sin/cos)
  seeded_axpy_ / seeded_dot (fp32)           rtol 1e-5 of the summed magnitude (fp32 reordering)
  seeded_axpy_ (fp16 / bf16 params)          <= 1 ulp of the storage dtype vs the reference
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fwdkern
from fwdkern.ops.reference import (
    philox4x32_10,
    reference_perturbation,
    reference_seeded_axpy_,
    reference_seeded_dot,
)

from conftest import available_backends

HOSTILE_SHAPES = [(1,), (7,), (127,), (128,), (129,), (4099,), (13, 1031), (2, 3, 5), (1, 1), (8, 1), ()]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
KERNEL_BACKENDS = [b for b in ("cpu", "cuda", "triton") if fwdkern.backends.available(b, "cpu")]
HYP = settings(max_examples=20, deadline=None)


def _gauss_close(a, b, tol=2e-6):
    a, b = a.float(), b.float()
    return bool(((a - b).abs() <= tol * torch.clamp(b.abs(), min=1.0)).all())


# ---------------------------------------------------------------------------- Philox known answers

# Random123's published known-answer vectors for philox4x32-10.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_philox_known_answers_reference(ctr, key, expected):
    out = philox4x32_10(*ctr, *key)
    assert tuple(int(x) for x in out) == expected



@pytest.mark.skipif(not fwdkern.backends.available("triton", "cpu"), reason="triton not runnable on CPU here")
@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_philox_known_answers_triton(ctr, key, expected):
    from fwdkern.triton.philox import philox_words_kernel

    inp = torch.tensor(list(ctr) + list(key), dtype=torch.int64)
    out = torch.zeros(4, dtype=torch.int64)
    philox_words_kernel[(1,)](inp, out, 1)
    assert tuple(int(x) & 0xFFFFFFFF for x in out) == expected


@pytest.mark.parametrize("backend", available_backends())
def test_kat_through_the_stream(backend):
    # Element (row 0, col c) of v(seed=0, param_id=0, k=0) is bit c of Philox((0,0,0,0), key 0).
    v = fwdkern.perturbation((128,), 0, 0, 0, backend=backend)
    words = KAT[0][2]
    expected = torch.tensor([-1.0 if (words[c >> 5] >> (c & 31)) & 1 else 1.0 for c in range(128)])
    assert torch.equal(v, expected)


# ---------------------------------------------------------------------------- the stream itself


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", HOSTILE_SHAPES)
def test_rademacher_bit_identical_all_backends(shape, dtype):
    seed, pid, k = 0xDEADBEEF12345678, 4242, 7
    ref = reference_perturbation(shape, seed, pid, k, "rademacher", dtype)
    assert ref.shape == torch.Size(shape)
    for backend in available_backends("cpu", dtype):
        got = fwdkern.perturbation(shape, seed, pid, k, dtype=dtype, backend=backend)
        assert got.dtype == dtype and got.shape == ref.shape
        assert torch.equal(got, ref), backend


@HYP
@given(
    seed=st.integers(0, 2**64 - 1),
    pid=st.integers(0, 2**32 - 1),
    k=st.integers(0, 2**32 - 1),
    shape=st.sampled_from([(1,), (7,), (127,), (300,), (3, 129), (5, 1, 33)]),
)
def test_rademacher_bit_identical_hypothesis(seed, pid, k, shape):
    ref = reference_perturbation(shape, seed, pid, k)
    for backend in available_backends():
        assert torch.equal(fwdkern.perturbation(shape, seed, pid, k, backend=backend), ref), backend


def test_streams_are_distinct_per_seed_param_k():
    base = fwdkern.perturbation((4096,), 1, 2, 3)
    for other in [(2, 2, 3), (1, 3, 3), (1, 2, 4)]:
        v = fwdkern.perturbation((4096,), *other)
        # Independent ±1 streams agree on about half of the entries.
        assert 0.4 < (v == base).float().mean().item() < 0.6
    # Rows of a 2-D tensor are independent too (counter word 1 is the row).
    m = fwdkern.perturbation((4, 256), 1, 2, 3)
    assert 0.4 < (m[0] == m[1]).float().mean().item() < 0.6


def test_rademacher_statistics():
    v = fwdkern.perturbation((1 << 20,), 123, 0, 0)
    assert set(v.unique().tolist()) == {-1.0, 1.0}
    assert abs(v.mean().item()) < 5 / math.sqrt(v.numel())


def test_gaussian_statistics():
    n = 1 << 20
    z = fwdkern.perturbation((n,), 77, 5, 1, dist="gaussian").double()
    mean, var = z.mean().item(), z.var().item()
    assert abs(mean) < 5 / math.sqrt(n)
    assert abs(var - 1.0) < 5 * math.sqrt(2.0 / n)
    kurt = ((z - mean) ** 4).mean().item() / var**2
    assert abs(kurt - 3.0) < 0.05
    # Tail mass vs the normal CDF: P(|z| > 2) = 0.0455
    assert abs((z.abs() > 2).double().mean().item() - 0.0455) < 0.002
    assert z.abs().max().item() <= math.sqrt(-2 * math.log(2**-24)) + 1e-4


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (7,), (4099,), (13, 1031), ()])
def test_gaussian_cross_backend(shape, dtype):
    ref32 = reference_perturbation(shape, 2**63 + 5, 11, 3, "gaussian")
    for backend in available_backends("cpu", dtype):
        got = fwdkern.perturbation(shape, 2**63 + 5, 11, 3, dist="gaussian", dtype=dtype, backend=backend)
        if backend in ("cpu", "reference"):
            assert torch.equal(got, ref32.to(dtype)), backend
        elif dtype == torch.float32:
            assert _gauss_close(got, ref32), backend
        else:  # rounding to fp16 may flip on the last bit when the fp32 values differ slightly
            assert torch.allclose(got.float(), ref32.to(dtype).float(), rtol=2e-3, atol=2e-3), backend


# ---------------------------------------------------------------------------- seeded_axpy_ / seeded_dot


def _rand(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
@pytest.mark.parametrize("shape", [(1,), (7,), (127,), (4099,), (13, 1031), (3, 4, 5), ()])
@pytest.mark.parametrize("K", [0, 1, 3, 16])
def test_axpy_matches_reference_fp32(shape, K, dist):
    ks = [(2**32 - 1 - 7 * j) if j % 2 else 5 * j for j in range(K)]
    coeffs = torch.linspace(-2, 3, K).tolist()
    p0 = _rand(shape, torch.float32)
    expected = reference_seeded_axpy_(p0.clone(), 99, 1234, ks, coeffs, dist, alpha=-0.25)
    scale = 0.25 * sum(abs(c) for c in coeffs) * (4.0 if dist == "gaussian" else 1.0) + p0.abs().max().item() + 1.0
    for backend in available_backends():
        p = p0.clone()
        out = fwdkern.seeded_axpy_(p, 99, 1234, ks, coeffs, dist=dist, alpha=-0.25, backend=backend)
        assert out is p
        torch.testing.assert_close(p, expected, rtol=0, atol=1e-5 * scale, msg=backend)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7,), (4099,), (13, 1031)])
def test_axpy_low_precision(shape, dtype):
    ks, coeffs = [0, 3, 9, 2**31], [0.5, -1.25, 0.75, 2.0]
    p0 = _rand(shape, dtype)
    expected = reference_seeded_axpy_(p0.clone(), 5, 6, ks, coeffs, alpha=0.1)
    ulp = torch.finfo(dtype).eps * (expected.float().abs() + 1.0)
    for backend in available_backends("cpu", dtype):
        p = p0.clone()
        fwdkern.seeded_axpy_(p, 5, 6, ks, coeffs, alpha=0.1, backend=backend)
        assert ((p.float() - expected.float()).abs() <= ulp).all(), backend


@HYP
@given(
    seed=st.integers(0, 2**64 - 1),
    pid=st.integers(0, 2**32 - 1),
    ks=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=8),
    n=st.sampled_from([1, 5, 128, 257, 1000]),
)
def test_axpy_and_dot_hypothesis(seed, pid, ks, n):
    coeffs = [((i * 37) % 11 - 5) / 3.0 for i in range(len(ks))]
    p0 = _rand((n,), torch.float32, seed=n)
    exp_axpy = reference_seeded_axpy_(p0.clone(), seed, pid, ks, coeffs)
    exp_dot = reference_seeded_dot(p0, seed, pid, ks)
    for backend in available_backends():
        p = p0.clone()
        fwdkern.seeded_axpy_(p, seed, pid, ks, coeffs, backend=backend)
        torch.testing.assert_close(p, exp_axpy, rtol=1e-5, atol=1e-5 * len(ks) * 3)
        d = fwdkern.seeded_dot(p0, seed, pid, ks, backend=backend)
        torch.testing.assert_close(d, exp_dot, rtol=1e-5, atol=1e-4 * math.sqrt(n))


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (7,), (4099,), (13, 1031), (2, 3, 5)])
@pytest.mark.parametrize("K", [1, 16])
def test_dot_matches_reference(shape, dtype, K, dist):
    ks = list(range(3, 3 + 2 * K, 2))
    t = _rand(shape, dtype)
    expected = reference_seeded_dot(t, 17, 8, ks, dist)
    n = max(1, t.numel())
    for backend in available_backends("cpu", dtype):
        got = fwdkern.seeded_dot(t, 17, 8, ks, dist=dist, backend=backend)
        assert got.dtype == torch.float32 and got.shape == (K,)
        # fp32 reordering error of a sum of n terms of size ~|t|*|v|
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-6 * n * (3 if dist == "gaussian" else 1), msg=backend)


def test_dot_is_deterministic():
    t = _rand((4099, 33), torch.float32)
    a = fwdkern.seeded_dot(t, 1, 2, list(range(16)))
    b = fwdkern.seeded_dot(t, 1, 2, list(range(16)))
    assert torch.equal(a, b)


def test_axpy_then_dot_recovers_coefficients():
    # <v_j, sum_i c_i v_i> = n c_j + O(sqrt(n)) for independent Rademacher streams.
    n = 1 << 16
    p = torch.zeros(n)
    ks, coeffs = [10, 20, 30], [1.0, -2.0, 0.5]
    fwdkern.seeded_axpy_(p, 3, 4, ks, coeffs)
    est = fwdkern.seeded_dot(p, 3, 4, ks) / n
    torch.testing.assert_close(est, torch.tensor(coeffs), atol=0.05, rtol=0)


@pytest.mark.parametrize("backend", available_backends())
def test_strided_views(backend):
    base = _rand((31, 17), torch.float32)
    view = base.t()  # [17, 31], strides (1, 17): handled without a copy
    ks, coeffs = [1, 2], [0.5, -0.5]
    expected = reference_seeded_axpy_(view.contiguous(), 9, 9, ks, coeffs)
    fwdkern.seeded_axpy_(view, 9, 9, ks, coeffs, backend=backend)
    assert torch.allclose(view, expected, atol=1e-6)
    torch.testing.assert_close(fwdkern.seeded_dot(view, 9, 9, ks, backend=backend),
                               reference_seeded_dot(view.contiguous(), 9, 9, ks), rtol=1e-5, atol=1e-4)
    # Column slice: row stride != cols
    big = _rand((6, 300), torch.float32)
    sl = big[:, 10:139]
    exp = reference_seeded_axpy_(sl.contiguous(), 1, 1, [4], [2.0])
    untouched = big[:, :10].clone()
    fwdkern.seeded_axpy_(sl, 1, 1, [4], [2.0], backend=backend)
    assert torch.allclose(sl, exp, atol=1e-6) and torch.equal(big[:, :10], untouched)


def test_ks_and_coeffs_as_tensors():
    p1, p2 = torch.zeros(300), torch.zeros(300)
    fwdkern.seeded_axpy_(p1, 1, 2, torch.tensor([4, 5], dtype=torch.int32), torch.tensor([1.0, 2.0], dtype=torch.float64))
    fwdkern.seeded_axpy_(p2, 1, 2, [4, 5], [1.0, 2.0])
    assert torch.equal(p1, p2)


# ---------------------------------------------------------------------------- custom-op registration


@pytest.mark.parametrize("backend", available_backends())
def test_opcheck(backend):
    from torch.library import opcheck

    from fwdkern.ops.seeded import _perturbation_op, _seeded_axpy_op, _seeded_dot_op

    ks = torch.tensor([1, 7, 2**32 - 1], dtype=torch.int64)
    c = torch.tensor([0.5, -1.0, 2.0])
    opcheck(_seeded_axpy_op, (torch.randn(5, 300), 12, 3, ks, c, "rademacher", 0.5, backend))
    opcheck(_seeded_dot_op, (torch.randn(5, 300), -12, 3, ks, "gaussian", backend))
    opcheck(_perturbation_op, ([3, 130], 12, 3, 4, "rademacher", torch.float32, torch.device("cpu"), backend))


def test_torch_compile():
    def step(p, t):
        fwdkern.seeded_axpy_(p, 7, 1, [0, 1], [1.0, -1.0], check_finite=False)
        return fwdkern.seeded_dot(t, 7, 1, [0, 1], check_finite=False) * 2

    p1, p2 = torch.zeros(257), torch.zeros(257)
    t = _rand((257,), torch.float32)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(p1, t), step(p2, t))
    assert torch.equal(p1, p2)


# ---------------------------------------------------------------------------- bad input


BAD = [
    (lambda: fwdkern.seeded_axpy_(torch.zeros(4, dtype=torch.int32), 1, 1, [0], [1.0]), TypeError, "param"),
    (lambda: fwdkern.seeded_axpy_(torch.zeros(4, dtype=torch.float64), 1, 1, [0], [1.0]), TypeError, "param"),
    (lambda: fwdkern.seeded_axpy_([0.0, 1.0], 1, 1, [0], [1.0]), TypeError, "param"),
    (lambda: fwdkern.seeded_axpy_(torch.zeros(4), 1, 1, [0, 1], [1.0]), ValueError, "coeffs"),
    (lambda: fwdkern.seeded_axpy_(torch.zeros(4), 1, 1, [0], [float("nan")]), ValueError, "coeffs"),
    (lambda: fwdkern.seeded_axpy_(torch.zeros(4), 1, 1, [0], [float("inf")]), ValueError, "coeffs"),
    (lambda: fwdkern.seeded_axpy_(torch.zeros(4), 1, 1, [0], [1.0], alpha=float("nan")), ValueError, "alpha"),
    (lambda: fwdkern.seeded_axpy_(torch.zeros(4), 1, 1, [-1], [1.0]), ValueError, "ks"),
    (lambda: fwdkern.seeded_axpy_(torch.zeros(4), 1, 1, [2**32], [1.0]), ValueError, "ks"),
    (lambda: fwdkern.seeded_axpy_(torch.zeros(4), 1, 1, torch.tensor([0.5]), [1.0]), TypeError, "ks"),
    (lambda: fwdkern.seeded_axpy_(torch.zeros(4), 1, 1, torch.tensor([[0]]), [1.0]), ValueError, "ks"),
    (lambda: fwdkern.seeded_axpy_(torch.zeros(4), 1, 1, torch.tensor([-3]), [1.0]), ValueError, "ks"),
    (lambda: fwdkern.seeded_axpy_(torch.zeros(4), 1, -1, [0], [1.0]), ValueError, "param_id"),
    (lambda: fwdkern.seeded_axpy_(torch.zeros(4), 1, 2**32, [0], [1.0]), ValueError, "param_id"),
    (lambda: fwdkern.seeded_axpy_(torch.zeros(4), -1, 1, [0], [1.0]), ValueError, "seed"),
    (lambda: fwdkern.seeded_axpy_(torch.zeros(4), 2**64, 1, [0], [1.0]), ValueError, "seed"),
    (lambda: fwdkern.seeded_axpy_(torch.zeros(4), 1.5, 1, [0], [1.0]), TypeError, "seed"),
    (lambda: fwdkern.seeded_axpy_(torch.zeros(4), 1, 1, [0], [1.0], dist="uniform"), ValueError, "dist"),
    (lambda: fwdkern.seeded_axpy_(torch.zeros(1).expand(4), 1, 1, [0], [1.0]), ValueError, "overlapping"),
    (lambda: fwdkern.seeded_axpy_(torch.zeros(4, 5, 6).permute(1, 0, 2), 1, 1, [0], [1.0]), ValueError, "contiguous"),
    (lambda: fwdkern.seeded_axpy_(torch.zeros(4), 1, 1, [0], [1.0], backend="cuda"), fwdkern.BackendUnavailable, "cuda"),
    (lambda: fwdkern.seeded_axpy_(torch.zeros(4), 1, 1, [0], [1.0], backend="nope"), ValueError, "backend"),
    (lambda: fwdkern.seeded_dot(torch.tensor([1.0, float("nan")]), 1, 1, [0]), ValueError, "NaN"),
    (lambda: fwdkern.seeded_dot(torch.zeros(3, dtype=torch.int64), 1, 1, [0]), TypeError, "tensor"),
    (lambda: fwdkern.seeded_dot(torch.zeros(3), 1, 1, [0], dist="normal"), ValueError, "dist"),
    (lambda: fwdkern.seeded_dot(torch.zeros(3), 1, 1, 5), TypeError, "ks"),
    (lambda: fwdkern.perturbation((2, -1), 1, 1, 0), ValueError, "shape"),
    (lambda: fwdkern.perturbation((3,), 1, 1, 2**32), ValueError, "k"),
    (lambda: fwdkern.perturbation((3,), 1, 1, 0, dtype=torch.int8), TypeError, "dtype"),
    (lambda: fwdkern.perturbation((3,), 1, 1, 0, dist="x"), ValueError, "dist"),
]


@pytest.mark.parametrize("call,exc,match", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_input_raises(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_bad_input_leaves_param_untouched():
    p = torch.arange(6, dtype=torch.float32)
    before = p.clone()
    with pytest.raises(ValueError):
        fwdkern.seeded_axpy_(p, 1, 1, [0, 2**40], [1.0, 2.0])
    assert torch.equal(p, before)


def test_extension_checks_raise_value_error():
    # The C++ layer validates on its own too (a direct _C call with a bad dtype code).
    from fwdkern import _C

    t = torch.zeros(4)
    with pytest.raises(ValueError, match="dtype"):
        _C.cpu_perturbation(t.data_ptr(), 7, 1, 4, 4, 1, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="dist"):
        _C.cpu_perturbation(t.data_ptr(), 0, 1, 4, 4, 1, 0, 0, 0, 5)
    ks = torch.tensor([2**33])
    c = torch.ones(1)
    with pytest.raises(ValueError, match="ks"):
        _C.cpu_seeded_axpy(t.data_ptr(), 0, 1, 4, 4, 1, 0, 0, ks.data_ptr(), c.data_ptr(), 1, 1.0, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", HOSTILE_SHAPES)
def test_gpu_backends_bit_identical_to_cpu(backend, dtype, shape):
    if not fwdkern.backends.available(backend, "cuda"):
        pytest.skip(f"{backend} unavailable")
    seed, pid, k = 2**63 + 99, 17, 123456
    cpu = fwdkern.perturbation(shape, seed, pid, k, dtype=dtype, backend="cpu")
    gpu = fwdkern.perturbation(shape, seed, pid, k, dtype=dtype, device="cuda", backend=backend)
    assert torch.equal(gpu.cpu(), cpu)
    ks, coeffs = [0, 5, 2**32 - 1], [1.0, -0.5, 0.25]
    p0 = _rand(shape, dtype)
    pc, pg = p0.clone(), p0.clone().cuda()
    fwdkern.seeded_axpy_(pc, seed, pid, ks, coeffs, backend="cpu")
    fwdkern.seeded_axpy_(pg, seed, pid, ks, coeffs, backend=backend)
    tol = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps * 4
    torch.testing.assert_close(pg.cpu().float(), pc.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(fwdkern.seeded_dot(p0.cuda(), seed, pid, ks, backend=backend).cpu(),
                               fwdkern.seeded_dot(p0, seed, pid, ks, backend="cpu"), rtol=1e-4, atol=1e-3)
    zg = fwdkern.perturbation(shape, seed, pid, k, dist="gaussian", device="cuda", backend=backend)
    assert _gauss_close(zg.cpu(), fwdkern.perturbation(shape, seed, pid, k, dist="gaussian", backend="cpu"),
                        tol=2e-6 if backend == "cuda" else 1e-5)
