"""What differs between forecasting and classification while a model trains, behind one
interface; what differs in how its results are shown is their other side, in ``evidence``.

A Task holds one data setting's tensors and knows what training needs of them: the loss, the
per-epoch scores, the naive predictor every model must beat, and the errors at the best epoch.
These two modules are the only ones that tell the two data kinds apart.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score
from torch import nn

from lstm_sweep import metrics as m
from lstm_sweep.config import Config
from lstm_sweep.data import ClassificationData, ForecastData, TrainingData, load_data


class Task(ABC):
    name: ClassVar[str]
    headline: ClassVar[str]  # the error that decides "better" against the baselines
    higher_is_better: ClassVar[bool]
    # an ensemble averages its members' class probabilities, not their raw outputs
    averages_probabilities: ClassVar[bool]

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

    def preprocessing(self) -> dict[str, Any]:
        """What predict needs to turn a table into this task's inputs and back: the scaler
        fitted on the training rows and the input names (and, to classify, the class names)."""
        return {**self.data.scaler.to_dict(), "inputs": self.data.inputs, "task": self.name}

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


class Forecast(Task):
    name = "forecast"
    headline = "mse"
    higher_is_better = False
    averages_probabilities = False
    data: ForecastData

    def __init__(self, data: ForecastData) -> None:
        super().__init__(data)
        # per held-out part: the truth in original units (n, horizon, targets), and the naive
        # forecast's MSE there, the yardstick of val_nmse
        self._truth = {part: data.truth(part) for part in ("val", "test")}
        self._naive_mse = {
            part: float(((data.naive(part) - truth) ** 2).mean())
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


class Classification(Task):
    name = "classification"
    headline = "accuracy"
    higher_is_better = True
    averages_probabilities = True
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

    def preprocessing(self) -> dict[str, Any]:
        return {**super().preprocessing(), "classes": self.data.classes}


def make_task(data: TrainingData) -> Task:
    if isinstance(data, ClassificationData):
        return Classification(data)
    return Forecast(data)


class TaskCache:
    """Each distinct data setting loaded once and shared by every trial that uses it: a
    searched window or transform gets its own windows, built the first time it is drawn."""

    def __init__(self) -> None:
        self._tasks: dict[str, Task] = {}

    def get(self, cfg: Config, fold: int | None = None) -> Task:
        """The task of ``cfg``'s data setting: its split, or one of its earlier folds."""
        key = f"{cfg.task}:{cfg.data.model_dump_json()}:{fold}"
        if key not in self._tasks:
            self._tasks[key] = make_task(load_data(cfg, fold))
        return self._tasks[key]

    def folds(self, cfg: Config) -> list[Task]:
        """The tasks of the folds before the split's own (none with one fold)."""
        return [self.get(cfg, fold) for fold in range(cfg.data.folds - 1)]

    def __len__(self) -> int:
        return len(self._tasks)
