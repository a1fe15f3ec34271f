"""Fixtures: real stores under tmp_path, the real sweep files shrunk, one finished sweep shared.

Creating an MLflow SQLite store runs its migrations (seconds), so one is made per session and
copied into each test's own mlruns/.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from mlflow.tracking import MlflowClient

from lstm_sweep.config import Config, load_config
from lstm_sweep.tasks import Task, TaskCache
from tests.helpers import (
    POSTGRES,
    QUICK,
    TINY,
    MlflowServer,
    fresh_database,
    load_study,
    mlflow_client,
    postgres_or_skip,
    runs_of,
    sweep_args,
)


def pytest_configure(config: pytest.Config) -> None:
    # the tests' models are tiny: a second intra-op thread only waits on the first, and with
    # anything else running it can slow a fit down a hundredfold
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()  # runs the migrations once
    return path


def new_stores(folder: Path, template: Path) -> Path:
    root = folder / "mlruns"
    root.mkdir(parents=True)
    shutil.copy(template, root / "mlflow.db")
    return root


@pytest.fixture
def stores(tmp_path: Path, mlflow_template: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh mlruns/ in the test's working directory, where the default URIs point."""
    monkeypatch.chdir(tmp_path)
    return new_stores(tmp_path, mlflow_template)


@pytest.fixture(scope="session")
def tracking_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real ``mlflow server`` for the scale-out tests, on its own fresh PostgreSQL database
    (each test uses an experiment and a model name of its own)."""
    artifacts = tmp_path_factory.mktemp("mlflow_server") / "artifacts"
    with (
        fresh_database(postgres_or_skip()) as name,
        MlflowServer(f"{POSTGRES}/{name}", artifacts) as server,
    ):
        yield server.uri


@pytest.fixture(scope="session")
def tiny_cfg() -> Config:
    return load_config(QUICK, TINY)


@pytest.fixture(scope="session")
def tiny_task(tiny_cfg: Config) -> Task:
    """The tiny quick sweep's data (real CO2), loaded once."""
    return TaskCache().get(tiny_cfg)


@pytest.fixture(scope="session")
def finished(tmp_path_factory: pytest.TempPathFactory, mlflow_template: Path) -> SimpleNamespace:
    """One tiny sweep with its closing stage and report, run through the command line once and
    shared by the tests that only read it."""
    from lstm_sweep.run import main

    folder = tmp_path_factory.mktemp("finished")
    root = new_stores(folder, mlflow_template)
    args = sweep_args(
        "closing.model_name=co2-tiny",
        "closing.baselines=null",  # every baseline
        "study.n_trials=5",
        "diagnostics.level=full",
        "tracking.system_metrics_seconds=1",
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        assert main(args) == 0
    client = mlflow_client(root)
    experiment = client.get_experiment_by_name("co2-quick").experiment_id
    (parent,) = runs_of(client, "co2-quick", "sweep")
    return SimpleNamespace(
        args=args,
        root=root,
        folder=folder,
        study=load_study(root),
        client=client,
        experiment=experiment,
        parent=client.get_run(parent.info.run_id),
        report=root / "reports" / "co2-quick",
    )
