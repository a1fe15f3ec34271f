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
import warnings
from collections.abc import Sequence
from functools import cache
from typing import Any

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

from lstm_sweep import metrics as m
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


ARIMA_HISTORY = 300  # values an ARIMA is fitted on at most: its few parameters settle well
# before that, and on a long series (CO2's 1,800 training weeks) the fits would cost seconds


def arima_order(levels: np.ndarray) -> tuple[int, int, int]:
    """An ARIMA order for one target's training values, as auto-ARIMA chooses one, kept small:
    d = 1 where the KPSS test rejects a stationary level at 5 %, else 0; then p <= 3 and
    q <= 2 by the lowest AIC."""
    from statsmodels.tsa.stattools import kpss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # KPSS's p-value is read off a table: clipped, said
        d = int(kpss(levels, regression="c", nlags="auto")[1] < 0.05)
        orders = [(p, d, q) for p in range(4) for q in range(3) if p or q]
        return min(orders, key=lambda order: float(_arima(levels, order).fit().aic))


@cache
def _order_of(levels: tuple[float, ...]) -> tuple[int, int, int]:
    """:func:`arima_order`, once per training series a process scores (every part and refit
    of a sweep share one)."""
    return arima_order(np.asarray(levels))


def _arima(levels: np.ndarray, order: tuple[int, int, int]) -> Any:
    from statsmodels.tsa.arima.model import ARIMA  # a second of imports: only where fitted

    trend = "c" if order[1] == 0 else "n"  # a mean for the levels; none for their differences
    return ARIMA(levels, order=order, trend=trend)


def arima_forecasts(
    levels: np.ndarray,
    order: tuple[int, int, int],
    fit_end: int,
    origins: np.ndarray,
    horizon: int,
) -> np.ndarray:
    """Forecasts (len(origins), horizon) of ``levels`` from each origin (the index of the last
    value known there) by an ARIMA of ``order`` fitted on ``levels[:fit_end]`` (its last
    :data:`ARIMA_HISTORY`), its parameters then fixed while the Kalman filter reads the whole
    series: from the state predicted for the step after each origin, the h-step forecasts follow
    by the model's own transition, for every origin at once (what ``predict(start=o + 1,
    end=o + h, dynamic=True)`` gives one origin at a time, tested)."""
    start = max(0, fit_end - ARIMA_HISTORY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence notes on short or flat stretches
        filtered = _arima(levels[start:fit_end], order).fit().apply(levels).filter_results
    design, transition = filtered.design[:, :, 0], filtered.transition[:, :, 0]
    state_intercept, obs_intercept = filtered.state_intercept[:, 0], filtered.obs_intercept[:, 0]
    states = filtered.predicted_state[:, origins + 1]  # (k_states, n): data up to each origin
    steps = []
    for _ in range(horizon):
        steps.append(obs_intercept[0] + design[0] @ states)
        states = transition @ states + state_intercept[:, None]
    return np.stack(steps, axis=1)


def arima(data: ForecastData, part: str, refit_on_val: bool) -> tuple[np.ndarray, str]:
    """statsmodels' ARIMA on each target's untransformed levels, its order chosen on the
    training part (:func:`arima_order`) and fitted there (on training and validation with
    ``refit_on_val``), forecasting each window of ``part`` from its origin, in original units;
    and the orders, in words."""
    series = level_series(data)
    windows = data.part(part)
    origins = series.index.get_indexer(windows.times[:, 0]) - 1
    ends = {
        name: series.index.get_loc(data.part(name).times[-1, -1]) + 1 for name in ("train", "val")
    }
    fit_end = ends["val" if refit_on_val else "train"]
    forecasts, orders = [], []
    for column in series.columns:
        levels = series[column].to_numpy(dtype=float)
        train = levels[max(0, ends["train"] - ARIMA_HISTORY) : ends["train"]]
        orders.append(_order_of(tuple(train)))
        forecasts.append(arima_forecasts(levels, orders[-1], fit_end, origins, windows.y.shape[1]))
    chosen = ", ".join(f"ARIMA{order}" for order in orders)
    return np.stack(forecasts, axis=-1), f"{chosen}, order chosen on training"


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


def forecast_baselines(
    data: ForecastData,
    part: str,
    refit_on_val: bool,
    methods: Sequence[str] = m.FORECAST_BASELINES,
) -> pd.DataFrame:
    """Each baseline's errors on a part: one row per method (index), columns :data:`METRICS`
    and ``note``. A baseline that cannot be made (no season) gets a note instead of numbers.
    With ``refit_on_val`` the models learn from training and validation, as the final LSTM
    does; scoring the validation part itself, they must not."""
    target, scale = data.truth(part), naive_scale(data)
    alpha = ridge_alpha(_flat(data.train), _flat(data.val))
    notes = {  # what each one is; where one cannot be made, why instead
        "seasonal_naive": f"season {data.season}",
        "ridge_ar": f"alpha {alpha:g} chosen on validation",
        "ridge_levels": "on untransformed levels, penalty chosen on validation",
        "mlp": "64 hidden units on the LSTM's input windows",
    }

    def fitted_arima() -> np.ndarray:
        forecast, notes["arima"] = arima(data, part, refit_on_val)
        return forecast

    makers = {
        "naive": lambda: data.naive(part),
        "seasonal_naive": lambda: seasonal_naive(data, part),
        "ridge_ar": lambda: ridge_ar(data, part, alpha, refit_on_val),
        "ridge_levels": lambda: ridge_levels(data, part, refit_on_val),
        "mlp": lambda: mlp(data, part, refit_on_val),
        "arima": fitted_arima,
    }
    rows: dict[str, dict[str, object]] = {}
    for name in methods:
        make = makers[name]
        try:
            rows[name] = {**errors(make(), target, scale), "note": ""}
        except ValueError as exc:
            rows[name] = {**dict.fromkeys(METRICS, math.nan), "note": str(exc)}
        rows[name]["note"] = rows[name]["note"] or notes.get(name, "")
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
