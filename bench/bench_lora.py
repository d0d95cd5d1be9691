"""LoRA dual forward: fused vs reference, jvp+vmap, the dense floor, inference.

    pytest bench/bench_lora.py --benchmark-only --benchmark-json=bench/results/lora_<device>_<date>.json

Grouped by shape; providers (one benchmarked call each):
  fused      fwdkern.lora_linear_dual (cpu backend on CPU, triton on GPU): primal + K tangents,
             perturbations generated in-kernel
  fused_cuda the same op on the cuda backend (GPU only: torch GEMMs + the CUDA seeded matmul), the
             comparison that decides the automatic order for CUDA tensors (fwdkern/backends.py AUTO)
  perturbed  fwdkern.lora_linear_perturbed (FwdLLM y±, same K) -- extra, for reference
  reference  (a) fwdkern.ops.reference_lora.reference_lora_dual: materialized perturbations + torch matmuls
  jvp_vmap   (b) torch.func.jvp + vmap over the K tangents; perturbations materialized by the
             fast fwdkern.perturbation op inside the timed call (so (b) is not charged for the slow
             pure-PyTorch Philox of (a))
  floor      (c) one dense GEMM [(1+K)·M, in] x [in, out] (output allocated, like every provider)
  inference  (d) the layer's plain forward at M rows
extra_info: environment, shape, median, ratio to the floor / to inference (when those ran
first in the same session), peak memory (CPU: RSS growth in a fresh process; GPU:
max_memory_allocated growth). On CPU also the process CPU time per call (all threads,
CLOCK_PROCESS_CPUTIME_ID): on a shared machine wall time includes waiting for other
processes, CPU time much less so.
"""
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import fwdkern
from fwdkern.ops.reference_lora import reference_lora_dual

from .common import environment, repetitions, sync

HAS_CUDA = torch.cuda.is_available()
# floor and inference first: later providers report their ratio to them.
PROVIDERS = ["floor", "inference", "fused", "perturbed", "reference", "jvp_vmap"]
GPU_PROVIDERS = PROVIDERS[:3] + ["fused_cuda"] + PROVIDERS[3:]
CPU_SHAPES = [(512, 1024, 1024, 8, 8)]  # (M, in, out, r, K), fp32 -- the CPU target
GPU_SHAPES = [(M, 4096, 4096, 16, K) for M in (64, 512, 4096) for K in (1, 8, 32)]
PIDS = {"A": 101, "B": 102}
_MEDIANS: dict = {}


def _setup(M, in_f, out_f, r, K, device, dtype):
    g = torch.Generator().manual_seed(0)
    t = lambda *s: (torch.randn(*s, generator=g) / s[-1] ** 0.5).to(device=device, dtype=dtype)  # noqa: E731
    x, xt = t(M, in_f), t(K, M, in_f)
    W, b, A, B = t(out_f, in_f), t(out_f), t(r, in_f), t(out_f, r)
    ks = torch.arange(K, dtype=torch.int64, device=device)
    return dict(x=x, xt=xt, W=W, b=b, A=A, B=B, ks=ks, X_all=t((1 + K) * M, in_f), s=2.0)


def _runner(provider, st, device):
    x, xt, W, b, A, B, ks, s = (st[k] for k in ("x", "xt", "W", "b", "A", "B", "ks", "s"))
    backend = "triton" if device == "cuda" else "cpu"
    if provider == "floor":
        return lambda: torch.mm(st["X_all"], W.t())
    if provider == "inference":
        return lambda: F.linear(x, W, b) + s * F.linear(F.linear(x, A), B)
    if provider in ("fused", "fused_cuda"):
        if provider == "fused_cuda":
            backend = "cuda"
        return lambda: fwdkern.lora_linear_dual(x, xt, W, b, A, B, s, 7, PIDS, ks, backend=backend)
    if provider == "perturbed":
        return lambda: fwdkern.lora_linear_perturbed(x, W, b, A, B, s, 7, PIDS, ks, 1e-3, backend=backend)
    if provider == "reference":
        return lambda: reference_lora_dual(x, xt, W, b, A, B, s, 7, (101, 102, 0), ks, "rademacher",
                                           (True, True, False))
    if provider == "jvp_vmap":
        r, in_f = A.shape
        out_f = W.shape[0]
        pb = "cuda" if device == "cuda" and fwdkern.backends.available("cuda", device) else None

        def layer(A_, B_, x_):
            return F.linear(x_, W, b) + s * F.linear(F.linear(x_, A_), B_)

        def run():
            kl = ks.tolist()
            dA = torch.stack([fwdkern.perturbation((r, in_f), 7, 101, k, dtype=x.dtype, device=device, backend=pb)
                              for k in kl])
            dB = torch.stack([fwdkern.perturbation((out_f, r), 7, 102, k, dtype=x.dtype, device=device, backend=pb)
                              for k in kl])
            return torch.func.vmap(lambda a, bb, xx: torch.func.jvp(layer, (A, B, x), (a, bb, xx)))(dA, dB, xt)

        return run
    raise ValueError(provider)


_CPU_MEMORY_CODE = {
    "floor": "    torch.mm(s['X_all'], s['W'].t())\n",
    "inference": "    F.linear(s['x'], s['W'], s['b']) + 2.0 * F.linear(F.linear(s['x'], s['A']), s['B'])\n",
    "fused": "    fwdkern.lora_linear_dual(s['x'], s['xt'], s['W'], s['b'], s['A'], s['B'], 2.0, 7, (101, 102), "
             "s['ks'], backend='cpu')\n",
    "perturbed": "    fwdkern.lora_linear_perturbed(s['x'], s['W'], s['b'], s['A'], s['B'], 2.0, 7, (101, 102), "
                 "s['ks'], 1e-3, backend='cpu')\n",
    "reference": "    reference_lora_dual(s['x'], s['xt'], s['W'], s['b'], s['A'], s['B'], 2.0, 7, (101, 102, 0), "
                 "s['ks'], 'rademacher', (True, True, False))\n",
    "jvp_vmap": None,  # filled from the runner in-process (closures); see _cpu_peak
}


def _peak_rss_growth(code: str):
    """Peak RSS growth (bytes) of one run(state) in a fresh interpreter: the kernel's
    high-water mark (VmHWM) is reset through /proc/self/clear_refs after setup and a warm
    run, so import-time transients do not count (unlike ru_maxrss). A fixed glibc mmap
    threshold makes every large buffer a fresh mapping that is unmapped on free, so RSS
    follows live memory instead of glibc's retained heap."""
    prog = (
        "import torch, fwdkern\n"
        "def _status(key):\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith(key): return int(line.split()[1]) * 1024\n"
        f"{code}\n"
        "state = setup(); run(state)\n"
        "state = setup()\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "base = _status('VmRSS'); run(state)\n"
        "print(_status('VmHWM') - base)\n"
    )
    try:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
        out = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=600, check=True,
                             env=env)
        return max(0, int(out.stdout.strip().splitlines()[-1]))
    except Exception as e:  # reported, not fatal (e.g. no /proc)
        print("peak memory measurement failed:", e, file=sys.stderr)
        return None


def _cpu_peak(provider, shape):
    M, in_f, out_f, r, K = shape
    head = (
        "import torch.nn.functional as F\n"
        "from fwdkern.ops.reference_lora import reference_lora_dual\n"
        "from bench.bench_lora import _setup, _runner\n"
        f"def setup():\n    return _setup({M}, {in_f}, {out_f}, {r}, {K}, 'cpu', torch.float32)\n"
        "def run(s):\n"
    )
    body = _CPU_MEMORY_CODE[provider] or f"    _runner('{provider}', s, 'cpu')()\n"
    return _peak_rss_growth(head + body)


def _bench(benchmark, provider, shape, device, dtype):
    M, in_f, out_f, r, K = shape
    key = (device, shape)
    benchmark.group = f"lora_dual M={M} in={in_f} out={out_f} r={r} K={K} {dtype}".replace("torch.", "")
    st = _setup(*shape, device, dtype)
    fn = _runner(provider, st, device)
    slow = provider in ("reference", "jvp_vmap") and device == "cpu"

    def run():
        out = fn()
        sync(device)
        return out

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    benchmark.pedantic(run, **repetitions(5 if slow else 15, warmup=2))
    med = benchmark.stats.stats.median
    _MEDIANS[key + (provider,)] = med
    if device == "cpu":
        cpu_times = []
        for _ in range(5):
            c0 = time.process_time()
            fn()
            cpu_times.append(time.process_time() - c0)
        _MEDIANS[key + (provider, "cpu")] = sorted(cpu_times)[2]
    info = benchmark.extra_info
    info.update(environment())
    info.update(M=M, in_features=in_f, out_features=out_f, r=r, K=K, dtype=str(dtype), provider=provider,
                median_s=med)
    # (1+K)·M·in·out FMAs of the dense part: the floor's work, the same for every dual provider.
    info["dense_tflops"] = 2 * (1 + K) * M * in_f * out_f / med / 1e12
    for ref in ("floor", "inference"):
        if key + (ref,) in _MEDIANS and provider != ref:
            info[f"vs_{ref}"] = med / _MEDIANS[key + (ref,)]
    if device == "cpu":
        info["cpu_time_s_median"] = _MEDIANS[key + (provider, "cpu")]
        if key + ("floor", "cpu") in _MEDIANS and provider != "floor":
            info["cpu_time_vs_floor"] = info["cpu_time_s_median"] / _MEDIANS[key + ("floor", "cpu")]
    if device == "cuda":
        info["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base
    else:
        info["peak_extra_bytes"] = _cpu_peak(provider, shape)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: "M{}-in{}-out{}-r{}-K{}".format(*s))
def test_lora_dual_cpu(benchmark, shape, provider):
    if not fwdkern.backends.available("cpu", "cpu"):
        pytest.skip("fwdkern._C is not built")
    _bench(benchmark, provider, shape, "cpu", torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("provider", GPU_PROVIDERS)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "M{}-in{}-out{}-r{}-K{}".format(*s))
def test_lora_dual_gpu(benchmark, shape, provider):
    M, in_f, out_f, r, K = shape
    if provider == "reference" and K * M * out_f * 2 * 3 > 0.5 * torch.cuda.get_device_properties(0).total_memory:
        pytest.skip("reference does not fit in GPU memory")
    if provider == "fused_cuda" and not fwdkern.backends.available("cuda", "cuda"):
        pytest.skip("fwdkern._C was built without the CUDA kernels")
    _bench(benchmark, provider, shape, "cuda", torch.bfloat16)
