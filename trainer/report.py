"""The report folder of a training run: PNG plots and ``metrics.json`` (matplotlib, Agg)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from trainer.metrics import BinaryCounts, roc_curve  # noqa: E402


def plot_learning_curves(history: Sequence[Mapping[str, float]], metric: str, path: Path) -> Path:
    """Training loss and validation ``metric`` per epoch, side by side."""
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot(epochs, [h["train_loss"] for h in history], marker="o")
    ax1.set(xlabel="epoch", ylabel="training loss", title="loss")
    ax2.plot(epochs, [h.get(f"val_{metric}", math.nan) for h in history], marker="o",
             color="tab:green")
    ax2.set(xlabel="epoch", ylabel=metric, title=f"validation {metric}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_roc(y_true: np.ndarray, score: np.ndarray, auc: float, path: Path) -> Path:
    """The ROC curve with its AUC in the title."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    if len(np.unique(y_true)) == 2:
        fpr, tpr, _ = roc_curve(y_true, score)
        ax.plot(fpr, tpr, lw=2)
    ax.plot([0, 1], [0, 1], ls="--", color="grey")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC (AUC {auc:.3f})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_confusion(counts: BinaryCounts, labels: Sequence[str], path: Path) -> Path:
    """The 2x2 confusion matrix (rows: reference, columns: prediction)."""
    m = np.array([[counts.tn, counts.fp], [counts.fn, counts.tp]])
    fig, ax = plt.subplots(figsize=(4, 3.6))
    ax.imshow(m, cmap="Blues")
    for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, str(v), ha="center", va="center",
                color="white" if v > m.max() / 2 else "black")
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=labels, yticklabels=labels,
           xlabel="predicted", ylabel="reference", title="confusion matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_overlays(images: np.ndarray, ref: np.ndarray, pred: np.ndarray,
                  labels: Sequence[str], path: Path, n: int = 6) -> Path:
    """Up to ``n`` slices with reference (solid) and predicted (dashed) contours per class.

    Slices with the rarest class present are shown first, so nodules are visible.
    """
    rare = len(labels) - 1
    order = np.argsort(-(ref == rare).sum(axis=(1, 2)), kind="stable")[:n]
    cols = max(1, len(order))
    fig, axes = plt.subplots(1, cols, figsize=(3 * cols, 3.2), squeeze=False)
    colors = ["none", "tab:cyan", "tab:red", "tab:orange", "tab:purple"]
    for ax, k in zip(axes[0], order, strict=False):
        ax.imshow(images[k, 0], cmap="gray")
        for c in range(1, len(labels)):
            color = colors[c % len(colors)]
            if (ref[k] == c).any():
                ax.contour(ref[k] == c, levels=[0.5], colors=color, linewidths=1.2)
            if (pred[k] == c).any():
                ax.contour(pred[k] == c, levels=[0.5], colors=color, linewidths=1.0,
                           linestyles="dashed")
        ax.set_axis_off()
        ax.set_title(f"#{k}", fontsize=8)
    fig.suptitle("reference (solid) vs predicted (dashed): " + ", ".join(
        f"{labels[c]}={colors[c % len(colors)]}" for c in range(1, len(labels))), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_metrics_json(path: Path, data: Mapping[str, Any]) -> Path:
    """``metrics.json`` with NaN written as null (strict JSON)."""
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, Mapping):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        if isinstance(v, np.generic):
            return clean(v.item())
        return v
    path.write_text(json.dumps(clean(data), indent=2))
    return path
