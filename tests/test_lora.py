"""Tests of the LoRA ops (fwdkern.lora_linear_dual / lora_linear_perturbed / seeded_matmul)
and fwdkern.LoRALinear, against the materializing reference (fwdkern/ops/reference_lora.py).

Tolerances: fp32 outputs are compared with a float64 evaluation of the reference at
rtol 1e-5 and atol 1e-5·max|ref| (per-element relative error is meaningless where an
output cancels to ~0). fp16/bf16: max error vs the float64 reference ≤ 2× the error of
plain torch ops evaluated in the same precision.
"""
import hashlib
import math

import pytest
import torch
import torch.nn.functional as F

import fwdkern
from fwdkern.nn import LoRALinear, assign_param_ids, param_id
from fwdkern.ops import reference_lora as R

F64 = torch.float64
PIDS = {"A": 11, "B": 22, "bias": 33}
SEED = 0x1234_5678_9ABC_DEF0

TRITON_ON_CPU = fwdkern.backends.available("triton", "cpu")


def _backends():
    """CPU-tensor backends: cpu + reference, and triton under the interpreter (fp32/fp16 only)."""
    skip = "triton backend unavailable on CPU (needs triton and TRITON_INTERPRET=1)"
    return [pytest.param("cpu"), pytest.param("reference"),
            pytest.param("triton", marks=pytest.mark.skipif(not TRITON_ON_CPU, reason=skip))]


def _flags(perturb):
    return tuple(n in perturb for n in ("A", "B", "bias"))


def _layer(batch, in_f, out_f, r, K, with_bias, with_xt, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, in_f, generator=g)
    xt = torch.randn(K, *batch, in_f, generator=g) if with_xt else None
    W = torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f)
    b = torch.randn(out_f, generator=g) if with_bias else None
    A = torch.randn(r, in_f, generator=g) / math.sqrt(in_f)
    B = torch.randn(out_f, r, generator=g) / math.sqrt(r)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return tuple(cast(t) for t in (x, xt, W, b, A, B))


def _assert_close32(out, ref, what):
    assert out.shape == ref.shape, (what, out.shape, ref.shape)
    if ref.numel() == 0:
        return
    scale = ref.abs().max().item()
    torch.testing.assert_close(out.to(F64), ref, rtol=1e-5, atol=1e-5 * max(scale, 1e-30), msg=lambda m: f"{what}: {m}")


def _rel_err(out, ref):
    return ((out.to(F64) - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


# (batch dims, in, out, r, K): every in/out in {1, 7, 64, 1031}, r in {1, 8, 64}, K in {1, 3, 16},
# 0-3 batch dims; the 1031x1031 layer gets a single token.
CASES = [
    ((), 1, 1, 1, 1),
    ((3,), 7, 1031, 8, 3),
    ((2, 3), 64, 7, 64, 16),
    ((2, 1, 3), 1031, 64, 1, 3),
    ((1,), 1031, 1031, 8, 1),
    ((4, 5), 7, 64, 64, 1),
    ((2, 3, 2), 64, 1, 8, 16),
    ((5,), 1, 7, 64, 3),
]
PERTURBS = [("A",), ("B",), ("A", "B"), ("A", "B", "bias"), ("bias",)]


def _skip_slow_triton(backend, perturb):
    # The interpreter is slow: A+B is the same kernel path as A, B and A+B+bias (flags only).
    if backend == "triton" and perturb == ("A", "B") and not torch.cuda.is_available():
        pytest.skip("A+B on the Triton interpreter: covered by A, B and A+B+bias (keeps CI fast)")


def _case_id(c):
    return "b{}-i{}-o{}-r{}-K{}".format("x".join(map(str, c[0])) or "0", *c[1:])


# ----------------------------------------------------------------------------- dual forward


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("perturb", PERTURBS, ids=lambda p: "+".join(p))
@pytest.mark.parametrize("with_xt", [True, False], ids=["xt", "no_xt"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_dual_matches_reference(case, with_xt, perturb, backend):
    _skip_slow_triton(backend, perturb)
    batch, in_f, out_f, r, K = case
    with_bias = "bias" in perturb or (in_f + out_f) % 2 == 0  # bias present in about half the other cases
    x, xt, W, b, A, B = _layer(batch, in_f, out_f, r, K, with_bias, with_xt)
    ks = [3 + 5 * j for j in range(K)]
    y, yt = fwdkern.lora_linear_dual(x, xt, W, b, A, B, 1.7, SEED, PIDS, ks, perturb=perturb, backend=backend)
    ry, ryt = R.reference_lora_dual(x, xt, W, b, A, B, 1.7, SEED, (11, 22, 33), torch.tensor(ks), "rademacher",
                                    _flags(perturb), compute_dtype=F64, out_dtype=F64)
    assert y.dtype == x.dtype and yt.dtype == x.dtype
    _assert_close32(y, ry, "y")
    _assert_close32(yt, ryt, "y_tangents")


@pytest.mark.parametrize("backend", _backends())
def test_dual_gaussian(backend):
    x, xt, W, b, A, B = _layer((2, 5), 200, 130, 8, 3, True, True)
    ks = [0, 9, 4]
    perturb = ("A", "B", "bias")
    y, yt = fwdkern.lora_linear_dual(x, xt, W, b, A, B, 0.5, 99, PIDS, ks, dist="gaussian", perturb=perturb,
                                     backend=backend)
    ry, ryt = R.reference_lora_dual(x, xt, W, b, A, B, 0.5, 99, (11, 22, 33), torch.tensor(ks), "gaussian",
                                    _flags(perturb), compute_dtype=F64, out_dtype=F64)
    _assert_close32(y, ry, "y")
    _assert_close32(yt, ryt, "y_tangents")


@pytest.mark.parametrize("backend", _backends())
def test_dual_equals_jvp(backend):
    """ẏ_k equals torch.func.jvp of the layer along (dA_k, dB_k, db_k, ẋ_k) (float64)."""
    batch, in_f, out_f, r, K, s = (3, 4), 65, 33, 4, 3, 2.5
    x, xt, W, b, A, B = _layer(batch, in_f, out_f, r, K, True, True)
    ks = [7, 1, 30]
    y, yt = fwdkern.lora_linear_dual(x, xt, W, b, A, B, s, SEED, PIDS, ks, perturb=("A", "B", "bias"),
                                     backend=backend)
    dA, dB, db = R.lora_perturbations(SEED, (11, 22, 33), torch.tensor(ks), r, in_f, out_f, "rademacher",
                                      (True, True, True), "cpu", F64)
    W64 = W.to(F64)

    def layer(A_, B_, b_, x_):
        return F.linear(x_, W64, b_) + s * F.linear(F.linear(x_, A_), B_)

    primals = tuple(t.to(F64) for t in (A, B, b, x))
    for k in range(K):
        y_ref, t_ref = torch.func.jvp(layer, primals, (dA[k], dB[k], db[k], xt[k].to(F64)))
        _assert_close32(y, y_ref, "y")
        _assert_close32(yt[k], t_ref, f"y_tangents[{k}]")


def _torch_lowp_error(fn_ref, dtype):
    """Max relative error of plain torch ops evaluated in `dtype` (the reference formula)."""
    lowp = fn_ref(dtype)
    exact = fn_ref(F64)
    return [_rel_err(a, e) for a, e in zip(lowp, exact)], exact


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
@pytest.mark.parametrize("case", [((4, 9), 256, 96, 8, 3), ((7,), 1031, 64, 64, 2)], ids=_case_id)
def test_dual_low_precision(case, backend, dtype):
    if backend == "triton" and (dtype == torch.bfloat16 or not TRITON_ON_CPU):
        pytest.skip("triton interpreter: no bf16 / not available")
    batch, in_f, out_f, r, K = case
    x, xt, W, b, A, B = _layer(batch, in_f, out_f, r, K, True, True, dtype=dtype)
    ks, perturb = list(range(K)), ("A", "B", "bias")

    def ref(cd):
        return R.reference_lora_dual(*(t.to(cd) for t in (x, xt, W, b, A, B)), 2.0, SEED, (11, 22, 33),
                                     torch.tensor(ks), "rademacher", _flags(perturb), compute_dtype=cd)

    torch_errs, exact = _torch_lowp_error(ref, dtype)
    outs = fwdkern.lora_linear_dual(x, xt, W, b, A, B, 2.0, SEED, PIDS, ks, perturb=perturb, backend=backend)
    eps = torch.finfo(dtype).eps
    for name, out, e_ref, e_torch in zip(("y", "y_tangents"), outs, exact, torch_errs):
        assert out.dtype == dtype
        err = _rel_err(out, e_ref)
        assert err <= 2 * max(e_torch, eps), f"{name}: error {err:.3g} > 2x torch's {e_torch:.3g}"


# ----------------------------------------------------------------------------- perturbed forward


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("perturb", PERTURBS, ids=lambda p: "+".join(p))
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_perturbed_matches_reference(case, perturb, backend):
    _skip_slow_triton(backend, perturb)
    batch, in_f, out_f, r, K = case
    with_bias = "bias" in perturb or (in_f + out_f) % 2 == 1
    x, _, W, b, A, B = _layer(batch, in_f, out_f, r, K, with_bias, False)
    ks = [2 * j + 1 for j in range(K)]
    yp, ym = fwdkern.lora_linear_perturbed(x, W, b, A, B, 0.8, SEED, PIDS, ks, 0.05, perturb=perturb,
                                           backend=backend)
    rp, rm = R.reference_lora_perturbed(x, W, b, A, B, 0.8, SEED, (11, 22, 33), torch.tensor(ks), 0.05,
                                        "rademacher", _flags(perturb), compute_dtype=F64, out_dtype=F64)
    _assert_close32(yp, rp, "y_plus")
    _assert_close32(ym, rm, "y_minus")


@pytest.mark.parametrize("backend", _backends())
def test_perturbed_gaussian(backend):
    x, _, W, b, A, B = _layer((3, 4), 140, 70, 8, 2, True, False)
    perturb = ("A", "B", "bias")
    yp, ym = fwdkern.lora_linear_perturbed(x, W, b, A, B, 1.0, 5, PIDS, [4, 8], 0.1, dist="gaussian",
                                           perturb=perturb, backend=backend)
    rp, rm = R.reference_lora_perturbed(x, W, b, A, B, 1.0, 5, (11, 22, 33), torch.tensor([4, 8]), 0.1, "gaussian",
                                        _flags(perturb), compute_dtype=F64, out_dtype=F64)
    _assert_close32(yp, rp, "y_plus")
    _assert_close32(ym, rm, "y_minus")


@pytest.mark.parametrize("backend", _backends())
def test_finite_difference_converges_to_tangent(backend):
    """(y+ − y−)/2ε → ẏ (ẋ = 0). The layer is bilinear in (A, B), so the central difference
    has no ε² term at all: exact in float64; in fp32 the error is rounding, ~u·|y|/ε."""
    x, _, W, b, A, B = _layer((6,), 96, 48, 8, 4, True, False)
    ks, perturb, s = [1, 2, 3, 4], ("A", "B", "bias"), 1.5
    _, tangent = R.reference_lora_dual(x, None, W, b, A, B, s, SEED, (11, 22, 33), torch.tensor(ks), "rademacher",
                                       _flags(perturb), compute_dtype=F64, out_dtype=F64)
    for eps in (1e-1, 1e-3):  # float64 reference: exact up to rounding at any ε
        rp, rm = R.reference_lora_perturbed(x, W, b, A, B, s, SEED, (11, 22, 33), torch.tensor(ks), eps,
                                            "rademacher", _flags(perturb), compute_dtype=F64, out_dtype=F64)
        assert _rel_err((rp - rm) / (2 * eps), tangent) < 1e-9
    y0 = F.linear(x.to(F64), W.to(F64), b.to(F64)).abs().max().item()
    errs = []
    for eps in (1e-1, 1e-2):
        yp, ym = fwdkern.lora_linear_perturbed(x, W, b, A, B, s, SEED, PIDS, ks, eps, perturb=perturb,
                                               backend=backend)
        fd = (yp.to(F64) - ym.to(F64)) / (2 * eps)
        err = (fd - tangent).abs().max().item()
        errs.append(err)
        bound = 8 * torch.finfo(torch.float32).eps * (y0 + tangent.abs().max().item()) / eps
        assert err <= bound, f"eps={eps}: FD error {err:.3g} > rounding bound {bound:.3g}"


# ----------------------------------------------------------------------------- the cuda backend's composition


def _compose_with_cpu_kernels():
    from fwdkern.ops import _compose, _cpu

    return _compose, dict(seeded_mm=_cpu.seeded_mm, perturbation=_cpu.perturbation)


@pytest.mark.parametrize("perturb", PERTURBS, ids=lambda p: "+".join(p))
@pytest.mark.parametrize("with_xt", [True, False], ids=["xt", "no_xt"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_composition_matches_reference(case, with_xt, perturb):
    """fwdkern/ops/_compose.py (what the cuda backend runs over its CUDA kernels), run here over
    the C++ kernels: dual and perturbed forward against the reference on the hostile shapes."""
    compose, kernels = _compose_with_cpu_kernels()
    batch, in_f, out_f, r, K = case
    with_bias = "bias" in perturb or (in_f + out_f) % 2 == 0
    x, xt, W, b, A, B = _layer(batch, in_f, out_f, r, K, with_bias, with_xt)
    ks = torch.tensor([3 + 5 * j for j in range(K)])
    args = (1.7, SEED, (11, 22, 33), ks)
    y, yt = compose.lora_dual(x, xt, W, b, A, B, *args, "rademacher", _flags(perturb), **kernels)
    ry, ryt = R.reference_lora_dual(x, xt, W, b, A, B, *args, "rademacher", _flags(perturb), compute_dtype=F64,
                                    out_dtype=F64)
    _assert_close32(y, ry, "y")
    _assert_close32(yt, ryt, "y_tangents")
    yp, ym = compose.lora_perturbed(x, W, b, A, B, *args, 0.05, "gaussian", _flags(perturb), **kernels)
    rp, rm = R.reference_lora_perturbed(x, W, b, A, B, *args, 0.05, "gaussian", _flags(perturb), compute_dtype=F64,
                                        out_dtype=F64)
    _assert_close32(yp, rp, "y_plus")
    _assert_close32(ym, rm, "y_minus")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_composition_low_precision(dtype):
    compose, kernels = _compose_with_cpu_kernels()
    x, xt, W, b, A, B = _layer((4, 9), 256, 96, 8, 3, True, True, dtype=dtype)
    ks, flags = torch.arange(3), (True, True, True)

    def ref(cd):
        return R.reference_lora_dual(*(t.to(cd) for t in (x, xt, W, b, A, B)), 2.0, SEED, (11, 22, 33), ks,
                                     "rademacher", flags, compute_dtype=cd)

    torch_errs, exact = _torch_lowp_error(ref, dtype)
    outs = compose.lora_dual(x, xt, W, b, A, B, 2.0, SEED, (11, 22, 33), ks, "rademacher", flags, **kernels)
    for name, out, e_ref, e_torch in zip(("y", "y_tangents"), outs, exact, torch_errs):
        assert out.dtype == dtype
        err = _rel_err(out, e_ref)
        assert err <= 2 * max(e_torch, torch.finfo(dtype).eps), f"{name}: error {err:.3g} > 2x torch's {e_torch:.3g}"


# ----------------------------------------------------------------------------- seeded_matmul


@pytest.mark.parametrize("backend", [b for b in _backends() if b.values[0] != "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (70, 1031, 9), (130, 8, 1031), (65, 200, 64), (3, 31, 300),
                                   (2, 32, 5)])
def test_seeded_matmul(shape, dtype, backend):
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter does not support bfloat16")
    M, D, N = shape
    if backend == "triton" and not torch.cuda.is_available():
        M = min(M, 16)  # the interpreter runs one program per tile: fewer rows, same tiling edge cases
    x = torch.randn(M, D).to(dtype)
    for dist in ("rademacher", "gaussian"):
        out = fwdkern.seeded_matmul(x, SEED, 7, [0, 5, 2**32 - 1], N, dist=dist, backend=backend)
        ref = R.reference_seeded_matmul(x.to(F64), SEED, 7, torch.tensor([0, 5, 2**32 - 1]), N, dist)
        assert out.dtype == torch.float32 and out.shape == (3, M, N)
        if backend == "triton" and dtype == torch.float16 and dist == "gaussian":
            # Triton feeds tl.dot operands in the input precision: Gaussian v is rounded to fp16
            # (±1 is exact), i.e. about fp16's unit roundoff relative to the largest output.
            assert _rel_err(out, ref.to(F64)) <= 4 * torch.finfo(torch.float16).eps
        else:
            _assert_close32(out, ref.to(F64), f"seeded_matmul {dist}")


def test_seeded_matmul_strided_and_batched_input():
    x = torch.randn(300, 40)
    xs = x.t()  # [40, 300], strides (1, 40)
    out = fwdkern.seeded_matmul(xs, 3, 9, [1, 2], 17, backend="cpu")
    ref = R.reference_seeded_matmul(xs.to(F64), 3, 9, torch.tensor([1, 2]), 17, "rademacher")
    _assert_close32(out, ref.to(F64), "strided x")
    x3 = torch.randn(2, 3, 5, 70)
    out = fwdkern.seeded_matmul(x3, 3, 9, [4], 6, backend="cpu")
    assert out.shape == (1, 2, 3, 5, 6)
    _assert_close32(out, R.reference_seeded_matmul(x3.to(F64), 3, 9, torch.tensor([4]), 6, "rademacher").to(F64),
                    "batched x")


def test_noncontiguous_inputs_dual():
    x, xt, W, b, A, B = _layer((6, 4), 48, 40, 8, 2, True, True)
    xs = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-contiguous
    Ws = W.t().contiguous().t()
    y, yt = fwdkern.lora_linear_dual(xs, xt, Ws, b, A, B, 1.0, 1, PIDS, [0, 1], backend="cpu")
    ry, ryt = R.reference_lora_dual(x, xt, W, b, A, B, 1.0, 1, (11, 22, 33), torch.tensor([0, 1]), "rademacher",
                                    (True, True, False), compute_dtype=F64, out_dtype=F64)
    _assert_close32(y, ry, "y")
    _assert_close32(yt, ryt, "y_tangents")


def test_zero_tangents_and_empty_batch():
    x, _, W, b, A, B = _layer((0, 3), 16, 8, 4, 2, True, False)
    y, yt = fwdkern.lora_linear_dual(x, None, W, b, A, B, 1.0, 1, PIDS, [0, 1], backend="cpu")
    assert y.shape == (0, 3, 8) and yt.shape == (2, 0, 3, 8)
    x, _, W, b, A, B = _layer((5,), 16, 8, 4, 0, True, False)
    y, yt = fwdkern.lora_linear_dual(x, None, W, b, A, B, 1.0, 1, PIDS, [], backend="cpu")
    assert yt.shape == (0, 5, 8)
    _assert_close32(y, F.linear(x.to(F64), W.to(F64), b.to(F64)) + F.linear(F.linear(x.to(F64), A.to(F64)),
                                                                            B.to(F64)), "y")
    # Nothing perturbed and no input tangents: the tangents are exactly zero.
    _, yt = fwdkern.lora_linear_dual(x, None, W, b, A, B, 1.0, 1, PIDS, [3, 4], perturb=(), backend="cpu")
    assert torch.count_nonzero(yt) == 0


# ----------------------------------------------------------------------------- GPU backends (skip without CUDA)

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _gpu_backend(backend):
    if not fwdkern.backends.available(backend, "cuda"):
        pytest.skip(f"backend {backend!r} unavailable on this GPU machine")


def _cuda(*ts):
    return tuple(t.cuda() if t is not None else None for t in ts)


@GPU
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
@pytest.mark.parametrize("perturb", [("A",), ("B",), ("A", "B", "bias")], ids=lambda p: "+".join(p))
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_gpu_lora_ops_match_reference(case, perturb, dist, backend):
    _gpu_backend(backend)
    batch, in_f, out_f, r, K = case
    x, xt, W, b, A, B = _layer(batch, in_f, out_f, r, K, True, True)
    ks = [3 + 5 * j for j in range(K)]
    kt = torch.tensor(ks)
    y, yt = fwdkern.lora_linear_dual(*_cuda(x, xt, W, b, A, B), 1.7, SEED, PIDS, ks, dist=dist, perturb=perturb,
                                     backend=backend)
    ry, ryt = R.reference_lora_dual(x, xt, W, b, A, B, 1.7, SEED, (11, 22, 33), kt, dist, _flags(perturb),
                                    compute_dtype=F64, out_dtype=F64)
    _assert_close32(y.cpu(), ry, "y")
    _assert_close32(yt.cpu(), ryt, "y_tangents")
    yp, ym = fwdkern.lora_linear_perturbed(*_cuda(x, W, b, A, B), 1.7, SEED, PIDS, ks, 0.05, dist=dist,
                                           perturb=perturb, backend=backend)
    rp, rm = R.reference_lora_perturbed(x, W, b, A, B, 1.7, SEED, (11, 22, 33), kt, 0.05, dist, _flags(perturb),
                                        compute_dtype=F64, out_dtype=F64)
    _assert_close32(yp.cpu(), rp, "y_plus")
    _assert_close32(ym.cpu(), rm, "y_minus")
    out = fwdkern.seeded_matmul(x.cuda(), SEED, 7, ks, out_f, dist=dist, backend=backend)
    _assert_close32(out.cpu(), R.reference_seeded_matmul(x.to(F64), SEED, 7, kt, out_f, dist), "seeded_matmul")


@GPU
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_lora_rademacher_bit_identical_to_cpu(backend):
    """Integer-valued inputs: every product and sum is exact in fp32, so the GPU backends give
    the CPU backend's results bit for bit (same Rademacher stream, no tolerance)."""
    _gpu_backend(backend)
    g = torch.Generator().manual_seed(8)
    M, in_f, out_f, r, K = 5, 300, 70, 8, 4
    x, W, A, B = (torch.randint(-3, 4, s, generator=g).float() for s in ((M, in_f), (out_f, in_f), (r, in_f),
                                                                           (out_f, r)))
    xt = torch.randint(-3, 4, (K, M, in_f), generator=g).float()
    b = torch.zeros(out_f)
    ks, perturb = [1, 2, 3, 2**32 - 1], ("A", "B", "bias")
    cpu = fwdkern.lora_linear_dual(x, xt, W, b, A, B, 1.0, SEED, PIDS, ks, perturb=perturb, backend="cpu")
    gpu = fwdkern.lora_linear_dual(*_cuda(x, xt, W, b, A, B), 1.0, SEED, PIDS, ks, perturb=perturb, backend=backend)
    for c, d in zip(cpu, gpu):
        assert torch.equal(d.cpu(), c)
    assert torch.equal(fwdkern.seeded_matmul(x.cuda(), SEED, 9, ks, 33, backend=backend).cpu(),
                       fwdkern.seeded_matmul(x, SEED, 9, ks, 33, backend="cpu"))


@GPU
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_lora_bf16(backend):
    _gpu_backend(backend)
    x, xt, W, b, A, B = _layer((64,), 256, 192, 16, 8, True, True, dtype=torch.bfloat16)
    ks, perturb = list(range(8)), ("A", "B", "bias")

    def ref(cd):
        return R.reference_lora_dual(*(t.to(cd) for t in (x, xt, W, b, A, B)), 0.5, SEED, (11, 22, 33),
                                     torch.tensor(ks), "rademacher", _flags(perturb), compute_dtype=cd)

    torch_errs, exact = _torch_lowp_error(ref, torch.bfloat16)
    outs = fwdkern.lora_linear_dual(*_cuda(x, xt, W, b, A, B), 0.5, SEED, PIDS, ks, perturb=perturb, backend=backend)
    for name, out, e_ref, e_torch in zip(("y", "y_tangents"), outs, exact, torch_errs):
        assert out.dtype == torch.bfloat16
        err = _rel_err(out.cpu(), e_ref)
        assert err <= 2 * max(e_torch, 2.0**-8), f"{name}: error {err:.3g} > 2x torch's {e_torch:.3g}"


# ----------------------------------------------------------------------------- custom ops


def _op_args(with_xt, backend):
    x, xt, W, b, A, B = _layer((2, 3), 20, 12, 4, 2, True, with_xt)
    ks = torch.tensor([0, 7])
    return x, xt, W, b, A, B, ks, backend


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("with_xt", [True, False], ids=["xt", "no_xt"])
def test_opcheck(with_xt, backend):
    x, xt, W, b, A, B, ks, backend = _op_args(with_xt, backend)
    torch.library.opcheck(torch.ops.fwdkern.lora_linear_dual.default,
                          (x, xt, W, b, A, B, 1.5, 123, 11, 22, 33, ks, "rademacher", True, True, True, backend))
    torch.library.opcheck(torch.ops.fwdkern.lora_linear_perturbed.default,
                          (x, W, b, A, B, 1.5, 123, 11, 22, 33, ks, 0.01, "rademacher", True, True, True, backend))
    torch.library.opcheck(torch.ops.fwdkern.seeded_matmul.default, (x, 123, 11, ks, 5, "rademacher", backend))


def test_torch_compile_fake():
    x, xt, W, b, A, B = _layer((4,), 24, 16, 4, 2, True, True)

    def f(x, xt):
        y, yt = fwdkern.lora_linear_dual(x, xt, W, b, A, B, 1.0, 5, PIDS, [1, 2], backend="cpu")
        return y * 2, yt.sum(0)

    ye, yte = f(x, xt)
    yc, ytc = torch.compile(f, backend="aot_eager", fullgraph=False)(x, xt)
    torch.testing.assert_close(yc, ye)
    torch.testing.assert_close(ytc, yte)


# ----------------------------------------------------------------------------- bad inputs


def _bad_calls():
    x, xt, W, b, A, B = _layer((3,), 8, 6, 2, 2, True, True)
    ks = [0, 1]
    d = fwdkern.lora_linear_dual
    p = fwdkern.lora_linear_perturbed
    return [
        ("x:", TypeError, lambda: d(x.long(), None, W, b, A, B, 1.0, 0, PIDS, ks)),
        ("x: last dimension", ValueError, lambda: d(x[:, :5], None, W, b, A, B, 1.0, 0, PIDS, ks)),
        ("weight:", ValueError, lambda: d(x, None, W[0], b, A, B, 1.0, 0, PIDS, ks)),
        ("lora_A:", ValueError, lambda: d(x, None, W, b, A[:, :3], B, 1.0, 0, PIDS, ks)),
        ("lora_B:", ValueError, lambda: d(x, None, W, b, A, B[:, :1], 1.0, 0, PIDS, ks)),
        ("bias:", ValueError, lambda: d(x, None, W, b[:2], A, B, 1.0, 0, PIDS, ks)),
        ("lora_B: dtype", TypeError, lambda: d(x, None, W, b, A, B.double(), 1.0, 0, PIDS, ks)),
        ("weight: dtype", TypeError, lambda: d(x, None, W.half(), b, A, B, 1.0, 0, PIDS, ks)),
        ("x_tangents: expected shape", ValueError, lambda: d(x, xt[:1], W, b, A, B, 1.0, 0, PIDS, ks)),
        ("x_tangents: dtype", TypeError, lambda: d(x, xt.half(), W, b, A, B, 1.0, 0, PIDS, ks)),
        ("perturb: unknown", ValueError, lambda: d(x, None, W, b, A, B, 1.0, 0, PIDS, ks, perturb=("C",))),
        ("perturb: 'bias'", ValueError, lambda: d(x, None, W, None, A, B, 1.0, 0, PIDS, ks, perturb=("bias",))),
        ("param_ids: no id", ValueError, lambda: d(x, None, W, b, A, B, 1.0, 0, {"A": 1}, ks)),
        ("param_ids: perturbed tensors share", ValueError, lambda: d(x, None, W, b, A, B, 1.0, 0, (1, 1), ks)),
        ("param_ids: unknown keys", ValueError, lambda: d(x, None, W, b, A, B, 1.0, 0, {"A": 1, "B": 2, "C": 3}, ks)),
        ("param_ids['A']", ValueError, lambda: d(x, None, W, b, A, B, 1.0, 0, (-1, 2), ks)),
        ("param_ids:", TypeError, lambda: d(x, None, W, b, A, B, 1.0, 0, 5, ks)),
        ("seed:", ValueError, lambda: d(x, None, W, b, A, B, 1.0, -1, PIDS, ks)),
        ("seed:", TypeError, lambda: d(x, None, W, b, A, B, 1.0, 1.5, PIDS, ks)),
        ("ks:", ValueError, lambda: d(x, None, W, b, A, B, 1.0, 0, PIDS, [0, 2**32])),
        ("ks:", TypeError, lambda: d(x, None, W, b, A, B, 1.0, 0, PIDS, torch.tensor([0.5]))),
        ("dist:", ValueError, lambda: d(x, None, W, b, A, B, 1.0, 0, PIDS, ks, dist="uniform")),
        ("scaling:", ValueError, lambda: d(x, None, W, b, A, B, float("nan"), 0, PIDS, ks)),
        ("scaling:", TypeError, lambda: d(x, None, W, b, A, B, "2", 0, PIDS, ks)),
        ("backend:", ValueError, lambda: d(x, None, W, b, A, B, 1.0, 0, PIDS, ks, backend="tpu")),
        ("eps:", ValueError, lambda: p(x, W, b, A, B, 1.0, 0, PIDS, ks, 0.0)),
        ("eps:", ValueError, lambda: p(x, W, b, A, B, 1.0, 0, PIDS, ks, float("inf"))),
        ("lora_A:", ValueError, lambda: p(x, W, b, A.t(), B, 1.0, 0, PIDS, ks, 0.1)),
        ("n:", ValueError, lambda: fwdkern.seeded_matmul(x, 0, 1, ks, -1)),
    ]


@pytest.mark.parametrize("idx", range(len(_bad_calls())))
def test_bad_inputs_raise(idx):
    msg, exc, call = _bad_calls()[idx]
    with pytest.raises(exc, match=msg.replace("[", r"\[").replace("(", r"\(")):
        call()


def test_unavailable_backend_raises():
    x, _, W, b, A, B = _layer((3,), 8, 6, 2, 1, True, False)
    with pytest.raises(fwdkern.BackendUnavailable):
        fwdkern.lora_linear_dual(x, None, W, b, A, B, 1.0, 0, PIDS, [0], backend="cuda")


# ----------------------------------------------------------------------------- LoRALinear


def test_param_id_is_documented_blake2b():
    name = "model.layers.0.self_attn.q_proj.lora_A.weight"
    digest = hashlib.blake2b(name.encode(), digest_size=4).digest()
    assert param_id(name) == int.from_bytes(digest, "little")
    assert param_id(name) == param_id(name) and param_id(name) != param_id(name.replace("_A", "_B"))
    with pytest.raises(TypeError):
        param_id(3)


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(12, 10)
        self.out = torch.nn.Linear(10, 5, bias=False)

    def forward(self, x):
        return self.out(torch.relu(self.proj(x)))


def test_lora_linear_drop_in_and_ids():
    torch.manual_seed(0)
    model = _Tiny()
    x = torch.randn(4, 12)
    y0 = model(x)
    model.proj = LoRALinear.from_linear(model.proj, r=4, alpha=8, train_bias=True)
    model.out = LoRALinear.from_linear(model.out, r=2, alpha=2)
    torch.testing.assert_close(model(x), y0)  # B = 0: same function
    assert set(model.state_dict()) == {"proj.base_layer.weight", "proj.base_layer.bias", "proj.lora_A.weight",
                                       "proj.lora_B.weight", "out.base_layer.weight", "out.lora_A.weight",
                                       "out.lora_B.weight"}
    assert model.proj.lora_A.weight.shape == (4, 12) and model.proj.lora_B.weight.shape == (10, 4)
    assert model.proj.scaling == 2.0 and model.proj.weight is model.proj.base_layer.weight
    assert not model.proj.weight.requires_grad and model.proj.bias.requires_grad
    assert not model.out.lora_B.weight.abs().sum() and model.out.lora_A.weight.abs().sum() > 0
    ids = assign_param_ids(model)
    assert ids["proj.lora_A.weight"] == param_id("proj.lora_A.weight") == model.proj.param_ids["A"]
    assert model.out.param_ids["B"] == param_id("out.lora_B.weight")
    # Same structure elsewhere (a "client") -> same ids -> same tangents from the seed alone.
    other = _Tiny()
    other.proj = LoRALinear.from_linear(other.proj, r=4, alpha=8, train_bias=True)
    assign_param_ids(other)
    assert other.proj.param_ids == model.proj.param_ids


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_lora_linear_dual_and_perturbed(backend):
    torch.manual_seed(1)
    layer = LoRALinear(32, 24, r=4, alpha=8, train_bias=True)
    torch.nn.init.normal_(layer.lora_B.weight)
    assign_param_ids(layer, prefix="blk.")
    x = torch.randn(2, 5, 32)
    xt = torch.randn(3, 2, 5, 32)
    y, yt = layer.forward_dual(x, xt, SEED, [0, 1, 2], backend=backend)
    torch.testing.assert_close(y, layer(x), rtol=1e-5, atol=1e-5)
    ids = layer.param_ids
    assert ids["A"] == param_id("blk.lora_A.weight")
    _, ryt = R.reference_lora_dual(x, xt, layer.weight, layer.bias.detach(), layer.lora_A.weight.detach(),
                                    layer.lora_B.weight.detach(), 2.0, SEED, (ids["A"], ids["B"], ids["bias"]),
                                    torch.tensor([0, 1, 2]), "rademacher", (True, True, True),
                                    compute_dtype=F64, out_dtype=F64)
    _assert_close32(yt, ryt, "y_tangents")
    yp, ym = layer.forward_perturbed(x, SEED, [0, 1, 2], 1e-2, backend=backend)
    fd = (yp.to(F64) - ym.to(F64)) / 2e-2
    _, t0 = R.reference_lora_dual(x, None, layer.weight, layer.bias.detach(), layer.lora_A.weight.detach(),
                                  layer.lora_B.weight.detach(), 2.0, SEED, (ids["A"], ids["B"], ids["bias"]),
                                  torch.tensor([0, 1, 2]), "rademacher", (True, True, True),
                                  compute_dtype=F64, out_dtype=F64)
    assert _rel_err(fd, t0) < 1e-3


def test_lora_linear_merge_unmerge_and_errors():
    torch.manual_seed(2)
    layer = LoRALinear(16, 8, r=4, alpha=4)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 16)
    y = layer(x)
    W0 = layer.weight.clone()
    layer.merge()
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.forward_dual(x, None, 0, [0], param_ids=PIDS)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, W0, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="assign_param_ids"):
        layer.forward_dual(x, None, 0, [0])
    drop = LoRALinear(16, 8, r=4, alpha=4, dropout=0.1)
    with pytest.raises(NotImplementedError, match="dropout"):
        drop.forward_dual(x, None, 0, [0], param_ids=PIDS)
    drop.eval()
    drop.forward_dual(x, None, 0, [0], param_ids=PIDS)
    with pytest.raises(ValueError, match="r:"):
        LoRALinear(4, 4, r=0)


def test_effective_weight_is_the_dense_weight_the_layer_applies():
    """effective_weight() = W + s·BA: x @ it.T (+ bias) is the layer's output, before and after merge,
    in the asked dtype; detached (no autograd graph back to A or B)."""
    torch.manual_seed(4)
    layer = LoRALinear(17, 7, r=3, alpha=6)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(5, 17)
    W = layer.effective_weight()
    assert W.shape == (7, 17) and W.dtype == torch.float32 and not W.requires_grad
    torch.testing.assert_close(F.linear(x, W, layer.base_layer.bias), layer(x), rtol=1e-5, atol=1e-5)
    ref = layer.base_layer.weight.detach().double() + 2.0 * layer.lora_B.weight.double() @ layer.lora_A.weight.double()
    torch.testing.assert_close(layer.effective_weight(torch.float64), ref, rtol=1e-12, atol=1e-12)
    assert layer.effective_weight(torch.bfloat16).dtype == torch.bfloat16
    layer.merge()
    torch.testing.assert_close(layer.effective_weight(), W, rtol=1e-6, atol=1e-6)


def test_lora_linear_low_precision_base():
    torch.manual_seed(3)
    base = torch.nn.Linear(32, 16).to(torch.bfloat16)
    layer = LoRALinear.from_linear(base, r=4, alpha=8)
    torch.nn.init.normal_(layer.lora_B.weight)
    assert layer.lora_A.weight.dtype == torch.float32 and layer.weight.dtype == torch.bfloat16
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = F.linear(x.float(), base.weight.float(), base.bias.float()) + 2.0 * (
        x.float() @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    assert _rel_err(y, ref.to(F64)) < 2e-2
    y2, yt = layer.forward_dual(x, None, 1, [0, 1], param_ids=PIDS)
    assert y2.dtype == yt.dtype == torch.bfloat16 and yt.shape == (2, 5, 16)


@pytest.fixture(scope="module")
def peft_lora():
    pytest.importorskip("peft", reason="peft is not installed (pip install --no-deps peft==0.21.2 + "
                                       "transformers, accelerate)")
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLinear

    return LoraConfig, PeftLinear


def test_peft_state_dict_round_trip(peft_lora):
    LoraConfig, PeftLinear = peft_lora
    torch.manual_seed(4)
    r, alpha = 4, 8
    peft_layer = PeftLinear(torch.nn.Linear(20, 12), "default", config=LoraConfig(r=r, lora_alpha=alpha),
                            r=r, lora_alpha=alpha)
    torch.nn.init.normal_(peft_layer.lora_B["default"].weight)
    ours = LoRALinear(20, 12, r=r, alpha=alpha)
    # peft's saved adapters drop the adapter name: lora_A.default.weight -> lora_A.weight.
    sd = {k.replace(".default", ""): v for k, v in peft_layer.state_dict().items()}
    ours.load_state_dict(sd, strict=True)
    assert ours.scaling == peft_layer.scaling["default"]
    x = torch.randn(3, 7, 20)
    torch.testing.assert_close(ours(x), peft_layer(x))
    # and back: our state dict loads into a fresh peft layer (adapter name re-inserted)
    torch.nn.init.normal_(ours.lora_A.weight)
    fresh = PeftLinear(torch.nn.Linear(20, 12), "default", config=LoraConfig(r=r, lora_alpha=alpha), r=r,
                       lora_alpha=alpha)
    back = {k.replace("lora_A.", "lora_A.default.").replace("lora_B.", "lora_B.default."): v
            for k, v in ours.state_dict().items()}
    fresh.load_state_dict(back, strict=True)
    torch.testing.assert_close(fresh(x), ours(x))
    # The A init matches peft's (kaiming-uniform a=√5 = nn.Linear's default): same bound.
    bound = 1 / math.sqrt(20)
    fresh_ours = LoRALinear(20, 12, r=r, alpha=alpha)
    assert fresh_ours.lora_A.weight.abs().max() <= bound + 1e-6


def test_peft_model_state_dict_names(peft_lora):
    """Names of get_peft_model_state_dict (adapter file keys) = ours under base_model.model."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    torch.manual_seed(5)
    model = get_peft_model(_Tiny(), LoraConfig(r=4, lora_alpha=8, target_modules=["proj", "out"]))
    peft_keys = set(get_peft_model_state_dict(model))
    ours = _Tiny()
    ours.proj = LoRALinear.from_linear(ours.proj, r=4, alpha=8)
    ours.out = LoRALinear.from_linear(ours.out, r=4, alpha=8)
    our_keys = {"base_model.model." + k for k in ours.state_dict() if ".lora_" in k}
    assert peft_keys == our_keys
