"""Where the good settings sit in the searched ranges: the response surface over pairs of keys
and the neighbourhood of the recommendation (positions in a range: ``SearchParam.position``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lstm_sweep import metrics as m
from lstm_sweep import plots
from lstm_sweep.config import SearchParam

EDGE_TOP = 3  # the best completed trials whose position in each range is checked
PAIRS = (("model.dropout", "train.weight_decay"), ("model.hidden_size", "train.learning_rate"))
SURFACE_METRICS = (m.BEST_VAL_LOSS, m.best(m.GAP), m.OVERFIT_ONSET)
BINS = 5  # cells per numeric axis of the response surface
NEIGHBOURHOOD = 0.2  # a trial is "near" when every searched key is this close, in range units


def cells(values: pd.Series, param: SearchParam) -> pd.Series:
    """Each value's cell along one axis of the response surface, as a categorical label."""
    if param.type == "categorical":
        labels = [str(c) for c in param.choices or []]
        categorical = pd.Categorical(values.astype(str), categories=labels)
        return pd.Series(categorical, index=values.index)
    low, high = param.span
    edges = (np.geomspace if param.log else np.linspace)(low, high, BINS + 1)
    labels = [f"{edges[i]:.2g}-{edges[i + 1]:.2g}" for i in range(BINS)]
    return pd.cut(values.astype(float), edges, labels=labels, include_lowest=True)


def surface(
    table: pd.DataFrame, x_key: str, y_key: str, metric: str, search: Mapping[str, SearchParam]
) -> pd.DataFrame:
    """Median of ``metric`` over completed trials per (y cell, x cell); NaN where none fell."""
    done = table[(table["state"] == m.COMPLETE) & table[metric].notna()]
    frame = pd.DataFrame(
        {
            "x": cells(done[x_key], search[x_key]),
            "y": cells(done[y_key], search[y_key]),
            "v": done[metric].astype(float),
        }
    )
    grid = frame.pivot_table(index="y", columns="x", values="v", aggfunc="median", observed=False)
    # every cell keeps its place, trials or not, so two pictures of one study line up
    return grid.reindex(index=frame["y"].cat.categories, columns=frame["x"].cat.categories)


def draw_surfaces(
    table: pd.DataFrame,
    search: Mapping[str, SearchParam],
    recommended: Mapping[str, Any],
    folder: Path,
) -> list[Path]:
    """One PNG per searched pair of :data:`PAIRS`, the recommendation starred."""
    written = []
    metrics = [k for k in SURFACE_METRICS if k in table and table[k].notna().any()]
    for x_key, y_key in PAIRS:
        if x_key not in search or y_key not in search or not metrics:
            continue
        grids = {k: surface(table, x_key, y_key, k, search) for k in metrics}
        star_x = cells(pd.Series([recommended[x_key]]), search[x_key]).iloc[0]
        star_y = cells(pd.Series([recommended[y_key]]), search[y_key]).iloc[0]
        name = f"surface_{x_key.split('.')[-1]}_{y_key.split('.')[-1]}.png"
        written.append(plots.heatmaps(grids, x_key, y_key, (star_x, star_y), folder / name))
    return written


REGULARISERS = ("model.dropout", "model.head_dropout", "train.weight_decay")


def more_regularised(
    table: pd.DataFrame, search: Mapping[str, SearchParam], recommended: Mapping[str, Any]
) -> pd.DataFrame:
    """Completed trials regularised at least as much as the recommendation on every searched
    regulariser (dropout, head dropout, weight decay) and more on one: what "more
    regularisation" scored in the searched range. Empty when none of them is searched."""
    keys = [k for k in REGULARISERS if k in search]
    done = table[table["state"] == m.COMPLETE]
    if not keys or done.empty:
        return done.iloc[:0]
    values = done[keys].astype(float)
    here = pd.Series({k: float(recommended[k]) for k in keys})
    return done[(values >= here).all(axis=1) & (values > here).any(axis=1)]


def neighbourhood(
    table: pd.DataFrame,
    search: Mapping[str, SearchParam],
    recommended: Mapping[str, Any],
    near_best: float,
    direction: str,
) -> tuple[int, int]:
    """Completed trials near the recommendation (every searched key within
    :data:`NEIGHBOURHOOD` of its range), and how many of them came within ``near_best`` of the
    study's best value: many good neighbours mean a robust region, none an isolated point."""
    done = table[table["state"] == m.COMPLETE]
    if done.empty:
        return 0, 0
    near = np.ones(len(done), dtype=bool)
    for key, param in search.items():
        here = param.position(recommended[key])
        where = done[key].map(param.position).to_numpy(dtype=float)
        near &= np.abs(where - here) <= NEIGHBOURHOOD
    values = done["value"].to_numpy(dtype=float)
    if direction == "minimize":
        good = values <= values.min() * (1 + near_best)
    else:
        good = values >= values.max() * (1 - near_best)
    return int(near.sum()), int((near & good).sum())
