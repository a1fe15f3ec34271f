"""Scale-out on the real engines: two workers on one Optuna study in PostgreSQL, tracked by a real
``mlflow server`` backed by PostgreSQL, through the real command line.

Skipped with a reason where no PostgreSQL answers at 127.0.0.1:5432; a failure when CI=true.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from mlflow.tracking import MlflowClient

from lstm_sweep import metrics as m
from tests.helpers import (
    command,
    environment,
    fresh_database,
    postgres_or_skip,
    runs_of,
    sweep_args,
)

pytestmark = pytest.mark.slow
PASSWORD = "s3cret-in-uri"  # trust auth accepts any password: it must never be printed or logged


@pytest.fixture(scope="module")
def postgres() -> sqlalchemy.Engine:
    return postgres_or_skip()


def test_two_workers_on_postgres_and_an_mlflow_server_finish_one_study_exactly(
    postgres: sqlalchemy.Engine, tracking_server: str, tmp_path: Path
) -> None:
    n_trials = 4
    with fresh_database(postgres) as name:
        storage = f"postgresql://postgres:{PASSWORD}@127.0.0.1:5432/{name}"
        args = sweep_args(
            f"study.n_trials={n_trials}",
            # unpruned trials of several seconds: the spawned worker (~6 s of imports) joins
            "train.max_epochs=100",
            "train.patience=100",
            "study.pruner.type=none",
            f"study.storage={storage}",
            f"tracking.uri={tracking_server}",
            "report.model_name=scaleout",
        )
        result = subprocess.run(
            command(*args, "--workers", "2"),
            cwd=tmp_path,
            env=environment(),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert PASSWORD not in result.stdout + result.stderr
        trials = optuna.load_study(study_name="co2-quick", storage=storage).get_trials()
    counted = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(counted) == n_trials
    assert len({t.number for t in trials}) == len(trials)
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    assert len({t.user_attrs[m.WORKER_ATTR] for t in trials}) == 2  # both worked

    client = MlflowClient(tracking_server)
    runs = runs_of(client, "co2-quick", m.ROLE_TRIAL)
    (parent,) = runs_of(client, "co2-quick", m.ROLE_SWEEP)
    assert parent.info.status == "FINISHED" and m.NOTE_TAG in parent.data.tags
    assert len(runs) == len(trials)
    assert all(r.info.status != "RUNNING" for r in runs)
    by_id = {r.info.run_id: r for r in runs}
    for trial in trials:
        run = by_id[trial.user_attrs[m.RUN_ID_ATTR]]
        assert run.data.tags[m.TRIAL_TAG] == str(trial.number)
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status == m.RUN_STATUS[trial.state.name]
        history = client.get_metric_history(run.info.run_id, m.VAL_LOSS)
        assert len(history) == trial.user_attrs[m.EPOCHS_TRAINED]
    versions = client.search_model_versions("name = 'scaleout'")
    assert len(versions) == 1, result.stdout + result.stderr
    logged = [v for r in [*runs, parent] for v in [*r.data.params.values(), *r.data.tags.values()]]
    assert any("***@127.0.0.1:5432" in v for v in logged)  # the storage URI is logged, masked
    assert not any(PASSWORD in v for v in logged)
