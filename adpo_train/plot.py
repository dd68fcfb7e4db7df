"""One PNG of the training curves: loss, implicit accuracy and mean instance weight per logged step."""
from __future__ import annotations

import os
from typing import Optional

from . import jsonl


def plot_metrics(metrics_path: str, out_path: str) -> Optional[str]:
    """Plot ``metrics.jsonl``; returns the PNG path, or None when matplotlib or the data is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not os.path.isfile(metrics_path):
        return None
    rows = jsonl.read(metrics_path)[0]  # a torn last line (a crash mid-append) is left out
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    mk = dict(marker="o", ms=4) if len(rows) <= 20 else {}  # few points: markers (one point as a line is invisible)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(steps, [r["loss"] for r in rows], **mk)
    axes[0].set_title("loss")
    axes[1].plot(steps, [r["implicit_acc"] for r in rows], **mk)
    axes[1].axhline(0.5, color="grey", lw=0.8, ls="--")
    axes[1].set_title("implicit accuracy")
    axes[2].plot(steps, [r["weight_mean"] for r in rows], label="all pairs", **mk)
    if any("weight_mean_flipped" in r for r in rows):
        fl = [(r["step"], r["weight_mean_flipped"], r["weight_mean_clean"]) for r in rows if "weight_mean_flipped" in r]
        axes[2].plot([x[0] for x in fl], [x[2] for x in fl], label="clean pairs", **mk)
        axes[2].plot([x[0] for x in fl], [x[1] for x in fl], label="flipped pairs", **mk)
        axes[2].legend(fontsize=8)
    axes[2].set_title("mean instance weight")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
