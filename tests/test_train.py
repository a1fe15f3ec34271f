"""The training loop on tiny data: determinism, best weights, stopping, callbacks, and that the
diagnostics observe without changing the training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lstm_sweep import diagnostics as dg
from lstm_sweep import metrics as m
from lstm_sweep.config import Config, load_config
from lstm_sweep.tasks import Task, TaskCache
from lstm_sweep.train import (
    Callback,
    History,
    Shifted,
    Stop,
    StopWhen,
    build_model,
    fit,
    fixed_subsample,
    predict,
    scores,
)
from tests.helpers import write_series, write_sweep


def train(cfg: Config, task: Task, callbacks=(), **values: object):
    cfg = cfg.with_values(values)
    model = build_model(task, cfg)
    return model, fit(model, task, cfg, callbacks)


def test_same_seed_gives_the_same_numbers_twice(tiny_cfg: Config, tiny_task: Task) -> None:
    _, first = train(tiny_cfg, tiny_task, **{"model.dropout": 0.2, "model.num_layers": 2})
    _, second = train(tiny_cfg, tiny_task, **{"model.dropout": 0.2, "model.num_layers": 2})
    assert first.rows == second.rows
    _, other = train(tiny_cfg, tiny_task, **{"train.seed": 1})
    assert other.rows[0][m.VAL_LOSS] != first.rows[0][m.VAL_LOSS]


NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@NEEDS_CUDA
def test_on_a_gpu_the_same_seed_gives_the_same_numbers_twice(
    tiny_cfg: Config, tiny_task: Task
) -> None:
    setting = {"train.device": "cuda", "model.dropout": 0.2, "model.num_layers": 2}
    model, first = train(tiny_cfg, tiny_task, **setting, **{"diagnostics.level": "full"})
    _, second = train(tiny_cfg, tiny_task, **setting, **{"diagnostics.level": "full"})
    assert next(model.parameters()).device.type == "cuda"
    assert first.rows == second.rows and torch.backends.cudnn.deterministic


@pytest.mark.parametrize("layers", [1, 2])
def test_diagnostics_observe_without_changing_the_training(
    tiny_cfg: Config, tiny_task: Task, layers: int
) -> None:
    """Every diagnostics level trains the very same model: the same losses, the same weights."""
    common = {"model.num_layers": layers, "model.dropout": 0.3, "model.head_dropout": 0.2}
    results = {
        level: train(tiny_cfg, tiny_task, **common, **{"diagnostics.level": level})
        for level in ("off", "basic", "full")
    }
    losses = {level: h.column(m.VAL_LOSS) for level, (_, h) in results.items()}
    assert losses["off"] == losses["basic"] == losses["full"]
    weights = {level: model.state_dict() for level, (model, _) in results.items()}
    for name, value in weights["off"].items():
        assert torch.equal(value, weights["full"][name]), name


def test_best_weights_are_restored_and_are_the_trial_value(
    tiny_cfg: Config, tiny_task: Task
) -> None:
    model, history = train(
        tiny_cfg, tiny_task, **{"train.max_epochs": 6, "train.learning_rate": 0.05}
    )
    data = tiny_task.data
    restored = scores(tiny_task, "val", predict(model, data.val.x), data.val.y)[m.VAL_LOSS]
    assert restored == pytest.approx(history.best_value, rel=1e-5)
    assert history.best_value == min(history.column(m.VAL_LOSS))


def test_the_honest_training_loss_scores_as_many_windows_as_validation_holds(
    tiny_cfg: Config, tiny_task: Task
) -> None:
    data = tiny_task.data
    assert len(data.val.x) < len(data.train.x)
    cfg = tiny_cfg.with_values(
        {"train.max_epochs": 1, "diagnostics.level": "basic", "diagnostics.eval_subsample": 10**6}
    )
    model, history = train(cfg, tiny_task)
    index = fixed_subsample(len(data.train.x), len(data.val.x), cfg.train.seed + 1)
    on_subsample = scores(
        tiny_task, "train", predict(model, data.train.x[index]), data.train.y[index]
    )
    everything = scores(tiny_task, "train", predict(model, data.train.x), data.train.y)
    assert history.rows[0][m.TRAIN_EVAL_LOSS] == pytest.approx(on_subsample[m.TRAIN_EVAL_LOSS])
    assert history.rows[0][m.TRAIN_EVAL_LOSS] != pytest.approx(everything[m.TRAIN_EVAL_LOSS])


def test_patience_stops_after_that_many_epochs_without_improvement(
    tiny_cfg: Config, tiny_task: Task
) -> None:
    _, history = train(
        tiny_cfg,
        tiny_task,
        **{"train.max_epochs": 200, "train.patience": 2, "train.learning_rate": 0.03},
    )
    assert history.stop is Stop.PATIENCE
    assert history.epochs_trained == history.best_epoch + 3


class Recorder(Callback):
    """Sees the whole fit and asks to stop after two epochs."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def on_fit_start(self, model: torch.nn.Module, history: History) -> None:
        self.events.append(f"start {len(history.rows)}")

    def on_epoch_end(self, epoch: int, row: dict[str, float], history: History) -> Stop | None:
        self.events.append(f"epoch {epoch} {len(history.rows)}")
        return Stop.PRUNED if epoch == 1 else None

    def on_fit_end(self, model: torch.nn.Module, history: History) -> None:
        self.events.append(f"end {history.stop.value}")


def test_callbacks_see_the_whole_fit_and_can_stop_it_with_a_typed_reason(
    tiny_cfg: Config, tiny_task: Task
) -> None:
    recorder, silent = Recorder(), Callback()
    _, history = train(tiny_cfg, tiny_task, [silent, recorder])
    assert recorder.events == ["start 0", "epoch 0 1", "epoch 1 2", "end pruned"]
    assert (history.epochs_trained, history.stop) == (2, Stop.PRUNED)
    assert history.stop.cut_short
    # a later fold's callbacks see its whole fit too, its epochs after the earlier folds'
    later = Recorder()
    _, history = train(tiny_cfg, tiny_task, [Shifted(later, 10)], **{"train.max_epochs": 2})
    assert later.events == ["start 0", "epoch 10 1", "epoch 11 2", f"end {history.stop.value}"]


def test_a_stop_request_ends_after_the_current_epoch(tiny_cfg: Config, tiny_task: Task) -> None:
    asked = iter([False, True])
    _, history = train(tiny_cfg, tiny_task, [StopWhen(lambda: next(asked))])
    assert (history.epochs_trained, history.stop) == (2, Stop.INTERRUPTED)


def test_every_level_logs_its_metrics(tiny_cfg: Config, tiny_task: Task) -> None:
    off = train(tiny_cfg, tiny_task, **{"diagnostics.level": "off"})[1].rows[-1]
    basic = train(tiny_cfg, tiny_task, **{"diagnostics.level": "basic"})[1].rows[-1]
    full = train(tiny_cfg, tiny_task, **{"diagnostics.level": "full", "model.num_layers": 2})[1]
    assert set(off) == {m.TRAIN_LOSS, m.VAL_LOSS, m.VAL_NMSE}
    expected = {m.TRAIN_EVAL_LOSS, m.GAP, m.GAP_RATIO, m.GRAD_NORM_MAX, m.CLIP_FRACTION}
    assert expected <= set(basic)
    last = full.rows[-1]
    wanted = {
        m.grad_norm("lstm_recurrent"),
        m.weight_stat("head", "norm"),
        m.hidden_stat("dead", 1),
    }
    assert wanted <= set(last)
    assert set(full.snapshots) == {"first", "best", "last"}
    assert full.snapshots["last"][0] == full.epochs_trained - 1


def test_val_nmse_is_the_mse_in_original_units_over_the_naive_forecasts(
    tiny_task: Task,
) -> None:
    data = tiny_task.data
    truth = data.to_original(data.val.y.numpy(), data.val)
    naive = data.to_original(data.naive_forecast(data.val).numpy(), data.val)
    noisy = data.val.y + 0.1
    prediction = data.to_original(noisy.numpy(), data.val)
    expected = ((prediction - truth) ** 2).mean() / ((naive - truth) ** 2).mean()
    assert tiny_task.epoch_scores("val", noisy, data.val.y)[m.VAL_NMSE] == pytest.approx(
        expected, rel=1e-5
    )
    naive_score = tiny_task.epoch_scores("val", data.naive_forecast(data.val), data.val.y)
    assert naive_score[m.VAL_NMSE] == pytest.approx(1.0, abs=1e-4)


def series_task(tmp_path: Path, values: np.ndarray, **sections: dict) -> tuple[Config, Task]:
    csv = write_series(tmp_path / "series.csv", values)
    cfg = load_config(write_sweep(tmp_path / "sweep.yaml", csv, **sections))
    return cfg, TaskCache().get(cfg)


def test_a_big_unregularised_model_on_a_tiny_noisy_series_is_called_overfitting(
    tmp_path: Path,
) -> None:
    noise = np.random.default_rng(0).normal(size=160)
    cfg, task = series_task(
        tmp_path,
        noise,
        data={"window": 12, "split": [0.5, 0.25, 0.25]},
        model={"hidden_size": 64},
        train={"max_epochs": 60, "patience": 60, "learning_rate": 0.02, "batch_size": 32},
        diagnostics={"level": "basic"},
    )
    _, history = train(cfg, task)
    verdict = dg.judge(history.rows, task.naive_val_loss, cfg.diagnostics.verdict)
    assert verdict.verdict == "overfitting", verdict.reason
    assert verdict.onset_epoch is not None and verdict.onset_epoch < history.epochs_trained - 1
    # the eval-mode gap opened after the onset (at lr 0.02 its epoch-to-epoch path depends on
    # the CPU's float kernels, so no single epoch is asserted)
    assert max(r[m.GAP_RATIO] for r in history.rows[verdict.onset_epoch :]) > 1.5


def test_a_learning_rate_that_blows_up_is_called_unstable(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    cfg, task = series_task(
        tmp_path,
        np.sin(np.arange(300) / 4) + rng.normal(0, 0.1, 300),
        train={"learning_rate": 1e4, "max_epochs": 20, "grad_clip": 0.0, "optimizer": "adam"},
        diagnostics={"level": "basic", "verdict": {"explode_grad_norm": 1e3}},
    )
    _, history = train(cfg, task)
    assert history.stop is Stop.UNSTABLE
    verdict = dg.judge(
        history.rows, task.naive_val_loss, cfg.diagnostics.verdict, history.unstable_reason
    )
    assert verdict.verdict == "unstable"
    assert "epoch" in verdict.reason


def test_a_tiny_network_on_a_smooth_random_walk_is_called_underfitting(tmp_path: Path) -> None:
    walk = np.cumsum(np.random.default_rng(2).normal(size=400))
    cfg, task = series_task(
        tmp_path,
        walk,
        model={"hidden_size": 1},
        train={"max_epochs": 3, "learning_rate": 1e-4},
        diagnostics={"level": "basic"},
    )
    _, history = train(cfg, task)
    verdict = dg.judge(history.rows, task.naive_val_loss, cfg.diagnostics.verdict)
    assert verdict.verdict == "underfitting", verdict.reason
