"""Plots of a run's metrics (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator


def plot_accuracy(rounds: list[dict], path: Path, title: str) -> Path:
    """Test accuracy and test loss of the global model versus round."""
    xs = [r["round"] for r in rounds]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)

    def series(key: str) -> list[float]:  # a round without a value (nobody evaluated): a gap
        return [float("nan") if r[key] is None else r[key] for r in rounds]

    ax_acc.plot(xs, series("test_accuracy"), marker="o")
    ax_acc.set(xlabel="round", ylabel="test accuracy", ylim=(0, 1), title="Global model accuracy")
    ax_loss.plot(xs, series("test_loss"), marker="o", label="test loss")
    train = [(r["round"], r["train_loss"]) for r in rounds if r.get("train_loss") is not None]
    if train:
        ax_loss.plot(*zip(*train, strict=True), marker=".", label="mean client train loss")
    ax_loss.set(xlabel="round", ylabel="cross-entropy", title="Loss")
    ax_loss.legend()
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds: no 0.5
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
