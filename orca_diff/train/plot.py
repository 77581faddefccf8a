"""A small PNG of the training and eval loss per stage, from the run's log records.

matplotlib is optional (the ``plot`` extra): without it :func:`plot_losses` returns None and the
trainer prints one line saying so.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Sequence


def plot_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def plot_losses(records: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Train loss per step (one colour per stage) and eval loss (markers) against the global step.

    Written under a temporary name and renamed; returns ``path``, or None without matplotlib.
    """
    if not plot_available():
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)  # no display needed; must precede pyplot
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("kind", "train") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    try:
        for stage in sorted({r["stage"] for r in train}):
            pts = [(r["global_step"], r["loss"]) for r in train if r["stage"] == stage]
            ax.plot(*zip(*pts), lw=1.2, label=f"train, stage {stage}")
        if evals:
            ax.plot([r["global_step"] for r in evals], [r["loss"] for r in evals], "o--", color="black", ms=4,
                    lw=1, label="eval (held out)")
        starts = sorted({min(r["global_step"] for r in train if r["stage"] == s) for s in {r["stage"] for r in train}})
        for x in starts[1:]:
            ax.axvline(x - 0.5, color="grey", lw=0.6, ls=":")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss per response token")
        ax.set_title("orca-diff train")
        ax.grid(alpha=0.3)
        if train or evals:
            ax.legend(fontsize=8)
        fig.tight_layout()
        tmp = path.with_name(path.name + ".tmp.png")
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
    return path
