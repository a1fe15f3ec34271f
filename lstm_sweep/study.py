"""Optuna, and the only module that imports it: sampler, pruner, storage, the search space and
the objective that turns one trial into one trained, tracked model."""

from __future__ import annotations

import fcntl
import math
import os
import socket
import time
import warnings
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.trial import FrozenTrial, TrialState

from lstm_sweep import artifacts
from lstm_sweep import diagnostics as dg
from lstm_sweep.config import Config, ConfigError, SearchParam
from lstm_sweep.data import ForecastData
from lstm_sweep.tracking import (
    ROLE_TAG,
    STORE_ROOT,
    STUDY_TAG,
    TRIAL_TAG,
    EpochLogger,
    Tracker,
    TrackingUnavailable,
    flatten,
    mask_uri,
    trial_run_name,
)
from lstm_sweep.train import TrainingData, build_model, fit, naive_loss, original_unit_errors

RUN_ID_ATTR = "mlflow_run_id"
WORKER_ATTR = "worker"  # host:pid that ran the trial, to trace a lost worker
RDB_SCHEMES = ("sqlite", "postgresql", "mysql")
MAX_RETRY = 2  # a trial's settings are retried at most this often, so a crash cannot loop
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)  # what n_trials counts
BEST_EPOCH_METRICS = (dg.TRAIN_EVAL_LOSS, dg.GAP, dg.VAL_ACCURACY, dg.ACCURACY_GAP)

optuna.logging.set_verbosity(optuna.logging.ERROR)  # we report trials ourselves
# heartbeats and retry callbacks are marked experimental; we rely on them knowingly
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def default_storage(root: Path = STORE_ROOT) -> str:
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(root / 'optuna.db').resolve()}"


def storage_url(cfg: Config) -> str:
    return cfg.study.storage or default_storage()


def make_sampler(cfg: Config, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    """The configured sampler, seeded with train.seed (plus an offset per parallel worker, or
    every worker would propose the same settings)."""
    seed, startup = cfg.train.seed + seed_offset, cfg.study.n_startup_trials
    match cfg.study.sampler:
        case "tpe":
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)
        case "random":
            return optuna.samplers.RandomSampler(seed=seed)
        case "cmaes":
            return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=startup)
        case "qmc":
            return optuna.samplers.QMCSampler(seed=seed)
        case "gp":
            return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)
    raise ValueError(f"unknown sampler {cfg.study.sampler!r}")


def make_pruner(cfg: Config) -> optuna.pruners.BasePruner:
    p = cfg.study.pruner
    match p.type:
        case "median":
            return optuna.pruners.MedianPruner(p.n_startup_trials, p.n_warmup_steps)
        case "hyperband":
            return optuna.pruners.HyperbandPruner(
                p.min_resource, cfg.train.max_epochs, p.reduction_factor
            )
        case "successive_halving":
            return optuna.pruners.SuccessiveHalvingPruner(p.min_resource, p.reduction_factor)
        case "none":
            return optuna.pruners.NopPruner()
    raise ValueError(f"unknown pruner {p.type!r}")


def make_storage(
    url: str,
    on_stale: Callable[[optuna.Study, FrozenTrial], None] | None,
    heartbeat_seconds: int,
    grace_seconds: int,
):
    """An RDB storage with heartbeats, so a killed worker's trial is failed and retried."""
    if not url.startswith(RDB_SCHEMES):
        return url  # e.g. a journal storage given by the user as an object elsewhere
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    return optuna.storages.RDBStorage(
        url,
        engine_kwargs=engine_kwargs,
        heartbeat_interval=heartbeat_seconds,
        grace_period=grace_seconds,
        heartbeat_stale_trial_callback=on_stale,
    )


def open_study(
    cfg: Config,
    source: str = "study.storage",
    on_stale: Callable[[optuna.Study, FrozenTrial], None] | None = None,
    seed_offset: int = 0,
) -> optuna.Study:
    """Create the study, or load it to resume; an unreachable storage is a ConfigError."""
    url = storage_url(cfg)
    try:
        return optuna.create_study(
            study_name=cfg.study_name,
            storage=make_storage(
                url, on_stale, cfg.study.heartbeat_seconds, cfg.study.grace_seconds
            ),
            sampler=make_sampler(cfg, seed_offset),
            pruner=make_pruner(cfg),
            direction=cfg.direction,
            load_if_exists=True,
        )
    except Exception as exc:  # driver errors vary by database; the user needs the URI and why
        reason = str(exc).splitlines()[0][:200]
        raise ConfigError(
            source, "study.storage", mask_uri(url), f"unreachable: {reason}"
        ) from None


class StudyLock:
    """A lock shared by every worker of a study, on any host that reaches its storage.

    It makes "count the trials, then start one" atomic, so N workers finish exactly n_trials:
    a PostgreSQL advisory lock on the Optuna database, or a file lock beside a SQLite file.
    """

    def __init__(self, url: str, study_name: str) -> None:
        self.url, self.key = url, zlib.crc32(study_name.encode())
        self._release: Callable[[], None] | None = None

    def acquire(self) -> None:
        if self.url.startswith("sqlite:///"):
            handle = open(self.url.removeprefix("sqlite:///") + ".lock", "a")  # noqa: SIM115
            fcntl.flock(handle, fcntl.LOCK_EX)
            self._release = handle.close  # closing drops the flock
        elif self.url.startswith("postgresql"):
            engine = sqlalchemy.create_engine(self.url, poolclass=sqlalchemy.pool.NullPool)
            connection = engine.connect()
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": self.key})

            def release() -> None:
                connection.execute(
                    sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": self.key}
                )
                connection.close()
                engine.dispose()

            self._release = release

    def release(self) -> None:
        if self._release is not None:
            release, self._release = self._release, None
            release()

    def __enter__(self) -> StudyLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def suggest_params(trial: optuna.Trial, search: Mapping[str, SearchParam]) -> dict[str, Any]:
    """The search space, in one place: dotted config key -> sampled value."""
    values: dict[str, Any] = {}
    for key, p in search.items():
        if p.type == "categorical":
            values[key] = trial.suggest_categorical(key, p.bounds())
            continue
        low, high = p.span
        if p.type == "int":
            step = int(p.step or 1)
            values[key] = trial.suggest_int(key, int(low), int(high), step=step, log=p.log)
        else:
            values[key] = trial.suggest_float(key, low, high, step=p.step, log=p.log)
    return values


def counted_trials(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=COUNTED))


def retry_failed(
    study: optuna.Study, tracker: Tracker | None = None, max_retry: int = MAX_RETRY
) -> int:
    """Queue the settings of every failed trial (a crash, Ctrl-C, a lost worker) not yet
    retried, so a resumed sweep finishes exactly what was lost; Optuna's own retry callback
    records which trial each retry replaces. With a ``tracker``, a failed trial's run that was
    never closed (the tracking server was down when it failed) is closed as FAILED."""
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    lost = [t for t in trials if t.state == TrialState.FAIL and t.number not in retried]
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
    for trial in lost:
        run_id = trial.user_attrs.get(RUN_ID_ATTR)
        if tracker is not None and run_id:
            reason = "failed while its run could not be closed (tracking unreachable)"
            tracker.finish_if_running(run_id, "FAIL", {"failure_reason": reason})
        retry(study, trial)
    return len(lost)


class StaleTrialHandler:
    """Storage callback for a trial whose worker stopped beating: close its MLflow run as
    failed, then queue it again with the same settings."""

    def __init__(self, tracker: Tracker, max_retry: int = MAX_RETRY) -> None:
        self.tracker = tracker
        self.retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        run_id = trial.user_attrs.get(RUN_ID_ATTR)
        if run_id:
            self.tracker.finish(run_id, "FAIL", {"failure_reason": "worker lost (no heartbeat)"})
        self.retry(study, trial)


class PruneCallback:
    """Training callback: report the monitored metric to Optuna each epoch and stop when it
    says prune."""

    def __init__(self, trial: optuna.Trial, monitor: str) -> None:
        self.trial, self.monitor = trial, monitor

    def on_epoch_end(self, epoch: int, row: Mapping[str, float]) -> str | None:
        value = row[self.monitor]
        if not math.isfinite(value):
            return None  # the loop's own instability check ends the trial
        self.trial.report(value, epoch)
        return "pruned" if self.trial.should_prune() else None


class StopCallback:
    """Training callback: end the epoch loop when the user asked the sweep to stop (Ctrl-C)."""

    def __init__(self, stop_requested: Callable[[], bool]) -> None:
        self.stop_requested = stop_requested

    def on_epoch_end(self, epoch: int, row: Mapping[str, float]) -> str | None:
        return "interrupted" if self.stop_requested() else None


@dataclass(frozen=True)
class TrialSummary:
    state: str  # COMPLETE or PRUNED
    value: float
    verdict: dg.Verdict
    metrics: dict[str, float]


class Objective:
    """One trial: sample, train with pruning, judge, and record it all in one nested run."""

    def __init__(
        self,
        cfg: Config,
        data: TrainingData,
        tracker: Tracker,
        parent_id: str,
        stop_requested: Callable[[], bool] = lambda: False,
    ) -> None:
        self.cfg, self.data, self.tracker, self.parent_id = cfg, data, tracker, parent_id
        self.stop_requested = stop_requested
        self.naive_val_loss = naive_loss(data, "val")

    def __call__(self, trial: optuna.Trial) -> float:
        values = suggest_params(trial, self.cfg.search)
        trial_cfg = self.cfg.with_values(values)
        run_id = self.tracker.start_child(
            self.parent_id,
            trial_run_name(trial.number, values),
            tags={ROLE_TAG: "trial", STUDY_TAG: self.cfg.study_name, TRIAL_TAG: str(trial.number)},
            params=flatten(trial_cfg.model_dump(mode="json")),
        )
        trial.set_user_attr(RUN_ID_ATTR, run_id)
        trial.set_user_attr(WORKER_ATTR, f"{socket.gethostname()}:{os.getpid()}")
        logger = EpochLogger(self.tracker, run_id, self.cfg.tracking.flush_seconds)
        try:
            model = build_model(self.data, trial_cfg)
            stop = StopCallback(self.stop_requested)
            history = fit(
                model,
                self.data,
                trial_cfg,
                [logger, PruneCallback(trial, trial_cfg.train.monitor), stop],
            )
            logger.flush()
            if history.stop_reason == "interrupted":
                raise KeyboardInterrupt
            summary = self.record(run_id, model, history, trial_cfg)
        except BaseException as exc:
            if isinstance(exc, TrackingUnavailable):
                raise  # closing the run would only wait again; the next start closes it
            interrupted = isinstance(exc, KeyboardInterrupt)
            reason = "interrupted by the user" if interrupted else f"{type(exc).__name__}: {exc}"
            self.tracker.finish(run_id, "FAIL", {"failure_reason": reason[:500]})
            raise
        for key in (dg.BEST_EPOCH, dg.EPOCHS_TRAINED):
            trial.set_user_attr(key, int(summary.metrics[key]))
        trial.set_user_attr("verdict", summary.verdict.verdict)
        trial.set_user_attr("verdict_reason", summary.verdict.reason)
        if summary.state == "PRUNED":
            raise optuna.TrialPruned(
                summary.verdict.reason if summary.verdict.verdict == "unstable" else None
            )
        return summary.value

    def record(self, run_id: str, model: Any, history: Any, cfg: Config) -> TrialSummary:
        """Summary metrics, verdict tags and artifacts of a finished training; closes the run."""
        verdict = dg.judge(
            history.rows, self.naive_val_loss, cfg.diagnostics.verdict, history.unstable_reason
        )
        metrics = {
            dg.BEST_VAL_LOSS: history.best_val_loss,
            dg.BEST_EPOCH: history.best_epoch,
            dg.EPOCHS_TRAINED: history.epochs_trained,
            dg.NAIVE_VAL_LOSS: self.naive_val_loss,
            dg.OVERFIT_SCORE: verdict.score,
            "train_seconds": history.seconds,
        }
        if verdict.onset_epoch is not None:
            metrics[dg.OVERFIT_ONSET] = verdict.onset_epoch
        if history.best_epoch >= 0:
            best = history.rows[history.best_epoch]
            metrics |= {f"best_{k}": v for k, v in best.items() if k in BEST_EPOCH_METRICS}
            if isinstance(self.data, ForecastData):
                metrics |= original_unit_errors(model, self.data, "val")
        self.tracker.log_summary(run_id, metrics)
        if cfg.diagnostics.level == "full" and history.best_epoch >= 0:
            with self.tracker.artifact_dir() as tmp:
                artifacts.trial_artifacts(
                    Path(tmp), model, self.data, history, verdict, cfg.diagnostics.k_worst
                )
                self.tracker.log_artifacts(run_id, Path(tmp), "diagnostics")
        pruned = history.stop_reason in ("pruned", "unstable")
        state = "PRUNED" if pruned else "COMPLETE"
        self.tracker.finish(
            run_id,
            state,
            {
                "verdict": verdict.verdict,
                "verdict_reason": verdict.reason,
                "stop_reason": history.stop_reason,
            },
        )
        return TrialSummary(state, history.best_value, verdict, metrics)


class ProgressCallback:
    """Study callback: keeps a tqdm bar's finished/pruned/failed counts and best value."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        states = [t.state for t in study.get_trials(deepcopy=False)]
        best = _best_value(study)
        self.bar.set_postfix(
            finished=states.count(TrialState.COMPLETE),
            pruned=states.count(TrialState.PRUNED),
            failed=states.count(TrialState.FAIL),
            best=f"{best:.4g}" if best is not None else "-",
            refresh=False,
        )
        if trial.state in COUNTED:
            self.bar.update(1)


def _best_value(study: optuna.Study) -> float | None:
    try:
        return study.best_value
    except ValueError:  # no completed trial yet
        return None


def optimize(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], float],
    n_trials: int,
    lock: StudyLock,
    callbacks: list[Callable[[optuna.Study, FrozenTrial], None]],
    timeout: float | None = None,
    stop_requested: Callable[[], bool] = lambda: False,
    poll_seconds: float = 1.0,
) -> None:
    """This worker's loop: run trials until the study holds ``n_trials`` finished (complete or
    pruned) ones, alone or beside other workers on the same storage.

    Counting and starting a trial happen under ``lock``, and trials that other workers are
    running count as taken, so the study ends with exactly ``n_trials``; a worker that finds
    all remaining trials taken waits, in case one of them is lost and comes back for retry.
    """
    deadline = time.monotonic() + timeout if timeout else math.inf
    while time.monotonic() < deadline and not stop_requested():
        lock.acquire()
        try:
            optuna.storages.fail_stale_trials(study)  # a lost worker's trial is retried
            states = [t.state for t in study.get_trials(deepcopy=False)]
            finished = sum(states.count(s) for s in COUNTED)
            if finished >= n_trials:
                return
            if finished + states.count(TrialState.RUNNING) >= n_trials:
                lock.release()
                time.sleep(poll_seconds)
                continue

            def run_released(trial: optuna.Trial) -> float:
                lock.release()  # the trial is RUNNING in storage now: others see it as taken
                return objective(trial)

            study.optimize(run_released, n_trials=1, callbacks=callbacks, catch=())
        finally:
            lock.release()


def torch_threads_per_worker(workers: int) -> int:
    """Share the cores between worker processes so they do not fight over threads."""
    return max(1, (os.cpu_count() or 1) // workers)


def trials_frame(study: optuna.Study) -> Any:
    """The study's trials as a DataFrame, searched values under their dotted config keys."""
    frame = study.trials_dataframe(attrs=("number", "state", "value", "params", "user_attrs"))
    frame.columns = [c.removeprefix("params_").removeprefix("user_attrs_") for c in frame.columns]
    return frame


def param_importances(study: optuna.Study, seed: int = 0) -> dict[str, float]:
    """fANOVA importance of each searched key for the objective, summing to 1, largest first;
    empty when fewer than two trials completed or nothing varied."""
    if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) < 2:
        return {}
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
    try:
        return optuna.importance.get_param_importances(study, evaluator=evaluator)
    except (RuntimeError, ValueError):  # e.g. a single distinct value per parameter
        return {}


def write_study_plots(
    study: optuna.Study, folder: Path, contour: list[str], seed: int = 0
) -> list[Path]:
    """Optuna's own views of the study as HTML: history, importances, slices, the ``contour``
    pair, parallel coordinates. Plotly's script is written once beside them, so the pages
    open offline without one 4 MB copy each."""
    folder.mkdir(parents=True, exist_ok=True)
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
    plots: dict[str, Callable[[], Any]] = {
        "optimization_history": lambda: optuna.visualization.plot_optimization_history(study),
        "param_importances": lambda: optuna.visualization.plot_param_importances(
            study, evaluator=evaluator
        ),
        "slice": lambda: optuna.visualization.plot_slice(study),
        "contour": lambda: optuna.visualization.plot_contour(study, params=contour),
        "parallel_coordinate": lambda: optuna.visualization.plot_parallel_coordinate(study),
    }
    written = []
    for name, plot in plots.items():
        if name == "contour" and len(contour) != 2:
            continue
        try:
            figure = plot()
        except (RuntimeError, ValueError):  # too few completed trials for this view
            continue
        path = folder / f"{name}.html"
        figure.write_html(path, include_plotlyjs="directory")
        written.append(path)
    return written
