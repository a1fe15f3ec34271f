"""Shared test helpers: the shipped sweep files shrunk to seconds, small series written to disk,
the real command in a subprocess, the stores read back with the real clients, and real servers
(PostgreSQL databases, an ``mlflow server``) for the scale-out tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import pytest
import sqlalchemy
import yaml
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "sweeps" / "quick.yaml"
FORECAST = ROOT / "sweeps" / "forecast.yaml"
CLASSIFY = ROOT / "sweeps" / "classify.yaml"
# the classification example shrunk to seconds
TINY_CLASSIFY = [
    "model.num_layers=1",
    "model.hidden_size=16",
    "train.max_epochs=3",
    "study.n_trials=3",
    "study.n_startup_trials=2",
    "diagnostics.eval_subsample=256",
    "train.batch_size=128",
    "closing.top_k=2",
    "closing.seeds=2",
    "study.workers=1",
    "search.model.hidden_size={type: categorical, choices: [32, 64]}",  # not the file's 128
]
CO2 = ROOT / "sweeps" / "data" / "co2_weekly.csv"
IN_CI = os.environ.get("CI") == "true"
POSTGRES = "postgresql://postgres@127.0.0.1:5432"

# The quick sweep, shrunk: tiny model, few epochs, few trials. Still the real CO2 data.
TINY = [
    "data.window=8",
    "data.horizon=2",
    "model.num_layers=1",
    "model.hidden_size=8",
    "train.max_epochs=4",
    "train.batch_size=256",
    "study.n_trials=4",
    "study.n_startup_trials=2",
    "diagnostics.eval_subsample=256",
    "study.workers=1",  # one process: the tests read exact trial sequences back
    "closing.top_k=2",
    "closing.seeds=2",
    # a monitor thread per run: the finished sweep below and test_tracking check them
    "tracking.system_metrics_seconds=0",
    # the cheap baselines (the MLP and the ARIMA's order search cost a second a sweep): the
    # finished sweep in conftest fits all of them
    "closing.baselines=[seasonal_naive, ridge_ar]",
]


def sweep_args(*extra: str, sweep: Path = QUICK) -> list[str]:
    """Command-line arguments of the tiny quick sweep, with more overrides."""
    return [str(sweep), "--no-progress", *(f"--set={s}" for s in [*TINY, *extra])]


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "lstm_sweep.run", *args]


def environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


class HeldSweep:
    """The real command in a subprocess, its runs of ``roles`` held mid-training by the test's
    hold (tests/pause/sitecustomize.py) until :meth:`release`: the test acts on a sweep in a
    known state, whatever the machine's speed. Its stderr goes to a file (nobody reads a pipe
    until the end); the process is killed if the block ends with it still running."""

    def __init__(self, args: list[str], roles: str, folder: Path, cwd: Path | None = None) -> None:
        self.args, self.cwd, self.roles = args, cwd, roles.split(",")
        self.folder = folder / "hold"
        self.folder.mkdir(parents=True)
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests" / "pause")]),
            "LSTM_SWEEP_PAUSE": roles,
            "LSTM_SWEEP_PAUSE_DIR": str(self.folder),
        }
        self.log_path = folder / "stderr.txt"

    def __enter__(self) -> HeldSweep:
        self.log = self.log_path.open("w")
        self.process = subprocess.Popen(
            self.args,
            env=self.env,
            cwd=self.cwd,
            stderr=self.log,
            stdout=subprocess.DEVNULL,
            start_new_session=True,  # its own process group, as a terminal gives a command
        )
        return self

    def ctrl_c(self) -> None:
        """SIGINT to the command's whole process group, as a terminal's Ctrl-C sends it."""
        os.killpg(self.process.pid, signal.SIGINT)

    def held(self, count: int, role: str | None = None) -> list[int]:
        """Once ``count`` runs (of ``role``, or of any role held) are held: their process ids."""
        pattern = f"{role or '*'}-[0-9]*"

        def marks() -> list[int] | None:
            assert self.process.poll() is None, self.log_path.read_text()[-3000:]
            found = [int(p.name.rsplit("-", 1)[1]) for p in self.folder.glob(pattern)]
            return found if len(found) >= count else None

        return wait_for(marks)

    def release(self, role: str | None = None) -> None:
        """Let the runs of ``role`` (or of every role held) go on, and those yet to come."""
        for name in [role] if role else self.roles:
            (self.folder / f"go-{name}").touch()

    def finish(self, timeout: float = 180) -> tuple[int, str]:
        """Let the runs go and wait for the command: its exit status and its stderr."""
        self.release()
        self.process.wait(timeout=timeout)
        return self.process.returncode, self.log_path.read_text()

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:  # its workers too: held, they would wait for minutes
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.log.close()


def write_series(path: Path, values: np.ndarray, **extra: np.ndarray) -> Path:
    """A weekly series as a CSV with a `date` column and a `y` target."""
    frame = pd.DataFrame(
        {"date": pd.date_range("2000-01-01", periods=len(values), freq="W"), "y": values, **extra}
    )
    frame.to_csv(path, index=False)
    return path


def write_sweep(path: Path, data_path: Path, **sections: dict[str, Any]) -> Path:
    """A minimal sweep file on a given CSV; sections override the defaults."""
    raw: dict[str, Any] = {
        "experiment": "test",
        "data": {"path": str(data_path), "time_column": "date", "target": "y", "window": 8},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(raw))
    return path


def load_study(root: Path, name: str = "co2-quick") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{root / 'optuna.db'}")


def mlflow_client(root: Path) -> MlflowClient:
    uri = f"sqlite:///{root / 'mlflow.db'}"
    return MlflowClient(uri, registry_uri=uri)


def runs_of(client: MlflowClient, experiment: str, role: str) -> list[Any]:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    return client.search_runs([found.experiment_id], f"tags.`lstm_sweep.role` = '{role}'")


def wait_for(condition: Callable[[], Any], timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)
    return value


def running_trial(storage: str, study: str = "co2-quick") -> optuna.trial.FrozenTrial | None:
    """A RUNNING trial that has reported an epoch, or None (also before the study exists)."""
    try:
        trials = optuna.load_study(study_name=study, storage=storage).trials
    except Exception:  # the study or its tables do not exist yet
        return None
    running = [t for t in trials if t.state.name == "RUNNING" and t.intermediate_values]
    return running[0] if running else None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def postgres_or_skip() -> sqlalchemy.Engine:
    engine = sqlalchemy.create_engine(f"{POSTGRES}/postgres", isolation_level="AUTOCOMMIT")
    try:
        engine.connect().close()
    except sqlalchemy.exc.OperationalError as exc:
        reason = f"no PostgreSQL at 127.0.0.1:5432 ({str(exc).splitlines()[0]})"
        if IN_CI:
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)
    return engine


@contextmanager
def fresh_database(engine: sqlalchemy.Engine) -> Iterator[str]:
    """A new, empty database for one test, dropped afterwards; yields its name."""
    name = f"lstm_sweep_test_{uuid.uuid4().hex[:12]}"
    with engine.connect() as connection:
        connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    try:
        yield name
    finally:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text(f'DROP DATABASE "{name}" WITH (FORCE)'))


class MlflowServer:
    """A real ``mlflow server`` on a loopback port with artifacts served: a context manager that
    yields itself once GET /health answers; ``stop()`` kills it early (a crash, not a shutdown).
    """

    def __init__(self, backend: str, artifacts: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.command = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            backend,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--serve-artifacts",
            "--artifacts-destination",
            str(artifacts),
        ]
        self.log = artifacts.parent / f"mlflow_server_{self.port}.log"

    def __enter__(self) -> MlflowServer:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("a") as out:
            self.process = subprocess.Popen(
                self.command,
                stdout=out,
                stderr=out,
                start_new_session=True,
                # no background job runner: it would start seven more processes per server
                env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            )
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2).close()
                return self
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    log = self.log.read_text()[-2000:]
                    raise RuntimeError(f"mlflow server did not start: {log}") from None
                time.sleep(0.3)

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig)  # the server, its uvicorn and job workers
            self.process.wait(timeout=30)

    def __exit__(self, *exc: object) -> None:
        self.stop(signal.SIGTERM)


MASK = "***"  # what a masked password reads as


def url_with_password(url: str, password: str) -> str:
    """``url`` with ``password`` given to its user: the tests build their credential URLs (a
    fake password, or the mask they expect back) rather than spell them out in the repo."""
    scheme, rest = url.split("://", 1)
    user, host = rest.split("@", 1)
    return f"{scheme}://{user}:{password}@{host}"
