"""The response surface of a study, not only its argmin.

Heatmaps of best validation loss, gap and overfitting onset over pairs of searched keys show
whether good settings form a region or one lucky point; the neighbourhood count says whether
the recommendation sits inside such a region; windows that every setting gets wrong are a data
or regime problem, listed apart.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from lstm_sweep import diagnostics as dg  # noqa: E402
from lstm_sweep.config import SearchParam  # noqa: E402

PAIRS = (("model.dropout", "train.weight_decay"), ("model.hidden_size", "train.learning_rate"))
SURFACE_METRICS = (dg.BEST_VAL_LOSS, f"best_{dg.GAP}", dg.OVERFIT_ONSET)
BINS = 5  # cells per numeric axis
NEIGHBOURHOOD = 0.2  # a trial is "near" when every searched key is this close, in range units
HARD_SHARE = 0.8  # a window in this share of the runs' worst-k lists is hard for every setting


def position(value: Any, param: SearchParam) -> float:
    """Where a value sits in its searched range: 0 at the low end, 1 at the high end (in log
    space for log ranges, by index for categorical choices)."""
    if param.type == "categorical":
        choices = list(param.choices or [])
        return choices.index(value) / max(1, len(choices) - 1) if value in choices else math.nan
    scale = math.log if param.log else float
    low, high = scale(float(param.low)), scale(float(param.high))  # type: ignore[arg-type]
    return (scale(float(value)) - low) / (high - low) if high > low else 0.5


def _axis(values: pd.Series, param: SearchParam) -> tuple[np.ndarray, list[str]]:
    """Each trial's cell index along one axis, and the cells' labels."""
    if param.type == "categorical":
        choices = list(param.choices or [])
        return values.map(choices.index).to_numpy(), [str(c) for c in choices]
    where = values.map(lambda v: position(v, param)).to_numpy(dtype=float)
    cells = np.clip((where * BINS).astype(int), 0, BINS - 1)
    low, high = float(param.low), float(param.high)  # type: ignore[arg-type]
    edges = (np.geomspace if param.log else np.linspace)(low, high, BINS + 1)
    return cells, [f"{edges[i]:.2g}-{edges[i + 1]:.2g}" for i in range(BINS)]


def surface(
    table: pd.DataFrame, x_key: str, y_key: str, metric: str, search: Mapping[str, SearchParam]
) -> pd.DataFrame:
    """Median of ``metric`` over completed trials per (y cell, x cell); NaN where none fell."""
    done = table[(table["state"] == "COMPLETE") & table[metric].notna()]
    x_cells, x_labels = _axis(done[x_key], search[x_key])
    y_cells, y_labels = _axis(done[y_key], search[y_key])
    grid = np.full((len(y_labels), len(x_labels)), np.nan)
    cells = pd.DataFrame({"x": x_cells, "y": y_cells, "v": done[metric].to_numpy(dtype=float)})
    for (x, y), value in cells.groupby(["x", "y"])["v"].median().items():
        grid[int(y), int(x)] = value
    return pd.DataFrame(grid, index=y_labels, columns=x_labels)


def heatmaps(
    table: pd.DataFrame,
    search: Mapping[str, SearchParam],
    recommended: Mapping[str, Any],
    folder: Path,
) -> list[Path]:
    """One PNG per searched pair of :data:`PAIRS`: a panel per metric of
    :data:`SURFACE_METRICS`, the recommendation marked with a star."""
    written = []
    for x_key, y_key in PAIRS:
        if x_key not in search or y_key not in search:
            continue
        metrics = [m for m in SURFACE_METRICS if m in table and table[m].notna().any()]
        fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
        for ax, metric in zip(axes[0], metrics, strict=True):
            grid = surface(table, x_key, y_key, metric, search)
            image = ax.imshow(grid.to_numpy(), origin="lower", cmap="viridis", aspect="auto")
            for (row, col), value in np.ndenumerate(grid.to_numpy()):
                if math.isfinite(value):
                    ax.text(
                        col,
                        row,
                        f"{value:.3g}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white",
                    )
            x_star = _axis(pd.Series([recommended[x_key]]), search[x_key])[0][0]
            y_star = _axis(pd.Series([recommended[y_key]]), search[y_key])[0][0]
            ax.plot(x_star, y_star, marker="*", color="red", markersize=14)
            ax.set_xticks(range(grid.shape[1]), grid.columns, rotation=45, fontsize=7)
            ax.set_yticks(range(grid.shape[0]), grid.index, fontsize=7)
            ax.set(xlabel=x_key, ylabel=y_key, title=f"{metric} (median per cell)")
            fig.colorbar(image, ax=ax)
        fig.tight_layout()
        path = folder / f"surface_{x_key.split('.')[-1]}_{y_key.split('.')[-1]}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written


def neighbourhood(
    table: pd.DataFrame,
    search: Mapping[str, SearchParam],
    recommended: Mapping[str, Any],
    near_best: float,
    direction: str = "minimize",
) -> tuple[int, int]:
    """Completed trials near the recommendation (every searched key within
    :data:`NEIGHBOURHOOD` of its range), and how many of them came within ``near_best`` of the
    study's best value: many good neighbours mean a robust region, none an isolated point."""
    done = table[table["state"] == "COMPLETE"]
    if done.empty:
        return 0, 0
    near = np.ones(len(done), dtype=bool)
    for key, param in search.items():
        here = position(recommended[key], param)
        where = done[key].map(lambda v, p=param: position(v, p)).to_numpy(dtype=float)
        near &= np.abs(where - here) <= NEIGHBOURHOOD
    values = done["value"].to_numpy(dtype=float)
    if direction == "minimize":
        good = values <= values.min() * (1 + near_best)
    else:
        good = values >= values.max() * (1 - near_best)
    return int(near.sum()), int((near & good).sum())


def hard_windows(worst: list[pd.DataFrame], share: float = HARD_SHARE) -> pd.DataFrame:
    """Validation samples among the worst-k of at least ``share`` of the runs: the sample's
    identity (window and start, or id and true class), runs (how many lists hold it), share,
    and its score averaged over those runs (mae, or the confidence of the wrong answer)."""
    lists = [w for w in worst if w is not None and not w.empty]
    keys, score = (
        (["id", "true"], "confidence")
        if lists and "id" in lists[0]
        else (["window", "start"], "mae")
    )
    if not lists:
        return pd.DataFrame(columns=[*keys, "runs", "share", score])
    stacked = pd.concat(lists)
    counted = stacked.groupby(keys, as_index=False).agg(
        runs=(score, "size"), **{score: (score, "mean")}
    )
    counted["share"] = counted["runs"] / len(lists)
    hard = counted[counted["share"] >= share].sort_values(["share", score], ascending=False)
    return hard[[*keys, "runs", "share", score]].reset_index(drop=True)


def importance_chart(importances: Mapping[str, float], path: Path) -> Path:
    """fANOVA importances as horizontal bars, largest on top."""
    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.45 * len(names)))
    ax.barh(names, [importances[n] for n in names], color="tab:blue")
    ax.set(xlabel="share of the validation loss's variance (fANOVA)", xlim=(0, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
