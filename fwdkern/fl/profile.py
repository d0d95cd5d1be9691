"""FwdLLM's offline PEFT profiler: which adapter, placement and rank to fine-tune with forward gradients.

For each candidate (LoRA ranks and placements, IA3, BitFit, bottleneck adapters) it measures, on a
few of the data's training batches: the trainable dimension d, the cosine between the
forward-gradient estimate at the planned K and the true gradient (autograd, for the measurement
only), the client step's CPU time and peak memory. The estimate's cosine is about sqrt(K / (K + d)),
so a step's expected progress is ~cos² |g|²: the profiler recommends the candidate with the most
``cos² / step time`` of the part forward gradients train (the body; a classifier head is trained
exactly by the default recipe, so it is left out of that score).

    python -m fwdkern profile --model all-minilm-l6-v2 --data bbc_news --out profile.json
"""
from __future__ import annotations

import gc
import json
import re
import time

import torch

CANDIDATES = [
    dict(name="lora r=8 last layer (q,v)", peft="lora", r=8, placement="last"),
    dict(name="lora r=1 all layers (q,v)", peft="lora", r=1, placement="all"),
    dict(name="lora r=8 all layers (q,v)", peft="lora", r=8, placement="all"),
    dict(name="ia3 all layers", peft="ia3", placement="all"),
    dict(name="bitfit", peft="bitfit", placement="all"),
    dict(name="adapter r=dim/16 last layer", peft="adapter", placement="last"),
]


def _rss_hwm_reset():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _hwm():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024
    return 0


def _last_layer_targets(model, targets):
    """The target module paths inside the model's last transformer block."""
    idx = {}
    for path, _ in model.named_modules():
        m = re.search(r"\.(?:layer|layers|h|block)\.(\d+)\.", "." + path + ".")
        if m and any(path == t or path.endswith("." + t) for t in targets):
            idx.setdefault(int(m.group(1)), []).append(path)
    if not idx:
        return list(targets)
    last = max(idx)
    return [re.sub(r"^.*?((?:layer|layers|h|block)\.\d+\.)", r"\1", p) for p in idx[last]]


def _cos(tr, grads, est, sel) -> float:
    num = sum(float((g * e).sum()) for (n, _, _), g, e in zip(tr, grads, est) if sel(n))
    gn = sum(float((g * g).sum()) for (n, _, _), g in zip(tr, grads) if sel(n)) ** 0.5
    en = sum(float((e * e).sum()) for (n, _, _), e in zip(tr, est) if sel(n)) ** 0.5
    return num / (gn * en) if gn > 0 and en > 0 else 0.0


def profile(cfg, perturbations: int = 16, batches: int = 2, candidates=None, log=print, repeats: int = 4,
            tangent_scope: str = "batch") -> dict:
    """Profile `candidates` (default :data:`CANDIDATES`) on `cfg`'s model and data; returns the report.

    tangent_scope: what each of the `perturbations` tangents' derivative is of, as a client computes it
    (fwdkern.fl.client.seeded_answer): "batch" -- the whole batch's loss; "sample" -- one sample's share
    of it (the tangents shared out among the batch's samples, scaled so the estimate stays unbiased)."""
    import fwdkern
    from .client import TANGENT_SCOPES, jvp_values, per_sample_values
    from .data import load_dataset
    from .head import find_head
    from .methods import method
    from .metrics import provenance
    from .models import load_model, resolve_task
    from .task import ClientTask

    if tangent_scope not in TANGENT_SCOPES:
        raise ValueError(f"tangent_scope: unknown {tangent_scope!r} ({', '.join(TANGENT_SCOPES)})")
    data = load_dataset(cfg.data, cfg.text_column, cfg.label_column)
    task = resolve_task(cfg.task, data)
    rows, skipped = [], []

    def skip(cand, reason):
        skipped.append({"name": cand["name"], "peft": cand["peft"], "reason": reason})
        log(f"{cand['name']:<32} skipped: {reason}")

    for cand in candidates or CANDIDATES:
        try:
            model, tok = load_model(_cfg_for(cfg, cand), data, task)
        except ValueError as e:  # the method does not apply to this model (e.g. BitFit without biases)
            skip(cand, str(e))
            continue
        ct = ClientTask(cfg, model, tok, data, task=task, head_at=find_head(cfg, model, task, method(cfg.method)))
        tr = fwdkern.trainable(model)
        head = set(ct.head_names)
        if all(n in head for n, _, _ in tr):  # e.g. BitFit when the only bias is the head's
            skip(cand, f"peft={cand['peft']!r}: trains no tensor outside the head, which trains exactly (nothing "
                       "for forward gradients to train)")
            del model, ct
            continue
        bs = [ct.batch([ct.train.texts[i] for i in ct.parts[c][:cfg.batch_size]],
                       [ct.train.labels[i] for i in ct.parts[c][:cfg.batch_size]] if ct.train.labels else None)
              for c in range(batches)]
        # true gradient (autograd, for the measurement only)
        params = [p for _, _, p in tr]
        grads = [torch.zeros_like(p) for p in params]
        for b in bs:
            with torch.enable_grad():
                loss = model(**b).loss
                for g, gi in zip(grads, torch.autograd.grad(loss, params, allow_unused=True)):
                    if gi is not None:
                        g += gi / len(bs)
        # forward-gradient estimates at K (the body only when the head trains exactly, as in the recipe),
        # `repeats` independent draws for a stable cosine, and the client step's cost
        body_names = [n for n, _, _ in tr if n not in head]
        perturbed = body_names if head else None
        gc.collect()
        base = _rss()
        _rss_hwm_reset()
        step_s, cosines = 0.0, {"all": [], "body": []}
        ks = list(range(perturbations))
        for rep in range(repeats):
            est = [torch.zeros_like(p) for p in params]
            c0 = time.process_time()
            for bi, b in enumerate(bs):
                seed = 1000 + 97 * rep + bi

                def directional(batch, ks, per_sample=False, seed=seed):
                    return jvp_values(model, batch, seed, ks, params=perturbed, per_sample=per_sample)

                if tangent_scope == "sample" and int(b["input_ids"].shape[0]) > 1:
                    jv = torch.as_tensor(per_sample_values(model, b, ks, directional)[1])
                else:
                    jv = torch.as_tensor(directional(b, ks)[1])
                coeffs = (jv.double() / perturbations / len(bs)).tolist()
                for (n, pid, p), e in zip(tr, est):
                    if perturbed is None or n not in head:
                        fwdkern.seeded_axpy_(e, seed, pid, ks, coeffs)
            if rep == 0:
                step_s = (time.process_time() - c0) / len(bs)
                peak = max(0, _hwm() - base)
            cosines["all"].append(_cos(tr, grads, est, lambda n: True))
            cosines["body"].append(_cos(tr, grads, est, lambda n: n not in head))

        d_all = sum(p.numel() for p in params)
        d_body = sum(p.numel() for (n, _, p) in tr if n not in head)
        g2_body = sum(float((g * g).sum()) for (n, _, _), g in zip(tr, grads) if n not in head)
        g2_all = sum(float((g * g).sum()) for g in grads)
        row = dict(name=cand["name"], peft=cand["peft"], d=d_all, d_body=d_body,
                   head_share_of_grad_energy=round(1 - g2_body / g2_all, 4) if g2_all else None,
                   cosine_all=round(sum(cosines["all"]) / repeats, 4),
                   cosine_body=round(sum(cosines["body"]) / repeats, 4),
                   expected_cosine_body=round((perturbations / (perturbations + max(1, d_body))) ** 0.5, 4),
                   step_cpu_s=round(step_s, 3), peak_mib=round(peak / 2**20, 1))
        row["score"] = row["cosine_body"] ** 2 / max(step_s, 1e-6)
        rows.append(row)
        log(f"{row['name']:<32} d={d_all:>8} body cos={row['cosine_body']:.3f} (sqrt(K/(K+d)) "
            f"{row['expected_cosine_body']:.3f}) step {step_s:.2f} CPU s peak {row['peak_mib']} MiB")
        del model, ct
        gc.collect()
    if not rows:
        raise ValueError("profile: no candidate applies to this model (" +
                         "; ".join(f"{r['name']}: {r['reason']}" for r in skipped) + ")")
    best = max(rows, key=lambda r: r["score"])
    return {"model": cfg.model, "data": cfg.data, "task": task, "perturbations": perturbations, "batches": batches,
            "repeats": repeats, "tangent_scope": tangent_scope,
            "head_trained_exactly": bool(rows and rows[0]["d"] != rows[0]["d_body"]),
            "batch_size": cfg.batch_size, "max_length": cfg.max_length, "candidates": rows, "skipped": skipped,
            "recommended": best["name"],
            "rule": "max cosine_body^2 / step CPU s (expected progress of a forward-gradient step per second)",
            "provenance": provenance()}


def _cfg_for(cfg, cand):
    import dataclasses

    from .config import RunConfig

    d = dataclasses.asdict(cfg)
    d.update(peft=cand["peft"], r=cand.get("r", cfg.r), lora_alpha=2.0 * cand.get("r", cfg.r), target_modules=None,
             layers=[-1] if cand.get("placement") == "last" else None)
    return RunConfig(**d)


def write(report: dict, path: str):
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
