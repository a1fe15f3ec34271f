"""Workers on a Ray cluster: ``python -m lstm_sweep.run SWEEP.yaml --ray ADDRESS --workers N``.

Ray places the workers and restarts the ones that die; it does not search. Each worker is an
actor that runs the loop of a local worker (:func:`lstm_sweep.sweep.work`) against the
shared Optuna storage and MLflow server, so the sampler, the pruner, the study lock, heartbeats
and stale-trial retries work as they do for processes on one machine:

- a worker that dies mid-trial is restarted by Ray (``study.ray.max_restarts``) and its call is
  resubmitted; its trial, silent for ``study.grace_seconds``, is failed by whichever worker next
  takes the study lock, its run closed as FAILED and its settings queued again;
- Ctrl-C or SIGTERM on the driver reaches every worker as a stop request, seen at the end of its
  current epoch, so each trial and run in flight ends as failed (to be retried) and the driver
  exits 130; a second signal kills the workers at once;
- the report is written once, by the driver, after every worker has returned.

Ray is an optional extra, imported only here and only when ``--ray`` is given.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

import torch

from lstm_sweep.config import Config, ConfigError, load_config, mask_secrets
from lstm_sweep.engines import Engine
from lstm_sweep.sweep import (
    EXIT_FAILED,
    GracefulStop,
    Sweep,
    WorkerExit,
    check_workers,
    prepare,
    work,
    worker_exit,
)
from lstm_sweep.train import Interrupted

LOCAL = "local"  # --ray without ADDRESS: Ray's own word for "start a local instance"
INSTALL_HINT = 'pip install -e ".[ray]"'
POLL_SECONDS = 0.2  # the driver passes on a stop this often: a worker stops within an epoch
PROGRESS_SECONDS = 1.0  # and reads the study for the progress bar this often
CONNECT_TIMEOUT = 5.0  # seconds for the cluster's port to accept a connection at start-up
RAY_PORT = 6379  # Ray's default GCS port, when ADDRESS names a host only
CLIENT_PORT = 10001  # Ray Client's default port (ray://host)


class RayMissing(ConfigError):
    """``--ray`` on an install without the ``ray`` extra: a ConfigError, so the command line
    shows it as one line with exit 2, but worded as the install hint, not as a key's value."""

    def __init__(self) -> None:
        self.source, self.key, self.value, self.rule = "--ray", "", None, INSTALL_HINT
        ValueError.__init__(self, f"--ray needs Ray: {INSTALL_HINT}")


def import_ray() -> Any:
    """The ``ray`` module, imported only once ``--ray`` is given; RayMissing without it."""
    try:
        import ray
    except ImportError:
        raise RayMissing() from None
    return ray


def check_cluster(path: str, overrides: list[str], address: str) -> None:
    """Before any store, study or run exists: Ray is installed, the cluster answers, and every
    worker, on whichever node Ray places it, can reach the Optuna storage and the tracking
    store. ConfigError (one line) otherwise."""
    cfg = load_config(path, overrides)
    refuse_local_stores(cfg, path)
    ray = import_ray()
    if address == LOCAL:
        return  # one machine: its loopback and sockets are the workers' too
    connect(ray, address)
    try:
        refuse_loopback(cfg, path, other_hosts(ray.nodes()))
    finally:
        ray.shutdown()  # run_ray_workers connects again once the stores are open


def refuse_local_stores(cfg: Config, source: str) -> None:
    """SQLite (the default stores) is a file on one machine: workers elsewhere cannot share it."""
    storage, tracking = cfg.study.storage, cfg.tracking.uri
    if storage is None or storage.startswith("sqlite"):
        raise ConfigError(
            source,
            "study.storage",
            storage,
            "Ray workers share one study through a database server every node reaches, not a"
            " SQLite file: set study.storage to postgresql://USER@HOST:5432/DB (the password"
            " from PGPASSWORD)",
        )
    if tracking is None or urllib.parse.urlsplit(tracking).scheme in ("", "file", "sqlite"):
        raise ConfigError(
            source,
            "tracking.uri",
            tracking,
            "Ray workers log to one MLflow tracking server every node reaches, not a local"
            " file: set tracking.uri to http://HOST:5000 (an `mlflow server --serve-artifacts`;"
            " the password from MLFLOW_TRACKING_PASSWORD)",
        )


def other_hosts(nodes: list[dict[str, Any]]) -> list[str]:
    """Hosts of the live Ray nodes other than this one: a loopback address or a local socket
    means a different machine (or container) to each of them."""
    here = socket.gethostname()
    return sorted({n["NodeManagerHostname"] for n in nodes if n["Alive"]} - {here})


def is_loopback(url: str) -> bool:
    """Whether a store URL names this machine only: localhost, a 127.x or ::1 address, or no
    host at all (a Unix socket)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or urllib.parse.parse_qs(parts.query).get("host", [""])[0]
    if not host or host.startswith("/") or host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: taken as reachable, as a worker would resolve it
        return False


def refuse_loopback(cfg: Config, source: str, hosts: list[str]) -> None:
    """ConfigError when a store is on this machine's loopback and Ray nodes run elsewhere."""
    if not hosts:
        return
    for key, url in (("study.storage", cfg.study.storage), ("tracking.uri", cfg.tracking.uri)):
        if url is not None and is_loopback(url):
            named = ", ".join(hosts[:3]) + (f" and {len(hosts) - 3} more" if hosts[3:] else "")
            raise ConfigError(
                source,
                key,
                url,
                f"is this machine's loopback, which the Ray nodes on {named} cannot reach: use"
                f" a host name or address they all reach (this machine is"
                f" {socket.gethostname()!r})",
            )


def check_answers(address: str) -> None:
    """Fail fast when nothing listens at ADDRESS: Ray itself would retry for minutes."""
    if address == "auto":
        return  # Ray finds the local cluster itself and says so at once if there is none
    parts = urllib.parse.urlsplit(address if "://" in address else f"ray://{address}")
    default = CLIENT_PORT if address.startswith("ray://") else RAY_PORT
    try:
        host, port = parts.hostname or "", parts.port or default
    except ValueError:  # a port that is not a number
        rule = "must be auto, ray://HOST:10001 or HOST:6379"
        raise ConfigError("--ray", "ADDRESS", address, rule) from None
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT).close()
    except OSError as exc:
        rule = f"no Ray cluster answers at {host}:{port} ({exc.strerror or exc})"
        raise ConfigError("--ray", "ADDRESS", address, rule) from None


def connect(ray: Any, address: str) -> Any:
    """Join the cluster at ``address`` (``local``: start an instance in this process); returns
    Ray's context. Ray's own SIGTERM handler (exit at once) is put back to the sweep's, so a
    SIGTERM still stops the workers gracefully."""
    if address != LOCAL:
        check_answers(address)
    kept = signal.getsignal(signal.SIGTERM)
    try:
        return ray.init(address=address, logging_level=logging.WARNING)
    except ConnectionError as exc:
        rule = str(exc).strip().splitlines()[0][:200]
        raise ConfigError("--ray", "ADDRESS", address, rule) from None
    finally:
        if kept is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, kept)


class RayCluster(Engine):
    """The workers as Ray actors on the cluster at ``address`` (``local``: a Ray instance in
    this process). The closing stage trains on the driver."""

    def check(self, path: str, overrides: list[str]) -> None:
        check_cluster(path, overrides, self.address or LOCAL)

    def run_trials(
        self, sweep: Sweep, parent_id: str, stop: GracefulStop, progress: Callable[..., None]
    ) -> None:
        run_ray_workers(sweep, parent_id, stop, progress, self.address or LOCAL)


class SweepWorker:
    """One worker on a Ray node, the actor's state. ``run`` is the loop of a local worker; the
    actor runs two calls at once, so ``stop`` reaches a run in the middle of a trial."""

    def __init__(self, path: str, overrides: list[str], parent_id: str, threads: int) -> None:
        self.path, self.overrides, self.parent_id = path, overrides, parent_id
        self.threads = threads
        # a flag only: Ray owns this process's signals, and the driver asks through stop()
        self.stop_requested = GracefulStop(quiet=True)

    def run(self) -> WorkerExit:
        """Trials until the study holds n_trials, or until stopped."""

        def life() -> None:
            sweep = prepare(self.path, self.overrides)
            # the CPUs Ray reserved, not the node's count
            work(sweep, self.parent_id, self.stop_requested, [], self.threads)

        return worker_exit(life, {})

    def stop(self) -> None:
        self.stop_requested.requested = True


def run_ray_workers(
    sweep: Sweep,
    parent_id: str,
    stop: GracefulStop,
    progress: Callable[[], None],
    address: str,
) -> None:
    """Run ``study.workers`` workers (at most a batch's) on the Ray cluster at ``address``
    until the study holds n_trials; Interrupted if the driver was asked to stop,
    SweepIncomplete if the workers were all lost short of n_trials."""
    ray = import_ray()
    # the closing stage trains here once the workers are done: one thread, as a local worker
    # has (see sweep.work: a second thread mostly waits, and slows a busy machine down)
    torch.set_num_threads(1)
    context = connect(ray, address)
    try:
        describe_cluster(ray, context, sweep.cfg, address)
        exits = wait_for_workers(ray, start_workers(ray, sweep, parent_id), stop, progress)
    finally:
        ray.shutdown()  # a local instance ends here; a cluster keeps running
    check_workers(sweep.study, exits, sweep.cfg)
    if stop.requested:  # asked while the last trials were ending: they count, but we stop
        raise Interrupted


def describe_cluster(ray: Any, context: Any, cfg: Config, address: str) -> None:
    """One line on the cluster and the workers it gets, one on where its dashboard is, and a
    warning when the workers do not all fit now (an autoscaling cluster may add nodes)."""
    per = cfg.study.ray
    workers = cfg.study.trainers
    nodes = [n for n in ray.nodes() if n["Alive"]]
    free = ray.available_resources()
    cpus, gpus = free.get("CPU", 0.0), free.get("GPU", 0.0)
    fit = int(cpus // per.num_cpus)
    if per.num_gpus:
        fit = min(fit, int(gpus // per.num_gpus))
    gpu = f" and {per.num_gpus:g} GPU" if per.num_gpus else ""
    print(
        f"Ray cluster {mask_secrets(address)}: {len(nodes)} node(s), {cpus:g} CPUs and"
        f" {gpus:g} GPUs free; {workers} worker(s) of {per.num_cpus:g} CPU{gpu} each",
        file=sys.stderr,
    )
    if context.dashboard_url:
        url = context.dashboard_url
        print(f"Ray dashboard: {url if '://' in url else f'http://{url}'}", file=sys.stderr)
    if fit < workers:
        print(
            f"warning: the cluster has room for {fit} of {workers} workers now; the others wait"
            " for resources (see study.ray.num_cpus and num_gpus)",
            file=sys.stderr,
        )


def start_workers(ray: Any, sweep: Sweep, parent_id: str) -> list[Any]:
    """The workers as Ray actors with the resources of ``study.ray``. A worker that dies is
    restarted up to ``max_restarts`` times and its ``run`` call resubmitted to the new process
    (max_task_retries=-1: restarts are the bound)."""
    per = sweep.cfg.study.ray
    actor = ray.remote(SweepWorker).options(
        num_cpus=per.num_cpus,
        num_gpus=per.num_gpus,
        max_restarts=per.max_restarts,
        max_task_retries=-1,
        max_concurrency=2,  # run() and stop() at once
        runtime_env=per.runtime_env,
    )
    # every node reads the sweep file (and its data) at this same absolute path: baked into
    # the worker image or on a shared file system; a changed file is refused by the study's
    # fingerprint
    path = os.path.abspath(sweep.path)
    threads = max(1, int(per.num_cpus))
    return [
        actor.remote(path, sweep.overrides, parent_id, threads)
        for _ in range(sweep.cfg.study.trainers)
    ]


def wait_for_workers(
    ray: Any, actors: list[Any], stop: GracefulStop, progress: Callable[[], None]
) -> list[WorkerExit]:
    """Wait for every worker's loop, refreshing the progress bar; once a stop is requested,
    pass it on at every poll (a worker Ray restarts meanwhile gets it too). Returns how each
    worker ended."""
    runs = [actor.run.remote() for actor in actors]
    pending = list(runs)
    shown = time.monotonic()
    try:
        while pending:
            if stop.requested:  # polled here, not sent from the signal handler: Ray's calls
                for actor in actors:  # are not safe to make from inside one
                    actor.stop.remote()
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=POLL_SECONDS)
            if time.monotonic() - shown >= PROGRESS_SECONDS:
                progress()
                shown = time.monotonic()
    except BaseException:  # a second signal, or a fault in the driver: no worker trains on
        for actor in actors:
            ray.kill(actor)
        raise
    return [ended_as(ray, run) for run in runs]


def ended_as(ray: Any, run: Any) -> WorkerExit:
    """How a worker ended, as it said (check_workers says its line), or as Ray found it."""
    try:
        ended: WorkerExit = ray.get(run)
    except ray.exceptions.RayError as exc:  # lost more often than max_restarts, or a bug
        return WorkerExit(EXIT_FAILED, f"worker failed: {mask_secrets(str(exc)).strip()}")
    return ended
