"""Faults on the real code path: a tracking server that goes away mid-sweep. Nothing finished is
lost and nothing is left RUNNING. (A worker killed mid-trial: tests/test_ray.py, on a cluster;
the heartbeat that fails its trial: tests/test_study.py; the exit codes: tests/test_workers.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from lstm_sweep import metrics as m
from lstm_sweep import tracking
from lstm_sweep.run import main
from tests.helpers import MlflowServer, load_study, runs_of, sweep_args

pytestmark = pytest.mark.slow
COUNTED = ("COMPLETE", "PRUNED")


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
