"""From a finished study to one recommended setting and one registered model.

The luckiest trial is not the answer: the top-k settings are trained again with several seeds
(nested MLflow runs tagged ``reevaluation``), the one with the best *mean* validation loss is
recommended, and the report says which others are within noise of it. The recommendation is then
trained once more on training plus validation windows for the epoch count selection found,
scored once on the test part, logged and registered. Selection never reads a test number.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml

from lstm_sweep import artifacts, baselines
from lstm_sweep import diagnostics as dg
from lstm_sweep.config import Config
from lstm_sweep.tracking import (
    ROLE_TAG,
    STUDY_TAG,
    TRIAL_TAG,
    EpochLogger,
    Tracker,
    flatten,
    trial_run_name,
)
from lstm_sweep.train import History, TrainingData, build_model, evaluate, fit, naive_loss, predict

TEST_LOSS = "test_loss"  # the training loss on the test part, in the units of val_loss
SEED_TAG = "lstm_sweep.seed"


@dataclass(frozen=True)
class Setting:
    """One searched setting, as the trial that found it left it."""

    number: int  # the trial's number
    values: dict[str, Any]  # dotted config key -> value
    value: float  # the trial's value: its monitored metric (train.monitor) at its best epoch
    best_epoch: int


@dataclass
class Reevaluation:
    runs: pd.DataFrame  # one row per (setting, seed): number, seed, run_id, val_loss, ...
    histories: dict[tuple[int, int], History]  # (trial number, seed) -> its training history
    verdicts: dict[tuple[int, int], dg.Verdict]  # (trial number, seed) -> its verdict
    worst: list[pd.DataFrame]  # each run's worst validation windows (diagnostics.worst_windows)


@dataclass(frozen=True)
class Recommendation:
    setting: Setting
    spread: pd.DataFrame  # one row per setting: number, val/test mean and std, within_noise
    epochs: int  # epochs for the final training: median over seeds of best_epoch + 1
    within_noise: list[int]  # trial numbers of other settings within noise of the winner


@dataclass(frozen=True)
class FinalModel:
    run_id: str
    model_uri: str  # models:/name/version
    epochs: int
    test_loss: float  # the training loss on the test part, comparable to val_loss
    test_value: float  # the monitored metric on the test part, comparable to trial values
    errors: dict[str, float]  # the task's test metrics (baselines.model_errors)
    history: History


def top_settings(table: pd.DataFrame, keys: list[str], k: int, direction: str) -> list[Setting]:
    """The k best distinct settings among completed trials of a comparison table."""
    done = table[table["state"] == "COMPLETE"].sort_values(
        "value", ascending=direction == "minimize"
    )
    settings: list[Setting] = []
    seen: set[tuple[Any, ...]] = set()
    for _, row in done.iterrows():
        values = {key: plain(row[key]) for key in keys}
        signature = tuple(values.values())
        if signature in seen:  # a retried trial repeats its settings
            continue
        seen.add(signature)
        settings.append(
            Setting(int(row["number"]), values, float(row["value"]), int(row[dg.BEST_EPOCH]))
        )
        if len(settings) == k:
            break
    return settings


def plain(value: Any) -> Any:
    """A NumPy scalar from a DataFrame cell as the Python value YAML and configs expect."""
    return value.item() if hasattr(value, "item") else value


def reevaluate(
    cfg: Config,
    data: TrainingData,
    tracker: Tracker,
    parent_id: str,
    settings: list[Setting],
    seeds: int,
) -> Reevaluation:
    """Train every setting with seeds train.seed, train.seed + 1, ...: one nested run each.

    Seed train.seed repeats the trial itself. Test loss is recorded for the report's spread
    table, and read by nobody that chooses.
    """
    naive_val = naive_loss(data, "val")
    rows, histories, verdicts, worst = [], {}, {}, []
    for setting in settings:
        for seed in range(cfg.train.seed, cfg.train.seed + seeds):
            run_cfg = cfg.with_values({**setting.values, "train.seed": seed})
            name = trial_run_name(setting.number, setting.values).replace("trial", "reeval", 1)
            run_id = tracker.start_child(
                parent_id,
                f"{name} seed={seed}",
                tags={
                    ROLE_TAG: "reevaluation",
                    STUDY_TAG: cfg.study_name,
                    TRIAL_TAG: str(setting.number),
                    SEED_TAG: str(seed),
                },
                params=flatten(run_cfg.model_dump(mode="json")),
            )
            logger = EpochLogger(tracker, run_id, cfg.tracking.flush_seconds)
            model = build_model(data, run_cfg)
            history = fit(model, data, run_cfg, [logger])
            logger.flush()
            verdict = dg.judge(
                history.rows, naive_val, cfg.diagnostics.verdict, history.unstable_reason
            )
            test = test_scores(model, data)
            metrics = {
                dg.BEST_VAL_LOSS: history.best_val_loss,
                dg.BEST_EPOCH: history.best_epoch,
                dg.EPOCHS_TRAINED: history.epochs_trained,
                **test,
            }
            tracker.log_summary(run_id, metrics)
            state = "COMPLETE" if history.best_epoch >= 0 else "FAIL"
            tracker.finish(
                run_id, state, {"verdict": verdict.verdict, "verdict_reason": verdict.reason}
            )
            best = history.rows[history.best_epoch] if history.best_epoch >= 0 else {}
            rows.append(
                {
                    "number": setting.number,
                    "seed": seed,
                    "run_id": run_id,
                    "val_loss": history.best_val_loss,
                    **test,
                    **{k: v for k, v in best.items() if k.startswith("val_")},
                    dg.BEST_EPOCH: history.best_epoch,
                    "verdict": verdict.verdict,
                }
            )
            histories[(setting.number, seed)] = history
            verdicts[(setting.number, seed)] = verdict
            worst.append(artifacts.worst_val_samples(model, data, cfg.diagnostics.k_worst))
    return Reevaluation(pd.DataFrame(rows), histories, verdicts, worst)


def test_scores(model: torch.nn.Module, data: TrainingData) -> dict[str, float]:
    """The loss and the task's scores on the test part (test_loss, test_accuracy, ...)."""
    return evaluate(model, data, "test", data.test.x, data.test.y)


def recommend(
    settings: list[Setting], runs: pd.DataFrame, direction: str, monitor: str = dg.VAL_LOSS
) -> Recommendation:
    """The setting with the best mean of the monitored validation metric over seeds, and the
    settings within noise of it: their mean differs from the winner's by less than the two
    standard deviations added (with one seed there is no spread, so nothing is within noise)."""
    grouped = runs.groupby("number")
    test_key = monitor.replace("val_", "test_", 1)
    spread = pd.DataFrame(
        {
            "val_mean": grouped[monitor].mean(),
            "val_std": grouped[monitor].std(),
            "test_mean": grouped[test_key].mean(),
            "test_std": grouped[test_key].std(),
            "epochs": grouped[dg.BEST_EPOCH].apply(lambda e: int(statistics.median(e + 1))),
        }
    )
    spread = spread.sort_values("val_mean", ascending=direction == "minimize")
    winner = int(spread.index[0])
    noise = spread["val_std"].fillna(0.0)
    distance = (spread["val_mean"] - spread.loc[winner, "val_mean"]).abs()
    within = distance < noise + noise.loc[winner]
    spread["within_noise"] = within & (spread.index != winner)
    by_number = {s.number: s for s in settings}
    return Recommendation(
        setting=by_number[winner],
        spread=spread.reset_index(),
        epochs=max(1, int(spread.loc[winner, "epochs"])),
        within_noise=[int(n) for n in spread.index[spread["within_noise"]]],
    )


def with_validation_in_training(data: TrainingData) -> TrainingData:
    """Training samples extended by the validation samples; the test part is untouched."""

    def join(first: Any, second: Any) -> Any:
        if isinstance(first, torch.Tensor):
            return torch.cat([first, second])
        return np.concatenate([first, second])

    train, val = data.train, data.val
    joined = {f.name: join(getattr(train, f.name), getattr(val, f.name)) for f in fields(train)}
    return replace(data, train=replace(train, **joined))  # type: ignore[arg-type]


def train_final(
    cfg: Config,
    data: TrainingData,
    tracker: Tracker,
    parent_id: str,
    recommendation: Recommendation,
    folder: Path,
) -> FinalModel:
    """Train the recommendation on train + validation for ``recommendation.epochs`` epochs,
    score it once on the test windows, log it with its scaler and data config, register it."""
    setting, epochs = recommendation.setting, recommendation.epochs
    run_cfg = cfg.with_values(
        {**setting.values, "train.max_epochs": epochs, "train.patience": epochs}
    )
    run_id = tracker.start_child(
        parent_id,
        trial_run_name(setting.number, setting.values).replace("trial", "final", 1),
        tags={
            ROLE_TAG: "final",
            STUDY_TAG: cfg.study_name,
            TRIAL_TAG: str(setting.number),
            "val_loss_note": "validation windows are part of this run's training data",
        },
        params=flatten(run_cfg.model_dump(mode="json")),
    )
    try:
        final_data = with_validation_in_training(data)
        model = build_model(final_data, run_cfg)
        logger = EpochLogger(tracker, run_id, cfg.tracking.flush_seconds)
        history = fit(model, final_data, run_cfg, [logger], restore_best=False)
        logger.flush()
        model = model.cpu().eval()
        test = test_scores(model, data)
        errors = baselines.model_errors(data, predict(model, data.test.x).numpy())
        tracker.log_summary(
            run_id,
            {
                **test,
                dg.EPOCHS_TRAINED: len(history.rows),
                **{f"test_{k}": v for k, v in errors.items()},
            },
        )
        example = data.train.x[:5].numpy()
        model_uri = tracker.log_model(
            run_id,
            model,
            example,
            predict(model, data.train.x[:5]).numpy(),
            write_model_files(cfg, data, folder),
            cfg.report.model_name or cfg.study_name,
        )
    except BaseException as exc:
        tracker.finish(run_id, "FAIL", {"failure_reason": f"{type(exc).__name__}: {exc}"[:500]})
        raise
    tracker.finish(run_id, "COMPLETE", {"model_uri": model_uri})
    test_value = test[cfg.train.monitor.replace("val_", "test_", 1)]
    return FinalModel(run_id, model_uri, epochs, test[TEST_LOSS], test_value, errors, history)


def write_model_files(cfg: Config, data: TrainingData, folder: Path) -> list[Path]:
    """What predict needs besides the weights to turn a CSV into forecasts: the scaler fitted
    on the training rows, and the data section of the config (columns, window, transform)."""
    folder.mkdir(parents=True, exist_ok=True)
    scaler = folder / "scaler.json"
    scaler.write_text(json.dumps({**data.scaler.to_dict(), "inputs": data.inputs}))
    data_config = folder / "data_config.yaml"
    data_config.write_text(yaml.safe_dump(cfg.data.model_dump(mode="json"), sort_keys=False))
    return [scaler, data_config]


def optimism(final: FinalModel, recommendation: Recommendation) -> dict[str, float]:
    """How much worse the test part is than what selection saw: test minus validation loss."""
    winner = recommendation.spread.iloc[0]
    return {
        "optimism_vs_trial": final.test_value - recommendation.setting.value,
        "optimism_vs_seed_mean": final.test_value - float(winner["val_mean"]),
        "seed_test_minus_val": float(winner["test_mean"] - winner["val_mean"]),
    }
