"""Shared benchmark helpers: environment record, timing sync, peak memory, repetitions."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys

import torch

# FWDKERN_BENCH_QUICK=1 (scripts/gpu_check.sh): fewer repetitions so the whole GPU check fits its
# time budget; medians of 5 calls after one warm-up instead of the suites' defaults.
QUICK = os.environ.get("FWDKERN_BENCH_QUICK", "") == "1"


def repetitions(rounds: int, warmup: int = 1) -> dict:
    """benchmark.pedantic's rounds / warmup_rounds, reduced under FWDKERN_BENCH_QUICK=1."""
    if QUICK:
        rounds, warmup = min(rounds, 5), min(warmup, 1)
    return dict(rounds=rounds, warmup_rounds=warmup, iterations=1)



def causal_lm_loss(logits, labels):
    """Next-token cross entropy over the full logits (what an HF causal-LM loss costs), fp32."""
    import torch.nn.functional as F

    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                           ignore_index=-100)


def git_commit(where: str) -> str | None:
    """The short commit of the checkout holding `where` (None outside a git checkout)."""
    try:
        out = subprocess.run(["git", "-C", where, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    except OSError:
        return None
    return out.stdout.strip() or None


def best_by_validation(rows: list, key) -> dict:
    """{key(row): the row with the largest finite "val_drop_at_12"} of a grid's rows."""
    best = {}
    for r in rows:
        k, v = key(r), r["val_drop_at_12"]
        if v == v and v > best.get(k, {}).get("val_drop_at_12", -float("inf")):
            best[k] = r
    return best


def time_gpu(benchmark, fn, rounds: int, warmup: int):
    """(median seconds, peak extra bytes) of `fn` on the GPU, synchronized after every call."""

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    benchmark.pedantic(run, **repetitions(rounds, warmup=warmup))
    return benchmark.stats.stats.median, torch.cuda.max_memory_allocated() - base

def environment() -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    else:
        info["device"] = "cpu"
    return info


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def peak_memory_subprocess(code: str) -> int | None:
    """Peak RSS growth (bytes) while running `code` once in a fresh interpreter (CPU).

    The kernel's peak-RSS counter (VmHWM) is reset through /proc/self/clear_refs right
    before the timed call, so import-time transients are not counted. After `code` has set up
    (a federated client keeps freed blocks in its heap: fwdkern.fl.task.keep_freed_memory),
    glibc is told to hand every freed block of 128 KiB or more back to the kernel, so the growth
    is the call's working memory, not what the allocator kept from the warm-up call.
    """
    prog = (
        "import ctypes, torch, fwdkern\n"
        "def rss():\n"
        "    with open('/proc/self/statm') as f: return int(f.read().split()[1]) * 4096\n"
        "def hwm():\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith('VmHWM'): return int(line.split()[1]) * 1024\n"
        "def release_freed():\n"
        "    try: libc = ctypes.CDLL('libc.so.6')\n"
        "    except OSError: return\n"
        "    libc.mallopt(-3, 128 << 10); libc.mallopt(-1, 128 << 10); libc.mallopt(-2, 0); libc.malloc_trim(0)\n"
        f"{code}\n"  # defines setup() -> state and run(state)
        "release_freed()\n"
        "state = setup(); run(state)\n"  # warm (lazy allocations, first-touch)
        "state = setup(); release_freed(); base = rss()\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "run(state)\n"
        "print(hwm() - base)\n"
    )
    try:
        out = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=600, check=True)
        return max(0, int(out.stdout.strip().splitlines()[-1]))
    except Exception as e:  # pragma: no cover - reported, not fatal
        print("peak memory measurement failed:", e, file=sys.stderr)
        return None


def dump(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
