"""The training loop on tiny data: determinism, best weights, stopping, and known verdicts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lstm_sweep import diagnostics as dg
from lstm_sweep.config import Config, load_config
from lstm_sweep.data import ForecastData, load_forecast_data
from lstm_sweep.train import build_model, evaluate, fit, naive_loss
from tests.conftest import QUICK, TINY, write_series, write_sweep


@pytest.fixture(scope="module")
def co2() -> tuple[Config, ForecastData]:
    cfg = load_config(QUICK, TINY)
    return cfg, load_forecast_data(cfg.data)


def train(cfg: Config, data: ForecastData, **values: object):
    cfg = cfg.with_values(values)
    model = build_model(data, cfg)
    return model, fit(model, data, cfg)


def test_same_seed_gives_the_same_numbers_twice(co2) -> None:
    cfg, data = co2
    _, first = train(cfg, data, **{"model.dropout": 0.2, "model.num_layers": 2})
    _, second = train(cfg, data, **{"model.dropout": 0.2, "model.num_layers": 2})
    assert first.rows == second.rows
    _, other = train(cfg, data, **{"train.seed": 1})
    assert other.rows[0][dg.VAL_LOSS] != first.rows[0][dg.VAL_LOSS]


def test_best_weights_are_restored_and_are_the_trial_value(co2) -> None:
    cfg, data = co2
    model, history = train(cfg, data, **{"train.max_epochs": 6, "train.learning_rate": 0.05})
    restored = evaluate(model, data, "val", data.val.x, data.val.y)[dg.VAL_LOSS]
    assert restored == pytest.approx(history.best_val_loss, rel=1e-5)
    assert history.best_val_loss == min(history.column(dg.VAL_LOSS))


def test_patience_stops_after_that_many_epochs_without_improvement(co2) -> None:
    cfg, data = co2
    _, history = train(
        cfg, data, **{"train.max_epochs": 200, "train.patience": 2, "train.learning_rate": 0.03}
    )
    assert history.stop_reason == "patience"
    assert history.epochs_trained == history.best_epoch + 3


def test_a_callback_can_stop_training(co2) -> None:
    cfg, data = co2

    class StopAtTwo:
        def on_epoch_end(self, epoch: int, row: dict[str, float]) -> str | None:
            return "pruned" if epoch == 1 else None

    model = build_model(data, cfg)
    history = fit(model, data, cfg, [StopAtTwo()])
    assert (history.epochs_trained, history.stop_reason) == (2, "pruned")


def test_every_level_logs_its_metrics(co2) -> None:
    cfg, data = co2
    off = train(cfg, data, **{"diagnostics.level": "off"})[1].rows[-1]
    basic = train(cfg, data, **{"diagnostics.level": "basic"})[1].rows[-1]
    full = train(cfg, data, **{"diagnostics.level": "full", "model.num_layers": 2})[1]
    assert set(off) == {dg.TRAIN_LOSS, dg.VAL_LOSS}
    assert {dg.TRAIN_EVAL_LOSS, dg.GAP, dg.GAP_RATIO, dg.GRAD_NORM_MAX, dg.CLIP_FRACTION} <= set(
        basic
    )
    last = full.rows[-1]
    assert {"grad_norm_lstm_recurrent", "weight_head_q95", "hidden_dead_l1"} <= set(last)
    assert set(full.weights) == {"first", "best", "last"}


def sweep_on(tmp_path: Path, values: np.ndarray, **sections: dict) -> tuple[Config, ForecastData]:
    csv = write_series(tmp_path / "series.csv", values)
    cfg = load_config(write_sweep(tmp_path / "sweep.yaml", csv, **sections))
    return cfg, load_forecast_data(cfg.data)


def test_a_big_unregularised_model_on_a_tiny_noisy_series_is_called_overfitting(
    tmp_path: Path,
) -> None:
    noise = np.random.default_rng(0).normal(size=160)
    cfg, data = sweep_on(
        tmp_path,
        noise,
        data={"window": 12, "split": [0.5, 0.25, 0.25]},
        model={"hidden_size": 64},
        train={"max_epochs": 120, "patience": 120, "learning_rate": 0.01, "batch_size": 16},
        diagnostics={"level": "basic"},
    )
    model, history = train(cfg, data)
    verdict = dg.judge(history.rows, naive_loss(data), cfg.diagnostics.verdict)
    assert verdict.verdict == "overfitting", verdict.reason
    assert verdict.onset_epoch is not None and verdict.onset_epoch < history.epochs_trained - 1
    assert history.rows[-1][dg.GAP_RATIO] > 1.5


def test_a_learning_rate_that_blows_up_is_called_unstable(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    cfg, data = sweep_on(
        tmp_path,
        np.sin(np.arange(300) / 4) + rng.normal(0, 0.1, 300),
        train={"learning_rate": 1e4, "max_epochs": 20, "grad_clip": 0.0, "optimizer": "adam"},
        diagnostics={"level": "basic", "verdict": {"explode_grad_norm": 1e3}},
    )
    _, history = train(cfg, data)
    assert history.stop_reason == "unstable"
    verdict = dg.judge(
        history.rows, naive_loss(data), cfg.diagnostics.verdict, history.unstable_reason
    )
    assert verdict.verdict == "unstable"
    assert "epoch" in verdict.reason


def test_a_tiny_network_on_a_smooth_random_walk_is_called_underfitting(tmp_path: Path) -> None:
    walk = np.cumsum(np.random.default_rng(2).normal(size=400))
    cfg, data = sweep_on(
        tmp_path,
        walk,
        model={"hidden_size": 1},
        train={"max_epochs": 3, "learning_rate": 1e-4},
        diagnostics={"level": "basic"},
    )
    _, history = train(cfg, data)
    verdict = dg.judge(history.rows, naive_loss(data), cfg.diagnostics.verdict)
    assert verdict.verdict == "underfitting", verdict.reason


def test_naive_loss_is_zero_on_a_constant_series(tmp_path: Path) -> None:
    cfg, data = sweep_on(tmp_path, np.full(100, 7.0), data={"scaler": "none"})
    assert naive_loss(data, "test") == 0.0
    assert torch.equal(data.naive_forecast(data.test), data.test.y)
