"""Forecasting and classification behind one interface, both sides: while training (scores,
naive predictors) and as evidence (errors in original units, baselines, worst samples), on small
real data. Importing the training loop loads neither matplotlib nor scikit-learn."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

from lstm_sweep import baselines
from lstm_sweep import metrics as m
from lstm_sweep.config import load_config
from lstm_sweep.evidence import evidence_for
from lstm_sweep.tasks import Classification, Forecast, Task, TaskCache
from tests.helpers import CLASSIFY, ROOT


@pytest.fixture(scope="module")
def digits() -> Classification:
    task = TaskCache().get(load_config(CLASSIFY))
    assert isinstance(task, Classification)
    return task


def test_forecast_errors_are_the_baselines_errors_of_the_same_numbers(tiny_task: Task) -> None:
    assert isinstance(tiny_task, Forecast)
    data = tiny_task.data
    naive_output = data.naive_forecast(data.test).numpy()
    evidence = evidence_for(tiny_task)
    errors = evidence.errors(naive_output, "test")
    table = evidence.baselines("test", refit_on_val=False, chosen=[])  # the naive row alone
    assert errors["mse"] == pytest.approx(table.loc["naive", "mse"], rel=1e-5)
    assert errors["mase"] == pytest.approx(table.loc["naive", "mase"], rel=1e-5)


def test_better_follows_each_tasks_headline_direction(
    tiny_task: Task, digits: Classification
) -> None:
    assert digits.better(0.9, 0.8) and not digits.better(0.8, 0.9)
    assert tiny_task.better(0.8, 0.9) and not tiny_task.better(0.9, 0.8)


@pytest.mark.slow  # a fresh interpreter importing torch: seconds
def test_importing_the_training_loop_loads_neither_matplotlib_nor_scikit_learn() -> None:
    code = (
        "import sys, lstm_sweep.train; print(sorted({m.split('.')[0] for m in sys.modules}"
        " & {'matplotlib', 'sklearn', 'statsmodels'}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_accuracy_metrics_equal_scikit_learns_on_fixed_predictions(digits: Classification) -> None:
    truth = torch.tensor([0, 1, 2, 2, 1, 0, 2])
    predicted = np.array([0, 2, 2, 2, 1, 1, 0])
    logits = torch.nn.functional.one_hot(torch.from_numpy(predicted), 10).float()
    scores = digits.epoch_scores("val", logits, truth)
    assert scores[m.VAL_ACCURACY] == pytest.approx(accuracy_score(truth, predicted))
    assert scores[m.VAL_BALANCED_ACCURACY] == pytest.approx(
        balanced_accuracy_score(truth, predicted)
    )
    assert scores[m.VAL_MACRO_F1] == pytest.approx(f1_score(truth, predicted, average="macro"))
    assert set(digits.epoch_scores("train", logits, truth)) == {m.TRAIN_ACCURACY}


def test_the_naive_loss_is_the_majority_class_priors_cross_entropy(digits: Classification) -> None:
    prior = np.bincount(digits.data.train.y.numpy(), minlength=10) / len(digits.data.train)
    expected = -np.log(prior[digits.data.val.y.numpy()]).mean()
    assert digits.naive_val_loss == pytest.approx(expected, rel=1e-5)


def test_worst_samples_rank_the_largest_errors_and_the_surest_mistakes(
    tiny_task: Task, digits: Classification
) -> None:
    data = tiny_task.data
    output = data.val.y.numpy().copy()
    output[5] += 3.0  # one window far off
    worst = evidence_for(tiny_task).worst_samples(output, k=2)
    assert worst.loc[0, "window"] == 5
    logits = np.zeros((len(digits.data.val), 10), dtype=np.float32)
    wrong = (digits.data.val.y.numpy()[0] + 1) % 10
    logits[0, wrong] = 9.0  # sure and wrong
    table = evidence_for(digits).worst_samples(logits, k=1)
    assert table.loc[0, "id"] == digits.data.val.ids[0]


def test_the_closing_stage_fits_the_chosen_baselines_and_always_the_naive_forecast(
    tiny_task: Task,
) -> None:
    table = evidence_for(tiny_task).baselines("val", False, ["ridge_ar"])
    assert list(table.index) == ["naive", "ridge_ar"]


def test_seasonal_naive_baseline_uses_the_configured_season(tiny_task: Task) -> None:
    table = baselines.forecast_baselines(tiny_task.data, "test", True, methods=("seasonal_naive",))
    assert table.loc["seasonal_naive", "note"] == "season 52"
    assert (ROOT / "sweeps" / "data" / "co2_weekly.csv").is_file()
