"""What a training run reports: <out>/metrics.jsonl, the progress line, and loss.png.

    log = MetricsLog(os.path.join(out, "metrics.jsonl"), is_main=True)
    log.start(resumed_step=None)        # a fresh run: an empty file; a resumed one keeps its rows
    log.write({"step": 1, "loss": 2.5, ...})
    plot_loss(log.path, os.path.join(out, "loss.png"))

Only rank 0 writes; every other rank's calls do nothing. Nothing here touches the model.
"""

from __future__ import annotations

import json
import os
import resource

import torch

from .memory import GiB


class MetricsLog:
    """metrics.jsonl: one JSON object per line, {"step", "epoch", "loss", "lr", "grad_norm",
    "tokens_per_s", "padding", "mem_gib"} for a logged step and {"step", "val_loss"} for an
    evaluation."""

    def __init__(self, path: str, is_main: bool):
        self.path = path
        self.is_main = is_main
        self.count = 0  # rows this run has written, counted on every rank alike

    def rows(self) -> list[dict]:
        """Every row written so far (none when the file does not exist)."""
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def start(self, resumed_step: int | None, rows: int | None = None) -> None:
        """Begin the file: empty for a fresh run. A run resumed after `resumed_step` keeps the
        first `rows` rows, the count its checkpoint recorded, so rows written after the
        checkpoint (those of steps that now run again, an evaluation whose final save then
        crashed) are dropped and none appears twice. Without `rows`, the rows up to
        `resumed_step`."""
        if resumed_step is None:
            kept = []
        elif rows is not None:
            kept = self.rows()[:rows] if self.is_main else []
        else:
            kept = [r for r in self.rows() if r["step"] <= resumed_step] if self.is_main else []
        self.count = rows if rows is not None else len(kept)
        if not self.is_main:
            return
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)

    def write(self, row: dict) -> None:
        """Append one row."""
        self.count += 1
        if self.is_main:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def plot_loss(metrics_path: str, png_path: str) -> bool:
    """Draw training and validation loss from metrics.jsonl. Returns False (and draws
    nothing) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = MetricsLog(metrics_path, is_main=False).rows()
    fig, ax = plt.subplots(figsize=(7, 4))
    train_rows = [r for r in rows if "loss" in r]
    val_rows = [r for r in rows if "val_loss" in r]
    ax.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], label="train")
    ax.plot([r["step"] for r in val_rows], [r["val_loss"] for r in val_rows], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean over target tokens)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return True


def peak_memory(device: torch.device) -> float:
    """GiB at the high-water mark so far: allocated tensors on a GPU, the process's resident
    set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB  # Linux: KiB


def duration(seconds: float) -> str:
    """"1h05m" or "4m07s"."""
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
