"""The closing stage's pure parts: the top settings, the seed spread and what is within noise,
the baseline that beats the LSTM, and selection.json's round trip."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from lstm_sweep import metrics as m
from lstm_sweep.select import (
    FinalModel,
    SeedResult,
    Selection,
    Setting,
    beaten_by,
    longest_first,
    spread_table,
    top_settings,
    with_validation_in_training,
)
from lstm_sweep.tasks import Task


def seed(number: int, value: float, epoch: int, test: float = 0.7) -> SeedResult:
    return SeedResult(
        number, 0, "run", value, epoch, "healthy", {"mse": 1.0}, {"mse": test}, 0.5, False
    )


def test_top_settings_are_the_best_distinct_completed_ones() -> None:
    table = pd.DataFrame(
        {
            "number": [0, 1, 2, 3, 4],
            "state": ["COMPLETE", "COMPLETE", "PRUNED", "COMPLETE", "COMPLETE"],
            "value": [0.5, 0.4, 0.1, 0.4, 0.9],
            "model.dropout": [0.1, 0.2, 0.3, 0.2, 0.4],  # trial 3 retried trial 1's settings
            m.BEST_EPOCH: [3, 4, 1, 4, 2],
            "run_id": ["a", "b", "c", "d", "e"],
        }
    )
    settings = top_settings(table, ["model.dropout"], 3, "minimize")
    assert [s.number for s in settings] == [1, 0, 4]
    assert settings[0] == Setting(1, {"model.dropout": 0.2}, 0.4, 4, "b")
    assert [s.number for s in top_settings(table, ["model.dropout"], 1, "maximize")] == [4]


def test_the_best_mean_wins_and_close_settings_are_named_within_noise() -> None:
    seeds = [
        seed(0, 0.50, 3),
        seed(0, 0.52, 5),
        seed(1, 0.49, 4),  # the luckiest single value ...
        seed(1, 0.535, 6),  # ... but a worse mean
        seed(2, 0.60, 2),
        seed(2, 0.62, 2),
    ]
    spread, winner, within = spread_table(seeds, "minimize", "mse")
    assert winner == 0
    assert within == [1]  # 0.0025 apart, well inside the seeds' spread
    assert int(spread.loc[spread["number"] == 0, "epochs"].iloc[0]) == 5  # median of 4 and 6
    assert spread["number"].tolist() == [0, 1, 2]


def test_validation_samples_join_training_and_test_stays_apart(tiny_task: Task) -> None:
    joined = with_validation_in_training(tiny_task.data)
    train, val = tiny_task.data.train, tiny_task.data.val
    assert len(joined.train) == len(train) + len(val)
    assert torch.equal(joined.train.x[len(train) :], val.x)
    assert joined.test is tiny_task.data.test


def test_a_baseline_that_beats_the_lstm_on_validation_is_named(tiny_task: Task) -> None:
    table = pd.DataFrame({"mse": [0.3, 0.2, float("nan")]}, index=["naive", "ridge_ar", "seasonal"])
    beaten = beaten_by(tiny_task, {"mse": 0.25}, table)
    assert beaten == {"method": "ridge_ar", "metric": "mse", "baseline": 0.2, "lstm": 0.25}
    assert beaten_by(tiny_task, {"mse": 0.1}, table) is None


def test_selection_round_trips_through_json() -> None:
    final = FinalModel("r", "models:/x/1", "ensemble", 5, {"mse": 0.3}, 0.8, {"mse": 0.35})
    selection = Selection(
        settings=[Setting(1, {"model.dropout": 0.2}, 0.4, 4, "b")],
        seeds=[seed(1, 0.4, 4)],
        spread=[{"number": 1, "val_mean": 0.4, "val_std": 0.0}],
        recommended=1,
        within_noise=[],
        epochs=5,
        baselines_val={"naive": {"mse": 0.5, "note": ""}},
        baselines_test={"naive": {"mse": 0.6, "note": ""}},
        lstm_val={"mse": 0.3},
        beaten_by=None,
        final=final,
        trainings=2,
        seconds=1.5,
        headline="mse",
    )
    again = Selection.from_dict(json.loads(selection.to_json()))
    assert again == selection
    assert again.winner.number == 1 and again.winner_spread["val_mean"] == pytest.approx(0.4)


def test_reevaluations_are_handed_out_longest_first() -> None:
    short, long, unknown = (Setting(n, {}, 0.1, 3, f"run{n}") for n in (4, 7, 9))
    jobs = [(short, 1), (short, 2), (long, 1), (long, 2), (unknown, 1)]
    ordered = longest_first(jobs, {4: 2.5, 7: 30.0})
    assert ordered == [(long, 1), (long, 2), (short, 1), (short, 2), (unknown, 1)]
