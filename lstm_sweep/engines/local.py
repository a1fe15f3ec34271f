"""The local engine: this process works as one worker and starts the others as processes of
this machine, forked from a warm server (``processes``); the closing stage's jobs go to such
processes too. Each process gets every signal the driver gets, and sends back one
:class:`~lstm_sweep.sweep.WorkerExit` before it exits, so the driver says each line once."""

from __future__ import annotations

import gc
import multiprocessing.connection
import os
import signal
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from multiprocessing.process import BaseProcess
from multiprocessing.queues import SimpleQueue
from typing import Any

import torch

from lstm_sweep.config import Config, StudyConfig, load_config
from lstm_sweep.engines import Engine, JobRunner
from lstm_sweep.engines.processes import process_context, start_seconds
from lstm_sweep.faults import EXIT_STORE, StoreFailed
from lstm_sweep.study import counted_trials, target_trials
from lstm_sweep.sweep import (
    EXIT_INTERRUPTED,
    GracefulStop,
    JobContext,
    JobFunction,
    Sweep,
    WorkerExit,
    check_workers,
    prepare,
    store_urls,
    work,
    worker_exit,
)
from lstm_sweep.train import Interrupted

Reports = SimpleQueue[tuple[int, WorkerExit]]  # (pid, how it ended) from each process


class LocalProcesses(Engine):
    start_seconds = start_seconds()

    def run_trials(
        self, sweep: Sweep, parent_id: str, stop: GracefulStop, progress: Callable[..., None]
    ) -> None:
        """This process works as one worker and starts up to ``study.workers - 1`` more: no
        more processes than a batch has trials or than trials are missing (each costs its
        data, its stores and a core); on GPUs, spread over them as :func:`device_plan` says,
        this process on the first."""
        cfg = sweep.cfg
        missing = missing_trials(sweep)
        plan = device_plan(trainers(cfg, missing), gpus_for(cfg), cfg.study)
        if plan[0] is not None:
            print(f"workers on GPUs: {describe_plan(plan)}", file=sys.stderr)
        if cfg.study.workers > len(plan) and missing > len(plan):
            print(batch_note(cfg.study), file=sys.stderr)
        args = [(sweep.path, sweep.overrides, parent_id, device) for device in plan[1:]]
        with running(trial_process, args, stop) as extra:
            try:
                work(sweep, parent_id, stop, [progress])
            finally:
                wait_for(extra.processes, progress)
        check_workers(sweep.study, extra.exits(), sweep.cfg)

    def job_runner(self, sweep: Sweep, parent_id: str, stop: GracefulStop) -> JobRunner | None:
        if sweep.cfg.study.workers < 2:
            return None
        return partial(run_jobs, sweep, parent_id, stop, sweep.cfg.study.workers)

    def spare_runner(self, sweep: Sweep, parent_id: str, stop: GracefulStop) -> JobRunner | None:
        """Batches smaller than study.workers leave workers idle through the search (one
        with the default batch of one on two cores): the spare ones run jobs meanwhile."""
        cfg = sweep.cfg
        missing = missing_trials(sweep)
        spare = cfg.study.workers - trainers(cfg, missing)
        if missing <= 0 or spare < 1 or gpus_for(cfg):  # on GPUs device_plan spreads them
            return None
        return partial(run_jobs, sweep, parent_id, stop, spare)


def missing_trials(sweep: Sweep) -> int:
    """Trials the study still needs before it holds n_trials (or its stop)."""
    return target_trials(sweep.study.get_trials(deepcopy=False), sweep.cfg) - counted_trials(
        sweep.study
    )


def trainers(cfg: Config, missing: int) -> int:
    """Workers that train trials: no more than a batch holds or than trials are missing."""
    return max(1, min(cfg.study.trainers, missing))


def batch_note(study: StudyConfig) -> str:
    """Why fewer workers train than study.workers asks for."""
    return (
        f"study.batch = {study.batch}: {study.trainers} of {study.workers} workers train trials"
        " (each batch is proposed from the trials before it); all of them run the closing stage"
    )


def gpus_for(cfg: Config) -> list[str]:
    """The GPUs the sweep's workers share: every visible one when the sweep trains on CUDA
    (train.device cuda, or auto where CUDA is present), none otherwise."""
    device = cfg.train.device
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return []
    count = torch.cuda.device_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:  # indices or UUIDs; CUDA reads them up to the first it cannot use
        return [name.strip() for name in listed.split(",")][:count]
    return [str(index) for index in range(count)]


def device_plan(workers: int, gpus: Sequence[str], study: StudyConfig) -> list[str | None]:
    """The GPU of each local worker (None: the CPU): without GPUs, ``workers`` on the CPU;
    with them, at most ``study.workers_per_device`` per GPU and ``workers`` in all, dealt
    round-robin so that the first workers go one to a device."""
    if not gpus:
        return [None] * workers
    count = min(workers, len(gpus) * study.workers_per_device)
    return [gpus[i % len(gpus)] for i in range(count)]


def describe_plan(plan: Sequence[str | None]) -> str:
    counts = Counter(plan)
    return ", ".join(f"{n} on GPU {device}" for device, n in counts.items())


def pin(device: str | None) -> None:
    """Make ``device`` the one GPU this process sees (its ``cuda``), before CUDA starts here:
    set after, it would be ignored, and every worker would share the first GPU."""
    if device is None:
        return
    if torch.cuda.is_initialized():
        raise RuntimeError(f"CUDA started in this process before it was pinned to GPU {device}")
    os.environ["CUDA_VISIBLE_DEVICES"] = device


def trial_process(
    path: str, overrides: list[str], parent_id: str, device: str | None, reports: Reports
) -> None:
    """Entry point of a worker process of this machine, pinned to ``device`` (a GPU, or None
    for the CPU): trials until the study holds n_trials."""
    pin(device)
    serve(reports, lambda stop: work(prepare(path, overrides), parent_id, stop, []))


def job_process(
    path: str,
    overrides: list[str],
    parent_id: str,
    function: JobFunction,
    jobs: SimpleQueue[Any],
    device: str | None,
    reports: Reports,
) -> None:
    """Entry point of a process of the closing stage, pinned to ``device`` as a trial worker
    is: ``function`` on each job from the queue until its end mark. A job that fails otherwise
    than by a store leaves its run FAILED: the closing stage trains it again itself."""
    pin(device)
    cfg = load_config(path, overrides)

    def life(stop: GracefulStop) -> None:
        torch.set_num_threads(1)  # as the trial workers: processes use the cores
        context = JobContext.open(cfg, path, parent_id, stop)
        gc.freeze()  # as a trial worker does once started: the collector skips what is here
        for job in iter(jobs.get, None):
            function(context, job)

    serve(reports, life, store_urls(cfg))


def serve(
    reports: Reports, life: Callable[[GracefulStop], None], urls: dict[str, str] | None = None
) -> None:
    """A process's whole life: ``life`` under a graceful stop that the driver passes on, how
    it ended sent back through ``reports`` (the driver says its line), then its exit status."""
    with GracefulStop(quiet=True, driven=True) as stop:
        try:
            ended = worker_exit(partial(life, stop), urls or {})
        finally:
            gc.freeze()  # as in run.py: the exit's last collection would take seconds
        reports.put((os.getpid(), ended))
    sys.exit(ended.code)


@contextmanager
def run_jobs(
    sweep: Sweep,
    parent_id: str,
    stop: GracefulStop,
    most: int,
    function: JobFunction,
    jobs: list[Any],
    on_progress: Callable[[], None],
) -> Iterator[None]:
    """``function`` on each job, shared out over at most ``most`` processes, while the block
    runs here and until they are done. Interrupted if asked to stop, StoreFailed if a store
    failed.

    The processes take the jobs one at a time from a queue, in the order given (the closing
    stage gives the longest first, so they finish close together): a fixed share each left
    one process idle while the other trained a seed that patience stopped late."""
    plan = device_plan(min(most, len(jobs)), gpus_for(sweep.cfg), sweep.cfg.study)
    queue = process_context().SimpleQueue()
    for job in [*jobs, *[None] * len(plan)]:  # one end mark per process
        queue.put(job)
    args = [(sweep.path, sweep.overrides, parent_id, function, queue, d) for d in plan]
    with running(job_process, args, stop) as processes:
        yield
        wait_for(processes.processes, on_progress)
    exits = processes.exits()
    for said in [e.message for e in exits if e.message and e.code != EXIT_STORE]:
        print(said, file=sys.stderr)  # its jobs are trained here instead
    failed = [e.message for e in exits if e.code == EXIT_STORE]
    if failed:
        raise StoreFailed(failed[0])
    if stop.requested or EXIT_INTERRUPTED in [e.code for e in exits]:
        raise Interrupted


@dataclass
class Processes:
    """Processes started by :func:`running`, and how each said it ended."""

    processes: Sequence[BaseProcess]
    reports: Reports

    def exits(self) -> list[WorkerExit]:
        """How each ended (call once they have): what it sent back, or, when it could send
        nothing (killed, or a bug), its exit status alone."""
        said: dict[int, WorkerExit] = {}
        while not self.reports.empty():
            pid, ended = self.reports.get()
            said[pid] = ended
        return [said.get(p.pid or 0, WorkerExit(p.exitcode or 0)) for p in self.processes]


@contextmanager
def running(
    target: Callable[..., None], args: list[tuple[Any, ...]], stop: GracefulStop
) -> Iterator[Processes]:
    """One process per tuple of ``args``, each a clean interpreter (no torch state of this
    process) given a queue for how it ended as its last argument; while the block runs,
    SIGTERM to this process reaches them too."""
    context = process_context()
    reports: Reports = context.SimpleQueue()
    processes = [context.Process(target=target, args=(*a, reports)) for a in args]
    for process in processes:
        process.start()

    def forward(signum: int) -> None:
        for process in processes:
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, signal.SIGTERM)

    stop.listeners.append(forward)
    try:
        yield Processes(processes, reports)
    finally:
        stop.listeners.remove(forward)


def wait_for(processes: Sequence[BaseProcess], on_progress: Callable[[], None]) -> None:
    """Until every process has exited, calling ``on_progress`` twice a second; returns as soon
    as the last one exits, not at the next tick."""
    while alive := [p.sentinel for p in processes if p.is_alive()]:
        on_progress()
        multiprocessing.connection.wait(alive, timeout=0.5)
