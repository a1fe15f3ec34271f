"""Faults on the real code path: a worker killed mid-trial, a tracking server that goes away
mid-sweep. Nothing finished is lost and nothing is left RUNNING."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial

from lstm_sweep import metrics as m
from lstm_sweep import tracking
from lstm_sweep.run import main
from tests.helpers import (
    MlflowServer,
    command,
    environment,
    load_study,
    mlflow_client,
    runs_of,
    sweep_args,
    wait_for,
)

pytestmark = pytest.mark.slow
COUNTED = ("COMPLETE", "PRUNED")


def worker_pids(main_pid: int) -> list[int]:
    """The spawned worker processes of a running sweep (not multiprocessing's helpers)."""
    children = []
    for task in Path(f"/proc/{main_pid}/task").iterdir():
        children += [int(p) for p in (task / "children").read_text().split()]
    return [p for p in children if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]


def trial_of_a_spawned_worker(storage: str, main_pid: int) -> FrozenTrial | None:
    """A RUNNING trial that has reported an epoch in a spawned worker (the command's own
    process is a worker too; killing it would end the sweep, not lose a worker)."""
    try:
        trials = optuna.load_study(study_name="co2-quick", storage=storage).trials
    except Exception:  # the study or its tables do not exist yet
        return None
    children = worker_pids(main_pid)
    for trial in trials:
        pid = int(trial.user_attrs.get(m.WORKER_ATTR, ":0").rsplit(":", 1)[1])
        if trial.state.name == "RUNNING" and trial.intermediate_values and pid in children:
            return trial
    return None


def test_a_worker_killed_mid_trial_loses_nothing_and_leaves_nothing_running(
    stores: Path,
) -> None:
    n_trials = 4
    args = command(
        *sweep_args(
            f"study.n_trials={n_trials}",
            "train.max_epochs=100",  # trials of seconds: the spawned worker starts in time
            "train.patience=100",
            "study.pruner.type=none",
            "model.hidden_size=16",
            "study.heartbeat_seconds=1",
            "study.grace_seconds=3",
            "report.top_k=1",  # the closing stage is not under test
            "report.seeds=1",
            "report.final_model=false",
        ),
        "--workers",
        "2",
    )
    sweep = subprocess.Popen(args, env=environment(), stderr=subprocess.PIPE, text=True)
    optuna_db = f"sqlite:///{stores / 'optuna.db'}"

    victim = wait_for(lambda: trial_of_a_spawned_worker(optuna_db, sweep.pid))
    os.kill(int(victim.user_attrs[m.WORKER_ATTR].rsplit(":", 1)[1]), signal.SIGKILL)
    _, err = sweep.communicate(timeout=240)
    assert sweep.returncode == 0, err[-3000:]
    assert "1 worker(s) lost" in err

    study, client = load_study(stores), mlflow_client(stores)
    states = [t.state.name for t in study.trials]
    assert sum(s in COUNTED for s in states) == n_trials
    assert "RUNNING" not in states and "WAITING" not in states
    (killed,) = [t for t in study.trials if t.state.name == "FAIL"]
    assert killed.number == victim.number
    (retry,) = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed.number]
    assert retry.params == killed.params and retry.state.name in COUNTED
    run = client.get_run(killed.user_attrs[m.RUN_ID_ATTR])
    assert run.info.status == "FAILED"
    assert run.data.tags[m.FAILURE_REASON_TAG] == m.WORKER_LOST_REASON
    runs = runs_of(client, "co2-quick", m.ROLE_TRIAL)
    assert len(runs) == len(study.trials)
    assert all(r.info.status != "RUNNING" for r in runs)


def test_a_tracking_server_lost_mid_sweep_stops_cleanly_and_the_rerun_resumes(
    stores: Path,
    mlflow_template: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A real server, killed while the second trial trains: the sweep retries, gives up with one
    line and keeps every Optuna trial; with the server back, the same command finishes and
    closes the run the outage left open."""
    monkeypatch.setattr(tracking, "RETRY_ATTEMPTS", 3)  # give up after 0.2 + 0.4 s
    monkeypatch.setattr(tracking, "RETRY_FIRST_WAIT", 0.2)
    for name in tracking.HTTP_DEFAULTS:
        monkeypatch.delenv(name, raising=False)  # the Tracker sets them; restored afterwards
    backend = f"sqlite:///{stores / 'server.db'}"
    (stores / "server.db").write_bytes(mlflow_template.read_bytes())  # migrated already
    server = MlflowServer(backend, stores / "served")
    args = sweep_args(
        "study.n_trials=3",
        "study.pruner.type=none",
        "report.top_k=1",  # the closing stage is not under test
        "report.seeds=1",
        "report.final_model=false",
        f"tracking.uri={server.uri}",
    )
    seen_runs: list[str] = []
    on_epoch_end = tracking.RunRecorder.on_epoch_end

    def kill_server_mid_second_trial(run: tracking.RunRecorder, epoch, row, history) -> None:
        if run.run_id not in seen_runs:
            seen_runs.append(run.run_id)
        if len(seen_runs) == 2 and epoch == 1:  # the second trial's run exists and trains
            server.stop()
        on_epoch_end(run, epoch, row, history)

    monkeypatch.setattr(tracking.RunRecorder, "on_epoch_end", kill_server_mid_second_trial)
    with server:
        code = main(args)
    monkeypatch.setattr(tracking.RunRecorder, "on_epoch_end", on_epoch_end)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith("error: tracking failed 3 times") and "resume" in err[-1]
    states = [t.state.name for t in load_study(stores).trials]
    assert states == ["COMPLETE", "FAIL"]  # Optuna kept both: nothing finished is lost
    lost_run_id = load_study(stores).trials[1].user_attrs[m.RUN_ID_ATTR]

    with server:
        assert main(args) == 0
        study = load_study(stores)
        assert sum(t.state.name in COUNTED for t in study.trials) == 3
        client = MlflowClient(server.uri, registry_uri=server.uri)
        runs = runs_of(client, "co2-quick", m.ROLE_TRIAL)
        assert len(runs) == len(study.trials)
        assert all(r.info.status != "RUNNING" for r in runs)
        lost = client.get_run(lost_run_id)
        assert lost.info.status == "FAILED" and "tracking" in lost.data.tags[m.FAILURE_REASON_TAG]
