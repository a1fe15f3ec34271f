"""One setting trained inside the MLflow run that holds it: build, fit, judge, record.

Trials and seed re-evaluations both go through :func:`train_in_run`, so every run of a setting
records the same numbers, tags and files the same way; the run itself is opened and closed by
``Tracker.child_run``.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lstm_sweep import diagnostics as dg
from lstm_sweep import metrics as m
from lstm_sweep import plots
from lstm_sweep.config import Config, flatten
from lstm_sweep.data import describe
from lstm_sweep.evidence import evidence_for
from lstm_sweep.model import LSTMNet
from lstm_sweep.tasks import Task
from lstm_sweep.tracking import RunRecorder, Tracker, run_name
from lstm_sweep.train import (
    Callback,
    History,
    Interrupted,
    Shifted,
    Stop,
    build_model,
    fit,
    predict,
)

RUN_KINDS = {m.ROLE_TRIAL: "trial", m.ROLE_REEVALUATION: "reeval", m.ROLE_FINAL: "final"}


@dataclass(frozen=True)
class Outcome:
    """What a trained setting left behind, beside its run."""

    model: LSTMNet  # holding its best epoch's weights
    history: History
    verdict: dg.Verdict
    state: str  # COMPLETE, or PRUNED (pruned or unstable)
    val_output: np.ndarray  # the best weights' validation output, model space
    value: float  # the setting's value: its best value, or with folds their mean (NaN if cut)


def summary_metrics(
    history: History, verdict: dg.Verdict, task: Task, val_output: np.ndarray
) -> dict[str, float]:
    """A run's single-value metrics: its best epoch, what it cost, the verdict's numbers."""
    metrics = {
        m.BEST_VAL_LOSS: history.best_row.get(m.VAL_LOSS, float("nan")),
        m.BEST_EPOCH: history.best_epoch,
        m.EPOCHS_TRAINED: history.epochs_trained,
        m.NAIVE_VAL_LOSS: task.naive_val_loss,
        m.OVERFIT_SCORE: verdict.score,
        m.TRAIN_SECONDS: history.seconds,
    }
    if verdict.onset_epoch is not None:
        metrics[m.OVERFIT_ONSET] = verdict.onset_epoch
    if history.best_epoch >= 0:
        best = history.best_row
        metrics |= {m.best(k): best[k] for k in m.AT_BEST_EPOCH if k in best}
        metrics |= task.best_epoch_errors(val_output)
    return metrics


def save_weights(model: torch.nn.Module, folder: Path) -> Path:
    path = folder / m.WEIGHTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, path)
    return path


def load_weights(model: torch.nn.Module, path: Path) -> torch.nn.Module:
    """Best weights a run saved, into a model built from the same setting."""
    model.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
    return model.eval()


WEIGHT_VALUES = "weight_values.npz"  # each group's values at the first, best and last epoch


def write_files(folder: Path, task: Task, outcome: Outcome, k_worst: int, draw: bool) -> None:
    """A run's diagnostics files: the worst validation samples and the weight snapshots (raw,
    cheap), and with ``draw`` the pictures of its curves, weights and predictions."""
    diagnostics = folder / m.DIAGNOSTICS_DIR
    diagnostics.mkdir(parents=True, exist_ok=True)
    history = outcome.history
    evidence_for(task).worst_samples(outcome.val_output, k_worst).to_csv(
        diagnostics / m.WORST_SAMPLES, index=False
    )
    snapshots = {
        moment: {group: values.numpy() for group, values in groups.items()}
        for moment, (_, groups) in history.snapshots.items()
    }
    if snapshots:
        arrays: dict[str, Any] = {
            f"{moment}__{g}": v for moment, groups in snapshots.items() for g, v in groups.items()
        }
        np.savez_compressed(diagnostics / WEIGHT_VALUES, **arrays)
    if draw:
        draw_pictures(
            diagnostics,
            task,
            history.rows,
            history.best_epoch,
            outcome.verdict.onset_epoch,
            snapshots,
            outcome.val_output,
        )


def read_snapshots(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """The weight snapshots :func:`write_files` saved: moment -> group -> values."""
    snapshots: dict[str, dict[str, np.ndarray]] = {}
    with np.load(path) as arrays:
        for name in arrays.files:
            moment, group = name.split("__", 1)
            snapshots.setdefault(moment, {})[group] = arrays[name]
    return snapshots


def draw_pictures(
    folder: Path,
    task: Task,
    rows: list[dict[str, float]],
    best_epoch: int,
    onset: int | None,
    snapshots: dict[str, dict[str, np.ndarray]],
    val_output: np.ndarray,
) -> None:
    """A run's pictures: loss curves, weight histograms, predictions on validation. Drawn only
    where someone will look (the top settings and their re-evaluations): they cost more than a
    small model's whole training."""
    plots.loss_curves(rows, best_epoch, onset, folder / "loss_curves.png")
    if snapshots:
        plots.weight_histograms(snapshots, folder / "weight_histograms.png")
    evidence_for(task).prediction_figure(val_output, "val", folder / "val_predictions.png")


def setting_run(
    tracker: Tracker,
    parent_id: str,
    role: str,
    cfg: Config,
    task: Task,
    number: int,
    values: dict[str, Any],
    tags: dict[str, Any] | None = None,
    suffix: str = "",
) -> AbstractContextManager[RunRecorder]:
    """The nested run of one setting (the trial ``number`` found it) in any role, opened with
    what every such run records: its name, role, study, trial, worker, the config it trains
    with (``cfg``, the setting's values in) and its dataset."""
    all_tags = {
        m.ROLE_TAG: role,
        m.STUDY_TAG: cfg.study_name,
        m.TRIAL_TAG: number,
        m.WORKER_TAG: m.this_process(),
        **(tags or {}),
    }
    return tracker.child_run(
        parent_id,
        run_name(RUN_KINDS[role], number, values) + suffix,
        all_tags,
        flatten(cfg.model_dump(mode="json")),
        cfg.tracking.flush_seconds,
        describe(cfg.data.path, task.data),
        cfg.tracking.system_metrics_seconds,
    )


def draw_recorded(tracker: Tracker, run_id: str, task: Task, model: torch.nn.Module) -> None:
    """The pictures of a run that left them undrawn (a trial, which draws nothing while the
    search runs): its curves from its metrics, its weights from its snapshots, its predictions
    from ``model``, its best weights."""
    rows = tracker.metric_history(run_id, [m.TRAIN_LOSS, m.TRAIN_EVAL_LOSS, m.VAL_LOSS])
    metrics = tracker.run_metrics(run_id)
    onset = metrics.get(m.OVERFIT_ONSET)
    with tracker.downloaded(run_id, f"{m.DIAGNOSTICS_DIR}/{WEIGHT_VALUES}") as local:
        snapshots = read_snapshots(local) if local is not None else {}
    val_output = predict(model, task.data.val.x).cpu().numpy()
    with tempfile.TemporaryDirectory(prefix="lstm_sweep_") as tmp:
        best = int(metrics.get(m.BEST_EPOCH, -1))
        onset_epoch = None if onset is None else int(onset)
        draw_pictures(Path(tmp), task, rows, best, onset_epoch, snapshots, val_output)
        tracker.log_artifacts(run_id, Path(tmp), m.DIAGNOSTICS_DIR)


class FoldRecorder(Callback):
    """An earlier fold's curves in its setting's run, each under ``fold<k>/`` (the losses and
    the monitored metric), at the fold's own epochs: they compare across trials in the UI."""

    def __init__(self, run: RunRecorder, number: int, monitor: str) -> None:
        self.run, self.number, self.keys = run, number, {*m.FOLD_CURVES, monitor}

    def on_epoch_end(self, epoch: int, row: dict[str, float], history: History) -> Stop | None:
        self.run.log_step(
            epoch, {m.fold(self.number, k): v for k, v in row.items() if k in self.keys}
        )
        return None


CUT_SHORT = (Stop.PRUNED, Stop.UNSTABLE)


def judged(cfg: Config, task: Task, history: History) -> dg.Verdict:
    """The verdict on a finished training of ``task``'s data."""
    cut_short = "pruned" if history.stop is Stop.PRUNED else None
    return dg.judge(
        history.rows,
        task.naive_val_loss,
        cfg.diagnostics.verdict,
        history.unstable_reason,
        cut_short,
    )


def close(run: RunRecorder, state: str, verdict: dg.Verdict, stop: Stop) -> None:
    """End a setting's run as ``state``, with its verdict and why training stopped."""
    run.end_as(
        state,
        {
            m.VERDICT_TAG: verdict.verdict,
            m.VERDICT_REASON_TAG: verdict.reason,
            m.STOP_REASON_TAG: stop.value,
        },
    )


def fold_summary(earlier: list[float], monitor: str, last: float | None) -> dict[str, float]:
    """The earlier folds' best values and, once the last fold has one (``last``), the mean
    over every fold: the setting's value."""
    summary = {m.fold(number, m.best(monitor)): value for number, value in enumerate(earlier)}
    if last is not None:
        summary[m.FOLDS_MEAN] = float(np.mean([*earlier, last]))
    return summary


def trained(
    cfg: Config, task: Task, recorder: Callback, callbacks: Sequence[Callback], offset: int
) -> tuple[LSTMNet, History]:
    """A fresh model of the setting fitted on ``task``, ``recorder`` told its epochs and the
    ``callbacks`` told them ``offset`` epochs later (the folds trained before it); a stop
    request ends it (:class:`Interrupted`)."""
    model = build_model(task, cfg)
    told = [Shifted(c, offset) for c in callbacks] if offset else list(callbacks)
    history = fit(model, task, cfg, [recorder, *told])
    if history.stop is Stop.INTERRUPTED:
        raise Interrupted
    return model, history


def train_in_run(
    cfg: Config,
    task: Task,
    run: RunRecorder,
    callbacks: Sequence[Callback] = (),
    draw: bool = False,
    folds: Sequence[Task] = (),
) -> Outcome:
    """Train one setting, judge it and record it in ``run``: per-epoch rows as they come, then
    its summary, verdict, weight quantiles at the first, best and last epoch, diagnostics
    files (level full: raw arrays always, pictures with ``draw`` and a completed run) and, if
    it completed, its best weights. A stop request ends the run as failed
    (:class:`Interrupted`).

    With ``folds`` (the tasks of the folds before the split's own, ``data.folds``) each is
    trained first, its curves under ``fold<k>/`` (:class:`FoldRecorder`), the callbacks told
    its epochs after the previous folds' (the pruner compares like with like); the setting's
    value is then the mean of every fold's best value. A fold cut short (pruned, unstable)
    ends the setting there."""
    bests: list[float] = []
    monitor = cfg.train.monitor
    epochs = cfg.train.max_epochs
    for number, fold_task in enumerate(folds):
        recorder = FoldRecorder(run, number, monitor)
        model, history = trained(cfg, fold_task, recorder, callbacks, number * epochs)
        if history.stop in CUT_SHORT:
            verdict = judged(cfg, fold_task, history)
            run.log_summary(fold_summary([*bests, history.best_value], monitor, None))
            close(run, m.PRUNED, verdict, history.stop)
            val_output = predict(model, fold_task.data.val.x).cpu().numpy()
            return Outcome(model, history, verdict, m.PRUNED, val_output, math.nan)
        bests.append(history.best_value)
    model, history = trained(cfg, task, run, callbacks, len(folds) * epochs)
    val_output = predict(model, task.data.val.x).cpu().numpy()
    verdict = judged(cfg, task, history)
    state = m.PRUNED if history.stop in CUT_SHORT else m.COMPLETE
    value = float(np.mean([*bests, history.best_value]))
    outcome = Outcome(model, history, verdict, state, val_output, value)
    summary = summary_metrics(history, verdict, task, val_output)
    run.log_summary(summary | (fold_summary(bests, monitor, history.best_value) if folds else {}))
    for epoch, groups in history.snapshots.values():
        run.log_step(epoch, dg.weight_stats(groups))
    with tempfile.TemporaryDirectory(prefix="lstm_sweep_") as tmp:
        folder = Path(tmp)
        if cfg.diagnostics.level == "full" and history.best_epoch >= 0:
            write_files(
                folder, task, outcome, cfg.diagnostics.k_worst, draw and state == m.COMPLETE
            )
        if state == m.COMPLETE:
            save_weights(model, folder)
        if any(folder.iterdir()):
            run.log_artifacts(folder)
    close(run, state, verdict, history.stop)
    return outcome
