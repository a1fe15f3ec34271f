"""A trial's pictures and data files: loss curves, weight histograms, predictions or a confusion
matrix, and its worst validation samples.

Written only at the few moments the diagnostics name (first, best and last epoch), into a
folder the tracker uploads in one call.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay  # noqa: E402

from lstm_sweep import diagnostics as dg  # noqa: E402
from lstm_sweep.data import ClassificationData  # noqa: E402
from lstm_sweep.train import History, TrainingData, predict  # noqa: E402


def loss_curves(
    rows: Sequence[dict[str, float]], best_epoch: int, onset: int | None, path: Path
) -> Path:
    """Train (running), train (eval mode) and validation loss per epoch, best and onset marked."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, style in ((dg.TRAIN_LOSS, ":"), (dg.TRAIN_EVAL_LOSS, "--"), (dg.VAL_LOSS, "-")):
        series = [r[key] for r in rows if key in r]
        if series:
            ax.plot(range(len(series)), series, style, label=key)
    if best_epoch >= 0:
        ax.axvline(best_epoch, color="green", alpha=0.6, label=f"best epoch {best_epoch}")
    if onset is not None:
        ax.axvline(onset, color="red", ls="--", alpha=0.6, label=f"overfitting onset {onset}")
    ax.set(xlabel="epoch", ylabel="MSE (scaled)", yscale="log", title="Loss curves")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def weight_histograms(snapshots: dict[str, dict[str, torch.Tensor]], folder: Path) -> list[Path]:
    """One panel per parameter group, first/best/last overlaid; the raw values as .npz too."""
    groups = list(next(iter(snapshots.values())))
    fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3.2))
    for ax, group in zip(np.atleast_1d(axes), groups, strict=True):
        for moment, values in snapshots.items():
            ax.hist(values[group].numpy(), bins=50, histtype="step", label=moment)
        ax.set(title=group, xlabel="weight")
    np.atleast_1d(axes)[0].legend()
    fig.tight_layout()
    png = folder / "weight_histograms.png"
    fig.savefig(png, dpi=80)
    plt.close(fig)
    data = folder / "weight_values.npz"
    arrays: dict[str, Any] = {f"{m}__{g}": v[g].numpy() for m, v in snapshots.items() for g in v}
    np.savez_compressed(data, **arrays)
    return [png, data]


def predictions(
    spans: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], targets: list[str], path: Path
) -> Path:
    """One-step-ahead predictions against the truth over each span (val, test).

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
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


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
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def worst_val_samples(model: torch.nn.Module, data: TrainingData, k: int) -> pd.DataFrame:
    """The k validation samples the model gets most wrong: the largest errors for forecasting
    (diagnostics.worst_windows), the most confident mistakes for classification."""
    output = predict(model, data.val.x).cpu()
    if isinstance(data, ClassificationData):
        probabilities = torch.softmax(output, dim=1).numpy()
        return dg.confidently_wrong(
            probabilities, data.val.y.numpy(), data.val.ids, data.classes, k
        )
    windows = data.val
    prediction = data.to_original(output.numpy(), windows)
    truth = data.to_original(windows.y.numpy(), windows)
    return dg.worst_windows(truth, prediction, windows.times, data.targets, k)


WORST_SAMPLES = "worst_val_samples.csv"  # in each trial's diagnostics/ folder


def trial_artifacts(
    folder: Path,
    model: torch.nn.Module,
    data: TrainingData,
    history: History,
    verdict: dg.Verdict,
    k: int,
) -> None:
    """Everything a trial saves at its best epoch, into ``folder``."""
    loss_curves(history.rows, history.best_epoch, verdict.onset_epoch, folder / "loss_curves.png")
    if history.weights:
        weight_histograms(history.weights, folder)
    worst_val_samples(model, data, k).to_csv(folder / WORST_SAMPLES, index=False)
    if isinstance(data, ClassificationData):
        predicted = predict(model, data.val.x).argmax(dim=1).cpu().numpy()
        confusion_matrix(
            data.val.y.numpy(), predicted, data.classes, folder / "confusion_matrix.png"
        )
        return
    spans = {}
    for part in ("val", "test"):
        windows = data.part(part)
        prediction = data.to_original(predict(model, windows.x).cpu().numpy(), windows)
        truth = data.to_original(windows.y.numpy(), windows)
        spans[part] = (windows.times[:, 0], truth[:, 0, :], prediction[:, 0, :])
    predictions(spans, data.targets, folder / "predictions.png")
