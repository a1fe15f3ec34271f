"""The report of a small finished study: the table, importances, seed re-evaluation, baselines,
the final model and the one readable file, read back from the real stores."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import optuna
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from lstm_sweep import select, surface
from lstm_sweep.config import ConfigError, load_config
from lstm_sweep.run import main
from lstm_sweep.study import param_importances
from lstm_sweep.tracking import ROLE_TAG
from tests.conftest import QUICK, TINY

REPORT = ["report.top_k=2", "report.seeds=2", "report.model_name=co2-tiny", "study.n_trials=5"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, mlflow_template: Path) -> SimpleNamespace:
    """One tiny sweep with its report, shared by the tests below (they only read it)."""
    root = tmp_path_factory.mktemp("report")
    (root / "mlruns").mkdir()
    shutil.copy(mlflow_template, root / "mlruns" / "mlflow.db")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        assert main([str(QUICK), "--no-progress", *(f"--set={s}" for s in [*TINY, *REPORT])]) == 0
    study = optuna.load_study(
        study_name="co2-quick", storage=f"sqlite:///{root / 'mlruns' / 'optuna.db'}"
    )
    uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("co2-quick").experiment_id
    parent = client.search_runs([experiment], f"tags.`{ROLE_TAG}` = 'sweep'")[0]
    return SimpleNamespace(
        root=root,
        study=study,
        client=client,
        experiment=experiment,
        parent=parent,
        folder=root / "mlruns" / "reports" / "co2-quick",
    )


def runs_of(finished: SimpleNamespace, role: str) -> list:
    parent = finished.parent.info.run_id
    query = f"tags.`{ROLE_TAG}` = '{role}' and tags.mlflow.parentRunId = '{parent}'"
    return finished.client.search_runs([finished.experiment], query)


def test_the_table_has_one_row_per_trial_with_its_state_and_run_metrics(finished) -> None:
    table = pd.read_csv(finished.folder / "trials.csv")
    trials = {t.number: t for t in finished.study.trials}
    assert sorted(table["number"]) == sorted(trials)
    for row in table.itertuples():
        trial = trials[row.number]
        assert row.state == trial.state.name
        assert row.wall_seconds > 0 and row.epochs_trained == trial.user_attrs["epochs_trained"]
        assert row.verdict == trial.user_attrs["verdict"]
    complete = table[table["state"] == "COMPLETE"]
    assert (complete["best_val_loss"] == complete["value"]).all()


def test_importances_cover_every_searched_key_and_optuna_plots_are_written(finished) -> None:
    importances = param_importances(finished.study)
    assert set(importances) == set(load_config(QUICK).search)
    assert sum(importances.values()) == pytest.approx(1.0)
    plots = {p.name for p in (finished.folder / "plots").glob("*.html")}
    assert {
        "optimization_history.html",
        "param_importances.html",
        "slice.html",
        "contour.html",
        "parallel_coordinate.html",
    } <= plots


def test_seed_reevaluation_makes_k_times_seeds_nested_runs_of_the_top_settings(finished) -> None:
    runs = runs_of(finished, "reevaluation")
    assert len(runs) == 2 * 2
    complete = [t for t in finished.study.trials if t.state.name == "COMPLETE"]
    top = {t.number for t in sorted(complete, key=lambda t: t.value)[:2]}
    pairs = {
        (int(r.data.tags["optuna.trial_number"]), int(r.data.tags[select.SEED_TAG])) for r in runs
    }
    assert pairs == {(n, seed) for n in top for seed in (0, 1)}
    for run in runs:
        assert run.info.status == "FINISHED" and select.TEST_LOSS in run.data.metrics
    seed0 = [r for r in runs if r.data.tags[select.SEED_TAG] == "0"]
    for run in seed0:  # seed train.seed repeats the trial itself
        trial = finished.study.trials[int(run.data.tags["optuna.trial_number"])]
        assert run.data.metrics["best_val_loss"] == pytest.approx(trial.value, rel=1e-5)


def test_the_final_model_is_registered_and_compared_with_all_three_baselines(finished) -> None:
    (final,) = runs_of(finished, "final")
    assert final.info.status == "FINISHED"
    assert final.data.tags["model_uri"] == "models:/co2-tiny/1"
    versions = finished.client.search_model_versions("name = 'co2-tiny'")
    assert [str(v.version) for v in versions] == ["1"] and versions[0].run_id == final.info.run_id
    parent = finished.client.get_run(finished.parent.info.run_id).data
    for method in ("lstm", "naive", "seasonal_naive", "ridge_ar"):
        for metric in ("mse", "mae", "mase"):
            assert parent.metrics[f"{method}_test_{metric}"] > 0
    recommended = finished.study.trials[int(parent.tags["recommended_trial"])]
    assert parent.metrics["optimism_vs_trial"] == pytest.approx(
        parent.metrics["final_test_loss"] - recommended.value
    )
    assert final.data.metrics["test_loss"] == parent.metrics["final_test_loss"]


def test_one_report_file_holds_every_part_and_is_logged_on_the_parent(finished) -> None:
    text = (finished.folder / "report.md").read_text()
    for part in (
        "## Recommendation",
        "## Against the baselines",
        "## Seed re-evaluation",
        "## What mattered",
        "## Validation windows every setting gets wrong",
        "## All trials",
        "optimism",
        "models:/co2-tiny/1",
        "| ridge_ar |",
        "| seasonal_naive |",
        "| naive |",
        "| lstm |",
    ):
        assert part in text, part
    for image in ("winner_loss_curves.png", "surface_dropout_weight_decay.png"):
        assert f"]({image})" in text and (finished.folder / image).is_file()
    logged = {a.path for a in finished.client.list_artifacts(finished.parent.info.run_id, "report")}
    assert {"report/report.md", "report/trials.csv", "report/recommended_config.yaml"} <= logged


def test_the_recommended_yaml_reproduces_the_recorded_validation_loss(
    finished, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(finished.root)
    path = finished.folder / "recommended_config.yaml"
    recommended = yaml.safe_load(path.read_text())
    assert recommended["search"] == {} and recommended["study"]["n_trials"] == 1
    assert main([str(path), "--no-progress", "--set=report.final_model=false"]) == 0
    rerun = optuna.load_study(
        study_name="co2-quick-recommended",
        storage=f"sqlite:///{finished.root / 'mlruns' / 'optuna.db'}",
    )
    runs = runs_of(finished, "reevaluation")
    number = int(
        finished.client.get_run(finished.parent.info.run_id).data.tags["recommended_trial"]
    )
    recorded = [
        r.data.metrics["best_val_loss"]
        for r in runs
        if r.data.tags["optuna.trial_number"] == str(number)
    ]
    assert min(recorded) - 1e-6 <= rerun.best_value <= max(recorded) + 1e-6


def test_recommend_picks_the_best_mean_and_names_settings_within_noise() -> None:
    settings = [
        select.Setting(n, {"model.dropout": d}, v, 3)
        for n, d, v in ((0, 0.1, 0.50), (1, 0.2, 0.49), (2, 0.3, 0.60))
    ]
    runs = pd.DataFrame(
        {
            "number": [0, 0, 1, 1, 2, 2],
            "val_loss": [0.50, 0.52, 0.505, 0.525, 0.60, 0.62],
            select.TEST_LOSS: [0.7, 0.7, 0.7, 0.7, 0.8, 0.8],
            "best_epoch": [3, 5, 4, 6, 2, 2],
        }
    )
    rec = select.recommend(settings, runs, "minimize")
    assert rec.setting.number == 0  # the best mean, not trial 1's lucky single value
    assert rec.within_noise == [1]  # 0.005 apart, well inside the seeds' spread
    assert rec.epochs == 5  # median of best_epoch + 1 over seeds: (4 + 6) / 2


def test_hard_windows_are_those_most_runs_get_wrong() -> None:
    def worst(*windows: int) -> pd.DataFrame:
        return pd.DataFrame(
            {"window": windows, "start": [str(w) for w in windows], "mae": [1.0] * len(windows)}
        )

    hard = surface.hard_windows([worst(1, 2, 3), worst(1, 2), worst(1, 4), worst(1, 2, 5)])
    assert list(hard["window"]) == [1]  # window 2 is in 3 of 4 lists: below the 80 % mark
    assert hard.loc[0, "share"] == 1.0


def test_a_blank_registry_name_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="report.model_name"):
        load_config(QUICK, ["report.model_name=' '"])
