"""The other side of a Task (``tasks``): how forecasting and classification show what a trained
model is worth. Errors in the target's own units, the baselines it must beat, the samples it
gets most wrong, the picture of its predictions, and the words the report uses for each.
This side loads scikit-learn's estimators and matplotlib; the training loop needs neither."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import torch

from lstm_sweep import baselines, plots
from lstm_sweep import diagnostics as dg
from lstm_sweep import metrics as m
from lstm_sweep.predict import load_bundle, predict_classes, predict_forecast
from lstm_sweep.tasks import Classification, Forecast, Task


class Evidence(ABC):
    """What one task's results are judged by."""

    # the report's words: how its baseline table reads, what to try when a baseline wins
    baseline_note: ClassVar[str]
    what_to_try: ClassVar[str]
    # the columns that name a sample in worst_samples, and the one that scores it
    sample_keys: ClassVar[tuple[str, ...]]
    sample_score: ClassVar[str]
    naive_row: ClassVar[str]  # the baselines' row of the predictor every model must beat

    def __init__(self, task: Task) -> None:
        self.task = task

    @abstractmethod
    def errors(self, output: np.ndarray, part: str) -> dict[str, float]:
        """A model's errors on a part, comparable with :meth:`baselines` row by row."""

    @abstractmethod
    def baselines(
        self, part: str, refit_on_val: bool, chosen: Sequence[str] | None = None
    ) -> pd.DataFrame:
        """The predictors the LSTM has to beat, scored on a part: one row per method (those
        ``chosen`` by closing.baselines, where the task lets them be chosen)."""

    @abstractmethod
    def worst_samples(self, output: np.ndarray, k: int) -> pd.DataFrame:
        """The k validation samples a model gets most wrong."""

    @abstractmethod
    def prediction_figure(self, output: np.ndarray, part: str, path: Path) -> Path:
        """A picture of a model's predictions on a part."""

    @abstractmethod
    def registered_score(self, model_uri: str, tracking_uri: str, path: Path) -> float:
        """A logged model's headline error on this task's test part, read as ``predict`` reads
        the table at ``path`` (the model's own scaler, window and transform): models trained
        on other settings compare on the same samples. ValueError when it cannot predict
        every one of them."""


class ForecastEvidence(Evidence):
    baseline_note = (
        "Errors in the target's own units. MASE divides the MAE by the naive forecast's MAE on"
        " the training windows. `ridge_ar` is a linear autoregression on the LSTM's own input"
        " windows, `ridge_levels` the same on the target's untransformed levels (lags = the"
        " window), each penalty chosen on validation; `mlp` is a small scikit-learn MLP on the"
        " LSTM's input windows: not recurrent, it says whether the recurrence earns its cost;"
        " `arima` is statsmodels' ARIMA on the levels, its order chosen on the training part"
        " (d by the KPSS test, p and q by AIC), forecasting from each window's origin."
    )
    what_to_try = (
        "a longer window (data.window), more data, or the linear path (model.skip: linear)"
    )
    sample_keys = ("window", "start")
    sample_score = "mae"
    naive_row = "naive"
    task: Forecast

    def errors(self, output: np.ndarray, part: str) -> dict[str, float]:
        data = self.task.data
        prediction = data.to_original(output, data.part(part))
        return baselines.errors(prediction, data.truth(part), baselines.naive_scale(data))

    def baselines(
        self, part: str, refit_on_val: bool, chosen: Sequence[str] | None = None
    ) -> pd.DataFrame:
        methods = [b for b in m.FORECAST_BASELINES if chosen is None or b in {"naive", *chosen}]
        return baselines.forecast_baselines(self.task.data, part, refit_on_val, methods)

    def worst_samples(self, output: np.ndarray, k: int) -> pd.DataFrame:
        data = self.task.data
        prediction = data.to_original(output, data.val)
        return dg.worst_windows(data.truth("val"), prediction, data.val.times, data.targets, k)

    def prediction_figure(self, output: np.ndarray, part: str, path: Path) -> Path:
        data = self.task.data
        windows = data.part(part)
        prediction = data.to_original(output, windows)
        truth = data.truth(part)
        spans = {part: (windows.times[:, 0], truth[:, 0, :], prediction[:, 0, :])}
        return plots.predictions(spans, data.targets, path)

    def registered_score(self, model_uri: str, tracking_uri: str, path: Path) -> float:
        """The MSE over every (time, step) the test part forecasts."""
        table = predict_forecast(load_bundle(model_uri, tracking_uri), path, last_only=False)
        test, targets = self.task.data.test, self.task.data.targets
        n, horizon = test.times.shape
        steps = np.tile(np.arange(1, horizon + 1), n)
        wanted = pd.DataFrame({"time": test.times.reshape(-1), "step": steps})
        rows = wanted.merge(table, on=["time", "step"], how="left")
        columns = [f"{t}_forecast" for t in targets], [f"{t}_actual" for t in targets]
        if not set(columns[0]) <= set(rows):
            raise ValueError(f"it forecasts {list(table.filter(like='_forecast'))}")
        error = rows[columns[0]].to_numpy(float) - rows[columns[1]].to_numpy(float)
        if np.isnan(error).any():
            raise ValueError(f"it forecasts {int(np.isnan(error).any(axis=1).sum())} fewer steps")
        return float((error**2).mean())


class ClassificationEvidence(Evidence):
    baseline_note = (
        "Accuracy, balanced accuracy and macro F1; the logistic regression reads the flattened"
        " sequences."
    )
    what_to_try = "more data, a larger model or the linear path (model.skip: linear)"
    sample_keys = ("id", "true")
    sample_score = "confidence"
    naive_row = "majority_class"
    task: Classification

    def errors(self, output: np.ndarray, part: str) -> dict[str, float]:
        truth = self.task.data.part(part).y.numpy()
        return baselines.classification_errors(output.argmax(axis=1), truth)

    def baselines(
        self, part: str, refit_on_val: bool, chosen: Sequence[str] | None = None
    ) -> pd.DataFrame:
        return baselines.classification_baselines(self.task.data, part, refit_on_val)

    def worst_samples(self, output: np.ndarray, k: int) -> pd.DataFrame:
        probabilities = torch.softmax(torch.from_numpy(output), dim=1).numpy()
        val, classes = self.task.data.val, self.task.data.classes
        return dg.confidently_wrong(probabilities, val.y.numpy(), val.ids, classes, k)

    def prediction_figure(self, output: np.ndarray, part: str, path: Path) -> Path:
        truth = self.task.data.part(part).y.numpy()
        return plots.confusion_matrix(truth, output.argmax(axis=1), self.task.data.classes, path)

    def registered_score(self, model_uri: str, tracking_uri: str, path: Path) -> float:
        """The accuracy over the test part's sequences."""
        table = predict_classes(load_bundle(model_uri, tracking_uri), path)
        test = self.task.data.test
        truth = pd.Series([self.task.data.classes[i] for i in test.y.numpy()], index=test.ids)
        predicted = table.set_index("id")["predicted"].reindex(truth.index)
        if predicted.isna().any():
            raise ValueError(f"it labels {int(predicted.isna().sum())} fewer sequences")
        return float((predicted.astype(str) == truth.astype(str)).mean())


# by Task.name: the report knows a study's task by its name only
EVIDENCE: dict[str, type[Evidence]] = {
    Forecast.name: ForecastEvidence,
    Classification.name: ClassificationEvidence,
}


def evidence_for(task: Task) -> Evidence:
    return EVIDENCE[task.name](task)
