"""Loss curves of a training run as a PNG (matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot_history(history: list[dict], path: Path, title: str = "") -> Path:
    """Training and validation loss per epoch, log-scaled when the losses are positive."""
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(epochs, [h["train_loss"] for h in history], label="training", marker=".")
    ax.plot(epochs, [h["val_loss"] for h in history], label="validation", marker=".")
    if all(h["train_loss"] > 0 and h["val_loss"] > 0 for h in history):
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
