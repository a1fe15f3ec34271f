"""Baselines give the textbook answer where it is known, on the very windows the LSTM sees."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lstm_sweep import baselines
from lstm_sweep import metrics as m
from lstm_sweep.config import load_config
from lstm_sweep.data import ForecastData, load_forecast_data
from tests.helpers import write_series, write_sweep


def series_data(tmp_path: Path, values: np.ndarray, **data: object) -> ForecastData:
    csv = write_series(tmp_path / "series.csv", values)
    sweep = write_sweep(tmp_path / "sweep.yaml", csv, data={"horizon": 3, **data})
    return load_forecast_data(load_config(sweep).data)


# every baseline but the ARIMA, which fits eleven models: its own tests below pay for it
FAST = tuple(name for name in m.FORECAST_BASELINES if name != "arima")


def periodic(n: int = 300, period: int = 12) -> np.ndarray:
    return 10.0 + np.sin(2 * np.pi * np.arange(n) / period)


@pytest.mark.parametrize("transform", ["none", "diff"])
def test_naive_forecast_is_exact_where_the_series_stands_still(
    tmp_path: Path, transform: str
) -> None:
    still = np.concatenate([np.linspace(0.0, 5.0, 100), np.full(100, 5.0)])  # ramp, then flat
    data = series_data(tmp_path, still, transform=transform)
    table = baselines.forecast_baselines(data, "test", refit_on_val=True, methods=("naive",))
    assert table.loc["naive", "mse"] == pytest.approx(0.0, abs=1e-12)
    assert table.loc["naive", "mae"] == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_allclose(data.naive("test"), 5.0, atol=1e-5)


def test_seasonal_naive_is_exact_on_a_pure_periodic_series(tmp_path: Path) -> None:
    # the window (8) is shorter than the season (12): the season is looked up in the series
    data = series_data(tmp_path, periodic(), season=12)
    np.testing.assert_allclose(
        baselines.seasonal_naive(data, "test"), data.truth("test"), atol=1e-9
    )
    table = baselines.forecast_baselines(data, "test", True, methods=("naive", "seasonal_naive"))
    assert table.loc["seasonal_naive", "mse"] < 1e-15 < table.loc["naive", "mse"]


def test_seasonal_naive_never_looks_past_the_forecast_origin(tmp_path: Path) -> None:
    # season 2, horizon 3: step 3 must come from two seasons back, not from step 1's truth
    values = np.arange(200, dtype=float)  # a ramp: any look-ahead would show as a smaller error
    data = series_data(tmp_path, values, season=2)
    forecast, truth = baselines.seasonal_naive(data, "test"), data.truth("test")
    expected = [[[2.0], [2.0], [4.0]]] * len(truth)  # truth went through float32 scaling
    np.testing.assert_allclose(truth - forecast, expected, atol=1e-4)


def test_ridge_autoregression_recovers_a_sinusoid_and_naive_mase_is_one_in_sample(
    tmp_path: Path,
) -> None:
    data = series_data(tmp_path, periodic(), season=12)
    table = baselines.forecast_baselines(data, "test", True, methods=("naive", "ridge_ar"))
    assert table.loc["ridge_ar", "mse"] < 1e-3 * table.loc["naive", "mse"]
    assert "chosen on validation" in table.loc["ridge_ar", "note"]
    in_sample = baselines.errors(
        data.naive("train"), data.truth("train"), baselines.naive_scale(data)
    )
    assert in_sample["mase"] == pytest.approx(1.0)


def test_without_a_season_the_seasonal_baseline_is_a_note_not_a_number(tmp_path: Path) -> None:
    data = series_data(tmp_path, periodic())
    table = baselines.forecast_baselines(data, "test", True, methods=FAST)
    assert list(table.index) == list(FAST)
    assert np.isnan(table.loc["seasonal_naive", "mse"])
    assert "season" in table.loc["seasonal_naive", "note"]
    assert np.isfinite(table.loc["naive", "mase"]) and np.isfinite(table.loc["ridge_ar", "mse"])


def test_the_level_lags_are_the_targets_last_window_values_before_each_forecast(
    tmp_path: Path,
) -> None:
    values = np.arange(200, dtype=float) * 3.0  # the value of row t is 3t
    data = series_data(tmp_path, values, transform="diff")  # the LSTM reads differences
    lags, known = baselines.level_lags(data, "test")
    first_target_row = np.flatnonzero(np.isclose(values, data.truth("test")[0, 0, 0]))[0]
    expected = values[first_target_row - 8 : first_target_row]  # window 8, oldest first
    np.testing.assert_allclose(lags[0], expected, atol=1e-3)
    assert known.all()
    _, train_known = baselines.level_lags(data, "train")
    assert not train_known.all() and train_known[-1]  # the first windows lack 8 known levels


def test_a_ridge_on_levels_forecasts_a_straight_line_whatever_the_lstms_transform(
    tmp_path: Path,
) -> None:
    line = 10.0 + 0.5 * np.arange(160)
    data = series_data(tmp_path, line, transform="diff", scaler="standard")
    forecast = baselines.ridge_levels(data, "test", refit_on_val=True)
    np.testing.assert_allclose(forecast, data.truth("test"), atol=0.05)  # by hand: next = +0.5
    table = baselines.forecast_baselines(data, "test", True, methods=("naive", "ridge_levels"))
    assert table.loc["ridge_levels", "mae"] < 0.05 < table.loc["naive", "mae"]


def test_the_mlp_on_the_lstms_windows_learns_a_periodic_series_better_than_naive(
    tmp_path: Path,
) -> None:
    data = series_data(tmp_path, periodic())
    table = baselines.forecast_baselines(data, "test", False, methods=("naive", "mlp"))
    assert table.loc["mlp", "mse"] < table.loc["naive", "mse"]
    again = baselines.forecast_baselines(data, "test", False, methods=("mlp",))  # seeded
    assert again.loc["mlp", "mse"] == table.loc["mlp", "mse"]


def ar1(n: int = 240, phi: float = 0.8, mean: float = 50.0, seed: int = 0) -> np.ndarray:
    """A stationary AR(1) around ``mean``: y_t - mean = phi (y_{t-1} - mean) + noise."""
    noise = np.random.default_rng(seed).normal(size=n)
    values = np.empty(n)
    values[0] = mean
    for t in range(1, n):
        values[t] = mean + phi * (values[t - 1] - mean) + noise[t]
    return values


def test_arima_forecasts_from_each_origin_as_its_fitted_equation_says() -> None:
    from statsmodels.tsa.arima.model import ARIMA

    levels = ar1()
    origins, fit_end = np.array([150, 151, 200, 238]), 150
    forecast = baselines.arima_forecasts(levels, (1, 0, 0), fit_end, origins, horizon=3)
    mean, phi, _ = ARIMA(levels[:fit_end], order=(1, 0, 0), trend="c").fit().params
    # by hand: h steps ahead of origin o, mean + phi^h (y_o - mean): later values never read
    steps = np.arange(1, 4)
    expected = mean + phi ** steps[None, :] * (levels[origins, None] - mean)
    np.testing.assert_allclose(forecast, expected, rtol=1e-6)
    assert 0.6 < phi < 0.95


def test_arima_differences_a_random_walk_and_not_a_stationary_series() -> None:
    walk = np.cumsum(np.random.default_rng(1).normal(size=150)) + 100
    assert baselines.arima_order(walk)[1] == 1
    assert baselines.arima_order(ar1(n=150))[1] == 0


def test_the_arima_baseline_is_scored_with_its_order_and_beats_naive_on_an_ar_series(
    tmp_path: Path,
) -> None:
    data = series_data(tmp_path, ar1(phi=0.5, n=200), transform="diff")
    table = baselines.forecast_baselines(data, "test", refit_on_val=False)
    assert table.loc["arima", "mae"] < table.loc["naive", "mae"]
    assert table.loc["arima", "note"].startswith("ARIMA(") and ", 0, " in table.loc["arima", "note"]
    refit = baselines.forecast_baselines(data, "test", refit_on_val=True)
    assert refit.loc["arima", "mae"] != table.loc["arima", "mae"]  # fitted on validation too


def test_arima_forecasts_for_every_origin_at_once_equal_statsmodels_one_at_a_time() -> None:
    from statsmodels.tsa.arima.model import ARIMA

    walk = np.cumsum(np.random.default_rng(2).normal(size=260)) + 5 * np.sin(np.arange(260) / 4)
    origins, fit_end, order = np.arange(200, 250, 7), 200, (2, 1, 1)
    forecast = baselines.arima_forecasts(walk, order, fit_end, origins, horizon=4)
    fitted = ARIMA(walk[:fit_end], order=order, trend="n").fit().apply(walk)
    one_at_a_time = [fitted.predict(start=o + 1, end=o + 4, dynamic=True) for o in origins]
    np.testing.assert_allclose(forecast, np.stack(one_at_a_time), rtol=1e-9)
