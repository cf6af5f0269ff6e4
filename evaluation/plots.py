"""Figures for the benchmark reports (PNG, matplotlib; image grids via torchvision)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.metrics import precision_recall_curve, roc_curve
from torchvision.utils import make_grid


def roc_and_pr(y_true: np.ndarray, scores: dict[str, np.ndarray], path: Path,
               title: str = "") -> Path:
    """ROC and precision-recall curves, one line per method (higher score = anomalous)."""
    fig, (roc_ax, pr_ax) = plt.subplots(1, 2, figsize=(10, 4.2))
    for name, score in scores.items():
        fpr, tpr, _ = roc_curve(y_true, score)
        precision, recall, _ = precision_recall_curve(y_true, score)
        roc_ax.plot(fpr, tpr, label=name)
        pr_ax.plot(recall, precision, label=name)
    roc_ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    roc_ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    pr_ax.set(xlabel="recall", ylabel="precision", title="precision-recall")
    pr_ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def score_histograms(y_true: np.ndarray, scores: dict[str, np.ndarray], path: Path) -> Path:
    """Anomaly-score histograms, normal vs anomalous, one panel per method."""
    fig, axes = plt.subplots(1, len(scores), figsize=(3.2 * len(scores), 3), squeeze=False)
    for ax, (name, score) in zip(axes[0], scores.items(), strict=True):
        bins = np.histogram_bin_edges(score, bins=40)
        ax.hist(score[y_true == 0], bins=bins, alpha=0.6, density=True, label="normal")
        ax.hist(score[y_true == 1], bins=bins, alpha=0.6, density=True, label="anomalous")
        ax.set_title(name, fontsize="small")
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def image_grid(rows: list[np.ndarray], path: Path, low: float, high: float,
               labels: list[str] | None = None) -> Path:
    """Rows of images ``(k, H, W)`` or ``(k, C, H, W)`` in data units, one grid row each."""
    tensors = []
    for images in rows:
        t = torch.as_tensor((np.asarray(images, dtype=np.float32) - low) / (high - low))
        tensors.append(t.unsqueeze(1) if t.ndim == 3 else t)
    per_row = tensors[0].shape[0]
    grid = make_grid(torch.cat(tensors).clamp(0, 1), nrow=per_row, padding=1, pad_value=1.0)
    fig, ax = plt.subplots(figsize=(per_row * 0.6, len(rows) * 0.65))
    ax.imshow(grid.permute(1, 2, 0).numpy(), cmap="gray")
    ax.set_xticks([])
    step = grid.shape[1] / len(rows)
    ax.set_yticks([step * (i + 0.5) for i in range(len(rows))], labels or [""] * len(rows),
                  fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def anomaly_maps(rows: list[np.ndarray], labels: list[str], path: Path) -> Path:
    """Images and their anomaly maps, one grid row each (``(k, H, W)``): the first row in
    grey, the others as heat maps, each row on its own colour scale (0 to its largest value),
    so maps of different methods are compared by where they light up."""
    k = rows[0].shape[0]
    fig, axes = plt.subplots(len(rows), k, figsize=(k * 0.7, len(rows) * 0.75), squeeze=False)
    for r, (images, label) in enumerate(zip(rows, labels, strict=True)):
        images = np.asarray(images, dtype=np.float64).reshape(k, *np.shape(images)[-2:])
        top = float(np.nanmax(images)) if r else None
        for c in range(k):
            ax = axes[r, c]
            if r == 0:
                ax.imshow(images[c], cmap="gray")
            else:
                ax.imshow(images[c], cmap="inferno", vmin=0.0, vmax=max(top, 1e-12))
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(label, fontsize="x-small", rotation=0, ha="right", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
