"""Per-round metrics of a run: the metrics.jsonl file, the console progress line and the plots."""
from __future__ import annotations

import json
import os

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


def progress(row, total, version) -> str:
    width = 30
    done = int(width * version / max(1, total))
    acc = f" acc {row['accuracy']:.3f}" if "accuracy" in row else ""
    loss = f" loss {row['loss']:.4f}" if row.get("loss") is not None else ""
    return (f"[{'#' * done}{'.' * (width - done)}] step {version}/{total} (round {row['round']})"
            f"{loss}{acc} K={row['perturbations']} up={row['bytes_up_per_client']}B t={row['wall_time_s']:.1f}s")


def plots(metrics, out):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ev = [m for m in metrics if "accuracy" in m]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    ax[0].plot([m["round"] for m in ev], [m["accuracy"] for m in ev], marker="o")
    ax[0].set(xlabel="round", ylabel="accuracy", title="accuracy vs round")
    ax[1].plot([m["wall_time_s"] for m in ev], [m["accuracy"] for m in ev], marker="o")
    ax[1].set(xlabel="wall time (s)", ylabel="accuracy", title="accuracy vs wall time")
    st = [m for m in metrics if m["stepped"]]
    ax[2].step(range(1, len(st) + 1), [m["perturbations"] for m in st], where="post")
    ax[2].set(xlabel="optimizer step", ylabel="perturbations", title="perturbation schedule")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=100)
    plt.close(fig)
