"""Whole-model forward gradients: SmolLM2-135M shapes, batch 4 x 128, K = 8 (CPU; GPU with
``test_engine_smollm2_gpu``), and the engine's dual attention on its own (GPU).

    HF_HUB_OFFLINE=1 python -m pytest bench/bench_engine.py --benchmark-only \
        --benchmark-json=bench/results/engine_cpu_<date>.json

Model: LlamaConfig with SmolLM2-135M's shapes (hidden 576, 30 layers, 9 heads / 3 kv heads,
intermediate 1536, vocab 49152, tied embeddings), random weights, fp32, LoRA r=16 on
q,k,v,o (alpha 32), B randomized (non-zero) so every tangent is non-trivial.
Providers (one benchmarked call each = one K=8 step, or one forward for inference):
  inference  plain forward + loss, sdpa (the floor: fwdkern's ideal is ~(1+K)x this)
  fwdkern    fwdkern.jvp (dual forward, fused LoRA dual op, dual attention, no LM-head tangent)
  jvp_vmap   torch.func.jvp + vmap over K materialized perturbations (fwdkern.perturbation, inside
             the timed call) of the LoRA tensors, functional_call on the same model with
             attn_implementation="eager" (sdpa has no forward-AD rule), full-logits CE
  perturbed  fwdkern.perturbed_loss (FwdLLM/MeZO: 2K forwards, perturbation applied in place)
  backprop   loss.backward() through the LoRA model (autograd)
extra_info: environment, median seconds, ratio to inference, peak RSS growth of one call in a
fresh process (bytes; GPU: max_memory_allocated growth).

Dual attention (``test_dual_attention_gpu``, bf16, SmolLM2's heads: 9 query / 3 key-value, D=64,
B=4, K=8, causal): ``floor`` = torch SDPA over (1+K)·B sequences (what 1+K plain attentions
cost), ``triton`` / ``chunked`` = fwdkern.ops.attention.dual_attention on the triton / cuda
backend, ``jvp_vmap`` = torch.func.jvp + vmap of eager attention.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fwdkern  # noqa: E402

from .common import causal_lm_loss, environment, repetitions, time_gpu  # noqa: E402

B, T, K, SEED = 4, 128, 8, 1234
PROVIDERS = ["inference", "fwdkern", "jvp_vmap", "perturbed", "backprop"]
_MEDIANS: dict = {}


def smollm2_config(attn="sdpa"):
    import transformers

    cfg = transformers.LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, rms_norm_eps=1e-5,
        rope_theta=100000.0, tie_word_embeddings=True, hidden_act="silu")
    cfg._attn_implementation = attn
    return cfg


def setup(provider, device="cpu"):
    """(callable step, model) for one provider; importable by the memory subprocess."""
    import transformers

    torch.manual_seed(0)
    torch.set_grad_enabled(provider == "backprop")
    attn = "eager" if provider == "jvp_vmap" else "sdpa"
    model = transformers.AutoModelForCausalLM.from_config(smollm2_config(attn), attn_implementation=attn)
    model = model.to(device).eval()
    fwdkern.patch(model, r=16, alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    with torch.no_grad():
        for name, _, p in fwdkern.trainable(model):
            if "lora_B" in name:
                p.normal_(0, 0.02)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 49152, (B, T), generator=g).to(device)
    am = torch.ones(B, T, dtype=torch.long, device=device)
    am[1, 100:] = 0
    batch = {"input_ids": ids, "attention_mask": am}
    labels = ids.masked_fill(am == 0, -100)
    ks = list(range(K))

    def lm_loss(logits):
        return causal_lm_loss(logits, labels)

    if provider == "inference":
        def step():
            with torch.no_grad():
                return lm_loss(model(**batch, use_cache=False).logits)
    elif provider == "fwdkern":
        def step():
            return fwdkern.jvp(model, batch, SEED, ks)
    elif provider == "perturbed":
        def step():
            return fwdkern.perturbed_loss(model, batch, SEED, ks, eps=1e-3)
    elif provider == "backprop":
        def step():
            model.zero_grad(set_to_none=True)
            loss = lm_loss(model(**batch, use_cache=False).logits)
            loss.backward()
            return loss
    elif provider == "jvp_vmap":
        tr = fwdkern.trainable(model)
        names = [n for n, _, _ in tr]
        params = {n: p.detach() for n, _, p in tr}

        def f(p):
            return lm_loss(torch.func.functional_call(model, p, args=(), kwargs={**batch, "use_cache": False}).logits)

        def step():
            with torch.no_grad():
                tans = {n: torch.stack([fwdkern.perturbation(p.shape, SEED, pid, k, device=p.device) for k in ks])
                        for n, pid, p in tr}
                return torch.func.vmap(lambda t: torch.func.jvp(f, (params,), (t,)))({n: tans[n] for n in names})
    else:
        raise ValueError(provider)
    return step, model


@pytest.mark.parametrize("provider", PROVIDERS)
def test_engine_smollm2_cpu(benchmark, provider):
    step, _ = setup(provider)
    benchmark.group = f"smollm2-135M B{B}xT{T} K{K} fp32 cpu"
    # NOTE: 2 rounds, no warm-up: one K=8 step is ~1 min on 2 shared cores; a first call measured within
    # 10% of the second (lazy init is small next to the step).
    benchmark.pedantic(step, **repetitions(2, warmup=0))
    med = benchmark.stats.stats.median
    _MEDIANS[provider] = med
    info = {"environment": environment(), "provider": provider, "median_s": med, "K": K, "batch": [B, T],
            "lora": "r=16 q,k,v,o"}
    if "inference" in _MEDIANS and provider != "inference":
        info["ratio_to_inference"] = med / _MEDIANS["inference"]
    info["peak_rss_growth_bytes"] = peak_rss_growth(provider)
    benchmark.extra_info.update(info)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_engine_smollm2_gpu(benchmark, provider):
    """The same K=8 step on the GPU, fp32 weights (the engine's default dtype handling, no autocast)."""
    step, _ = setup(provider, "cuda")
    benchmark.group = f"smollm2-135M B{B}xT{T} K{K} fp32 cuda"
    med, peak = time_gpu(benchmark, step, 5, 1)
    _MEDIANS[("cuda", provider)] = med
    info = {"environment": environment(), "provider": provider, "median_s": med, "K": K, "batch": [B, T],
            "lora": "r=16 q,k,v,o", "peak_extra_bytes": peak}
    if ("cuda", "inference") in _MEDIANS and provider != "inference":
        info["ratio_to_inference"] = med / _MEDIANS[("cuda", "inference")]
    benchmark.extra_info.update(info)


ATTN_PROVIDERS = ["floor", "triton", "chunked", "jvp_vmap"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("provider", ATTN_PROVIDERS)
@pytest.mark.parametrize("T_", [128, 1024])
def test_dual_attention_gpu(benchmark, T_, provider):
    from fwdkern.ops.attention import dual_attention, reference_attention

    Hq, Hkv, D, dt = 9, 3, 64, torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, device="cuda", dtype=dt)  # noqa: E731
    q, k, v = r(B, Hq, T_, D), r(B, Hkv, T_, D), r(B, Hkv, T_, D)
    qt, kt, vt = r(K, B, Hq, T_, D), r(K, B, Hkv, T_, D), r(K, B, Hkv, T_, D)
    if provider == "floor":
        qa, ka, va = (torch.cat([p[None], t]).flatten(0, 1) for p, t in ((q, qt), (k, kt), (v, vt)))
        fn = lambda: F.scaled_dot_product_attention(qa, ka, va, is_causal=True, enable_gqa=True)  # noqa: E731
    elif provider in ("triton", "chunked"):
        backend = "triton" if provider == "triton" else "cuda"
        if not fwdkern.backends.available(backend, "cuda"):
            pytest.skip(f"backend {backend!r} unavailable")
        fn = lambda: dual_attention(q, k, v, qt, kt, vt, is_causal=True, backend=backend)  # noqa: E731
    else:
        def f(q_, k_, v_):
            return reference_attention(q_, k_, v_, is_causal=True)

        fn = lambda: torch.func.vmap(lambda a, b_, c: torch.func.jvp(f, (q, k, v), (a, b_, c)))(qt, kt, vt)  # noqa

    benchmark.group = f"dual_attention B{B} Hq{Hq} Hkv{Hkv} T{T_} D{D} K{K} bf16 causal"
    med, peak = time_gpu(benchmark, fn, 10, 2)
    _MEDIANS[("attn", T_, provider)] = med
    info = {"environment": environment(), "provider": provider, "median_s": med, "T": T_, "K": K,
            "peak_extra_bytes": peak}
    if ("attn", T_, "floor") in _MEDIANS and provider != "floor":
        info["vs_floor"] = med / _MEDIANS[("attn", T_, "floor")]
    benchmark.extra_info.update(info)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _measure_in_process(provider: str) -> int:
    """Peak RSS growth of one step over the RSS after setup, sampled every 2 ms by a thread.

    NOTE: ru_maxrss-based measurement (bench/common.py) also counts the peak of model construction
    (a second model built while the first is alive), which hid the step's own peak for the
    inference-sized providers (both read 514 MiB); sampling isolates the step."""
    import threading

    step, _ = setup(provider)
    base = _rss()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            done.wait(0.002)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    step()
    done.set()
    th.join()
    return max(peak[0], _rss()) - base


def peak_rss_growth(provider: str):
    """:func:`_measure_in_process` in a fresh interpreter (bytes), or None if it failed."""
    import subprocess
    import sys

    code = f"from bench.bench_engine import _measure_in_process as m; print(m({provider!r}))"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, check=True,
                             cwd=root)
        return int(out.stdout.strip().splitlines()[-1])
    except Exception as e:  # pragma: no cover - reported, not fatal
        print("peak memory measurement failed:", e, file=sys.stderr)
        return None


if __name__ == "__main__":  # memory only: python -m bench.bench_engine [out.json]
    import json
    import sys

    res = {"environment": environment(), "batch": [B, T], "K": K, "lora": "r=16 q,k,v,o",
           "peak_rss_growth_bytes": {p: peak_rss_growth(p) for p in PROVIDERS}}
    print(json.dumps(res, indent=2))
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(res, f, indent=2)
