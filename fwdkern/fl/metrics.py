"""Per-round metrics of a run: the metrics.jsonl file, the console progress line and the plots."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess

from .checkpoint import failpoint, write_atomic


class MetricsLog:
    """metrics.jsonl: one JSON object per client round. On (re)start it is rewritten (atomically)
    from the rows the checkpoint holds, so rows computed after the last checkpoint, or a row cut
    short by a crash, are never kept twice."""

    def __init__(self, path: str, rows: list):
        self.path = path
        write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows).encode())

    def append(self, row: dict):
        line = json.dumps(row) + "\n"
        with open(self.path, "a") as f:
            f.write(line[: len(line) // 2])
            f.flush()
            failpoint("metrics-row")
            f.write(line[len(line) // 2:])


def _bytes(n) -> str:
    return f"{n} B" if n < 10_000 else f"{n / 1000:.1f} kB" if n < 10_000_000 else f"{n / 1e6:.1f} MB"


def progress(row, total, version, client_round=None) -> str:
    """One console line per client round, each number named: what a participating client evaluated
    (tangents through the body, projections of its exact head update), the bytes it sent and received,
    and the run's CPU time so far; a round that did not step says why (pacing retry, no update)."""
    width = 30
    done = int(width * version / max(1, total))
    acc = f" acc {row['accuracy']:.3f}" if "accuracy" in row else ""
    if "eval_loss" in row:
        acc = f" held-out loss {row['eval_loss']:.3f} (ppl {row['perplexity']:.1f})"
    loss = f" loss {row['loss']:.4f}" if row.get("loss") is not None else ""
    cr = f"client round {client_round}" if client_round is not None else f"round {row['round']}"
    work = [f"{row.get('tangents_per_client', 0)} tangents"]
    if row.get("head_projections_per_client"):
        work.append(f"{row['head_projections_per_client']} head projections")
    note = ""
    if not row.get("stepped"):
        reason = row.get("reason", "")
        note = (f" [no step: retry {row.get('attempt', 0) + 1}, {reason}]" if reason.startswith("variance")
                else f" [no step: {reason or 'no update'}]")
    return (f"[{'#' * done}{'.' * (width - done)}] step {version}/{total} ({cr}){loss}{acc} | per client: "
            f"{' + '.join(work)}, up {_bytes(row['bytes_up_per_client'])}, down "
            f"{_bytes(row.get('bytes_down_per_client', 0))} | {row.get('cpu_time_s', 0):.1f} CPU s{note}")


def plots(metrics, out, initial=None, reference=None):
    """curves.png against client rounds (1 = the first round, as on the console): the held-out metric
    (test accuracy with the untrained model, chance and majority-class lines; or held-out token loss),
    the training loss, the bytes a participating client sent and received, and the perturbations per
    round when they vary (pacing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    x_all = list(range(1, len(metrics) + 1))
    key = "accuracy" if any("accuracy" in m for m in metrics) or "accuracy" in (initial or {}) else "eval_loss"
    ev = [(i, m[key]) for i, m in zip(x_all, metrics) if key in m]
    if initial and key in initial:
        ev = [(0, initial[key])] + ev
    varying = len({m["perturbations"] for m in metrics}) > 1
    n = 4 if varying else 3
    fig, ax = plt.subplots(1, n, figsize=(5.2 * n, 4))
    if ev:
        ax[0].plot([x for x, _ in ev], [a for _, a in ev], marker="o",
                   label="test accuracy" if key == "accuracy" else "held-out token loss")
    for (name, y), style in zip((reference or {}).items(), ("--", ":")):
        ax[0].axhline(y, linestyle=style, color="gray", label=f"{name} ({y:.2f})")
    if key == "accuracy":
        ax[0].set(xlabel="client round", ylabel="accuracy", title="test accuracy", ylim=(0, 1.02))
    else:
        ax[0].set(xlabel="client round", ylabel="mean token loss (nats)", title="held-out loss")
    if ev or reference:
        ax[0].legend(fontsize=8)
    lx = [x for x, m in zip(x_all, metrics) if m.get("loss") is not None]
    ax[1].plot(lx, [m["loss"] for m in metrics if m.get("loss") is not None], marker=".")
    ax[1].set(xlabel="client round", ylabel="training loss (clients' batches)", title="training loss")
    for k, label in (("bytes_up_per_client", "up (mean)"), ("bytes_down_per_client", "down (mean)"),
                     ("bytes_down_max", "down (max)")):
        ys = [(x, m[k]) for x, m in zip(x_all, metrics) if m.get(k)]
        if ys:
            ax[2].plot([x for x, _ in ys], [y for _, y in ys], marker=".", label=label)
    ax[2].set(xlabel="client round", ylabel="bytes per participating client", title="communication",
              yscale="log")
    ax[2].legend(fontsize=8)
    if varying:
        ax[3].step(x_all, [m["perturbations"] for m in metrics], where="post")
        ax[3].set(xlabel="client round", ylabel="perturbations", title="perturbations per client round")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=100)
    plt.close(fig)


def provenance() -> dict:
    """Where a result comes from: fwdkern (and its commit when known: $FWDKERN_COMMIT, or the git
    checkout it runs from), torch, Python, the device, torch's threads, the date and the machine's load."""
    import torch

    import fwdkern

    commit = os.environ.get("FWDKERN_COMMIT")
    if not commit:
        try:
            commit = subprocess.run(["git", "-C", os.path.dirname(os.path.abspath(fwdkern.__file__)), "rev-parse",
                                     "--short", "HEAD"], capture_output=True, text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            commit = ""
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                device = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), device)
        except OSError:
            pass
    return {"fwdkern": fwdkern.__version__, "commit": commit or None, "torch": torch.__version__,
            "python": platform.python_version(), "device": device, "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "load": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}
