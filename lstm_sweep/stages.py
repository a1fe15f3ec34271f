"""The stages of one sweep, in order: the workers run the study's missing trials; once the study
holds ``n_trials``, the closing stage (seed re-evaluation, final model, registry) and the report,
once per study, in whichever process claims them first."""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lstm_sweep import metrics as m
from lstm_sweep.config import MOVED_TO_CLOSING, Config
from lstm_sweep.engines import Engine
from lstm_sweep.faults import classify, store_failure
from lstm_sweep.progress import Ticker, step
from lstm_sweep.report import publish
from lstm_sweep.report.render import parent_metrics
from lstm_sweep.report.table import comparison_table
from lstm_sweep.select import Selector, baselines_ahead, baselines_job, reevaluation_job
from lstm_sweep.study import (
    best_value,
    counted_trials,
    record_selection,
    selection_recorded,
    state_counts,
    stopping_point,
    storage_url,
    target_trials,
    trials_frame,
)
from lstm_sweep.sweep import (
    GracefulStop,
    JobContext,
    LockTimeout,
    StudyLock,
    Sweep,
    SweepIncomplete,
    start,
)
from lstm_sweep.tracking import TrackingUnavailable, failure_reason


@dataclass
class Stage:
    """Which stage the sweep is in: an interrupt is worded, and recorded, by it."""

    name: str = m.STAGE_TRIALS


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM ended the sweep during ``stage``; what is done is kept."""

    def __init__(self, stage: str) -> None:
        super().__init__(stage)
        self.stage = stage


class Progress:
    """One bar over the whole study, fed by this process's trials (an Optuna callback) and by
    polling the storage for the other workers' trials; redrawn every second while open."""

    def __init__(self, sweep: Sweep, enabled: bool) -> None:
        self.study, self.cfg = sweep.study, sweep.cfg
        self.bar = tqdm(
            total=sweep.cfg.study.n_trials,
            initial=counted_trials(sweep.study),
            desc=sweep.cfg.study_name,
            unit="trial",
            disable=not enabled,
            file=sys.stderr,
        )
        self.lock = threading.Lock()  # a trial's callback and the ticker's poll both update it
        self.ticker = Ticker(self.bar, poll=self)

    def __call__(self, *_: Any) -> None:
        with self.lock:
            counts = state_counts(self.study)
            best = best_value(self.study)
            self.bar.set_postfix(
                finished=counts[m.COMPLETE],
                pruned=counts[m.PRUNED],
                failed=counts[m.FAIL],
                best=f"{best:.4g}" if best is not None else "-",
                refresh=False,
            )
            self.bar.update(counts[m.COMPLETE] + counts[m.PRUNED] - self.bar.n)

    def finish(self) -> None:
        """The last update; where the study stopped itself, the bar ends full at its trials
        and a line says why."""
        self()
        stopped = stopping_point(self.study.get_trials(deepcopy=False), self.cfg)
        if stopped is not None:
            with self.lock:
                self.bar.total = self.bar.n
                self.bar.refresh()
            print(f"{self.cfg.study_name}: {stopped}", file=sys.stderr)

    def __enter__(self) -> Progress:
        self.ticker.__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.ticker.__exit__(*exc_info)
        self.bar.close()


def conclude(
    sweep: Sweep,
    parent_id: str,
    stop: GracefulStop,
    engine: Engine,
    progress: bool = True,
    stage: Stage | None = None,
) -> str:
    """Once the study holds n_trials: the closing stage and the report, exactly once per study
    however many processes and hosts worked on it (the first to claim the report lock does
    them; the others say where to look). ``stage`` follows along."""
    stage = stage or Stage()
    cfg, study, tracker = sweep.cfg, sweep.study, sweep.tracker
    counted = counted_trials(study)
    if counted < target_trials(study.get_trials(deepcopy=False), cfg):
        held = f"the study holds {counted} of {cfg.study.n_trials} trials"
        if not state_counts(study)["RUNNING"]:  # else other hosts go on under the same run
            tracker.stop_parent(parent_id, f"study.timeout reached: {held}")
        return (
            f"{held.capitalize()} (study.timeout reached): run the same command again to"
            " continue; the report and the registered model come once it is complete."
        )
    claim = StudyLock(storage_url(cfg), cfg.study_name, cfg.study.lock_timeout, "report")
    if not claim.try_acquire():
        return (
            f"Another process is writing the report of study {cfg.study_name!r}; it will be on"
            f" the sweep's parent run: {tracker.ui_command(parent_id)}"
        )
    try:
        # runs of an earlier attempt whose process died; none of this attempt's has started
        tracker.close_running(parent_id, (m.ROLE_REEVALUATION, m.ROLE_FINAL), m.LEFTOVER_REASON)
        recorded = with_closing_named(selection_recorded(study) or {})
        # a study extended since, or asked for another closing stage, needs a new one
        asked = {"n_trials": counted, "closing": closing_settings(cfg)}
        current = all(recorded.get(key) == value for key, value in asked.items())
        if current and recorded.get("reported_by"):
            tracker.finish_parent(parent_id, m.COMPLETE)  # this start reopened it
            return (
                f"Study {cfg.study_name!r} is complete; its report was written by"
                f" {recorded['reported_by']}: {tracker.ui_command(parent_id)}"
            )
        if not current:
            stage.name = m.STAGE_CLOSING
            select_once(sweep, parent_id, stop, engine, progress)
        stage.name = m.STAGE_REPORT
        with step("writing the report", progress):
            text = publish(cfg, tracker, study, parent_id)
        tracker.finish_parent(parent_id, m.COMPLETE)
        done = selection_recorded(study) or {}
        record_selection(study, {**done, "reported_by": m.this_process()})
        return text
    finally:
        claim.release()


def with_closing_named(recorded: dict[str, Any]) -> dict[str, Any]:
    """What a study recorded of its closing stage, its settings under ``closing`` even when
    they were recorded under ``report`` (before the section had its own name): a finished
    study stays finished."""
    if "closing" in recorded or "report" not in recorded:
        return recorded
    old = recorded["report"]
    return {**recorded, "closing": {k: old[k] for k in MOVED_TO_CLOSING if k in old}}


def closing_settings(cfg: Config) -> dict[str, Any]:
    """What the closing stage was asked for: changed, it is done again (the trials stay)."""
    return cfg.closing.model_dump(mode="json")


def select_once(
    sweep: Sweep, parent_id: str, stop: GracefulStop, engine: Engine, progress: bool
) -> None:
    """The closing stage; its findings go onto the parent run and into the study. Its seed
    re-evaluations may run beside this process, where the engine runs jobs."""
    cfg, tracker = sweep.cfg, sweep.tracker
    table = comparison_table(
        trials_frame(sweep.study), tracker.child_runs(parent_id, m.ROLE_TRIAL), list(cfg.search)
    )
    if not (table["state"] == m.COMPLETE).any():
        return
    say = partial(print, file=sys.stderr)
    runner = engine.job_runner(sweep, parent_id, stop)
    elsewhere = partial(runner, reevaluation_job) if runner else None
    context = JobContext(cfg, sweep.tasks, tracker, parent_id, stop)
    selector = Selector(context, say, progress, elsewhere, engine.start_seconds)
    selection = selector.run(table)
    with tempfile.TemporaryDirectory(prefix="lstm_sweep_") as tmp:
        (Path(tmp) / m.SELECTION_FILE).write_text(selection.to_json())
        tracker.log_artifacts(parent_id, Path(tmp))
    tracker.log_summary(parent_id, parent_metrics(selection))
    tags: dict[str, Any] = {m.RECOMMENDED_TRIAL_TAG: selection.recommended}
    if selection.final is not None:
        tags[m.MODEL_URI_TAG] = selection.final.model_uri
    tracker.set_tags(parent_id, tags)
    record_selection(
        sweep.study,
        {
            "n_trials": counted_trials(sweep.study),
            "closing": closing_settings(cfg),
            "recommended": selection.recommended,
            "model_uri": selection.final.model_uri if selection.final else None,
        },
    )


def run_sweep(sweep: Sweep, stop: GracefulStop, engine: Engine, progress: bool = True) -> str:
    """Run the missing trials on study.workers workers of the engine, then conclude; returns
    the summary. However it ends, the parent run ends with it: an interrupt as
    SweepInterrupted (naming the stage), a store fault as StoreFailed (its one line)."""
    stage = Stage()
    parent_id = None
    started = time.monotonic()
    try:
        parent_id = start(sweep)
        with Progress(sweep, progress) as bar:
            with beside_the_search(sweep, parent_id, stop, engine, bar):
                engine.run_trials(sweep, parent_id, stop, bar)
            bar.finish()
        text = conclude(sweep, parent_id, stop, engine, progress, stage)
    except KeyboardInterrupt:
        during = "" if stage.name == m.STAGE_TRIALS else f" in the {stage.name}"
        close_parent(sweep, parent_id, f"{m.INTERRUPTED_REASON}{during}")
        raise SweepInterrupted(stage.name) from None
    except (SweepIncomplete, LockTimeout) as exc:
        close_parent(sweep, parent_id, str(exc))
        raise
    except TrackingUnavailable:
        raise  # the parent run cannot be closed now; the next start reopens it
    except Exception as exc:  # a store fault, or a bug: leave no run RUNNING behind it
        failure = store_failure(exc, sweep.store_urls())
        close_parent(sweep, parent_id, str(failure) if failure else failure_reason(exc))
        if failure is not None:
            raise failure from None
        raise
    return f"{text}\nWall time: {time.monotonic() - started:.0f} s"


def beside_the_search(
    sweep: Sweep, parent_id: str, stop: GracefulStop, engine: Engine, bar: Progress
) -> AbstractContextManager[None]:
    """What the closing stage will need whatever the search finds (the baselines, where no
    data key is searched), fitted on workers the search leaves idle while it runs."""
    jobs = baselines_ahead(sweep.cfg)
    runner = engine.spare_runner(sweep, parent_id, stop) if jobs else None
    return runner(baselines_job, jobs, bar) if runner else nullcontext()


def close_parent(sweep: Sweep, parent_id: str | None, reason: str) -> None:
    """Close the sweep's parent run as failed, with its reason, where the store still takes it
    (after a store fault it may not: the next start reopens the run)."""
    if parent_id is None:
        return
    try:
        sweep.tracker.finish_parent(parent_id, m.FAIL, reason)
    except Exception as exc:
        if classify(exc) is None:
            raise
