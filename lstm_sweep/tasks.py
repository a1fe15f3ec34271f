"""What differs between forecasting and classification, behind one interface.

A Task holds one data setting's tensors and knows what to do with a model's output on them:
the loss, the per-epoch scores, the naive predictor, errors in the target's own units, the
worst samples, the baselines and the picture of its predictions. Everything else in the project
asks its Task; this is the only module that tells the two data kinds apart.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score
from torch import nn

from lstm_sweep import baselines, plots
from lstm_sweep import diagnostics as dg
from lstm_sweep import metrics as m
from lstm_sweep.config import Config
from lstm_sweep.data import ClassificationData, ForecastData, TrainingData, load_data


class Task(ABC):
    name: ClassVar[str]
    naive_name: ClassVar[str]  # the predictor every model must beat, in words
    headline: ClassVar[str]  # the error that decides "better" against the baselines
    higher_is_better: ClassVar[bool]
    skill_column: ClassVar[str]
    baseline_note: ClassVar[str]

    def __init__(self, data: TrainingData) -> None:
        self.data = data
        self.naive_val_loss = self.naive_loss("val")

    @property
    def n_inputs(self) -> int:
        return self.data.n_inputs

    @property
    def steps(self) -> int:
        """Input time steps per sample: the window, or the sequence length."""
        return int(self.data.train.x.shape[1])

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self.data.output_shape

    def naive_loss(self, part: str) -> float:
        """The naive predictor's loss on a part, in the model's own loss."""
        return float(self.loss(self.naive_prediction(part), self.data.part(part).y))

    def better(self, value: float, than: float) -> bool:
        return value > than if self.higher_is_better else value < than

    @abstractmethod
    def loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def epoch_scores(
        self, part: str, prediction: torch.Tensor, target: torch.Tensor
    ) -> dict[str, float]:
        """Per-epoch metrics of a part beyond its loss."""

    @abstractmethod
    def naive_prediction(self, part: str) -> torch.Tensor:
        """The naive predictor's output on a part, in model space."""

    @abstractmethod
    def best_epoch_errors(self, output: np.ndarray) -> dict[str, float]:
        """Errors of a model's validation output in the target's own units (forecasting)."""

    @abstractmethod
    def errors(self, output: np.ndarray, part: str) -> dict[str, float]:
        """A model's errors on a part, comparable with :meth:`baselines` row by row."""

    @abstractmethod
    def baselines(self, part: str, refit_on_val: bool) -> pd.DataFrame:
        """The predictors the LSTM has to beat, scored on a part: one row per method."""

    @abstractmethod
    def worst_samples(self, output: np.ndarray, k: int) -> pd.DataFrame:
        """The k validation samples a model gets most wrong."""

    @abstractmethod
    def prediction_figure(self, output: np.ndarray, part: str, path: Path) -> Path:
        """A picture of a model's predictions on a part."""

    def skill(self, compared: pd.DataFrame, model_row: str = "lstm") -> pd.Series:
        """How much better the row ``model_row`` is than each other row: 1 - MSE ratio for
        forecasting (above 0: better), the accuracy difference for classification."""
        model = compared.loc[model_row, self.headline]
        if self.higher_is_better:
            gain = model - compared[self.headline]
        else:
            gain = 1 - model / compared[self.headline]
        return gain.where(compared.index != model_row)


class Forecast(Task):
    name = "forecast"
    naive_name = "naive last-value forecast"
    headline = "mse"
    higher_is_better = False
    skill_column = "skill_mse"
    baseline_note = (
        "Errors in the target's own units. MASE divides the MAE by the naive forecast's MAE on"
        " the training windows; `skill_mse` is 1 - MSE(LSTM) / MSE(baseline): above 0 the LSTM"
        " is better."
    )
    data: ForecastData

    def __init__(self, data: ForecastData) -> None:
        super().__init__(data)
        # per held-out part: the truth in original units (n, horizon, targets), and the naive
        # forecast's MSE there, the yardstick of val_nmse
        self._truth = {part: baselines.truth(data, part) for part in ("val", "test")}
        self._naive_mse = {
            part: float(((baselines.naive(data, part) - truth) ** 2).mean())
            for part, truth in self._truth.items()
        }

    def loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(prediction, target)

    def epoch_scores(
        self, part: str, prediction: torch.Tensor, target: torch.Tensor
    ) -> dict[str, float]:
        """On a held-out part, the MSE in the target's units over the naive forecast's."""
        if part not in self._truth:
            return {}
        windows = self.data.part(part)
        error = self.data.to_original(prediction.cpu().numpy(), windows) - self._truth[part]
        mse, naive = float((error**2).mean()), self._naive_mse[part]
        # a part the naive forecast predicts exactly leaves the raw MSE to compare
        return {m.on_part(m.VAL_NMSE, part): mse / naive if naive > 0 else mse}

    def naive_prediction(self, part: str) -> torch.Tensor:
        return self.data.naive_forecast(self.data.part(part))

    def best_epoch_errors(self, output: np.ndarray) -> dict[str, float]:
        error = self.data.to_original(output, self.data.val) - self._truth["val"]
        return {
            m.VAL_MAE: float(np.abs(error).mean()),
            m.VAL_RMSE: float(np.sqrt((error**2).mean())),
        }

    def errors(self, output: np.ndarray, part: str) -> dict[str, float]:
        prediction = self.data.to_original(output, self.data.part(part))
        truth = baselines.truth(self.data, part)
        return baselines.errors(prediction, truth, baselines.naive_scale(self.data))

    def baselines(self, part: str, refit_on_val: bool) -> pd.DataFrame:
        return baselines.forecast_baselines(self.data, part, refit_on_val)

    def worst_samples(self, output: np.ndarray, k: int) -> pd.DataFrame:
        prediction = self.data.to_original(output, self.data.val)
        return dg.worst_windows(
            self._truth["val"], prediction, self.data.val.times, self.data.targets, k
        )

    def prediction_figure(self, output: np.ndarray, part: str, path: Path) -> Path:
        windows = self.data.part(part)
        prediction = self.data.to_original(output, windows)
        truth = baselines.truth(self.data, part)
        spans = {part: (windows.times[:, 0], truth[:, 0, :], prediction[:, 0, :])}
        return plots.predictions(spans, self.data.targets, path)


class Classification(Task):
    name = "classification"
    naive_name = "majority-class prior"
    headline = "accuracy"
    higher_is_better = True
    skill_column = "accuracy_gain"
    baseline_note = (
        "`accuracy_gain` is the LSTM's test accuracy minus the baseline's: above 0 the LSTM is"
        " better."
    )
    data: ClassificationData

    def loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(prediction, target)

    def epoch_scores(
        self, part: str, prediction: torch.Tensor, target: torch.Tensor
    ) -> dict[str, float]:
        """Accuracy on every part; balanced accuracy and macro F1 on validation."""
        predicted, truth = prediction.argmax(dim=1).cpu().numpy(), target.cpu().numpy()
        scores = {m.on_part(m.VAL_ACCURACY, part): float(accuracy_score(truth, predicted))}
        if part == "val":
            scores[m.VAL_BALANCED_ACCURACY] = float(balanced_accuracy_score(truth, predicted))
            scores[m.VAL_MACRO_F1] = float(f1_score(truth, predicted, average="macro"))
        return scores

    def naive_prediction(self, part: str) -> torch.Tensor:
        """Logits of the training class frequencies: the majority-class predictor's loss."""
        classes = len(self.data.classes)
        counts = torch.bincount(self.data.train.y, minlength=classes).float()
        log_prior = torch.log(counts.clamp(min=1) / counts.sum())
        return log_prior.expand(len(self.data.part(part)), -1).clone()

    def best_epoch_errors(self, output: np.ndarray) -> dict[str, float]:
        return {}

    def errors(self, output: np.ndarray, part: str) -> dict[str, float]:
        truth = self.data.part(part).y.numpy()
        return baselines.classification_errors(output.argmax(axis=1), truth)

    def baselines(self, part: str, refit_on_val: bool) -> pd.DataFrame:
        return baselines.classification_baselines(self.data, part, refit_on_val)

    def worst_samples(self, output: np.ndarray, k: int) -> pd.DataFrame:
        probabilities = torch.softmax(torch.from_numpy(output), dim=1).numpy()
        val = self.data.val
        return dg.confidently_wrong(probabilities, val.y.numpy(), val.ids, self.data.classes, k)

    def prediction_figure(self, output: np.ndarray, part: str, path: Path) -> Path:
        truth = self.data.part(part).y.numpy()
        return plots.confusion_matrix(truth, output.argmax(axis=1), self.data.classes, path)


def make_task(data: TrainingData) -> Task:
    if isinstance(data, ClassificationData):
        return Classification(data)
    return Forecast(data)


class TaskCache:
    """Each distinct data setting loaded once and shared by every trial that uses it: a
    searched window or transform gets its own windows, built the first time it is drawn."""

    def __init__(self) -> None:
        self._tasks: dict[str, Task] = {}

    def get(self, cfg: Config) -> Task:
        key = f"{cfg.task}:{cfg.data.model_dump_json()}"
        if key not in self._tasks:
            self._tasks[key] = make_task(load_data(cfg))
        return self._tasks[key]

    def __len__(self) -> int:
        return len(self._tasks)
