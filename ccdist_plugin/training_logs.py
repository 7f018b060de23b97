"""What a run records per epoch in its folder: ``metrics.jsonl`` and ``metrics.csv`` (one row per
epoch), ``curves.png``, and the epoch's log line."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

__all__ = ["write_metrics", "plot_curves", "format_row"]

log = logging.getLogger(__name__)


def write_metrics(history: list[dict[str, Any]], run_dir: Path) -> None:
    """``metrics.jsonl`` and ``metrics.csv`` in ``run_dir``: one row per epoch."""
    with open(run_dir / "metrics.jsonl", "w") as fh:
        for row in history:
            fh.write(json.dumps(row) + "\n")
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    with open(run_dir / "metrics.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(history)


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """``path`` (a PNG): the loss terms, the accuracies and ε/lr per epoch (needs matplotlib)."""
    if not history:
        return
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        log.debug("matplotlib is not installed; no curves.png")
        return
    fig = Figure(figsize=(12, 3.5))
    FigureCanvasAgg(fig)
    epochs = [r["epoch"] for r in history]
    ax = fig.add_subplot(1, 3, 1)
    for key in sorted({k for r in history for k in r if k.startswith("train_") and not k.endswith("acc")}):
        ax.plot(epochs, [r.get(key, float("nan")) for r in history], label=key[6:])
    ax.set_xlabel("epoch")
    ax.set_yscale("symlog")
    ax.set_title("training loss terms")
    ax.legend(fontsize=6)
    ax = fig.add_subplot(1, 3, 2)
    for key in ("val_clean_acc", "val_ibp_cert_acc", "train_clean_acc"):
        if any(key in r for r in history):
            ax.plot(epochs, [r.get(key, float("nan")) for r in history], label=key)
    ax.set_xlabel("epoch")
    ax.set_ylim(0, 1)
    ax.set_title("accuracy")
    ax.legend(fontsize=6)
    ax = fig.add_subplot(1, 3, 3)
    ax.plot(epochs, [r["eps"] for r in history], label="ε (end of epoch)")
    ax.set_xlabel("epoch")
    ax2 = ax.twinx()
    ax2.plot(epochs, [r["lr"] for r in history], color="tab:red", label="lr")
    ax.set_title("ε and lr (red)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def format_row(row: dict[str, Any]) -> str:
    """An epoch's metrics as one log line: ``epoch=1, loss=0.3521, ...``."""
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
