"""seeded_axpy_ / seeded_dot vs the materializing reference.

    pytest bench/bench_seeded.py --benchmark-only --benchmark-json=bench/results/seeded_<device>_<date>.json

Grouped by (op, n, K); providers: cpu (C++) and reference (materializes V [K, n]: O(K*n)
memory) in ``test_seeded``; cuda, triton and reference_gpu in ``test_seeded_gpu`` (skips
without CUDA). extra_info: element throughput, peak memory (CPU: RSS growth in a fresh
process; GPU: max_memory_allocated growth), and on H100/H200 the floor (one pass over the
tensor at HBM bandwidth + K*n FMAs at fp32 peak) with the time over it.
"""
import pytest
import torch

import fwdkern
from fwdkern.ops.reference import reference_seeded_axpy_, reference_seeded_dot

from .common import environment, peak_memory_subprocess, repetitions, sync

NS = [1 << 20, 1 << 24]
KS = [1, 16, 256]
HAS_CUDA = torch.cuda.is_available()
CPU_PROVIDERS = ["cpu", "reference"]
GPU_PROVIDERS = ["cuda", "triton", "reference_gpu"]
# The reference materializes K*n fp32 values plus int64 bit planes; cap its size on CPU.
REF_MAX_ELEMS_CPU = (1 << 24) * 16


def _gpu_peaks(name: str):
    """Datasheet peaks (dense fp32 FMA/s = FLOP/s / 2, HBM bytes/s) for the floor."""
    table = {"H100": (67e12 / 2, 3.35e12), "H200": (67e12 / 2, 4.8e12)}
    for key, (fma, bw) in table.items():
        if key in name:
            return {"fp32_fma_per_s": fma, "bytes_per_s": bw}
    return None


def _device(provider):
    return "cuda" if provider in ("cuda", "triton", "reference_gpu") else "cpu"


def _skip_reason(provider, n, K):
    if provider == "reference" and n * K > REF_MAX_ELEMS_CPU:
        return f"reference would materialize {n * K / 1e9:.1f}G values on CPU"
    if provider == "reference_gpu" and n * K * 12 > 0.6 * torch.cuda.get_device_properties(0).total_memory:
        return "reference does not fit in GPU memory"
    return None


def _call(op, provider, p, t, ks, coeffs):
    if op == "axpy":
        if provider.startswith("reference"):
            reference_seeded_axpy_(p, 1234, 7, ks, coeffs, alpha=1e-3)
        else:
            fwdkern.seeded_axpy_(p, 1234, 7, ks, coeffs, alpha=1e-3, backend=provider, check_finite=False)
    else:
        if provider.startswith("reference"):
            return reference_seeded_dot(t, 1234, 7, ks)
        return fwdkern.seeded_dot(t, 1234, 7, ks, backend=provider, check_finite=False)


@pytest.mark.parametrize("provider", CPU_PROVIDERS)
@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("op", ["axpy", "dot"])
def test_seeded(benchmark, op, n, K, provider):
    _bench(benchmark, op, n, K, provider)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("provider", GPU_PROVIDERS)
@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("op", ["axpy", "dot"])
def test_seeded_gpu(benchmark, op, n, K, provider):
    _bench(benchmark, op, n, K, provider)


def _bench(benchmark, op, n, K, provider):
    why = _skip_reason(provider, n, K)
    if why:
        pytest.skip(why)
    device = _device(provider)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    benchmark.group = f"{op} n={n} K={K} {dtype}".replace("torch.", "")
    p = torch.randn(n, device=device).to(dtype)
    t = p.clone()
    ks = torch.arange(K, dtype=torch.int64, device=device) * 3 + 11
    coeffs = torch.randn(K, device=device)
    rounds = 3 if (provider == "reference" or (device == "cpu" and n * K >= (1 << 28))) else 10

    def run():
        out = _call(op, provider, p, t, ks, coeffs)
        sync(device)
        return out

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    benchmark.pedantic(run, **repetitions(rounds))
    info = benchmark.extra_info
    info.update(environment())
    info.update(op=op, n=n, K=K, dtype=str(dtype), provider=provider)
    med = benchmark.stats.stats.median
    info["melem_k_per_s"] = n * K / med / 1e6  # (element, perturbation) pairs per second
    if device == "cuda":
        info["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base
        # Floor: one read+write of the parameter tensor + K*n FMAs at fp32 peak (user-provided peaks).
        bytes_moved = (2 if op == "axpy" else 1) * n * p.element_size()
        info["bytes_moved"] = bytes_moved
        peak = _gpu_peaks(torch.cuda.get_device_name())
        if peak:
            floor = bytes_moved / peak["bytes_per_s"] + n * K / peak["fp32_fma_per_s"]
            info["floor_s"] = floor
            info["time_over_floor"] = med / floor
    else:
        setup = (
            f"def setup():\n"
            f"    return torch.randn({n}), torch.arange({K}) * 3 + 11, torch.randn({K})\n"
            f"def run(s):\n"
            f"    p, ks, c = s\n"
        )
        if provider == "reference":
            from_ref = "    from fwdkern.ops.reference import reference_seeded_axpy_, reference_seeded_dot\n"
            body = ("    reference_seeded_axpy_(p, 1234, 7, ks, c)\n" if op == "axpy"
                    else "    reference_seeded_dot(p, 1234, 7, ks)\n")
            setup += from_ref + body
        else:
            body = (f"    fwdkern.seeded_axpy_(p, 1234, 7, ks, c, backend='{provider}')\n" if op == "axpy"
                    else f"    fwdkern.seeded_dot(p, 1234, 7, ks, backend='{provider}')\n")
            setup += body
        info["peak_extra_bytes"] = peak_memory_subprocess(setup)
