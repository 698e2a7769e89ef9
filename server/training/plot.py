"""The training card's picture: training loss per step and eval loss per evaluation, as a PNG.

Owns: drawing `loss.png` from the card's history with matplotlib's headless Agg backend (no
display, no window), into a file the caller publishes with the adapter. It does not know where
the history comes from (trainer.py) or who looks at the picture.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PLOT_FILE = "loss.png"


def plot_losses(history: list[dict[str, Any]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # headless: a server and CI have no display
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    try:
        if train:
            ax.plot(*zip(*train, strict=True), label="training loss", linewidth=1.2)
        if evals:
            ax.plot(*zip(*evals, strict=True), "o-", label="eval loss", linewidth=1.5)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return path
