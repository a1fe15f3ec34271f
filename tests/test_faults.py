"""Faults on the real code path: a worker killed mid-trial, a tracking server that is down at the
start or goes away mid-sweep. Nothing finished is lost and nothing is left RUNNING."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial

from lstm_sweep import tracking
from lstm_sweep.run import main
from lstm_sweep.study import WORKER_ATTR
from lstm_sweep.tracking import TrackingUnavailable, with_retries
from tests.conftest import QUICK, ROOT
from tests.test_scaleout import MlflowServer, free_port
from tests.test_sweep import open_stores, sweep_args, trial_runs, wait_for

COUNTED = ("COMPLETE", "PRUNED")


def worker_pids(main_pid: int) -> list[int]:
    """The spawned worker processes of a running sweep (not multiprocessing's helpers)."""
    children = []
    for task in Path(f"/proc/{main_pid}/task").iterdir():
        children += [int(p) for p in (task / "children").read_text().split()]
    return [p for p in children if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]


def trial_mid_training(storage: str) -> FrozenTrial | None:
    """A RUNNING trial that has reported an epoch, or None (also before the study exists)."""
    try:
        trials = optuna.load_study(study_name="co2-quick", storage=storage).trials
    except Exception:  # the study or its tables do not exist yet
        return None
    running = [t for t in trials if t.state.name == "RUNNING" and t.intermediate_values]
    return running[0] if running else None


def test_a_worker_killed_mid_trial_loses_nothing_and_leaves_nothing_running(
    stores: Path,
) -> None:
    n_trials = 3
    args = [
        sys.executable,
        "-m",
        "lstm_sweep.run",
        *sweep_args(
            f"study.n_trials={n_trials}",
            "train.max_epochs=25",
            "train.patience=25",
            "study.pruner.type=none",
            "model.hidden_size=16",
            "study.heartbeat_seconds=1",
            "study.grace_seconds=3",
        ),
        "--workers",
        "2",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    sweep = subprocess.Popen(args, env=env, stderr=subprocess.PIPE, text=True)
    optuna_db = f"sqlite:///{stores / 'optuna.db'}"

    wait_for(lambda: trial_mid_training(optuna_db) is not None)
    victim = trial_mid_training(optuna_db)
    pid = int(victim.user_attrs[WORKER_ATTR].rsplit(":", 1)[1])
    assert pid in worker_pids(sweep.pid)
    os.kill(pid, signal.SIGKILL)
    _, err = sweep.communicate(timeout=240)
    assert sweep.returncode == 0, err[-3000:]
    assert "1 worker(s) lost" in err

    study, client, experiment = open_stores(stores)
    states = [t.state.name for t in study.trials]
    assert sum(s in COUNTED for s in states) == n_trials
    assert "RUNNING" not in states and "WAITING" not in states
    (killed,) = [t for t in study.trials if t.state.name == "FAIL"]
    assert killed.number == victim.number
    (retry,) = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed.number]
    assert retry.params == killed.params and retry.state.name in COUNTED
    run = client.get_run(killed.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED"
    assert run.data.tags["failure_reason"] == "worker lost (no heartbeat)"
    runs = trial_runs(client, experiment)
    assert len(runs) == len(study.trials)
    assert all(r.info.status != "RUNNING" for r in runs)


def test_a_tracking_server_down_at_the_start_is_one_line_before_any_training(
    stores: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    assert main(sweep_args(f"tracking.uri={uri}")) == 2
    assert time.monotonic() - started < 30  # MLflow's own retries would take ~4 minutes
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {QUICK}: tracking.uri = '{uri}': unreachable")
    assert "\n" not in err
    assert not (stores / "optuna.db").exists()  # no study, so no trial


def test_with_retries_backs_off_through_a_blink_and_gives_up_with_a_masked_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    waits: list[float] = []
    monkeypatch.setattr(tracking.time, "sleep", waits.append)
    calls = iter([OSError("blink"), OSError("blink"), "ok"])

    def flaky() -> str:
        outcome = next(calls)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    assert with_retries(flaky, attempts=4, first_wait=1.0) == "ok"
    assert waits == [1.0, 2.0]

    def down() -> None:
        raise OSError("no route to http://user:pw@mlflow:5000")

    with pytest.raises(TrackingUnavailable, match=r"failed 3 times over 3 s") as caught:
        with_retries(down, attempts=3, first_wait=1.0)
    assert "user:***@mlflow" in str(caught.value) and "pw@" not in str(caught.value)


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
    args = sweep_args("study.n_trials=3", "study.pruner.type=none", f"tracking.uri={server.uri}")
    optuna_db = f"sqlite:///{stores / 'optuna.db'}"

    seen_runs: list[str] = []
    on_epoch_end = tracking.EpochLogger.on_epoch_end

    def kill_server_mid_second_trial(logger: tracking.EpochLogger, epoch: int, row) -> None:
        if logger.run_id not in seen_runs:
            seen_runs.append(logger.run_id)
        if len(seen_runs) == 2 and epoch == 1:  # the second trial's run exists and trains
            server.stop()
        on_epoch_end(logger, epoch, row)

    monkeypatch.setattr(tracking.EpochLogger, "on_epoch_end", kill_server_mid_second_trial)
    with server:
        code = main(args)
    monkeypatch.setattr(tracking.EpochLogger, "on_epoch_end", on_epoch_end)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith("error: tracking failed 3 times") and "resume" in err[-1]
    study = optuna.load_study(study_name="co2-quick", storage=optuna_db)
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "FAIL"]  # Optuna kept both: nothing finished is lost
    lost_run_id = study.trials[1].user_attrs["mlflow_run_id"]

    with server:
        assert main(args) == 0
        study = optuna.load_study(study_name="co2-quick", storage=optuna_db)
        assert sum(t.state.name in COUNTED for t in study.trials) == 3
        client = MlflowClient(server.uri)
        experiment = client.get_experiment_by_name("co2-quick").experiment_id
        runs = trial_runs(client, experiment)
        assert len(runs) == len(study.trials)
        assert all(r.info.status != "RUNNING" for r in runs)
        lost = client.get_run(lost_run_id)
        assert lost.info.status == "FAILED" and "tracking" in lost.data.tags["failure_reason"]
