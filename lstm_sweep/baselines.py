"""Predictors an LSTM has to beat, made on the very samples it is scored on.

Forecasting: the last value carried forward (naive), the value one season back (seasonal
naive), a linear autoregression on the same scaled input windows the LSTM reads (scikit-learn
Ridge), the same on the target's untransformed levels (what a practitioner fits first on a
stationary series, whatever transform the LSTM searched), and a nonlinear model that is not
recurrent (scikit-learn's MLP on the LSTM's input windows: whether the recurrence earns its
cost). All errors are in the target's own units; MASE divides the MAE by the naive forecast's
MAE on the training windows, so 1.0 means "as good as carrying the last value forward in-sample".

Classification: the majority class, and scikit-learn's logistic regression on the flattened
sequences; scored by accuracy, balanced accuracy and macro F1.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    mean_absolute_error,
    mean_squared_error,
)
from sklearn.neural_network import MLPRegressor

from lstm_sweep.data import PARTS, ClassificationData, ForecastData, Windows

RIDGE_ALPHAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # chosen on validation windows only
METRICS = ("mse", "mae", "mase")
CLASSIFICATION_METRICS = ("accuracy", "balanced_accuracy", "macro_f1")


def level_series(data: ForecastData) -> pd.DataFrame:
    """Every target value the windows hold, in original units, one row per time stamp in order:
    the history a seasonal forecast looks back into."""
    frames = []
    for part in PARTS:
        values = data.truth(part)  # (n, horizon, targets)
        times = data.part(part).times.reshape(-1)
        frames.append(pd.DataFrame(values.reshape(-1, values.shape[2]), index=times))
    series = pd.concat(frames)
    return series[~series.index.duplicated()].sort_index()


def seasonal_naive(data: ForecastData, part: str) -> np.ndarray:
    """Each step's value one season earlier (k seasons for steps beyond the first season), never
    later than the forecast origin. ValueError when no season is set or history is too short."""
    if data.season is None:
        raise ValueError("data.season is not set")
    windows = data.part(part)
    series = level_series(data)
    rows = series.index.get_indexer(windows.times.reshape(-1)).reshape(windows.times.shape)
    steps = np.arange(1, rows.shape[1] + 1)  # (horizon,): steps ahead of the origin
    back = data.season * np.ceil(steps / data.season).astype(int)  # >= steps: no look-ahead
    source = rows - back[None, :]  # (n, horizon)
    if (source < 0).any():
        raise ValueError(f"season {data.season} reaches back before the first known value")
    return series.to_numpy()[source]  # (n, horizon, targets)


def _flat(windows: Windows) -> tuple[np.ndarray, np.ndarray]:
    """Inputs (n, window * inputs) and targets (n, horizon * targets), as the LSTM sees them."""
    n = len(windows)
    return windows.x.reshape(n, -1).numpy(), windows.y.reshape(n, -1).numpy()


def _join(first: Windows, second: Windows) -> tuple[np.ndarray, np.ndarray]:
    (x1, y1), (x2, y2) = _flat(first), _flat(second)
    return np.concatenate([x1, x2]), np.concatenate([y1, y2])


Pairs = tuple[np.ndarray, np.ndarray]  # inputs (n, features) and targets (n, outputs)


def ridge_alpha(train: Pairs, val: Pairs, alphas: tuple[float, ...] = RIDGE_ALPHAS) -> float:
    """The Ridge penalty with the lowest validation MSE when fitted on the training pairs."""

    def val_mse(alpha: float) -> float:
        fitted = Ridge(alpha=alpha).fit(*train)
        return float(((fitted.predict(val[0]) - val[1]) ** 2).mean())

    return min(alphas, key=val_mse)


def ridge_ar(data: ForecastData, part: str, alpha: float, refit_on_val: bool) -> np.ndarray:
    """A linear autoregression on the scaled input windows, in original units. With
    ``refit_on_val`` it learns from training and validation windows, as the final LSTM does."""
    x, y = _join(data.train, data.val) if refit_on_val else _flat(data.train)
    windows = data.part(part)
    prediction = Ridge(alpha=alpha).fit(x, y).predict(_flat(windows)[0])
    return data.to_original(prediction.reshape(windows.y.shape), windows)


def level_lags(data: ForecastData, part: str) -> tuple[np.ndarray, np.ndarray]:
    """Each window of a part as the target's last ``window`` levels before its first step, in
    original units (n, window * targets), and which windows have that much known history
    (training windows at the very start of the series may not)."""
    series = level_series(data)
    windows = data.part(part)
    steps = windows.x.shape[1]
    origin = series.index.get_indexer(windows.times[:, 0]) - 1  # the last input row
    rows = origin[:, None] - np.arange(steps)[::-1][None, :]  # (n, window), oldest first
    known = rows.min(axis=1) >= 0
    lags = series.to_numpy()[np.clip(rows, 0, None)]  # (n, window, targets)
    return lags.reshape(len(rows), -1), known


def ridge_levels(data: ForecastData, part: str, refit_on_val: bool) -> np.ndarray:
    """A linear autoregression on the target's untransformed levels (lags = the window), its
    penalty chosen on the validation windows, in original units."""

    def known(name: str) -> Pairs:
        lags, ok = level_lags(data, name)
        return lags[ok], data.truth(name)[ok].reshape(int(ok.sum()), -1)

    train, val = known("train"), known("val")
    alpha = ridge_alpha(train, val)
    fitting = [train, val] if refit_on_val else [train]
    model = Ridge(alpha=alpha).fit(*(np.concatenate(side) for side in zip(*fitting, strict=True)))
    x, _ = level_lags(data, part)
    return model.predict(x).reshape(data.truth(part).shape)


def mlp(data: ForecastData, part: str, refit_on_val: bool, seed: int = 0) -> np.ndarray:
    """scikit-learn's MLP (one hidden layer of 64, early stopping on a held-out tenth) on the
    LSTM's own scaled input windows, in original units."""
    x, y = _join(data.train, data.val) if refit_on_val else _flat(data.train)
    y = y.ravel() if y.shape[1] == 1 else y  # one output: the 1-D target scikit-learn expects
    model = MLPRegressor(
        hidden_layer_sizes=(64,), early_stopping=True, max_iter=500, random_state=seed
    )
    windows = data.part(part)
    prediction = model.fit(x, y).predict(_flat(windows)[0])
    return data.to_original(prediction.reshape(windows.y.shape), windows)


def naive_scale(data: ForecastData) -> float:
    """MASE's denominator: the naive forecast's MAE on the training windows, original units."""
    return float(np.abs(data.naive("train") - data.truth("train")).mean())


def errors(prediction: np.ndarray, target: np.ndarray, scale: float) -> dict[str, float]:
    """MSE, MAE and MASE of a forecast against the truth, both in original units."""
    truth, predicted = target.reshape(len(target), -1), prediction.reshape(len(prediction), -1)
    mae = float(mean_absolute_error(truth, predicted))
    return {
        "mse": float(mean_squared_error(truth, predicted)),
        "mae": mae,
        "mase": mae / scale if scale > 0 else math.inf,
    }


def forecast_baselines(data: ForecastData, part: str, refit_on_val: bool) -> pd.DataFrame:
    """Each baseline's errors on a part: one row per method (index), columns :data:`METRICS`
    and ``note``. A baseline that cannot be made (no season) gets a note instead of numbers.
    With ``refit_on_val`` the ridge learns from training and validation windows, as the final
    LSTM does; scoring the validation part itself, it must not."""
    target, scale = data.truth(part), naive_scale(data)
    alpha = ridge_alpha(_flat(data.train), _flat(data.val))
    rows: dict[str, dict[str, object]] = {}
    makers = {
        "naive": lambda: data.naive(part),
        "seasonal_naive": lambda: seasonal_naive(data, part),
        "ridge_ar": lambda: ridge_ar(data, part, alpha, refit_on_val),
        "ridge_levels": lambda: ridge_levels(data, part, refit_on_val),
        "mlp": lambda: mlp(data, part, refit_on_val),
    }
    for name, make in makers.items():
        try:
            rows[name] = {**errors(make(), target, scale), "note": ""}
        except ValueError as exc:
            rows[name] = {**dict.fromkeys(METRICS, math.nan), "note": str(exc)}
    rows["seasonal_naive"]["note"] = rows["seasonal_naive"]["note"] or f"season {data.season}"
    rows["ridge_ar"]["note"] = f"alpha {alpha:g} chosen on validation"
    rows["ridge_levels"]["note"] = "on untransformed levels, penalty chosen on validation"
    rows["mlp"]["note"] = "64 hidden units on the LSTM's input windows"
    return pd.DataFrame.from_dict(rows, orient="index")[[*METRICS, "note"]]


def classification_errors(predicted: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy and macro F1 of predicted class indices."""
    return {
        "accuracy": float(accuracy_score(truth, predicted)),
        "balanced_accuracy": float(balanced_accuracy_score(truth, predicted)),
        "macro_f1": float(f1_score(truth, predicted, average="macro")),
    }


def classification_baselines(
    data: ClassificationData, part: str, refit_on_val: bool
) -> pd.DataFrame:
    """The majority class and a logistic regression on flattened sequences, scored on a part.
    With ``refit_on_val`` both learn from training and validation samples, as the final LSTM
    does."""
    learn = [data.train, data.val] if refit_on_val else [data.train]
    x = np.concatenate([p.x.reshape(len(p), -1).numpy() for p in learn])
    y = np.concatenate([p.y.numpy() for p in learn])
    scored = data.part(part)
    truth = scored.y.numpy()
    majority = np.full_like(truth, np.bincount(y).argmax())
    logistic = LogisticRegression(max_iter=2000).fit(x, y)
    rows = {
        "majority_class": {**classification_errors(majority, truth), "note": ""},
        "logistic_regression": {
            **classification_errors(
                logistic.predict(scored.x.reshape(len(scored), -1).numpy()), truth
            ),
            "note": "on flattened sequences",
        },
    }
    return pd.DataFrame.from_dict(rows, orient="index")[[*CLASSIFICATION_METRICS, "note"]]
