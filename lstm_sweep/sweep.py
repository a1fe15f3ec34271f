"""A sweep, validated and connected: the wiring that the command line, the report and every
worker process share.

``prepare`` finds every fault in the input (config, data, both stores) before a run or trial
exists; ``work`` is one worker's loop over trials.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass, field

import optuna
import torch

from lstm_sweep.config import Config, load_config
from lstm_sweep.data import load_data
from lstm_sweep.diagnostics import config_warnings
from lstm_sweep.study import (
    Objective,
    StaleTrialHandler,
    StudyLock,
    open_study,
    optimize,
    retry_failed,
    storage_url,
    torch_threads_per_worker,
)
from lstm_sweep.tracking import Tracker, TrackingUnavailable
from lstm_sweep.train import TrainingData


@dataclass
class Sweep:
    path: str
    overrides: list[str]
    cfg: Config
    data: TrainingData
    tracker: Tracker
    study: optuna.Study
    lock: StudyLock = field(repr=False)


def prepare(path: str, overrides: list[str], seed_offset: int | None = None) -> Sweep:
    """Validate the config and the data and connect to both stores; ConfigError on any fault.

    ``seed_offset`` sets parallel workers' samplers apart, or they would all propose the same
    settings. By default it is 0 on the local store (a single worker is reproducible) and the
    process id on a shared storage, where other hosts may be working on the same study.
    """
    cfg = load_config(path, overrides)
    data = load_data(cfg)
    tracker = Tracker(cfg.tracking.uri, cfg.experiment, path)
    if seed_offset is None:
        seed_offset = 0 if cfg.study.storage is None else os.getpid()
    study = open_study(cfg, path, on_stale=StaleTrialHandler(tracker), seed_offset=seed_offset)
    lock = StudyLock(storage_url(cfg), cfg.study_name)
    return Sweep(path, list(overrides), cfg, data, tracker, study, lock)


def start(sweep: Sweep) -> str:
    """Open (or resume) the sweep's parent run and queue the trials a previous run lost.

    Under the study lock, so workers starting together on several hosts share one parent run
    and retry each lost trial once.
    """
    with sweep.lock:
        parent_id = sweep.tracker.open_parent(
            sweep.cfg.study_name, sweep.cfg.model_dump(mode="json")
        )
        retry_failed(sweep.study, sweep.tracker)
    warnings = config_warnings(sweep.cfg)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if warnings:
        sweep.tracker.set_tags(parent_id, {"sanity_warnings": " | ".join(warnings)})
    return parent_id


class GracefulStop:
    """First Ctrl-C: finish the current epoch, close the trial as failed (it is retried on the
    next run) and stop. A second Ctrl-C stops at once."""

    def __init__(self, quiet: bool = False) -> None:
        self.requested, self.quiet = False, quiet

    def __enter__(self) -> GracefulStop:
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self.previous)

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if not self.quiet:
            print("\nstopping after this epoch (Ctrl-C again to stop at once)", file=sys.stderr)

    def __call__(self) -> bool:
        return self.requested


def work(sweep: Sweep, parent_id: str, stop: GracefulStop, callbacks: list | None = None) -> None:
    """One worker: run trials until the study holds n_trials, raising KeyboardInterrupt if the
    user stopped it."""
    cfg = sweep.cfg
    torch.set_num_threads(torch_threads_per_worker(cfg.study.workers))
    objective = Objective(cfg, sweep.data, sweep.tracker, parent_id, stop)
    optimize(
        sweep.study,
        objective,
        cfg.study.n_trials,
        sweep.lock,
        callbacks or [],
        timeout=cfg.study.timeout,
        stop_requested=stop,
    )
    if stop.requested:  # asked between two trials
        raise KeyboardInterrupt


def worker_process(path: str, overrides: list[str], parent_id: str) -> None:
    """Entry point of a spawned worker process; exits 130 when stopped by Ctrl-C."""
    sweep = prepare(path, overrides, seed_offset=os.getpid())
    with GracefulStop(quiet=True) as stop:
        try:
            work(sweep, parent_id, stop)
        except KeyboardInterrupt:
            sys.exit(130)
        except TrackingUnavailable as exc:  # one line, not a traceback; the main process sums up
            print(f"worker {os.getpid()}: {exc}", file=sys.stderr)
            sys.exit(1)
