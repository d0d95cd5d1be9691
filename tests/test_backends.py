"""Backend registry (fwdkern/backends.py): selection order, the support table and its rules,
the registered implementations, and scripts/gpu_check.sh's dry run."""
import os
import subprocess
import sys

import pytest
import torch

import fwdkern
from fwdkern import backends
from fwdkern.ops.attention import dual_attention

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRITON_ON_CPU = backends.available("triton", "cpu")


def test_backend_selection(monkeypatch):
    assert backends.resolve("seeded_dot", "cpu") == "cpu"
    monkeypatch.setenv("FWDKERN_BACKEND", "reference")
    assert backends.resolve("seeded_dot", "cpu") == "reference"
    assert backends.resolve("seeded_dot", "cpu", "cpu") == "cpu"  # per-call wins
    monkeypatch.setenv("FWDKERN_BACKEND", "cuda")
    with pytest.raises(fwdkern.BackendUnavailable, match="cuda"):
        fwdkern.seeded_dot(torch.ones(3), 1, 1, [0])
    monkeypatch.setenv("FWDKERN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="bogus"):
        fwdkern.seeded_dot(torch.ones(3), 1, 1, [0])


def test_automatic_choice_per_device():
    for op in backends.OPS:
        assert backends.resolve(op, "cpu") == "cpu"
        assert backends.resolve(op, "meta") == "reference"
        assert set(backends.AUTO["cuda"][op]) <= set(backends.BACKENDS)
        assert backends.AUTO["cuda"][op][-1] == "reference"


def test_requested_backend_that_cannot_run_says_why():
    with pytest.raises(fwdkern.BackendUnavailable, match="needs CUDA tensors"):
        backends.resolve("lora_linear_dual", "cpu", "cuda")
    with pytest.raises(fwdkern.BackendUnavailable, match="needs CPU tensors"):
        backends.resolve("seeded_axpy_", "meta", "cpu")
    with pytest.raises(ValueError, match="unknown backend"):
        backends.resolve("seeded_dot", "cpu", "tpu")


@pytest.mark.skipif(not TRITON_ON_CPU, reason="triton interpreter not available")
@pytest.mark.parametrize("op", backends.OPS)
def test_triton_interpreter_rejects_bf16(op):
    with pytest.raises(fwdkern.BackendUnavailable, match="bfloat16"):
        backends.resolve(op, "cpu", "triton", dtype=torch.bfloat16)
    assert backends.resolve(op, "cpu", "triton", dtype=torch.float16) == "triton"


@pytest.mark.skipif(not TRITON_ON_CPU, reason="triton interpreter not available")
def test_triton_interpreter_rejects_bf16_in_the_ops():
    bf = torch.zeros(4, 8, dtype=torch.bfloat16)
    calls = [
        lambda: fwdkern.seeded_axpy_(bf[0], 1, 1, [0], [1.0], backend="triton"),
        lambda: fwdkern.seeded_dot(bf, 1, 1, [0], backend="triton"),
        lambda: fwdkern.perturbation((4,), 1, 1, 0, dtype=torch.bfloat16, backend="triton"),
        lambda: fwdkern.seeded_matmul(bf, 1, 1, [0], 3, backend="triton"),
        lambda: fwdkern.lora_linear_dual(bf, None, bf, None, bf[:2], bf[:, :2], 1.0, 1, (1, 2), [0], backend="triton"),
        lambda: dual_attention(bf[None, None], bf[None, None], bf[None, None], None, None, None, backend="triton"),
    ]
    for call in calls:
        with pytest.raises(fwdkern.BackendUnavailable, match="bfloat16"):
            call()


def test_support_table_rows():
    rows = backends.support_table("cpu")
    assert [(op, b) for op, b, _, _ in rows] == [(op, b) for op in backends.OPS for b in backends.BACKENDS]
    by_key = {(op, b): (ok, note) for op, b, ok, note in rows}
    for op in backends.OPS:
        assert by_key[(op, "cpu")][0] and by_key[(op, "reference")][0]
        ok, note = by_key[(op, "cuda")]
        assert not ok and "CUDA tensors" in note
        ok, note = by_key[(op, "triton")]
        assert ok == TRITON_ON_CPU
        if ok:
            assert "bfloat16" in note
    assert "4-D" in by_key[("dual_attention", "triton")][1] or not TRITON_ON_CPU
    for op, b, ok, note in backends.support_table("cuda"):
        assert ok == (backends.available(b, "cuda")), (op, b, note)


def test_every_implemented_backend_registers_its_implementation():
    importable = ["cpu", "cuda", "reference"] + (["triton"] if backends.has_triton() else [])
    for op in backends.OPS:
        assert set(backends.IMPLEMENTED[op]) == set(backends.BACKENDS)
        for b in importable:
            assert callable(backends.implementation(op, b)), (op, b)


def test_register_rejects_unknown_names():
    with pytest.raises(ValueError):
        backends.register("seeded_axpy", "cpu")
    with pytest.raises(ValueError):
        backends.register("seeded_axpy_", "tpu")


# ----------------------------------------------------------------------------- dual attention routing


def _attention_inputs():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 16, generator=g) for _ in range(3))
    return q, k, v, torch.randn(2, 1, 2, 5, 16, generator=g)


def test_dual_attention_follows_the_backend_rules(monkeypatch):
    q, k, v, qt = _attention_inputs()
    o_ref, t_ref = dual_attention(q, k, v, qt, None, None, backend="reference")
    o, t = dual_attention(q, k, v, qt, None, None, backend="torch")  # "torch": the old name of the chunked path
    assert torch.equal(o, o_ref) and torch.equal(t, t_ref)
    for b in ("cpu", None):  # the cpu backend's one-block path: the same values up to fp32 rounding
        o, t = dual_attention(q, k, v, qt, None, None, backend=b)
        torch.testing.assert_close(o, o_ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(t, t_ref, rtol=1e-6, atol=1e-6)
    monkeypatch.setenv("FWDKERN_BACKEND", "cuda")
    with pytest.raises(fwdkern.BackendUnavailable, match="cuda"):
        dual_attention(q, k, v, qt, None, None)
    monkeypatch.setenv("FWDKERN_BACKEND", "reference")
    o, _ = dual_attention(q, k, v, qt, None, None)
    assert torch.equal(o, o_ref)


@pytest.mark.skipif(not TRITON_ON_CPU, reason="triton interpreter not available")
def test_dual_attention_triton_shape_rule():
    q, k, v, qt = _attention_inputs()
    with pytest.raises(ValueError, match="4-D"):
        dual_attention(q[0], k[0], v[0], qt[:, 0], None, None, backend="triton")
    with pytest.raises(ValueError, match="value head dim"):
        dual_attention(q, k, torch.randn(1, 2, 5, 8), None, None, None, backend="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_automatic_choice():
    for op in backends.OPS:
        b = backends.resolve(op, "cuda")
        assert b == next(x for x in backends.AUTO["cuda"][op] if backends.available(x, "cuda"))
    # 3-D attention inputs do not fit the Triton kernel: automatic choice moves on.
    assert backends.resolve("dual_attention", "cuda", fits=False) != "triton"


# ----------------------------------------------------------------------------- scripts/gpu_check.sh


def test_device_check_dry_run():
    """The GPU check's dry run finds every test file, benchmark and selected test/benchmark id."""
    env = {k: v for k, v in os.environ.items() if k != "FWDKERN_BACKEND"}
    env["PYTHON"] = sys.executable
    r = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", "--no-build"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "would run" in r.stdout
    for piece in ("tests/test_seeded.py", "tests/test_lora.py", "bench/bench_seeded.py::test_seeded_gpu",
                  "bench/bench_lora.py::test_lora_dual_gpu", "bench/bench_engine.py::test_dual_attention_gpu",
                  "bench/bench_engine.py::test_engine_smollm2_gpu"):
        assert piece in r.stdout, piece


def test_device_check_dry_run_fails_on_a_missing_piece():
    """A missing piece (here a test file; likewise a selection that collects nothing) fails the dry run."""
    env = {k: v for k, v in os.environ.items() if k != "FWDKERN_BACKEND"}
    env.update(PYTHON=sys.executable, FWDKERN_GPU_CHECK_EXTRA="tests/test_no_such_file.py")
    r = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", "--no-build"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "MISSING file: tests/test_no_such_file.py" in r.stdout + r.stderr
