"""The default recipe: every setting a user leaves at "auto" / unset, chosen from the model, the
data's size and the clients -- never from the test set.

Each choice and the committed suite it rests on (the numbers are in those results, tabulated in
bench/results/README.md; on these data sets the defaults were picked on the sweeps, so they are
tuned settings there, not independent checks):

* fwdkern on a classifier: the head is trained exactly on each client's own features (no pass
  through the body) and its update travels as seeded projections; the body's perturbations default
  to 0 when the model has such a head, because a K = 16 body estimate's cosine with the true
  gradient is about sqrt(K / (K + d)) -- noise at LoRA sizes -- while the head holds nearly all of
  the gradient's energy (bench/results/profile_minilm_bbc.json, profile_smollm2_prompt.json); turned
  on beside the head it has not paid for its client CPU on the bundled data (bench/results/
  demo_cpu_2026-12-06/body_k16_fedadam/, fl_word_order/, fl_word_order_explore/).
  Without a head (causal LM) the body is all there is: the compute of K = 16 whole-batch tangents
  with FedAdam (fewer tangents, a larger lr, layer blocks and a smaller adapter all did worse:
  bench/results/fl_causal_lm_explore/;
  more tangents learn more per round at about proportional client CPU, and K = 16 is the largest
  within 3x backprop's: bench/results/fl_causal_lm_tangents/; tangents confined to the value
  projections' B, where 94 % of the gradient is, learn no more: bench/results/fl_causal_lm_explore/
  tangent_subsets.json; more clients per round do, at the same work per client:
  bench/results/fl_causal_lm_clients/).
* tangent_scope sample there, with 16 tangents per sample (at most 128, so an upload stays under
  1 KB): each tangent's derivative is of one sample's share of the batch loss, so a client answers
  B x 16 tangents at the client compute of 16 over the whole batch (a tangent costs about one forward
  of what it runs through). The round pools B times the directional derivatives; each is of a
  single sample's gradient (noisier than the batch's), which costs less than the extra directions
  gain (bench/results/fl_causal_lm/: default against default_batch, at the same client CPU;
  fl_causal_lm_clients/ at 20 clients a round; the central simulation's
  all:fedadam:16:seq in fl_causal_lm_explore/tangent_subsets.json). Classifiers and the
  zeroth-order baselines keep the whole batch's derivative (beside the exact head, per-sample
  tangents learned no more than the head alone on word order: bench/results/fl_word_order_sample/).
* guard on wherever the body trains by forward gradients (fwdkern.fl.guard): a step the next
  round's clients measure as raising their loss is not taken.
* tangent_precision bf16 wherever tangents run on a device with bf16 matrix units: the tangents'
  GEMMs with the frozen weights in bf16, the loss and weights in fp32 (fwdkern.dual.tangent_matmuls;
  bench/results/fl_causal_lm/: default_batch and default_fp32, the same held-out loss as fp32 tangents
  at less client CPU; the client
  step alone: bench/results/fl_client_lm_cpu_2026-12-06.json).
* head_lr 8: scale-free (divided by the features' mean squared norm), the best or tied-best of the
  head-lr sweeps on BBC News, Rotten Tomatoes and SmolLM2 prompt classification
  (bench/results/fl_{bbc,rt,smollm2}_cpu/).
* head_calibration 1: the Bayes correction from a client's label mix to the training split's
  (logit adjustment); the calibration sweeps and finals are in the same suites.
* head_centering off: it diverges on SmolLM2's hidden states (fwdkern.fl.head.ExactHead._center).
* backprop (LoRA FedAvg): about one local epoch (local_batches below), client SGD lr 2, FedAvg
  (server SGD lr 1): the best FedAvg setting of the BBC News sweep.
* Each method's other defaults are its row's (fwdkern.fl.methods.METHODS).
"""
from __future__ import annotations

import dataclasses
import math

from .config import RunConfig
from .methods import method

# Most tangents the recipe gives a client with per-sample tangents: 128 fp32 scalars keep an upload under 1 KB.
MAX_SAMPLE_TANGENTS = 128

# Server learning rates when the optimizer is given but the lr is not.
OPTIMIZER_LR = {"sgd": 0.01, "fedadam": 0.01, "fedyogi": 0.01}


def local_batches_for(n_train: int, clients: int, batch_size: int) -> int:
    """About one local epoch of an average client, 1 to 4 batches."""
    return int(min(4, max(1, math.ceil(n_train / max(1, clients) / batch_size))))


def resolve(cfg: RunConfig, n_train: int, has_exact_head: bool, device: str = "cpu") -> RunConfig:
    """`cfg` with every unset setting filled in from its method's row (a new RunConfig; explicit settings
    are kept)."""
    d = dataclasses.asdict(cfg)
    m = method(cfg.method).defaults
    if d["local_batches"] is None:
        d["local_batches"] = local_batches_for(n_train, cfg.clients, cfg.batch_size)
    explicit_opt = d["optimizer"] != "auto"
    if not explicit_opt:
        d["optimizer"] = m["optimizer"]
    if d["lr"] is None:
        d["lr"] = m["lr"] if not explicit_opt or d["optimizer"] == m["optimizer"] else OPTIMIZER_LR[d["optimizer"]]
    no_head = not has_exact_head and "perturbations_no_head" in m
    if d["tangent_scope"] == "auto":
        d["tangent_scope"] = m.get("tangent_scope_no_head", "batch") if no_head else "batch"
    if d["perturbations"] is None:
        d["perturbations"] = m["perturbations_no_head"] if no_head else m["perturbations"]
        if no_head and d["tangent_scope"] == "sample":  # that many per sample, the upload under 1 KB, and a
            # multiple of the batch so one pass carries them (one a sample for batches over the cap)
            per = max(1, min(d["perturbations"], MAX_SAMPLE_TANGENTS // cfg.batch_size))
            d["perturbations"] = per * cfg.batch_size
    if d["local_lr"] is None and m["local_lr"]:  # only methods with local steps use it
        d["local_lr"] = m["local_lr"]
    if d["guard"] == "auto":  # the guard wherever the body trains by forward gradients (and pacing is off)
        d["guard"] = "on" if (method(cfg.method).guard and d["perturbations"] and d["pacing"] == "off") else "off"
    if d["tangent_precision"] == "auto":  # bf16 tangent GEMMs where tangents run and the hardware has bf16 units
        tangents = method(cfg.method).tangents and d["perturbations"]
        d["tangent_precision"] = "bf16" if (tangents and fast_bf16(device)) else "fp32"
    return RunConfig(**d)


def fast_bf16(device: str = "cpu") -> bool:
    """Whether `device` multiplies bf16 matrices in hardware (AMX or AVX512-BF16 on a CPU; a CUDA GPU
    that supports bf16): there the tangents' GEMMs run in bf16 by default."""
    import torch

    if str(device).startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(cpu, c, lambda: False)()) for c in checks)
