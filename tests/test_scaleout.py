"""Scale-out on the real engines: two workers on one Optuna study in PostgreSQL, tracked by a real
``mlflow server`` backed by PostgreSQL, through the real command line.

Skipped with a reason where no PostgreSQL answers at 127.0.0.1:5432; a failure when CI=true.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from mlflow.tracking import MlflowClient

from lstm_sweep import diagnostics as dg
from lstm_sweep.tracking import RUN_STATUS, STATE_TAG, TRIAL_TAG
from tests.conftest import IN_CI, QUICK, ROOT, TINY

POSTGRES = "postgresql://postgres@127.0.0.1:5432"
PASSWORD = "s3cret-in-uri"  # trust auth accepts any password: it must never be printed or logged


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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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
        with self.log.open("a") as out:
            self.process = subprocess.Popen(
                self.command, stdout=out, stderr=out, start_new_session=True
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


@pytest.fixture(scope="module")
def postgres() -> sqlalchemy.Engine:
    return postgres_or_skip()


@pytest.fixture(scope="module")
def tracking_server(
    postgres: sqlalchemy.Engine, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """One MLflow server per module, on its own fresh PostgreSQL database."""
    artifacts = tmp_path_factory.mktemp("mlflow_server") / "artifacts"
    with fresh_database(postgres) as name, MlflowServer(f"{POSTGRES}/{name}", artifacts) as server:
        yield server.uri


def test_two_workers_on_postgres_and_an_mlflow_server_finish_one_study_exactly(
    postgres: sqlalchemy.Engine, tracking_server: str, tmp_path: Path
) -> None:
    with fresh_database(postgres) as name:
        storage = f"postgresql://postgres:{PASSWORD}@127.0.0.1:5432/{name}"
        n_trials = 6
        command = [
            sys.executable,
            "-m",
            "lstm_sweep.run",
            str(QUICK),
            "--workers",
            "2",
            "--no-progress",
            *(f"--set={s}" for s in TINY),
            f"--set=study.n_trials={n_trials}",
            f"--set=study.storage={storage}",
            f"--set=tracking.uri={tracking_server}",
        ]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        result = subprocess.run(
            command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert PASSWORD not in result.stdout + result.stderr

        study = optuna.load_study(study_name="co2-quick", storage=storage)
        trials = study.get_trials(deepcopy=False)
        counted = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
        assert len(counted) == n_trials
        assert len({t.number for t in trials}) == len(trials)
        assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]

    client = MlflowClient(tracking_server)
    experiment = client.get_experiment_by_name("co2-quick").experiment_id
    runs = client.search_runs([experiment], "tags.`lstm_sweep.role` = 'trial'")
    parents = client.search_runs([experiment], "tags.`lstm_sweep.role` = 'sweep'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(runs) == len(trials)
    assert all(r.info.status != "RUNNING" for r in runs)
    by_id = {r.info.run_id: r for r in runs}
    for trial in trials:
        run = by_id[trial.user_attrs["mlflow_run_id"]]
        assert run.data.tags[TRIAL_TAG] == str(trial.number)
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.info.status == RUN_STATUS[trial.state.name]
        assert run.data.tags[STATE_TAG] == trial.state.name
        assert dg.BEST_VAL_LOSS in run.data.metrics
        history = client.get_metric_history(run.info.run_id, dg.VAL_LOSS)
        assert len(history) == trial.user_attrs["epochs_trained"]
    logged = [
        v for r in [*runs, *parents] for v in [*r.data.params.values(), *r.data.tags.values()]
    ]
    assert any("***@127.0.0.1:5432" in v for v in logged)  # the storage URI is logged, masked
    assert not any(PASSWORD in v for v in logged)
