"""Every figure the project draws, in one place: a trial's curves, weights and predictions, the
report's response surface and importances, and Optuna's own study views as HTML.

Pure drawing: each function takes numbers, writes one file and returns its path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay  # noqa: E402

from lstm_sweep import metrics as m  # noqa: E402

MARGINS = {"left": 0.06, "right": 0.98, "bottom": 0.16, "top": 0.88, "wspace": 0.25}


def saved(fig: Any, path: Path, dpi: int = 80) -> Path:
    """Write a figure to ``path`` and free it: pyplot keeps every open figure alive."""
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def loss_curves(
    rows: Sequence[dict[str, float]], best_epoch: int, onset: int | None, path: Path
) -> Path:
    """Train (running), train (eval mode) and validation loss per epoch, best and onset marked."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, style in ((m.TRAIN_LOSS, ":"), (m.TRAIN_EVAL_LOSS, "--"), (m.VAL_LOSS, "-")):
        series = [r[key] for r in rows if key in r]
        if series:
            ax.plot(range(len(series)), series, style, label=key)
    if best_epoch >= 0:
        ax.axvline(best_epoch, color="green", alpha=0.6, label=f"best epoch {best_epoch}")
    if onset is not None:
        ax.axvline(onset, color="red", ls="--", alpha=0.6, label=f"overfitting onset {onset}")
    ax.set(xlabel="epoch", ylabel="loss (model space)", yscale="log", title="Loss curves")
    ax.legend()
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.13, top=0.9)
    return saved(fig, path, dpi=90)


def weight_histograms(snapshots: Mapping[str, Mapping[str, np.ndarray]], path: Path) -> Path:
    """One panel per parameter group, the snapshots (first, best, last epoch) overlaid."""
    groups = list(next(iter(snapshots.values())))
    fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3.2), squeeze=False)
    fig.subplots_adjust(**MARGINS)  # fixed margins: tight_layout costs more than the drawing
    for ax, group in zip(axes[0], groups, strict=True):
        for moment, values in snapshots.items():
            counts, edges = np.histogram(values[group], bins=40)
            ax.stairs(counts, edges, label=moment)
        ax.set(title=group, xlabel="weight")
    axes[0, 0].legend()
    return saved(fig, path, dpi=80)


def predictions(
    spans: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], targets: list[str], path: Path
) -> Path:
    """One-step-ahead predictions against the truth over each span (val, or test).

    ``spans`` maps a part name to (times (n,), truth (n, targets), prediction (n, targets)).
    """
    fig, axes = plt.subplots(len(targets), 1, figsize=(9, 3 * len(targets)), squeeze=False)
    for t, name in enumerate(targets):
        ax = axes[t, 0]
        for part, (times, truth, prediction) in spans.items():
            ax.plot(times, truth[:, t], color="black", lw=0.8)
            ax.plot(times, prediction[:, t], lw=0.8, label=f"{part} prediction")
        ax.set(title=name, ylabel=name)
        ax.legend()
    fig.autofmt_xdate()
    fig.tight_layout()
    return saved(fig, path, dpi=80)


def confusion_matrix(
    truth: np.ndarray, predicted: np.ndarray, classes: list[str], path: Path
) -> Path:
    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(classes), 1 + 0.5 * len(classes)))
    ConfusionMatrixDisplay.from_predictions(
        truth,
        predicted,
        labels=range(len(classes)),
        display_labels=classes,
        ax=ax,
        colorbar=False,
    )
    ax.set(title="Validation confusion matrix (best epoch)")
    fig.tight_layout()
    return saved(fig, path, dpi=80)


def heatmaps(
    grids: Mapping[str, pd.DataFrame],
    x_key: str,
    y_key: str,
    star: tuple[Any, Any] | None,
    path: Path,
) -> Path:
    """One panel per metric: its median per cell over two searched keys (``grids`` maps a
    metric to a DataFrame indexed by the y key's cells, columned by the x key's), the
    recommendation's cell ``star`` (x label, y label) marked."""
    fig, axes = plt.subplots(1, len(grids), figsize=(5 * len(grids), 4), squeeze=False)
    for ax, (metric, grid) in zip(axes[0], grids.items(), strict=True):
        values = grid.to_numpy(dtype=float)
        image = ax.imshow(values, origin="lower", cmap="viridis", aspect="auto")
        for (row, col), value in np.ndenumerate(values):
            if math.isfinite(value):
                ax.text(col, row, f"{value:.3g}", ha="center", va="center", fontsize=7, color="w")
        if star is not None:
            ax.plot(
                list(grid.columns).index(star[0]),
                list(grid.index).index(star[1]),
                marker="*",
                color="red",
                markersize=14,
            )
        ax.set_xticks(range(grid.shape[1]), [str(c) for c in grid.columns], rotation=45, fontsize=7)
        ax.set_yticks(range(grid.shape[0]), [str(i) for i in grid.index], fontsize=7)
        ax.set(xlabel=x_key, ylabel=y_key, title=f"{metric} (median per cell)")
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return saved(fig, path, dpi=80)


def importance_chart(importances: Mapping[str, float], path: Path) -> Path:
    """fANOVA importances as horizontal bars, largest on top."""
    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.45 * len(names)))
    ax.barh(names, [importances[n] for n in names], color="tab:blue")
    ax.set(xlabel="share of the validation loss's variance (fANOVA)", xlim=(0, 1))
    fig.tight_layout()
    return saved(fig, path, dpi=80)


def study_pages(figures: Mapping[str, Any], folder: Path) -> list[Path]:
    """Optuna's plotly figures as HTML pages; plotly's script is written once beside them, so
    the pages open offline without one 4 MB copy each."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, figure in figures.items():
        path = folder / f"{name}.html"
        figure.write_html(path, include_plotlyjs="directory")
        written.append(path)
    return written
