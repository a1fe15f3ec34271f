"""The command line end to end, on real stores: Optuna trials and MLflow runs agree; bad input
is one line; a stopped sweep resumes; two processes give one answer; the same seed gives the
same study wherever it is stored; no password is written anywhere."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest
import torch
import yaml

from lstm_sweep import metrics as m
from lstm_sweep import select
from lstm_sweep import study as study_module
from lstm_sweep.config import load_config
from lstm_sweep.engines.local import LocalProcesses
from lstm_sweep.run import INTERRUPTED, main
from lstm_sweep.selection import Setting
from lstm_sweep.study import open_study
from lstm_sweep.sweep import JobContext
from lstm_sweep.tasks import TaskCache
from lstm_sweep.tracking import Tracker
from tests.helpers import (
    CO2,
    POSTGRES,
    QUICK,
    HeldSweep,
    command,
    environment,
    fresh_database,
    load_study,
    mlflow_client,
    postgres_or_skip,
    runs_of,
    sweep_args,
    url_with_password,
    wait_for,
    write_series,
    write_sweep,
)

PASSWORD = "pw-secret-123"


def assert_one_line_and_nothing_created(err: str, start: str, stores: Path) -> None:
    line = err.strip()
    assert "\n" not in line and "Traceback" not in line, line
    assert line.startswith(f"error: {start}"), line
    assert PASSWORD not in line
    assert not runs_of(mlflow_client(stores), "co2-quick", m.ROLE_SWEEP)
    assert not runs_of(mlflow_client(stores), "test", m.ROLE_SWEEP)


@pytest.mark.parametrize(
    ("overrides", "start"),
    [
        (["model.dropout=1.5"], f"{QUICK}: model.dropout = 1.5: Input should be less than 1"),
        (
            [f"study.storag={url_with_password('postgresql://u@h/db', PASSWORD)}"],
            f"{QUICK}: study.storag = ",
        ),
        (["search.model.hidden_size={type: int, low: 4, high: 8, step: 0.5}"], f"{QUICK}: search"),
        (["model.dropout=[0.1"], "--set: model.dropout = '[0.1': malformed YAML value"),
        (["data.path=/nonexistent/co2.csv"], "/nonexistent/co2.csv: data.path = "),
        (
            [f"study.storage={url_with_password('postgresql://u@127.0.0.1:1/x', PASSWORD)}"],
            f"{QUICK}: study.storage",
        ),
        (["data.folds=6"], f"{CO2}: data.folds = 6: too few rows: the first fold trains on"),
    ],
    ids=[
        "range",
        "typo with a secret",
        "int step",
        "bad YAML in --set",
        "data file",
        "storage",
        "folds",
    ],
)
def test_bad_input_is_one_line_exit_2_and_creates_nothing(
    stores: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    overrides: list[str],
    start: str,
) -> None:
    monkeypatch.setattr(study_module, "OPEN_FIRST_WAIT", 0.0)  # unreachable: retried at once
    assert main([str(QUICK), *(f"--set={o}" for o in overrides)]) == 2
    assert_one_line_and_nothing_created(capsys.readouterr().err, start, stores)
    assert not (stores / "optuna.db").exists() or "storage" in start


def test_bad_data_is_one_line_exit_2_and_creates_nothing(
    stores: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv = write_series(tmp_path / "series.csv", np.full(100, 3.0))
    assert main([str(write_sweep(tmp_path / "s.yaml", csv))]) == 2
    err = capsys.readouterr().err
    assert_one_line_and_nothing_created(err, f"{csv}: data.target = 'y': constant", stores)
    assert not (stores / "optuna.db").exists()


@pytest.mark.slow
def test_the_real_command_prints_one_line_and_no_traceback(stores: Path) -> None:
    result = subprocess.run(
        command(str(QUICK), "--set=modle.dropout=0.1"),
        capture_output=True,
        text=True,
        env=environment(),
        timeout=120,
    )
    assert result.returncode == 2
    expected = f"{QUICK}: modle = {{'dropout': 0.1}}: unknown key (did you mean 'model'?)"
    assert_one_line_and_nothing_created(result.stderr, expected, stores)


@pytest.mark.slow
def test_every_trained_run_and_the_sweep_name_their_dataset_for_the_ui(finished) -> None:
    """MLflow's Dataset column: the same file, by the content hash the study's fingerprint
    records, on every trial, re-evaluation, final model and the sweep's own run."""
    fingerprint = json.loads(finished.study.user_attrs[m.CONFIG_ATTR])
    roles = (m.ROLE_TRIAL, m.ROLE_REEVALUATION, m.ROLE_FINAL, m.ROLE_SWEEP)
    runs = [run for role in roles for run in runs_of(finished.client, "co2-quick", role)]
    assert {r.data.tags[m.ROLE_TAG] for r in runs} == set(roles)
    for run in runs:
        (used,) = finished.client.get_run(run.info.run_id).inputs.dataset_inputs
        dataset, (context,) = used.dataset, used.tags
        assert (dataset.name, f"sha256:{dataset.digest}") == (
            "co2_weekly",
            fingerprint["data.path"],
        )
        assert json.loads(dataset.source)["uri"] == str(CO2)
        assert [c["name"] for c in json.loads(dataset.schema)["mlflow_colspec"]] == ["co2"]
        assert set(json.loads(dataset.profile)) == {"train_samples", "val_samples", "test_samples"}
        sweep = run.data.tags[m.ROLE_TAG] == m.ROLE_SWEEP
        assert context.value == (m.DATASET_CONTEXT_SWEEP if sweep else m.DATASET_CONTEXT_TRAINING)


@pytest.mark.slow
def test_every_trained_run_shows_its_system_metrics(finished) -> None:
    roles = (m.ROLE_TRIAL, m.ROLE_REEVALUATION, m.ROLE_FINAL)
    runs = [run for role in roles for run in runs_of(finished.client, "co2-quick", role)]
    assert {r.data.tags[m.ROLE_TAG] for r in runs} == set(roles)
    for run in runs:
        assert "system/cpu_utilization_percentage" in run.data.metrics, run.info.run_name


@pytest.mark.slow
def test_every_optuna_trial_has_one_nested_mlflow_run_with_its_metrics(finished) -> None:
    parent = finished.parent.info.run_id
    reevaluated = runs_of(finished.client, "co2-quick", m.ROLE_REEVALUATION)
    top = {
        int(r.data.tags[m.TRIAL_TAG])
        for r in reevaluated
        if r.data.tags["mlflow.parentRunId"] == parent  # not the recommended YAML's rerun
    }
    runs = [
        r
        for r in runs_of(finished.client, "co2-quick", m.ROLE_TRIAL)
        if r.data.tags["mlflow.parentRunId"] == parent
    ]
    assert len(finished.study.trials) == len(runs) == 5
    by_id = {r.info.run_id: r for r in runs}
    for trial in finished.study.trials:
        run = by_id[trial.user_attrs[m.RUN_ID_ATTR]]
        assert run.data.tags[m.TRIAL_TAG] == str(trial.number)
        assert run.data.tags["mlflow.parentRunId"] == finished.parent.info.run_id
        assert run.info.status == m.RUN_STATUS[trial.state.name]
        assert run.data.tags[m.STATE_TAG] == trial.state.name
        assert run.data.tags[m.VERDICT_TAG] in m.VERDICTS
        assert float(run.data.params["model.dropout"]) == pytest.approx(
            trial.params["model.dropout"]
        )
        history = finished.client.get_metric_history(run.info.run_id, m.VAL_LOSS)
        assert [h.step for h in history] == list(range(trial.user_attrs[m.EPOCHS_TRAINED]))
        assert run.info.run_name.startswith(f"trial {trial.number:03d} dropout=")
        if trial.state.name == "COMPLETE":
            assert run.data.metrics[m.BEST_VAL_LOSS] == pytest.approx(trial.value)
            files = {a.path for a in finished.client.list_artifacts(run.info.run_id, "diagnostics")}
            assert {"diagnostics/weight_values.npz", "diagnostics/worst_val_samples.csv"} <= files
            weights = finished.client.list_artifacts(run.info.run_id, "model")
            assert [a.path for a in weights] == [m.WEIGHTS_FILE]
            drawn = "diagnostics/loss_curves.png" in files  # pictures only where people look
            assert drawn == (trial.number in top), trial.number


@pytest.mark.slow
def test_pruning_stops_poor_trials_and_their_runs_say_so(stores: Path) -> None:
    args = sweep_args(
        "study.n_trials=8",
        "train.max_epochs=8",
        "study.sampler=random",
        "study.pruner.n_startup_trials=1",
        "study.pruner.n_warmup_steps=1",
        "train.learning_rate=1e-3",
        "diagnostics.level=off",
        "closing.final_model=false",
    )
    assert main(args) == 0
    study, client = load_study(stores), mlflow_client(stores)
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned, "no trial was pruned"
    for trial in pruned:
        run = client.get_run(trial.user_attrs[m.RUN_ID_ATTR])
        assert (run.info.status, run.data.tags[m.STATE_TAG]) == ("KILLED", m.PRUNED)
        assert run.data.tags[m.STOP_REASON_TAG] == "pruned"
        assert trial.user_attrs[m.EPOCHS_TRAINED] < 8
        if run.data.tags[m.VERDICT_TAG] != "overfitting":  # all it can know when cut short
            assert run.data.tags[m.VERDICT_TAG] == "undecided"


@pytest.mark.slow
def test_a_blown_up_trial_is_unstable_and_the_study_goes_on(stores: Path) -> None:
    args = sweep_args(
        "study.n_trials=2",
        "train.grad_clip=0",
        "train.optimizer=adam",
        "diagnostics.verdict.explode_grad_norm=1000",
        "search.train.learning_rate={type: float, low: 1.0e-3, high: 1.0e4, log: true}",
        "closing.final_model=false",
    )
    study = open_study(load_config(QUICK, [a.removeprefix("--set=") for a in args[2:]]), "t")
    study.enqueue_trial({"train.learning_rate": 1e4})  # the first trial explodes
    assert main(args) == 0
    first, second = load_study(stores).trials
    assert first.state == optuna.trial.TrialState.PRUNED
    assert first.user_attrs[m.VERDICT_ATTR] == "unstable"
    assert second.user_attrs[m.EPOCHS_TRAINED] >= 1  # the study went on to its next trial
    run = mlflow_client(stores).get_run(first.user_attrs[m.RUN_ID_ATTR])
    assert (
        run.data.tags[m.VERDICT_TAG] == "unstable"
        and "epoch" in run.data.tags[m.VERDICT_REASON_TAG]
    )


def test_a_changed_sweep_file_is_refused_before_any_training(
    stores: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    optuna_study = optuna.create_study(
        study_name="co2-quick", storage=f"sqlite:///{stores / 'optuna.db'}"
    )
    optuna_study.set_user_attr(m.CONFIG_ATTR, '{"train.max_epochs": 99}')
    assert main(sweep_args()) == 2
    err = capsys.readouterr().err.strip()
    assert "study 'co2-quick' in sqlite:///" in err and "--set study.name=co2-quick-2" in err
    assert "\n" not in err and not load_study(stores).trials


def trial_values(root: Path, name: str = "co2-quick") -> list[tuple[str, float | None]]:
    return [(t.state.name, t.value) for t in load_study(root, name).trials]


# eight trials in batches of two: setting 2 drawn at random, so it starts before settings 0
# and 1 end; the model-based sampler and the pruner at work from the fifth
DETERMINISTIC = [
    "closing.top_k=1",
    "closing.seeds=1",
    "closing.final_model=false",
    "model.num_layers=2",
    "model.dropout=0.3",
    "study.n_trials=8",
    "study.batch=2",
    "study.n_startup_trials=3",
    "study.pruner.n_startup_trials=3",
    "study.pruner.n_warmup_steps=1",
]


def same_seed_study(
    folder: Path, mlflow_template: Path, storage: str | None, *extra: str
) -> list[tuple[dict, float | None]]:
    """The tiny sweep in ``folder`` with ``extra`` arguments; its trials' settings and values."""
    from tests.conftest import new_stores

    new_stores(folder, mlflow_template)
    os.chdir(folder)
    overrides = [f"study.storage={storage}"] if storage else []
    sets, flags = [e for e in extra if "=" in e], [e for e in extra if "=" not in e]
    assert main([*sweep_args(*DETERMINISTIC, *overrides, *sets), *flags]) == 0
    url = storage or f"sqlite:///{folder / 'mlruns' / 'optuna.db'}"
    study = optuna.load_study(study_name="co2-quick", storage=url)
    return [(t.params, t.value) for t in study.trials]


@pytest.fixture(scope="module")
def one_worker(
    tmp_path_factory: pytest.TempPathFactory, mlflow_template: Path
) -> list[tuple[dict, float | None]]:
    """The tiny sweep with one worker, diagnostics off, on the default store: the reference."""
    here = os.getcwd()
    try:
        folder = tmp_path_factory.mktemp("one_worker")
        return same_seed_study(
            folder, mlflow_template, None, "diagnostics.level=off", "--workers", "1"
        )
    finally:
        os.chdir(here)


@pytest.mark.slow
def test_the_same_seed_gives_the_same_trials_at_every_diagnostics_level_with_any_workers(
    one_worker: list[tuple[dict, float | None]],
    tmp_path: Path,
    mlflow_template: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    explicit = f"sqlite:///{tmp_path / 'explicit.db'}"
    three = same_seed_study(
        tmp_path / "three", mlflow_template, explicit, "diagnostics.level=full", "--workers", "3"
    )
    assert "study.batch = 2: 2 of 3 workers train trials" in capsys.readouterr().err
    assert three == one_worker
    assert len({tuple(params.values()) for params, _ in one_worker}) == 8


@pytest.mark.slow
def test_two_workers_on_postgresql_give_the_study_one_worker_gives_on_sqlite(
    one_worker: list[tuple[dict, float | None]],
    tmp_path: Path,
    mlflow_template: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    with fresh_database(postgres_or_skip()) as name:
        postgres = f"{POSTGRES}/{name}"
        two = same_seed_study(tmp_path / "two", mlflow_template, postgres, "--workers", "2")
    assert two == one_worker


@pytest.mark.slow
def test_sigterm_stops_both_workers_cleanly_and_the_rerun_finishes_the_study(
    stores: Path,
) -> None:
    """The real command with two workers (this process and one forked from the server), both
    held mid-trial: SIGTERM exits 130 with one line saying what to do, both trials closed as
    failed in both stores and no process of the sweep left behind; the same command (with one
    worker now: budgets may change) retries exactly those settings and finishes the study."""
    args = stoppable_sweep()
    with HeldSweep([*args, "--workers=2"], m.ROLE_TRIAL, stores.parent) as sweep:
        sweep.held(2)
        sweep.process.send_signal(signal.SIGTERM)
        code, err = sweep.finish()
    assert code == 130, err
    assert "Traceback" not in err and "SIGTERM: stopping after this epoch" in err
    assert err.strip().splitlines()[-1] == INTERRUPTED["trials"]
    stopped = load_study(stores).trials
    assert [t.state.name for t in stopped] == ["FAIL", "FAIL"]
    assert len({t.user_attrs[m.WORKER_ATTR] for t in stopped}) == 2
    client = mlflow_client(stores)
    for trial in stopped:
        run = client.get_run(trial.user_attrs[m.RUN_ID_ATTR])
        assert (run.info.status, run.data.tags[m.FAILURE_REASON_TAG]) == (
            "FAILED",
            m.INTERRUPTED_REASON,
        )
    assert wait_for(lambda: not processes_in(stores.parent), timeout=10)  # the server too

    assert subprocess.run(args, env=environment(), capture_output=True).returncode == 0
    study = load_study(stores)
    assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials) == 2
    for trial in stopped:
        retry = [t for t in study.trials if t.system_attrs.get("failed_trial") == trial.number]
        assert len(retry) == 1 and retry[0].params == trial.params
    runs = [
        *runs_of(client, "co2-quick", m.ROLE_TRIAL),
        *runs_of(client, "co2-quick", m.ROLE_SWEEP),
    ]
    assert all(r.info.status != "RUNNING" for r in runs)
    assert len(runs) == len(study.trials) + 1


def stoppable_sweep() -> list[str]:
    """The real command on two short trials that nothing ends early (the closing stage is not
    under test: only the trials' own)."""
    return command(
        *sweep_args(
            "study.n_trials=2",
            "study.batch=2",  # both trials train at once
            "train.max_epochs=6",
            "train.patience=6",
            "study.pruner.type=none",
            "closing.top_k=1",
            "closing.seeds=1",
            "closing.final_model=false",
        )
    )


def processes_in(folder: Path) -> list[int]:
    """The processes working in ``folder`` (the sweep's, its server's and workers'), this one
    (pytest) aside."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name in ("self", str(os.getpid())) or not entry.name.isdigit():
                continue
            if (entry / "cwd").resolve() == folder.resolve():
                found.append(int(entry.name))
        except OSError:  # gone, or not ours to look at
            continue
    return found


def test_a_bug_shows_its_traceback_then_one_line_on_what_it_means_for_the_study(
    stores: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("a bug in training")

    monkeypatch.setattr(study_module, "train_in_run", boom)
    assert main(sweep_args()) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback (most recent call last):" in err
    assert err[-1] == (
        "error: lstm_sweep failed (ZeroDivisionError: a bug in training): what it was training"
        " was closed as failed and every finished trial is kept: run the same command again to"
        " resume; the traceback above is worth reporting"
    )
    client = mlflow_client(stores)
    (parent,) = runs_of(client, "co2-quick", m.ROLE_SWEEP)
    (trial,) = runs_of(client, "co2-quick", m.ROLE_TRIAL)
    for run in (parent, trial):
        assert run.info.status == "FAILED"
        assert run.data.tags[m.FAILURE_REASON_TAG] == "ZeroDivisionError: a bug in training"


def test_a_sweep_stopped_by_its_timeout_ends_its_run_as_killed_and_says_how_to_go_on(
    stores: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(sweep_args("study.timeout=0.001")) == 0  # over before a trial finishes
    assert "(study.timeout reached): run the same command again to continue" in (
        capsys.readouterr().out
    )
    (parent,) = runs_of(mlflow_client(stores), "co2-quick", m.ROLE_SWEEP)
    assert parent.info.status == "KILLED"
    assert parent.data.tags[m.FAILURE_REASON_TAG].startswith("study.timeout reached: the study")


@pytest.mark.slow
def test_a_study_that_stops_itself_says_why_everywhere_and_a_rerun_trains_nothing_more(
    stores: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # any gain under 100 % is too little: it stops at the first chance, after 2 random + 2;
    # on two validation folds, whose values the report gives
    args = sweep_args(
        "data.folds=2",
        "study.batch=2",  # two workers train at once
        "study.n_trials=12",
        "study.n_startup_trials=2",
        "study.stop.patience=2",
        "study.stop.min_gain=1.0",
        "closing.top_k=1",
        "closing.seeds=1",
    )
    assert main([*args, "--workers=2"]) == 0
    out = capsys.readouterr()
    said = "the study stopped itself after 4 trials"
    assert [t.state.name in ("COMPLETE", "PRUNED") for t in load_study(stores).trials] == [True] * 4
    assert said in out.out and said in out.err  # the summary and the progress line
    report = (stores / "reports" / "co2-quick" / "report.md").read_text()
    assert (
        said in report
        and "- Over its 2 validation folds (seed 0, the split's own last): " in report
    )
    (parent,) = runs_of(mlflow_client(stores), "co2-quick", m.ROLE_SWEEP)
    assert parent.info.status == "FINISHED"
    assert said in parent.data.tags["mlflow.note.content"]  # the run's description
    assert main(args) == 0
    assert "is complete; its report was written by" in capsys.readouterr().out
    assert len(load_study(stores).trials) == 4


@pytest.mark.slow
def test_the_same_command_on_a_finished_study_leaves_its_run_finished(
    finished, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(finished.root, tmp_path / "mlruns")
    monkeypatch.chdir(tmp_path)
    assert main(finished.args) == 0
    assert "Study 'co2-quick' is complete; its report was written by" in capsys.readouterr().out
    parent = mlflow_client(tmp_path / "mlruns").get_run(finished.parent.info.run_id)
    assert (parent.info.status, parent.data.tags[m.STATE_TAG]) == ("FINISHED", "COMPLETE")


@pytest.mark.slow
def test_two_processes_on_one_study_give_one_report_and_one_model(stores: Path) -> None:
    args = command(
        *sweep_args(
            "study.n_trials=4",
            "study.batch=4",  # both processes train at once, neither waits for the other
            "train.max_epochs=10",
            "train.patience=10",
            "closing.top_k=1",
        )
    )
    processes = [
        subprocess.Popen(
            args, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in processes]
    for process, (_, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err[-3000:]
    study = load_study(stores)
    assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials) == 4
    assert len({tuple(t.params.values()) for t in study.trials}) == len(study.trials)
    client = mlflow_client(stores)
    assert len(runs_of(client, "co2-quick", m.ROLE_FINAL)) == 1
    assert len(client.search_model_versions("name = 'co2-quick'")) == 1
    reevaluations = runs_of(client, "co2-quick", m.ROLE_REEVALUATION)
    assert len(reevaluations) == len(
        {(r.data.tags[m.TRIAL_TAG], r.data.tags[m.SEED_TAG]) for r in reevaluations}
    )
    texts = [out for out, _ in outputs]
    assert sum("Report: " in text for text in texts) == 1
    others = [t for t in texts if "Report: " not in t]
    assert "report of study 'co2-quick'" in others[0] or "its report was written by" in others[0]


@pytest.mark.slow
def test_a_password_in_the_storage_url_is_written_nowhere(stores: Path, tmp_path: Path) -> None:
    engine = postgres_or_skip()
    with fresh_database(engine) as name:
        storage = url_with_password(f"postgresql://postgres@127.0.0.1:5432/{name}", PASSWORD)
        result = subprocess.run(
            command(
                *sweep_args(
                    f"study.storage={storage}",
                    "study.n_trials=2",
                    "diagnostics.level=full",
                    "closing.top_k=1",
                )
            ),
            env=environment(),
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr[-3000:]
    assert PASSWORD not in result.stdout + result.stderr
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert PASSWORD.encode() not in path.read_bytes(), path
    client = mlflow_client(tmp_path / "mlruns")
    experiment = client.get_experiment_by_name("co2-quick").experiment_id
    downloads = tmp_path.parent / f"{tmp_path.name}_artifacts"
    for run in client.search_runs([experiment]):
        data = run.data
        assert not any(PASSWORD in v for v in [*data.params.values(), *data.tags.values()])
        local = mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id,
            dst_path=str(downloads / run.info.run_id),
            tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}",
        )
        for path in Path(local).rglob("*"):
            if path.is_file():
                assert PASSWORD.encode() not in path.read_bytes(), path
    resolved = yaml.safe_load(
        (tmp_path / "mlruns" / "reports" / "co2-quick" / "resolved_config.yaml").read_text()
    )
    assert resolved["study"]["storage"] == f"postgresql://postgres@127.0.0.1:5432/{name}"


@pytest.mark.slow
def test_a_changed_closing_stage_is_done_again_on_the_same_trials(
    stores: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = sweep_args(
        "study.n_trials=2", "closing.final_model=false", "closing.top_k=1", "closing.seeds=1"
    )
    assert main(args) == 0 and main(args) == 0
    assert "its report was written by" in capsys.readouterr().out  # unchanged: nothing redone
    assert main([*args, "--set=closing.seeds=2"]) == 0
    assert "its report was written by" not in capsys.readouterr().out
    (reevaluation,) = runs_of(mlflow_client(stores), "co2-quick", m.ROLE_REEVALUATION)
    assert reevaluation.data.tags[m.SEED_TAG] == "1"  # seed 0 is the trial itself
    assert len(load_study(stores).trials) == 2


@pytest.mark.slow
def test_reevaluations_spread_over_the_workers_give_the_numbers_of_one_process(
    stores: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # tiny trainings: spread them anyway; on two validation folds, a model each
    monkeypatch.setattr(LocalProcesses, "start_seconds", 0.0)
    args = sweep_args(
        "study.n_trials=2", "closing.final_model=false", "closing.seeds=1", "data.folds=2"
    )
    assert main(args) == 0  # the trials, in this process
    assert main([*args, "--set=closing.seeds=2", "--workers=2"]) == 0  # a new closing stage
    spread = runs_of(mlflow_client(stores), "co2-quick", m.ROLE_REEVALUATION)
    assert len(spread) == 2 and {r.info.status for r in spread} == {"FINISHED"}
    # the two processes take the jobs from one queue: which one takes which is a race
    workers = {r.data.tags[m.WORKER_TAG] for r in spread}
    assert 1 <= len(workers) <= 2 and m.this_process() not in workers
    report = (stores / "reports" / "co2-quick" / "report.md").read_text()
    assert "The closing stage trained 4 model(s) in" in report  # wherever they trained

    cfg = load_config(QUICK, [a.removeprefix("--set=") for a in args if a.startswith("--set=")])
    run = spread[0]
    trial = load_study(stores).trials[int(run.data.tags[m.TRIAL_TAG])]
    setting = Setting(trial.number, trial.params, trial.value or 0.0, 0, "")
    parent_id = run.data.tags["mlflow.parentRunId"]
    context = JobContext(cfg, TaskCache(), Tracker(None, cfg.experiment), parent_id, lambda: False)
    selector = select.Selector(context)
    seed = int(run.data.tags[m.SEED_TAG])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as every worker trains
    try:
        here = selector.train_seed(setting, seed)
    finally:
        torch.set_num_threads(threads)
    assert here.value == run.data.metrics[m.FOLDS_MEAN]  # the mean over its folds


@pytest.mark.slow
def test_a_quote_in_the_experiment_name_just_works(stores: Path) -> None:
    args = sweep_args("study.n_trials=2", "closing.final_model=false", "diagnostics.level=off")
    assert main([*args, "--set=experiment=it's mine"]) == 0
    assert main([*args, "--set=experiment=it's mine", "--set=study.n_trials=3"]) == 0
    (parent,) = runs_of(mlflow_client(stores), "it's mine", m.ROLE_SWEEP)
    assert parent.info.status == "FINISHED"
    assert len(load_study(stores, "it's mine").trials) == 3


def test_help_explains_the_sections(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for word in ("--set", "search", "study", "tracking", "resumes", "is refused"):
        assert word in out
