"""End to end on real stores: Optuna trials and MLflow runs agree, pruning, resume, bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from lstm_sweep import diagnostics as dg
from lstm_sweep.run import main
from lstm_sweep.tracking import RUN_STATUS, STATE_TAG, TRIAL_TAG
from tests.conftest import QUICK, ROOT, TINY


def sweep_args(*extra: str) -> list[str]:
    return [str(QUICK), "--no-progress", *(f"--set={s}" for s in [*TINY, *extra])]


def open_stores(root: Path, study: str = "co2-quick") -> tuple[optuna.Study, MlflowClient, str]:
    study_obj = optuna.load_study(study_name=study, storage=f"sqlite:///{root / 'optuna.db'}")
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("co2-quick").experiment_id
    return study_obj, client, experiment


def trial_runs(client: MlflowClient, experiment: str) -> list:
    return client.search_runs([experiment], "tags.`lstm_sweep.role` = 'trial'")


def test_every_optuna_trial_has_one_nested_mlflow_run_with_its_metrics(
    stores: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(sweep_args("diagnostics.level=full")) == 0
    study, client, experiment = open_stores(stores)
    runs = trial_runs(client, experiment)
    assert len(study.trials) == 4 and len(runs) == 4
    parent = client.search_runs([experiment], "tags.`lstm_sweep.role` = 'sweep'")
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"

    by_id = {r.info.run_id: r for r in runs}
    for trial in study.trials:
        run = by_id[trial.user_attrs["mlflow_run_id"]]
        assert run.data.tags[TRIAL_TAG] == str(trial.number)
        assert run.data.tags["mlflow.parentRunId"] == parent[0].info.run_id
        assert run.info.status == RUN_STATUS[trial.state.name]
        assert run.data.tags[STATE_TAG] == trial.state.name
        assert run.data.tags["verdict"] in dg.VERDICTS
        assert float(run.data.params["model.dropout"]) == pytest.approx(
            trial.params["model.dropout"]
        )
        assert run.data.params["train.max_epochs"] == "4"
        history = client.get_metric_history(run.info.run_id, dg.VAL_LOSS)
        assert [m.step for m in history] == list(range(trial.user_attrs["epochs_trained"]))
        assert run.data.metrics[dg.BEST_VAL_LOSS] == pytest.approx(
            trial.value if trial.value is not None else min(m.value for m in history)
        )
        assert run.info.run_name.startswith(f"trial {trial.number:03d} dropout=")
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "diagnostics")}
        assert {"diagnostics/loss_curves.png", "diagnostics/worst_val_samples.csv"} <= artifacts

    for verdict in {r.data.tags["verdict"] for r in runs}:  # the UI's filter works on the tag
        found = client.search_runs([experiment], f"tags.verdict = '{verdict}'")
        assert {r.info.run_id for r in found} >= {
            r.info.run_id for r in runs if r.data.tags["verdict"] == verdict
        }

    out = capsys.readouterr().out
    assert "Trials: " in out and "naive last-value forecast" in out and "mlflow ui" in out
    best = yaml.safe_load((stores / "reports" / "co2-quick" / "best_config.yaml").read_text())
    assert best["search"] == {} and best["study"]["n_trials"] == 1
    assert best["model"]["dropout"] == pytest.approx(study.best_params["model.dropout"])


def test_pruning_stops_poor_trials_and_their_runs_say_so(stores: Path) -> None:
    args = sweep_args(
        "study.n_trials=8",
        "train.max_epochs=8",
        "study.sampler=random",
        "study.pruner.n_startup_trials=1",
        "study.pruner.n_warmup_steps=1",
        "train.learning_rate=1e-3",
        "diagnostics.level=off",
    )
    assert main(args) == 0
    study, client, experiment = open_stores(stores)
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned, "no trial was pruned"
    runs = {r.info.run_id: r for r in trial_runs(client, experiment)}
    for trial in pruned:
        run = runs[trial.user_attrs["mlflow_run_id"]]
        assert run.info.status == "KILLED"
        assert run.data.tags[STATE_TAG] == "PRUNED"
        assert run.data.tags["stop_reason"] == "pruned"
        assert trial.user_attrs["epochs_trained"] < 8


def test_a_blown_up_trial_is_unstable_and_the_study_goes_on(stores: Path) -> None:
    study = optuna.create_study(study_name="co2-quick", storage=f"sqlite:///{stores / 'optuna.db'}")
    study.enqueue_trial({"train.learning_rate": 1e4})  # the first trial explodes
    args = sweep_args(
        "study.n_trials=2",
        "train.grad_clip=0",
        "train.optimizer=adam",
        "diagnostics.verdict.explode_grad_norm=1000",
        "search.train.learning_rate={type: float, low: 1.0e-3, high: 1.0e4, log: true}",
    )
    assert main(args) == 0
    study, client, _ = open_stores(stores)
    first, second = study.trials
    assert first.state == optuna.trial.TrialState.PRUNED
    assert first.user_attrs["verdict"] == "unstable"
    assert second.state == optuna.trial.TrialState.COMPLETE
    run = client.get_run(first.user_attrs["mlflow_run_id"])
    assert run.data.tags["verdict"] == "unstable" and "epoch" in run.data.tags["verdict_reason"]


def test_bad_input_exits_2_with_one_line_and_creates_nothing(
    stores: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([str(QUICK), "--set", "model.dropout=1.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model.dropout = 1.5" in err and str(QUICK) in err
    assert main([str(QUICK), "--set", "data.target=nope"]) == 2
    assert "data.target = 'nope': no such column" in capsys.readouterr().err
    assert not (stores / "optuna.db").exists()
    client = MlflowClient(f"sqlite:///{stores / 'mlflow.db'}")
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def test_help_explains_the_sections() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lstm_sweep.run", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    for word in ("--set", "search", "study", "tracking", "resumes"):
        assert word in result.stdout


def wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_ctrl_c_then_rerun_finishes_the_study_with_nothing_lost(stores: Path) -> None:
    """The real command: SIGINT mid-sweep exits 130 cleanly; the same command resumes."""
    args = [
        sys.executable,
        "-m",
        "lstm_sweep.run",
        *sweep_args(
            "study.n_trials=3",
            "train.max_epochs=80",  # trials of several seconds: a wide window to interrupt
            "train.patience=80",
            "study.pruner.type=none",
            "data.window=26",
            "model.hidden_size=32",
            "report.top_k=1",
            "report.seeds=1",
            "report.final_model=false",
        ),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = (stores / "stderr.txt").open("w+")  # a file, not a pipe nobody reads until the end
    worker = subprocess.Popen(args, env=env, stderr=log, text=True)
    optuna_db = stores / "optuna.db"

    def one_done_one_running() -> bool:
        if not optuna_db.exists():
            return False
        try:
            study = optuna.load_study(study_name="co2-quick", storage=f"sqlite:///{optuna_db}")
        except KeyError:
            return False
        states = [t.state for t in study.trials]
        return optuna.trial.TrialState.COMPLETE in states and states[-1].name == "RUNNING"

    wait_for(one_done_one_running)
    worker.send_signal(signal.SIGINT)
    worker.wait(timeout=120)
    log.seek(0)
    err = log.read()
    assert worker.returncode == 130, err
    assert "Traceback" not in err

    study, client, experiment = open_stores(stores)
    interrupted = study.trials[-1]
    assert interrupted.state == optuna.trial.TrialState.FAIL
    run = client.get_run(interrupted.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED"
    assert run.data.tags["failure_reason"] == "interrupted by the user"
    finished_before = {t.number: t.params for t in study.trials if t.state.name == "COMPLETE"}

    assert subprocess.run(args, env=env, capture_output=True).returncode == 0
    study, client, experiment = open_stores(stores)
    counted = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(counted) == 3
    assert {t.number: t.params for t in counted if t.number in finished_before} == finished_before
    retry = [t for t in study.trials if t.system_attrs.get("failed_trial") == interrupted.number]
    assert len(retry) == 1 and retry[0].params == interrupted.params
    runs = trial_runs(client, experiment)
    assert all(r.info.status != "RUNNING" for r in runs)
    assert len(runs) == len(study.trials)
