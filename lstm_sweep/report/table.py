"""The study read back as one table: each Optuna trial joined with its MLflow run, the counts
and ranking the summary states, and the validation samples every setting gets wrong. The
closing stage and the report both read the trials through it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from lstm_sweep import metrics as m
from lstm_sweep.config import plain

RUN_METRICS = (  # per trial, read back from its MLflow run
    m.BEST_VAL_LOSS,
    m.best(m.GAP),
    m.best(m.TRAIN_EVAL_LOSS),
    m.OVERFIT_ONSET,
)
SUMMARY_COLUMNS = [
    "number",
    "state",
    "value",
    "verdict",
    m.best(m.GAP),
    m.BEST_EPOCH,
    m.EPOCHS_TRAINED,
    "wall_seconds",
]
HARD_SHARE = 0.8  # a window in this share of the runs' worst-k lists is hard for every setting


def comparison_table(trials: pd.DataFrame, runs: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """One row per Optuna trial joined with its MLflow run: searched values, state, value,
    best validation loss, gap and train-eval loss at the best epoch, overfitting onset, verdict,
    epochs, wall time. ``trials`` as study.trials_frame gives it, ``runs`` as
    Tracker.child_runs does."""
    view = pd.DataFrame({"run_id": runs.get("run_id", pd.Series(dtype=str))})
    for metric in RUN_METRICS:
        view[metric] = runs.get(f"metrics.{metric}", math.nan)
    if len(runs):
        view["wall_seconds"] = (runs["end_time"] - runs["start_time"]).dt.total_seconds()
    else:
        view["wall_seconds"] = pd.Series(dtype=float)
    if m.RUN_ID_ATTR not in trials:  # no trial has started yet
        trials = trials.assign(**{m.RUN_ID_ATTR: pd.Series(dtype=str)})
    table = trials.merge(view, how="left", left_on=m.RUN_ID_ATTR, right_on="run_id")
    columns = [
        "number",
        "state",
        *keys,
        "value",
        *RUN_METRICS,
        m.VERDICT_ATTR,
        m.BEST_EPOCH,
        m.EPOCHS_TRAINED,
        "wall_seconds",
        "run_id",
    ]
    return table[[c for c in columns if c in table]].sort_values("number", ignore_index=True)


@dataclass(frozen=True)
class SweepSummary:
    finished: int
    pruned: int
    failed: int
    unstable: int  # of the pruned: the loss blew up
    best_number: int | None
    best_value: float | None
    best_values: dict[str, Any]
    naive_val_loss: float
    table: pd.DataFrame  # completed trials, best first
    monitor: str
    folds: int = 1  # a trial's value is the mean over this many validation folds
    stopped: str = ""  # why the study ended before n_trials, where it stopped itself


def summarise(
    table: pd.DataFrame,
    keys: list[str],
    direction: str,
    monitor: str,
    naive_val_loss: float,
    folds: int = 1,
) -> SweepSummary:
    """Counts, best trial and a ranked table from a comparison table."""
    states = table["state"].value_counts() if len(table) else pd.Series(dtype=int)
    done = table[table["state"] == m.COMPLETE].sort_values(
        "value", ascending=direction == "minimize"
    )
    columns = [c for c in [*SUMMARY_COLUMNS[:3], *keys, *SUMMARY_COLUMNS[3:]] if c in table]
    best = done.iloc[0] if len(done) else None
    return SweepSummary(
        finished=int(states.get(m.COMPLETE, 0)),
        pruned=int(states.get(m.PRUNED, 0)),
        failed=int(states.get(m.FAIL, 0)),
        unstable=int((table["verdict"] == "unstable").sum()) if "verdict" in table else 0,
        best_number=int(best["number"]) if best is not None else None,
        best_value=float(best["value"]) if best is not None else None,
        best_values={k: plain(best[k]) for k in keys} if best is not None else {},
        naive_val_loss=naive_val_loss,
        table=done[columns].reset_index(drop=True),
        monitor=monitor,
        folds=folds,
    )


def hard_windows(
    worst: list[pd.DataFrame], names: Sequence[str], score: str, share: float = HARD_SHARE
) -> pd.DataFrame:
    """Validation samples among the worst-k of at least ``share`` of the runs: the sample's
    identity (its columns ``names``: window and start, or id and true class), runs (how many
    lists hold it), share, and its ``score`` averaged over those runs (mae, or the confidence
    of the wrong answer)."""
    lists = [w for w in worst if w is not None and not w.empty]
    keys = list(names)
    if not lists:
        return pd.DataFrame(columns=[*keys, "runs", "share", score])
    stacked = pd.concat(lists)
    counted = stacked.groupby(keys, as_index=False).agg(
        runs=(score, "size"), **{score: (score, "mean")}
    )
    counted["share"] = counted["runs"] / len(lists)
    hard = counted[counted["share"] >= share].sort_values(["share", score], ascending=False)
    return hard[[*keys, "runs", "share", score]].reset_index(drop=True)
