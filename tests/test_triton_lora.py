"""Triton LoRA dual / perturbed kernels (fwdkern/triton/lora.py, through the public ops with
backend="triton") against materialized torch math.

Runs in the Triton interpreter when there is no GPU. Tolerances:
- fp32: elementwise |out - ref| <= 1e-5 * |ref| + 1e-5 * max|ref| (ref in float64
  from the same inputs and the materialized reference perturbations);
- fp16: max|out - ref| <= 2 * max(torch_err, 2^-11 * max|ref|), where torch_err is
  the error of the same computation done by torch in fp16 with fp16-materialized
  perturbations (2^-11 * max|ref| = rounding the largest output to fp16 once).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import fwdkern  # noqa: E402
from fwdkern.ops import reference_lora as R  # noqa: E402
from fwdkern.ops.reference import reference_perturbations  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SEED = 0x1234_5678_9ABC_DEF1  # both 32-bit halves non-zero
PID_A, PID_B, PID_BIAS = 11, 12, 13
FLAG_SETS = [("A",), ("B",), ("bias",), ("A", "B"), ("A", "B", "bias"), ()]


def _layer(M, D, N, R, K, dtype, bias=True, xt=True, gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)
    t = lambda *s: torch.randn(*s, generator=g).to(DEV, dtype)  # noqa: E731
    x, W, A, B = t(M, D), t(N, D) / D**0.5, t(R, D) / D**0.5, t(N, R)
    b = t(N) if bias else None
    xts = t(K, M, D) if xt else None
    ks = torch.randint(0, 2**32, (K,), generator=g, dtype=torch.int64)
    return x, xts, W, b, A, B, ks


def _flags(flags):
    return tuple(n in flags for n in ("A", "B", "bias"))


def _ref_dual(x, xt, W, b, A, B, s, ks, dist, flags, dtype):
    """The reference dual forward evaluated in `dtype` (float64 = ground truth, fp16 = torch's own fp16)."""
    return R.reference_lora_dual(x, xt, W, b, A, B, s, SEED, (PID_A, PID_B, PID_BIAS), ks, dist, _flags(flags),
                                 compute_dtype=dtype, out_dtype=dtype)


def _ref_perturbed(x, W, b, A, B, s, ks, eps, dist, flags, dtype):
    """The reference perturbed forward (perturbed dense weights formed explicitly) in `dtype`."""
    return R.reference_lora_perturbed(x, W, b, A, B, s, SEED, (PID_A, PID_B, PID_BIAS), ks, eps, dist,
                                      _flags(flags), compute_dtype=dtype, out_dtype=dtype)


def _assert_fp32(out, ref, what):
    ref = ref.to(torch.float64)
    err = (out.double() - ref).abs()
    scale = ref.abs().max().item() if ref.numel() else 0.0
    bound = 1e-5 * ref.abs() + 1e-5 * scale + 1e-30
    assert out.dtype == torch.float32, what
    assert bool((err <= bound).all()), f"{what}: max err {err.max().item():.3e}, max|ref| {scale:.3e}"
    return err.max().item() / max(scale, 1e-30) if err.numel() else 0.0


def _assert_fp16(out, ref64, ref16, what):
    assert out.dtype == torch.float16, what
    if ref64.numel() == 0:
        return
    err = (out.double() - ref64).abs().max().item()
    terr = (ref16.double() - ref64).abs().max().item()
    floor = 2.0**-11 * ref64.abs().max().item()
    assert err <= 2 * max(terr, floor), f"{what}: err {err:.3e} vs torch fp16 err {terr:.3e} (floor {floor:.3e})"


def _run_dual(x, xt, W, b, A, B, s, ks, dist, flags):
    return fwdkern.lora_linear_dual(x, xt, W, b, A, B, s, SEED, (PID_A, PID_B, PID_BIAS), ks.to(DEV), dist=dist,
                                    perturb=flags, backend="triton")


def _run_pert(x, W, b, A, B, s, ks, eps, dist, flags):
    return fwdkern.lora_linear_perturbed(x, W, b, A, B, s, SEED, (PID_A, PID_B, PID_BIAS), ks.to(DEV), eps, dist=dist,
                                         perturb=flags, backend="triton")


# Hostile shapes (M, in, out, r, K): in/out in {1, 7, 64, 1031}, r in {1, 8, 64}
# (+130 > 128: several rank chunks), K in {1, 3, 16}. Not the full product: the
# interpreter is slow, each Philox round is a dozen interpreted ops.
SHAPES = [
    (3, 1, 7, 1, 3),
    (5, 7, 1, 8, 1),
    (4, 64, 64, 64, 3),
    (2, 1031, 7, 8, 3),
    (3, 7, 1031, 1, 3),
    (1, 1031, 1031, 64, 1),
    (16, 64, 7, 8, 16),
    (3, 7, 9, 130, 3),
]


def _cases():
    out = []
    for i, shp in enumerate(SHAPES):
        flags = FLAG_SETS[i % 5]  # rotate the non-empty flag sets over the shapes
        dist = "rademacher" if i % 3 else "gaussian"
        out.append(pytest.param(shp, flags, dist, id=f"{'x'.join(map(str, shp))}-{'+'.join(flags)}-{dist[:5]}"))
    return out


@pytest.mark.parametrize("shape,flags,dist", _cases())
@pytest.mark.parametrize("with_xt", [True, False], ids=["xt", "noxt"])
def test_dual_fp32_shapes(shape, flags, dist, with_xt):
    M, D, N, R, K = shape
    x, xt, W, b, A, B, ks = _layer(M, D, N, R, K, torch.float32, bias=(M % 2 == 1) or "bias" in flags, xt=with_xt)
    y, yt = _run_dual(x, xt, W, b, A, B, 0.75, ks, dist, flags)
    ry, ryt = _ref_dual(x, xt, W, b, A, B, 0.75, ks, dist, flags, torch.float64)
    assert y.shape == (M, N) and yt.shape == (K, M, N)
    _assert_fp32(y, ry, "y")
    _assert_fp32(yt, ryt, "yt")


@pytest.mark.parametrize("flags", FLAG_SETS, ids=lambda f: "+".join(f) or "none")
@pytest.mark.parametrize("with_xt", [True, False], ids=["xt", "noxt"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_dual_fp32_flags(flags, with_xt, with_bias, dist):
    if "bias" in flags and not with_bias:
        pytest.skip("bias perturbation needs a bias")
    x, xt, W, b, A, B, ks = _layer(6, 9, 10, 8, 3, torch.float32, bias=with_bias, xt=with_xt, gen_seed=1)
    y, yt = _run_dual(x, xt, W, b, A, B, 2.0, ks, dist, flags)
    ry, ryt = _ref_dual(x, xt, W, b, A, B, 2.0, ks, dist, flags, torch.float64)
    _assert_fp32(y, ry, "y")
    _assert_fp32(yt, ryt, "yt")


@pytest.mark.parametrize("shape,flags,dist", _cases())
def test_perturbed_fp32_shapes(shape, flags, dist):
    M, D, N, R, K = shape
    eps = 1e-2
    x, _, W, b, A, B, ks = _layer(M, D, N, R, K, torch.float32, bias=True, xt=False, gen_seed=2)
    yp, ym = _run_pert(x, W, b, A, B, 0.5, ks, eps, dist, flags)
    rp, rm = _ref_perturbed(x, W, b, A, B, 0.5, ks, eps, dist, flags, torch.float64)
    assert yp.shape == (K, M, N) and ym.shape == (K, M, N)
    _assert_fp32(yp, rp, "y_plus")
    _assert_fp32(ym, rm, "y_minus")


@pytest.mark.parametrize("flags", FLAG_SETS, ids=lambda f: "+".join(f) or "none")
@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_perturbed_fp32_flags(flags, dist):
    eps = 0.1  # large: the eps^2 term (A and B both perturbed) is visible
    x, _, W, b, A, B, ks = _layer(5, 9, 10, 8, 3, torch.float32, bias=True, xt=False, gen_seed=3)
    yp, ym = _run_pert(x, W, b, A, B, 1.5, ks, eps, dist, flags)
    rp, rm = _ref_perturbed(x, W, b, A, B, 1.5, ks, eps, dist, flags, torch.float64)
    _assert_fp32(yp, rp, "y_plus")
    _assert_fp32(ym, rm, "y_minus")


def test_perturbed_central_difference_is_tangent():
    """(y+ - y-) / 2 eps equals the dual tangent (without input tangents) for every eps."""
    x, _, W, b, A, B, ks = _layer(4, 33, 20, 8, 3, torch.float32, gen_seed=4)
    flags = ("A", "B", "bias")
    _, yt = _run_dual(x, None, W, b, A, B, 0.5, ks, "rademacher", flags)
    for eps in (1e-1, 1e-2):
        yp, ym = _run_pert(x, W, b, A, B, 0.5, ks, eps, "rademacher", flags)
        fd = (yp.double() - ym.double()) / (2 * eps)
        tol = 4 * torch.finfo(torch.float32).eps * yp.abs().max().item() / eps + 1e-5 * yt.abs().max().item()
        assert (fd - yt.double()).abs().max().item() <= tol


FP16_SHAPES = [(3, 7, 64, 8, 3), (2, 1031, 7, 1, 16), (5, 64, 1031, 64, 1)]


@pytest.mark.parametrize("shape", FP16_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("with_xt", [True, False], ids=["xt", "noxt"])
def test_dual_fp16(shape, with_xt):
    M, D, N, R, K = shape
    flags = ("A", "B", "bias")
    x, xt, W, b, A, B, ks = _layer(M, D, N, R, K, torch.float16, xt=with_xt, gen_seed=5)
    y, yt = _run_dual(x, xt, W, b, A, B, 0.5, ks, "rademacher", flags)
    r64 = _ref_dual(x, xt, W, b, A, B, 0.5, ks, "rademacher", flags, torch.float64)
    r16 = _ref_dual(x, xt, W, b, A, B, 0.5, ks, "rademacher", flags, torch.float16)
    _assert_fp16(y, r64[0], r16[0], "y")
    _assert_fp16(yt, r64[1], r16[1], "yt")


@pytest.mark.parametrize("shape", FP16_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_perturbed_fp16(shape):
    M, D, N, R, K = shape
    flags = ("A", "B", "bias")
    x, _, W, b, A, B, ks = _layer(M, D, N, R, K, torch.float16, gen_seed=6)
    yp, ym = _run_pert(x, W, b, A, B, 0.5, ks, 1e-2, "gaussian", flags)
    r64 = _ref_perturbed(x, W, b, A, B, 0.5, ks, 1e-2, "gaussian", flags, torch.float64)
    r16 = _ref_perturbed(x, W, b, A, B, 0.5, ks, 1e-2, "gaussian", flags, torch.float16)
    _assert_fp16(yp, r64[0], r16[0], "y_plus")
    _assert_fp16(ym, r64[1], r16[1], "y_minus")


@pytest.mark.parametrize("M,D,N", [(1, 1, 1), (3, 1031, 7), (5, 7, 200), (17, 64, 64)])
@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_seeded_matmul_nt(M, D, N, dist, dtype):
    """fp32 output at fp32 accuracy for fp16 X too (Gaussian v split into fp16 hi + lo)."""
    g = torch.Generator().manual_seed(7)
    X = torch.randn(M, D, generator=g).to(DEV, dtype)
    ks = torch.tensor([0, 5, 2**32 - 1], dtype=torch.int64)
    out = fwdkern.seeded_matmul(X, SEED, 99, ks.to(DEV), N, dist=dist, backend="triton")
    V = reference_perturbations((N, D), SEED, 99, ks, dist).to(DEV, torch.float64)
    ref = X.double() @ V.transpose(1, 2)
    assert out.shape == (3, M, N)
    _assert_fp32(out, ref, "X v^T")


def test_rademacher_products_are_exact():
    """Integer-valued inputs: every product and sum is exact in fp32, so the kernels
    reproduce the reference perturbations bit for bit (no tolerance)."""
    g = torch.Generator().manual_seed(8)
    M, D, N, R, K = 3, 200, 9, 8, 3
    x = torch.randint(-3, 4, (M, D), generator=g).float().to(DEV)
    W = torch.randint(-3, 4, (N, D), generator=g).float().to(DEV)
    A = torch.randint(-3, 4, (R, D), generator=g).float().to(DEV)
    B = torch.randint(-3, 4, (N, R), generator=g).float().to(DEV)
    ks = torch.tensor([1, 2, 3])
    flags = ("A", "B", "bias")
    b = torch.zeros(N, device=DEV)
    y, yt = _run_dual(x, None, W, b, A, B, 1.0, ks, "rademacher", flags)
    ry, ryt = _ref_dual(x, None, W, b, A, B, 1.0, ks, "rademacher", flags, torch.float64)
    assert torch.equal(y.double(), ry) and torch.equal(yt.double(), ryt)


def test_empty_and_degenerate():
    x, xt, W, b, A, B, ks = _layer(0, 7, 5, 2, 3, torch.float32)
    y, yt = _run_dual(x, xt, W, b, A, B, 1.0, ks, "rademacher", ("A", "B"))
    assert y.shape == (0, 5) and yt.shape == (3, 0, 5)
    # K = 0: primal only
    x, _, W, b, A, B, _ = _layer(3, 7, 5, 2, 1, torch.float32)
    ks0 = torch.zeros(0, dtype=torch.int64)
    y, yt = _run_dual(x, None, W, b, A, B, 1.0, ks0, "rademacher", ("A", "B", "bias"))
    ry, _ = _ref_dual(x, None, W, b, A, B, 1.0, ks0, "rademacher", (), torch.float64)
    assert yt.shape == (0, 3, 5)
    _assert_fp32(y, ry, "y")
    yp, ym = _run_pert(x, W, b, A, B, 1.0, ks0, 1e-3, "rademacher", ("A",))
    assert yp.shape == (0, 3, 5) and ym.shape == (0, 3, 5)


def test_bad_shapes_raise():
    x, xt, W, b, A, B, ks = _layer(3, 7, 5, 2, 2, torch.float32)
    bad = [
        dict(W=W[:, :6]),
        dict(A=A[:, :6]),
        dict(B=B[:, :1]),
        dict(b=b[:4]),
        dict(xt=xt[:1]),
        dict(xt=xt[:, :2]),
    ]
    for kw in bad:
        args = dict(x=x, xt=xt, W=W, b=b, A=A, B=B)
        args.update(kw)
        with pytest.raises(ValueError):
            fwdkern.lora_linear_dual(args["x"], args["xt"], args["W"], args["b"], args["A"], args["B"], 1.0, SEED,
                                     (1, 2, 3), ks, perturb=("A", "B", "bias"), backend="triton")
    with pytest.raises(ValueError):  # bias perturbed, no bias
        fwdkern.lora_linear_perturbed(x, W, None, A, B, 1.0, SEED, (1, 2, 3), ks, 1e-3, perturb=("A", "B", "bias"),
                                      backend="triton")
    with pytest.raises(ValueError):  # unknown distribution
        fwdkern.lora_linear_dual(x, None, W, b, A, B, 1.0, SEED, (1, 2, 3), ks, dist="uniform", backend="triton")
    with pytest.raises(ValueError):  # x without a feature dimension
        fwdkern.seeded_matmul(x[0, 0], SEED, 1, ks, 4, backend="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 needs a GPU (the interpreter has no bf16)")
def test_dual_bf16_gpu():
    M, D, N, R, K = 64, 256, 192, 16, 8
    flags = ("A", "B", "bias")
    x, xt, W, b, A, B, ks = _layer(M, D, N, R, K, torch.bfloat16, gen_seed=9)
    y, yt = _run_dual(x, xt, W, b, A, B, 0.5, ks, "rademacher", flags)
    r64 = _ref_dual(x, xt, W, b, A, B, 0.5, ks, "rademacher", flags, torch.float64)
    r16 = _ref_dual(x, xt, W, b, A, B, 0.5, ks, "rademacher", flags, torch.bfloat16)
    for out, a, c in ((y, r64[0], r16[0]), (yt, r64[1], r16[1])):
        err = (out.double() - a).abs().max().item()
        terr = (c.double() - a).abs().max().item()
        assert err <= 2 * max(terr, 2.0**-8 * a.abs().max().item())


def test_strided_rows_and_fp16():
    """Row-strided x / xt views (row stride != in), in fp32 and in fp16."""
    M, D, N, R, K = 4, 7, 9, 8, 3
    g = torch.Generator().manual_seed(10)
    xw = torch.randn(M, D + 5, generator=g).to(DEV)
    x = xw[:, 2:2 + D]  # stride(0) = D + 5
    xtw = torch.randn(K, M, D + 3, generator=g).to(DEV)
    xt = xtw[:, :, :D]
    W = torch.randn(N, D, generator=g).to(DEV)
    A = torch.randn(R, D, generator=g).to(DEV)
    B = torch.randn(N, R, generator=g).to(DEV)
    ks = torch.tensor([4, 5, 6])
    flags = ("A", "B")
    y, yt = _run_dual(x, xt, W, None, A, B, 0.5, ks, "rademacher", flags)
    ry, ryt = _ref_dual(x, xt, W, None, A, B, 0.5, ks, "rademacher", flags, torch.float64)
    _assert_fp32(y, ry, "y")
    _assert_fp32(yt, ryt, "yt")
    # fp16 layer (the ops take one dtype: a frozen fp32 weight is cast to x's dtype first)
    x16, xt16 = x.half(), xt.half()
    y16, yt16 = _run_dual(x16, xt16, W.half(), None, A.half(), B.half(), 0.5, ks, "rademacher", flags)
    r16 = _ref_dual(x16, xt16, W.half(), None, A.half(), B.half(), 0.5, ks, "rademacher", flags, torch.float16)
    r64 = _ref_dual(x16, xt16, W.half(), None, A.half(), B.half(), 0.5, ks, "rademacher", flags, torch.float64)
    _assert_fp16(y16, r64[0], r16[0], "y")
    _assert_fp16(yt16, r64[1], r16[1], "yt")


_AOT_SCRIPT = r"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from fwdkern.triton import lora

def compile_one(kernel, types, consts, cfg):
    fn = kernel.fn
    consts = dict(consts, **cfg.kwargs)
    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
    # what the launcher would specialize for 16-aligned tensors and strides
    div = [n for n in fn.arg_names if sig[n].startswith("*") or n.startswith("stride") or n in ("N", "D")]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    print(fn.__name__, "smem", k.metadata.shared)

P = "*bf16"
f = {"scaling": "fp32", "eps": "fp32", "H": "*fp32", "OUT": "*fp32", "KS": "*i64", "S": "*fp32", "Z": "*fp32"}
for name in ("X", "XT", "W", "BIAS", "A", "B", "Y", "YT", "YP", "YM"):
    f[name] = P
gemm = [c for c in lora._gemm_configs() if c.kwargs["BLOCK_M"] == 128 and c.kwargs["BLOCK_N"] == 128][0]
common = dict(DIST=int(sys.argv[1]), PREC="tf32")
# float base (QBITS=0), then the quantized bases: int8 per channel, int4 two columns per byte
for qbits, wt in ((0, P), (8, "*i8"), (4, "*u8")):
    fq = dict(f, W=wt)
    compile_one(lora._dual_kernel, fq, dict(common, HAS_BIAS=True, PERTURB_B=True, PERTURB_BIAS=True, RB=16,
                QBITS=qbits), gemm)
    compile_one(lora._perturbed_kernel, fq, dict(common, HAS_BIAS=True, PERTURB_A=True, PERTURB_B=True,
                PERTURB_BIAS=True, RB=16, QBITS=qbits), gemm)
compile_one(lora._nt_kernel, f, dict(common, SEEDED=True, VSPLIT=1, BLOCK_N=16), lora._nt_configs()[-1])
# seeded_matmul_nt's bf16 Gaussian path (v split into three bf16 parts)
compile_one(lora._nt_kernel, f, dict(DIST=1, PREC="tf32", SEEDED=True, VSPLIT=3, BLOCK_N=64), lora._nt_configs()[-1])
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU compiles (and runs) the kernels for real")
def test_bf16_kernels_compile_for_sm90():
    """bf16 cannot run in the interpreter: compile the kernels ahead of time for sm_90
    (Triton's own ptxas, no GPU needed) so bf16 / compiled-only errors show up here."""
    import subprocess
    import sys

    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        pytest.skip("this triton has no ASTSource / GPUTarget")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, "0"], cwd=root, env=env, capture_output=True, text=True,
                       timeout=600)
    if r.returncode != 0 and ("nvidia" in r.stderr.lower() and "backend" in r.stderr.lower()):
        pytest.skip(f"no NVIDIA backend in this triton: {r.stderr[-300:]}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("smem") == 8, r.stdout
