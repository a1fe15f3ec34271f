"""The report: its pure parts on hand-made tables, then a finished tiny sweep read back from the
real stores (table, importances, seed re-evaluation, registered model, report.md, the parent
run's description, the ready-to-train file)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import optuna
import pandas as pd
import pytest
import yaml

from lstm_sweep import metrics as m
from lstm_sweep.config import SearchParam
from lstm_sweep.evidence import ForecastEvidence
from lstm_sweep.report import fold_values
from lstm_sweep.report.__main__ import main as report_main
from lstm_sweep.report.ranges import more_regularised, neighbourhood, surface
from lstm_sweep.report.render import (
    champion_line,
    format_summary,
    indistinguishable,
    naive_comparison,
    overfitting_line,
)
from lstm_sweep.report.table import hard_windows, summarise
from lstm_sweep.run import main
from lstm_sweep.selection import Champion, Setting
from tests.helpers import runs_of

SEARCH = {
    "model.dropout": SearchParam(type="float", low=0.0, high=0.5),
    "train.weight_decay": SearchParam(type="float", low=1e-6, high=1e-1, log=True),
}


def test_a_study_where_no_trial_finished_says_why_and_what_to_change() -> None:
    table = pd.DataFrame(
        {
            "number": [0, 1, 2, 3],
            "state": ["PRUNED", "PRUNED", "PRUNED", "FAIL"],
            "value": [math.nan] * 4,
            "verdict": ["unstable", "unstable", "undecided", None],
        }
    )
    summary = summarise(table, [], "minimize", "val_loss", naive_val_loss=1.0)
    said = format_summary(summary, None, "forecast", "open it").splitlines()
    assert said[0] == "Trials: 0 finished, 3 pruned, 1 failed."
    assert said[1] == (
        "No trial finished, so there is nothing to recommend: 2 unstable (the loss blew up:"
        " search lower learning rates, or set train.grad_clip); 1 pruned early (let trials"
        " train longer before the pruner judges: study.pruner.n_warmup_steps); 1 failed (each"
        " trial run's failure_reason says why). Change the sweep file and run it as a new study"
        " (--set study.name=...)."
    )


def test_the_surface_is_the_median_per_cell_with_every_cell_shown() -> None:
    table = pd.DataFrame(
        {
            "state": ["COMPLETE"] * 4 + ["PRUNED"],
            "model.dropout": [0.01, 0.02, 0.45, 0.46, 0.01],
            "train.weight_decay": [1e-6, 2e-6, 0.09, 0.09, 1e-6],
            "best_val_loss": [1.0, 3.0, 0.5, 0.7, 100.0],
        }
    )
    grid = surface(table, "model.dropout", "train.weight_decay", "best_val_loss", SEARCH)
    assert grid.shape == (5, 5)  # empty cells stay, as NaN
    assert grid.iloc[0, 0] == 2.0  # median of 1 and 3; the pruned trial is left out
    assert grid.iloc[-1, -1] == pytest.approx(0.6)
    assert int(grid.notna().sum().sum()) == 2


def test_neighbours_count_completed_trials_near_the_recommendation() -> None:
    table = pd.DataFrame(
        {
            "state": ["COMPLETE"] * 3,
            "model.dropout": [0.20, 0.22, 0.48],
            "train.weight_decay": [1e-3, 2e-3, 1e-6],
            "value": [0.50, 0.52, 0.51],
        }
    )
    near, good = neighbourhood(
        table, SEARCH, {"model.dropout": 0.2, "train.weight_decay": 1e-3}, 0.1, "minimize"
    )
    assert (near, good) == (2, 2)


def test_hard_windows_are_those_most_runs_get_wrong() -> None:
    def worst(*windows: int) -> pd.DataFrame:
        return pd.DataFrame(
            {"window": windows, "start": [str(w) for w in windows], "mae": [1.0] * len(windows)}
        )

    lists = [worst(1, 2, 3), worst(1, 2), worst(1, 4), worst(1, 2, 5)]
    hard = hard_windows(lists, ForecastEvidence.sample_keys, ForecastEvidence.sample_score)
    assert list(hard["window"]) == [1]  # window 2 is in 3 of 4 lists: below the 80 % mark
    assert hard.loc[0, "share"] == 1.0


def test_the_naive_predictor_is_quoted_in_the_monitored_measure() -> None:
    assert naive_comparison(m.VAL_LOSS, 0.5, 2.0) == " (naive predictor's val loss: 2, 25% of it)"
    assert "below 1 beats it" in naive_comparison(m.VAL_NMSE, 0.74, 0.71)  # not the loss
    assert naive_comparison(m.VAL_ACCURACY, 0.9, 0.69) == ""  # a loss beside an accuracy


@pytest.mark.slow
def test_the_table_has_one_row_per_trial_with_its_state_and_run_metrics(finished) -> None:
    table = pd.read_csv(finished.report / "trials.csv")
    trials = {t.number: t for t in finished.study.trials}
    assert sorted(table["number"]) == sorted(trials)
    for row in table.itertuples():
        trial = trials[row.number]
        assert row.state == trial.state.name
        assert row.wall_seconds > 0 and row.epochs_trained == trial.user_attrs["epochs_trained"]
        assert row.verdict == trial.user_attrs["verdict"]
    complete = table[table["state"] == "COMPLETE"]
    assert (complete["best_val_loss"] == complete["value"]).all()


@pytest.mark.slow
def test_importances_and_optuna_plots_are_written(finished) -> None:
    plots = {p.name for p in (finished.report / "plots").glob("*.html")}
    assert {"optimization_history.html", "slice.html", "parallel_coordinate.html"} <= plots
    text = (finished.report / "report.md").read_text()
    assert "## What mattered" in text and "importance" in text


@pytest.mark.slow
def test_each_top_setting_is_seen_with_every_seed_reusing_the_trials_own_training(
    finished,
) -> None:
    reevaluations = runs_of(finished.client, "co2-quick", m.ROLE_REEVALUATION)
    trained = {(r.data.tags[m.TRIAL_TAG], r.data.tags[m.SEED_TAG]) for r in reevaluations}
    assert len(trained) == len(reevaluations) == 2  # top 2 x seeds 2, seed 0 = the trials
    assert {seed for _, seed in trained} == {"1"}
    for run in reevaluations:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == finished.parent.info.run_id
        assert m.error("test", "mse") in run.data.metrics
    # what the evidence cost, on the parent run: the two seeds and the retrained final model;
    # two seeds make one round of the race, which spares nothing
    metrics = finished.parent.data.metrics
    assert metrics["closing_trainings"] == len(reevaluations) + 1
    assert metrics["closing_spared"] == 0 and metrics["closing_seconds"] > 0


@pytest.mark.slow
def test_the_final_model_is_registered_once_and_compared_with_every_baseline(finished) -> None:
    (final,) = runs_of(finished.client, "co2-quick", m.ROLE_FINAL)
    assert final.info.status == "FINISHED"
    assert final.data.tags[m.MODEL_URI_TAG] == "models:/co2-tiny/1"
    versions = finished.client.search_model_versions("name = 'co2-tiny'")
    assert [str(v.version) for v in versions] == ["1"] and versions[0].run_id == final.info.run_id
    metrics = finished.parent.data.metrics
    for method in ("lstm", *m.FORECAST_BASELINES):
        for part in ("val", "test"):
            assert metrics[m.baseline(method, part, "mse")] > 0
    assert metrics["lstm_test_mse"] == pytest.approx(final.data.metrics["test_mse"])
    recommended = finished.study.trials[int(finished.parent.data.tags[m.RECOMMENDED_TRIAL_TAG])]
    assert metrics["optimism_vs_trial"] == pytest.approx(
        metrics["final_test_value"] - recommended.value
    )


@pytest.mark.slow
def test_one_report_holds_every_part_and_the_parent_run_shows_the_answer(finished) -> None:
    text = (finished.report / "report.md").read_text()
    for part in (
        "## Recommendation",
        "## Against the baselines",
        "## Seed re-evaluation",
        "## What mattered",
        "## Validation windows every setting gets wrong",
        "## All trials",
        "optimism",
        "models:/co2-tiny/1",
        "| ridge_ar ",
        "| seasonal_naive ",
        "| lstm ",
    ):
        assert part in text, part
    for image in ("winner_loss_curves.png", "surface_dropout_weight_decay.png"):
        assert f"]({image})" in text and (finished.report / image).is_file()
    # 4 epochs with patience 4: early stopping can end no trial, and the report says so
    assert "- Epoch budget: train.max_epochs: 3 of the best 3 trial(s) trained all 4" in text
    assert "train.max_epochs: 3 of the best 3" in finished.parent.data.tags[m.RANGE_TAG]
    logged = {a.path for a in finished.client.list_artifacts(finished.parent.info.run_id, "report")}
    assert {"report/report.md", "report/trials.csv", "report/recommended_config.yaml"} <= logged
    note = finished.parent.data.tags[m.NOTE_TAG]
    assert note.startswith("## co2-quick: recommended settings") and "| ridge_ar " in note
    assert finished.parent.info.status == "FINISHED"


@pytest.mark.slow
def test_the_recommended_yaml_reproduces_the_recorded_validation_loss(
    finished, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(finished.folder)
    path = finished.report / "recommended_config.yaml"
    recommended = yaml.safe_load(path.read_text())
    assert recommended["search"] == {} and recommended["study"]["n_trials"] == 1
    assert main([str(path), "--no-progress", "--set=closing.final_model=false"]) == 0
    rerun = optuna.load_study(
        study_name="co2-quick-recommended", storage=f"sqlite:///{finished.root / 'optuna.db'}"
    )
    number = int(finished.parent.data.tags[m.RECOMMENDED_TRIAL_TAG])
    assert rerun.best_value == pytest.approx(finished.study.trials[number].value, rel=1e-6)
    assert not math.isnan(rerun.best_value)


def test_the_champion_line_says_where_the_alias_is_and_on_what_evidence() -> None:
    uri, alias = "models:/m/3", "`models:/m@champion`"
    first = Champion("mse", "3", 0.2, None, None, crowned=True)
    assert champion_line(first, uri).startswith(f"{alias} is this version, the first")
    beaten = Champion("mse", "3", 0.5, "2", 0.25, crowned=False)
    assert champion_line(beaten, uri) == (
        f"{alias} stays on version 2: this version's mse 0.5 on this study's test part"
        " against version 2's 0.25."
    )
    note = "version 2 cannot be scored on this test part: it forecasts 4 fewer steps"
    unscored = Champion("mse", "3", 0.5, "2", None, crowned=False, note=note)
    assert champion_line(unscored, uri) == f"{alias} stays on version 2: {note}."


def test_more_regularised_trials_are_at_least_as_regularised_on_every_searched_key() -> None:
    table = pd.DataFrame(
        {
            "state": [m.COMPLETE] * 4 + [m.PRUNED],
            "model.dropout": [0.2, 0.3, 0.3, 0.1, 0.4],
            "train.weight_decay": [1e-3, 1e-3, 1e-2, 1e-2, 1e-2],
            "value": [0.5, 0.6, 0.4, 0.3, 0.1],
        }
    )
    stronger = more_regularised(table, SEARCH, {"model.dropout": 0.2, "train.weight_decay": 1e-3})
    assert list(stronger["value"]) == [0.6, 0.4]  # not itself, not less dropout, not pruned
    assert more_regularised(table, {}, {}).empty  # no regulariser searched


def test_the_report_says_plainly_which_settings_tie_and_what_overfitting_means() -> None:
    settings = [Setting(n, {"model.hidden_size": h}, 0.4, 5, "r") for n, h in ((3, 64), (7, 16))]
    selection = SimpleNamespace(
        recommended=3, within_noise=[7], sizes={3: 17_000, 7: 1_400}, settings=settings
    )
    assert indistinguishable(selection) == (  # type: ignore[arg-type]
        "Indistinguishable from it (mean difference below the two seed standard deviations"
        " added): any of trials #3, #7 will do; the smallest is #7 (1,400 parameters:"
        " model.hidden_size=16)."
    )
    cfg = SimpleNamespace(direction="minimize", train=SimpleNamespace(monitor="val_loss"))
    report = SimpleNamespace(cfg=cfg, onset=12, stronger=(4, 0.45))
    line = overfitting_line(report, 0.40, 9)  # type: ignore[arg-type]
    assert "rises from epoch 12" in line and "weights of epoch 9, before that" in line
    assert line.endswith(
        "4 completed trial(s) regularised it more in the searched ranges and"
        " scored worse at best (val_loss 0.45 against its 0.4)."
    )
    report.stronger = (0, None)
    assert "widen dropout or weight decay upward" in overfitting_line(report, 0.4, 9)  # type: ignore[arg-type]


def test_a_runs_fold_values_are_read_oldest_first_and_only_when_every_fold_ended() -> None:
    best = m.best("val_nmse")
    metrics = {m.fold(0, best): 0.3, m.fold(1, best): 0.2, best: 0.25, m.FOLDS_MEAN: 0.25}
    assert fold_values(metrics, 3, "val_nmse") == [0.3, 0.2, 0.25]
    assert fold_values(metrics, 1, "val_nmse") == []  # one fold: no spread over folds
    del metrics[m.fold(1, best)]  # cut in its second fold
    assert fold_values(metrics, 3, "val_nmse") == []


@pytest.mark.slow
def test_the_report_command_writes_it_again_and_leaves_the_sweeps_run_as_it_was(
    finished, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(finished.folder)
    before = finished.client.get_run(finished.parent.info.run_id).info
    overrides = [a for a in finished.args if a.startswith("--set=")]
    assert report_main([finished.args[0], *overrides]) == 0
    out = capsys.readouterr().out
    assert out.startswith("The LSTM ") and "Report: mlruns/reports/co2-quick/report.md" in out
    after = finished.client.get_run(finished.parent.info.run_id).info
    assert after.status == before.status == "FINISHED" and after.end_time == before.end_time
