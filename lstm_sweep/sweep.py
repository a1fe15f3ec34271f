"""A sweep's lifecycle, whoever runs its trials: validate and connect (:func:`prepare`), open or
resume the parent run and repair what an abrupt stop left (:func:`start`), the study lock every
worker shares, stale trials of lost workers, the worker's loop (:func:`optimize`), and the one
place where Ctrl-C and SIGTERM become a graceful stop.

The engines (``lstm_sweep.engines``) decide where the workers run; every worker, wherever it
runs, runs :func:`work` against the shared Optuna storage and MLflow store, so the study ends
with exactly ``n_trials`` (or where it stopped itself) however many processes and hosts work on
it.
"""

from __future__ import annotations

import gc
import signal
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, TextIO

import filelock
import sqlalchemy
import torch

from lstm_sweep import metrics as m
from lstm_sweep.config import (
    Config,
    ConfigError,
    flatten,
    load_config,
    mask_secrets,
    sanity_warnings,
)
from lstm_sweep.data import describe
from lstm_sweep.faults import EXIT_STORE, StoreFailed, quiet_store_faults_in_threads, store_failure
from lstm_sweep.study import (
    Objective,
    StaleTrialHandler,
    Study,
    blind_settings,
    counted_trials,
    fail_stale_trials,
    may_propose,
    open_study,
    reconcile_runs,
    retry_failed,
    run_one_trial,
    storage_url,
    target_trials,
)
from lstm_sweep.tasks import TaskCache
from lstm_sweep.tracking import (
    STORE_ROOT,
    Tracker,
    TrackingUnavailable,
    default_tracking_uri,
    file_lock,
)
from lstm_sweep.train import Interrupted

EXIT_FAILED, EXIT_INTERRUPTED = m.EXIT_FAILED, m.EXIT_INTERRUPTED
LOCK_POLL = 0.2  # seconds between two tries of a busy study lock
# seconds between two looks at a running batch: a small series' trial can end in a second
BATCH_POLL_SECONDS = 0.05
LOCK_NOTICE = 10.0  # say what we wait for after this long, and again this often


class LockTimeout(RuntimeError):
    """The study lock stayed busy for ``study.lock_timeout`` seconds."""


class SweepIncomplete(RuntimeError):
    """Workers stopped before the study held n_trials (all of them crashed or were killed)."""


@dataclass(frozen=True)
class WorkerExit:
    """How a worker ended: an exit status as a local worker process gives it, and a line to
    show (masked) when it did not finish normally."""

    code: int
    message: str = ""


class GracefulStop:
    """Ctrl-C (SIGINT) or SIGTERM (``docker compose stop``, Kubernetes, schedulers): finish the
    current epoch, close the run and the trial as failed (the next run retries it) and stop.
    A second signal stops at once. Installed once per process; as PID 1 in a container a
    handler is what makes SIGTERM count at all."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(
        self, quiet: bool = False, stream: TextIO = sys.stderr, driven: bool = False
    ) -> None:
        """``driven``: in a process the driver started, which passes each stop on as one
        SIGTERM; a terminal's Ctrl-C, sent to the whole process group, is ignored here, or it
        would count as a second signal and stop the process at once."""
        self.requested, self.quiet, self.stream, self.driven = False, quiet, stream, driven
        self.listeners: list[Callable[[int], None]] = []

    def __enter__(self) -> GracefulStop:
        handlers: dict[int, Any] = {sig: self._handle for sig in self.SIGNALS}
        if self.driven:
            handlers[signal.SIGINT] = signal.SIG_IGN
        self.previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        again, self.requested = self.requested, True
        for listener in self.listeners:  # the processes this one started get each signal
            listener(signum)
        if again:
            raise KeyboardInterrupt
        if not self.quiet:
            name = signal.Signals(signum).name
            print(
                f"\n{name}: stopping after this epoch ({name} again to stop at once)",
                file=self.stream,
            )

    def __call__(self) -> bool:
        return self.requested


class StudyLock:
    """A lock shared by every worker of a study, on any host that reaches its storage: a
    PostgreSQL advisory lock on the Optuna database, or a file lock beside a SQLite file.

    It makes "count the trials, then start one" atomic, so N workers finish exactly n_trials.
    Waiting is bounded by ``timeout``; after a while it says what it waits for (and, on
    PostgreSQL, which client holds the lock).
    """

    def __init__(
        self,
        url: str,
        study_name: str,
        timeout: float,
        purpose: str = "trials",
        stream: TextIO = sys.stderr,
    ) -> None:
        self.url, self.timeout, self.stream = url, timeout, stream
        self.name = f"study lock of {study_name!r}" + (
            "" if purpose == "trials" else f" ({purpose})"
        )
        self.key = zlib.crc32(
            study_name.encode() + (b"" if purpose == "trials" else purpose.encode())
        )
        self._release: Callable[[], None] | None = None
        self._engine: sqlalchemy.Engine | None = None

    def try_acquire(self) -> bool:
        """Take the lock if it is free; True if taken."""
        if self.url.startswith("sqlite:///"):
            lock = file_lock(self.url.removeprefix("sqlite:///") + f".{self.key}.lock")
            try:
                lock.acquire(timeout=0)
            except filelock.Timeout:
                return False
            self._release = lock.release
            return True
        connection = self._postgres().connect()
        query = sqlalchemy.text("SELECT pg_try_advisory_lock(:k)")
        if not connection.execute(query, {"k": self.key}).scalar():
            connection.close()
            return False

        def release() -> None:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
            connection.close()

        self._release = release
        return True

    def acquire(self) -> None:
        started = noticed = time.monotonic()
        while not self.try_acquire():
            now = time.monotonic()
            if now - started > self.timeout:
                raise LockTimeout(
                    f"waited {self.timeout:g} s for the {self.name}, held by {self.holder()};"
                    " if that process is gone for good, its lock ends with its connection"
                )
            if now - noticed > LOCK_NOTICE:
                print(f"waiting for the {self.name}, held by {self.holder()}", file=self.stream)
                noticed = now
            time.sleep(LOCK_POLL)

    def holder(self) -> str:
        """Who holds the lock, as far as the storage can tell."""
        if not self.url.startswith("postgresql"):
            return "another process on this machine"
        query = sqlalchemy.text(
            "SELECT a.application_name, a.client_addr, a.pid, a.backend_start"
            " FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.locktype = 'advisory' AND l.granted AND l.objid = :k"
        )
        with self._postgres().connect() as connection:
            row = connection.execute(query, {"k": self.key}).first()
        if row is None:
            return "nobody any more"
        name, address, pid, since = row
        where = f"{name or 'a client'} at {address or 'the local socket'}"
        return f"{where} (server pid {pid}, connected {since:%Y-%m-%d %H:%M:%S})"

    def _postgres(self) -> sqlalchemy.Engine:
        if self._engine is None:
            self._engine = sqlalchemy.create_engine(
                self.url,
                poolclass=sqlalchemy.pool.NullPool,
                connect_args={
                    "application_name": f"lstm_sweep {m.this_process()}",
                    "connect_timeout": 10,
                },
            )
        return self._engine

    def release(self) -> None:
        if self._release is not None:
            release, self._release = self._release, None
            release()

    def dispose(self) -> None:
        """Release, and close the lock's database engine."""
        self.release()
        if self._engine is not None:
            self._engine.dispose()

    def __enter__(self) -> StudyLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass
class Sweep:
    """A sweep, validated and connected: what every worker of this process shares."""

    path: str
    overrides: list[str]
    cfg: Config
    tasks: TaskCache
    tracker: Tracker
    study: Study
    lock: StudyLock = field(repr=False)
    on_stale: StaleTrialHandler = field(repr=False)

    def store_urls(self) -> dict[str, str]:
        return store_urls(self.cfg, self.tracker.uri)


def data_variants(cfg: Config) -> list[Config]:
    """The config as given, and one per value at the edge of each searched data key: loading
    them all up front finds a window too long or a log of a non-positive series before any
    trial exists."""
    variants = [cfg]
    for key, param in cfg.search.items():
        if key.startswith("data."):
            variants += [cfg.with_values({key: value}) for value in param.bounds()]
    return variants


def prepare(path: str, overrides: list[str]) -> Sweep:
    """Validate the config and the data and connect to both stores; ConfigError on any fault,
    found before a run or trial exists."""
    cfg = load_config(path, overrides)
    quiet_store_faults_in_threads()
    tasks = TaskCache()
    for variant in data_variants(cfg):
        tasks.get(variant)
    tracker = Tracker(cfg.tracking.uri, cfg.experiment, path)
    on_stale = StaleTrialHandler(tracker)
    study = open_study(cfg, path, on_stale)
    lock = StudyLock(storage_url(cfg), cfg.study_name, cfg.study.lock_timeout)
    return Sweep(path, list(overrides), cfg, tasks, tracker, study, lock, on_stale)


def start(sweep: Sweep) -> str:
    """Open (or resume) the sweep's parent run and queue the trials a previous run lost.

    Under the study lock, so workers starting together on several hosts share one parent run
    and retry each lost trial once. What an earlier run left behind when it stopped abruptly
    (a full disk, a killed process) is repaired first, and said: trials left RUNNING by a
    process that is gone, and trial runs whose status disagrees with Optuna's record.
    """
    cfg = sweep.cfg
    with sweep.lock:
        params = flatten(cfg.model_dump(mode="json"))
        data = describe(cfg.data.path, sweep.tasks.get(cfg).data)
        parent_id = sweep.tracker.open_parent(cfg.study_name, params, data)
        lost = fail_stale_trials(sweep.study, cfg.study.grace_seconds, sweep.on_stale)
        closed = reconcile_runs(sweep.study, sweep.tracker, parent_id)
        retry_failed(sweep.study)
    if lost or closed:
        print(f"repaired: {repairs(lost, closed)}", file=sys.stderr)
    warnings = sanity_warnings(cfg)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if warnings:
        sweep.tracker.set_tags(parent_id, {m.SANITY_TAG: " | ".join(warnings)})
    return parent_id


def repairs(lost: list[int], closed: list[int]) -> str:
    """What start-up repaired, in words: ``lost`` trials failed and queued again, the runs of
    ``closed`` trials closed as their trials ended."""
    said = []
    if lost:
        said.append(
            f"trial(s) {_numbers(lost)} left RUNNING by a process that is gone were failed and"
            " queued again"
        )
    if closed:
        said.append(f"the MLflow runs of trial(s) {_numbers(closed)} now end as Optuna recorded")
    return "; ".join(said)


def _numbers(numbers: list[int]) -> str:
    return ", ".join(str(n) for n in sorted(numbers))


def optimize(
    sweep: Sweep,
    objective: Callable[[Any], float],
    callbacks: list[Callable[..., None]],
    stop_requested: Callable[[], bool],
    poll_seconds: float = 1.0,
) -> None:
    """This worker's loop: run trials until the study holds ``n_trials`` finished (complete or
    pruned) ones, or fewer where it stopped itself (``study.stop``), alone or beside other
    workers on the same storage.

    Counting and starting a trial happen under the study lock, and trials that other workers
    are running count as taken, so the study ends with exactly that many; a worker that
    finds all remaining trials taken waits, in case one of them is lost and comes back. A
    worker also waits while the batch before its next trial's runs (``study.batch``): the
    sampler proposes from finished batches only, so any number of workers gives one study
    (the first settings, which nothing decides by other trials, do not wait:
    :func:`blind_settings`).
    """
    cfg, study, lock = sweep.cfg, sweep.study, sweep.lock
    # Start-up's objects (torch, MLflow, SQLAlchemy, the data) live as long as the process:
    # frozen, the collector stops walking them, and its full passes during the trials drop
    # from ~0.3 s each to a few ms (on a small series that was ~2 ms per epoch).
    gc.freeze()
    blind = blind_settings(cfg)
    timeout = cfg.study.timeout
    deadline = time.monotonic() + timeout if timeout else float("inf")
    while time.monotonic() < deadline and not stop_requested():
        lock.acquire()
        try:
            fail_stale_trials(study, cfg.study.grace_seconds, sweep.on_stale)
            trials = study.get_trials(deepcopy=False)
            counts = Counter(t.state.name for t in trials)
            finished = counts[m.COMPLETE] + counts[m.PRUNED]
            target = target_trials(trials, cfg)  # fewer than n_trials once it stopped itself
            if finished >= target:
                return
            if finished + counts["RUNNING"] >= target:
                lock.release()
                time.sleep(poll_seconds)
                continue
            if not may_propose(trials, cfg.study.batch, blind):  # the batch before still runs
                lock.release()
                time.sleep(BATCH_POLL_SECONDS)
                continue

            def run_released(trial: Any) -> float:
                lock.release()  # the trial is RUNNING in storage now: others see it as taken
                return objective(trial)

            run_one_trial(study, run_released, callbacks)
        finally:
            lock.release()


def work(
    sweep: Sweep,
    parent_id: str,
    stop: GracefulStop,
    callbacks: list[Callable[..., None]],
    threads: int = 1,
) -> None:
    """One worker: run trials until the study holds n_trials; Interrupted if asked to stop,
    StoreFailed if a store failed under it."""
    # One thread per worker process by default, however many workers: the models are small,
    # so a second intra-op thread mostly waits on the first, and next to any other busy
    # process its spinning slows a fit down tenfold or more (measured); processes use the
    # cores instead. An engine that reserves several CPUs per worker passes their count.
    torch.set_num_threads(threads)
    objective = Objective(sweep.cfg, sweep.tasks, sweep.tracker, parent_id, stop)
    try:
        optimize(sweep, objective, callbacks, stop)
    except Exception as exc:  # a store fault becomes its one line; anything else goes on
        failure = store_failure(exc, sweep.store_urls())
        if failure is None:
            raise
        raise failure from None
    if stop.requested:  # asked between two trials
        raise Interrupted


def worker_exit(body: Callable[[], None], urls: Mapping[str, str]) -> WorkerExit:
    """Run a worker's whole life (``body``) and say how it ended, whichever engine runs it:
    0 when done; EXIT_INTERRUPTED when stopped; EXIT_FAILED with its line when the config, the
    tracking store or the study lock stayed out of reach; EXIT_STORE with its line when a store
    at ``urls`` failed. Anything else is a bug and propagates."""
    try:
        body()
    except KeyboardInterrupt:  # Interrupted too: the run in flight is closed as failed
        return WorkerExit(EXIT_INTERRUPTED)
    except (ConfigError, TrackingUnavailable, LockTimeout) as exc:  # the driver sums up
        return WorkerExit(EXIT_FAILED, f"worker {m.this_process()}: {mask_secrets(str(exc))}")
    except Exception as exc:
        failure = store_failure(exc, urls)
        if failure is None:
            raise
        return WorkerExit(EXIT_STORE, str(failure))
    return WorkerExit(0)


def store_urls(cfg: Config, tracking_uri: str | None = None) -> dict[str, str]:
    """Each store's URL, by the library that writes it, and where the sweep writes its own
    files (the report): what faults.store_failure names."""
    files = str(STORE_ROOT.resolve())
    tracking = tracking_uri or cfg.tracking.uri or default_tracking_uri()
    return {"optuna": storage_url(cfg), "mlflow": tracking, "files": files}


def check_workers(study: Study, exits: list[WorkerExit], cfg: Config) -> None:
    """After the workers ended, their lines said (but a store failure's, said once for all):
    StoreFailed if a store failed under one and the study is short of its trials (n_trials,
    or fewer where it stopped itself), Interrupted if they were stopped, SweepIncomplete if
    they all died short of them, a warning line if some died but the others finished it."""
    n_trials = target_trials(study.get_trials(deepcopy=False), cfg)
    for said in [e.message for e in exits if e.message and e.code != EXIT_STORE]:
        print(said, file=sys.stderr)
    exit_codes = [e.code for e in exits]
    failed = [e.message or "a store failed under a worker" for e in exits if e.code == EXIT_STORE]
    counted = counted_trials(study)
    if failed and counted < n_trials:
        raise StoreFailed(failed[0])
    if EXIT_INTERRUPTED in exit_codes:
        raise Interrupted
    for line in failed:  # the study is whole all the same: the closing stage goes on
        print(f"warning: a worker stopped: {line}", file=sys.stderr)
    lost = [code for code in exit_codes if code]
    if lost and counted < n_trials:
        raise SweepIncomplete(
            f"{len(lost)} of {len(exit_codes)} workers exited with codes {lost} and the study"
            f" holds {counted} of {n_trials} trials"
        )
    if lost:  # e.g. a killed worker: the others retried its trial, the sweep is whole
        print(
            f"warning: {len(lost)} worker(s) lost (exit codes {lost});"
            " their trials were retried by the others",
            file=sys.stderr,
        )


@dataclass
class JobContext:
    """What one job of the closing stage (a seed re-evaluation) needs, in whichever process
    an engine runs it: the config, the data, the tracker, the sweep's run, a stop request."""

    cfg: Config
    tasks: TaskCache
    tracker: Tracker
    parent_id: str
    stop_requested: Callable[[], bool]

    @classmethod
    def open(cls, cfg: Config, source: str, parent_id: str, stop: Callable[[], bool]) -> JobContext:
        """Connected afresh, for a process of its own: the tracker only, no study."""
        tracker = Tracker(cfg.tracking.uri, cfg.experiment, source)
        return cls(cfg, TaskCache(), tracker, parent_id, stop)


JobFunction = Callable[[JobContext, Any], None]
