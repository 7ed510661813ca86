"""Training plots: loss/accuracy curves and the confusion matrix, written as PNG files.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so nothing here needs a
display or changes matplotlib's global backend for the rest of the process.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def plot_training_history(
    history: Mapping[str, Sequence[float]], path: Path, *, best_epoch: int | None = None
) -> Path:
    """Write loss and accuracy per epoch, train vs validation, side by side; returns ``path``.

    ``history`` is Keras' ``History.history`` (keys loss, val_loss, accuracy, val_accuracy);
    ``best_epoch`` (1-based) is marked when given — the weights that were kept.
    """
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    for axes, metric, title in zip(
        figure.subplots(1, 2),
        ("loss", "accuracy"),
        ("Loss (cross-entropy)", "Accuracy"),
        strict=True,
    ):
        for key, label, style in ((metric, "train", "-o"), (f"val_{metric}", "validation", "-s")):
            values = history.get(key)
            if values:
                axes.plot(range(1, len(values) + 1), values, style, markersize=3, label=label)
        if best_epoch is not None:
            axes.axvline(
                best_epoch, color="grey", linestyle=":", label=f"kept (epoch {best_epoch})"
            )
        axes.set_title(title)
        axes.set_xlabel("epoch")
        axes.grid(alpha=0.3)
        axes.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


def plot_confusion_matrix(matrix: np.ndarray, path: Path, *, title: str) -> Path:
    """Write a confusion matrix with counts (rows: true, columns: predicted); returns ``path``."""
    figure = Figure(figsize=(6.4, 5.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    image = axes.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axes, shrink=0.8)
    classes = np.arange(matrix.shape[0])
    axes.set_xticks(classes)
    axes.set_yticks(classes)
    axes.set_xlabel("predicted digit")
    axes.set_ylabel("true digit")
    axes.set_title(title)
    threshold = matrix.max() / 2 if matrix.size else 0
    for row in classes:
        for column in classes:
            count = int(matrix[row, column])
            if count:
                axes.text(
                    column,
                    row,
                    str(count),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if count > threshold else "black",
                )
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path
