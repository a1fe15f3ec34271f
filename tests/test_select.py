"""The closing stage's pure parts: the top settings, the seed spread and what is within noise,
the baseline that beats the LSTM, and selection.json's round trip."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from lstm_sweep import metrics as m
from lstm_sweep import predict, select
from lstm_sweep.config import Config, load_config
from lstm_sweep.engines.local import LocalProcesses
from lstm_sweep.evidence import evidence_for
from lstm_sweep.report.render import honesty_lines
from lstm_sweep.run import main
from lstm_sweep.select import (
    beaten_by,
    leaving,
    longest_first,
    reevaluation_run,
    rounds_of,
    spread_table,
    top_settings,
    with_validation_in_training,
)
from lstm_sweep.selection import (
    Champion,
    FinalModel,
    RaceRound,
    SeedResult,
    Selection,
    Setting,
)
from lstm_sweep.sweep import JobContext
from lstm_sweep.tasks import Task, TaskCache
from lstm_sweep.train import build_model
from tests.helpers import CO2, QUICK, mlflow_client, runs_of, sweep_args


def seed(number: int, value: float, epoch: int, test: float = 0.7) -> SeedResult:
    return SeedResult(
        number, 0, "run", value, epoch, "healthy", {"mse": 1.0}, {"mse": test}, 0.5, False
    )


def test_the_race_gives_its_first_two_seeds_together_then_one_a_round() -> None:
    assert rounds_of([3, 4, 5, 6], race=True) == [[3, 4], [5], [6]]
    assert rounds_of([3, 4, 5, 6], race=False) == [[3, 4, 5, 6]]
    assert rounds_of([3], race=True) == [[3]]


def test_a_setting_leaves_the_race_when_it_trails_the_leader_beyond_their_spreads() -> None:
    leader = [seed(0, 0.50, 3), seed(0, 0.52, 3)]  # mean 0.51, std 0.014
    close = [seed(1, 0.52, 3), seed(1, 0.53, 3)]  # 0.015 behind: within 0.014 + 0.007
    far = [seed(2, 0.60, 3), seed(2, 0.61, 3)]  # 0.095 behind
    assert leaving([*leader, *close, *far], "minimize", "mse") == {
        2: "its mean 0.605 trails #0's 0.51 by 0.095, more than their seed spreads added (0.021)"
    }
    assert leaving([*leader, *close, *far], "maximize", "mse").keys() == {0, 1}  # 2 leads
    # one seed of a setting: no spread to judge by, nobody leaves yet
    assert leaving([*leader, *far, seed(3, 0.9, 3)], "minimize", "mse") == {}


def test_the_winner_is_the_best_mean_among_the_settings_that_finished_the_race() -> None:
    seeds = [seed(0, 0.50, 3), seed(0, 0.52, 3), seed(0, 0.60, 3), seed(1, 0.53, 3)]
    seeds.append(seed(1, 0.54, 3))  # left after two seeds, its mean 0.535 now the best
    assert spread_table(seeds, "minimize", "mse")[1] == 1
    assert spread_table(seeds, "minimize", "mse", finalists={0})[1] == 0


def test_the_baselines_are_known_before_the_winner_unless_a_data_key_is_searched() -> None:
    cfg = load_config(QUICK)
    fingerprint = select.baselines_fingerprint(cfg)
    # a trial's model and training values leave its baselines as they are
    trial = cfg.with_values({"model.hidden_size": 7, "train.learning_rate": 0.5})
    assert select.baselines_fingerprint(trial) == fingerprint
    for other in ({"data.window": 9}, {"train.seed": 1}, {"closing.baselines": ["ridge_ar"]}):
        assert select.baselines_fingerprint(cfg.with_values(other)) != fingerprint
    assert select.baselines_ahead(cfg) == [("val", False), ("test", True)]
    assert select.baselines_ahead(cfg.with_values({"closing.ensemble": True}))[1] == ("test", False)
    searched = {"data.window": {"type": "int", "low": 8, "high": 16}}
    assert select.baselines_ahead(cfg.with_values({"search": searched})) == []


def test_top_settings_are_the_best_distinct_completed_ones() -> None:
    table = pd.DataFrame(
        {
            "number": [0, 1, 2, 3, 4],
            "state": ["COMPLETE", "COMPLETE", "PRUNED", "COMPLETE", "COMPLETE"],
            "value": [0.5, 0.4, 0.1, 0.4, 0.9],
            "model.dropout": [0.1, 0.2, 0.3, 0.2, 0.4],  # trial 3 retried trial 1's settings
            m.BEST_EPOCH: [3, 4, 1, 4, 2],
            "run_id": ["a", "b", "c", "d", "e"],
        }
    )
    settings = top_settings(table, ["model.dropout"], 3, "minimize")
    assert [s.number for s in settings] == [1, 0, 4]
    assert settings[0] == Setting(1, {"model.dropout": 0.2}, 0.4, 4, "b")
    assert [s.number for s in top_settings(table, ["model.dropout"], 1, "maximize")] == [4]


def test_the_best_mean_wins_and_close_settings_are_named_within_noise() -> None:
    seeds = [
        seed(0, 0.50, 3),
        seed(0, 0.52, 5),
        seed(1, 0.49, 4),  # the luckiest single value ...
        seed(1, 0.535, 6),  # ... but a worse mean
        seed(2, 0.60, 2),
        seed(2, 0.62, 2),
    ]
    spread, winner, within = spread_table(seeds, "minimize", "mse")
    assert winner == 0
    assert within == [1]  # 0.0025 apart, well inside the seeds' spread
    assert int(spread.loc[spread["number"] == 0, "epochs"].iloc[0]) == 5  # median of 4 and 6
    assert spread["number"].tolist() == [0, 1, 2]


def test_validation_samples_join_training_and_test_stays_apart(tiny_task: Task) -> None:
    joined = with_validation_in_training(tiny_task.data)
    train, val = tiny_task.data.train, tiny_task.data.val
    assert len(joined.train) == len(train) + len(val)
    assert torch.equal(joined.train.x[len(train) :], val.x)
    assert joined.test is tiny_task.data.test


def test_a_baseline_that_beats_the_lstm_on_validation_is_named(tiny_task: Task) -> None:
    table = pd.DataFrame({"mse": [0.3, 0.2, float("nan")]}, index=["naive", "ridge_ar", "seasonal"])
    beaten = beaten_by(tiny_task, {"mse": 0.25}, table)
    assert beaten == {"method": "ridge_ar", "metric": "mse", "baseline": 0.2, "lstm": 0.25}
    assert beaten_by(tiny_task, {"mse": 0.1}, table) is None


def a_selection(**changes: Any) -> Selection:
    """A small Selection, as the closing stage would save it, with ``changes``."""
    champion = Champion("mse", "2", 0.31, "1", 0.4, crowned=True)
    final = FinalModel(
        "r", "models:/x/2", "ensemble", 5, {"mse": 0.3}, 0.8, {"mse": 0.35}, champion
    )
    selection = Selection(
        settings=[Setting(1, {"model.dropout": 0.2}, 0.4, 4, "b")],
        seeds=[seed(1, 0.4, 4)],
        spread=[{"number": 1, "val_mean": 0.4, "val_std": 0.0}],
        recommended=1,
        within_noise=[],
        epochs=5,
        baselines_val={"naive": {"mse": 0.5, "note": ""}},
        baselines_test={"naive": {"mse": 0.6, "note": ""}},
        lstm_val={"mse": 0.3},
        beaten_by=None,
        final=final,
        trainings=2,
        seconds=1.5,
        headline="mse",
    )
    return dataclasses.replace(selection, **changes)


def test_a_reevaluation_read_back_is_worth_its_folds_mean_where_it_has_one() -> None:
    row = {"run_id": "r", f"metrics.{m.best('val_loss')}": 0.5, f"metrics.{m.BEST_EPOCH}": 3}
    assert reevaluation_run(pd.Series(row), "val_loss").value == 0.5
    folds = {**row, f"metrics.{m.FOLDS_MEAN}": 0.4}
    assert reevaluation_run(pd.Series(folds), "val_loss").value == 0.4
    older = {**row, f"metrics.{m.FOLDS_MEAN}": float("nan")}  # a run beside fold runs
    assert reevaluation_run(pd.Series(older), "val_loss").value == 0.5


def test_selection_round_trips_through_json() -> None:
    beaten = {"method": "arima", "metric": "mse", "baseline": 0.2, "lstm": 0.3}
    race = [RaceRound([0, 1], [1, 4], {4: "its mean trails"}), RaceRound([2], [1])]
    selection = a_selection(beaten_on_test=beaten, race=race, spared=1)
    again = Selection.from_dict(json.loads(selection.to_json()))
    assert again == selection  # the race's trial numbers come back as numbers
    assert again.winner.number == 1 and again.winner_spread["val_mean"] == pytest.approx(0.4)


def test_the_first_lines_say_which_baseline_beats_the_lstm_on_validation_and_on_test() -> None:
    arima = {"method": "arima", "metric": "mse", "baseline": 0.25, "lstm": 0.3}
    ridge = {"method": "ridge_ar", "metric": "mse", "baseline": 0.2, "lstm": 0.3}
    (alone,) = honesty_lines(a_selection(), "forecast")
    assert alone == "The LSTM beats every baseline on the validation part (mse 0.3)."
    first, advice = honesty_lines(a_selection(beaten_on_test=arima), "forecast")
    assert first == (
        "The LSTM beats every baseline on the validation part (mse 0.3); on the test part it"
        " does NOT: arima mse 0.25 against the LSTM's 0.3."
    )
    assert advice.startswith("Use the baseline, or try a longer window")
    first, _ = honesty_lines(a_selection(beaten_by=ridge, beaten_on_test=arima), "forecast")
    assert first == (
        "The LSTM does NOT beat the ridge_ar baseline on the validation part: ridge_ar mse 0.2"
        " against the LSTM's 0.3; on the test part: arima mse 0.25 against the LSTM's 0.3."
    )
    # an older selection.json, written before the test part was compared, still reads
    raw = json.loads(a_selection().to_json())
    del raw["beaten_on_test"]
    assert Selection.from_dict(raw).beaten_on_test is None


def test_reevaluations_are_handed_out_longest_first() -> None:
    short, long, unknown = (Setting(n, {}, 0.1, 3, f"run{n}") for n in (4, 7, 9))
    jobs = [(short, 1), (short, 2), (long, 1), (long, 2), (unknown, 1)]
    ordered = longest_first(jobs, {4: 2.5, 7: 30.0})
    assert ordered == [(long, 1), (long, 2), (short, 1), (short, 2), (unknown, 1)]


CRIPPLED = ["data.transform=none", "train.max_epochs=1", "train.learning_rate=1e-5"]


@pytest.mark.slow
def test_the_champion_alias_moves_only_to_a_version_that_beats_it_on_the_same_test_part(
    stores: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def sweep(name: str, *extra: str) -> str:
        shared = ["search={}", "study.n_trials=1", "closing.top_k=1", "closing.seeds=1"]
        args = sweep_args(*shared, "closing.model_name=co2-shared", f"study.name={name}", *extra)
        assert main(args) == 0
        capsys.readouterr()
        return (stores / "reports" / name / "report.md").read_text()

    client = mlflow_client(stores)
    first = sweep("untrained", *CRIPPLED)  # an untrained model on raw levels: far off
    assert "`models:/co2-shared@champion` is this version, the first of its name" in first
    assert client.get_model_version_by_alias("co2-shared", m.CHAMPION).version == 1
    second = sweep("trained")
    assert "`models:/co2-shared@champion` moved to this version: mse" in second
    assert client.get_model_version_by_alias("co2-shared", m.CHAMPION).version == 2
    third = sweep("untrained-again", *CRIPPLED)
    assert "`models:/co2-shared@champion` stays on version 2: this version's mse" in third
    assert client.get_model_version_by_alias("co2-shared", m.CHAMPION).version == 2

    out = {}
    for uri in ("models:/co2-shared@champion", "models:/co2-shared/2"):
        out[uri] = tmp_path / f"{uri.rsplit('/', 1)[-1]}.csv"
        assert predict.main([uri, str(CO2), "-o", str(out[uri]), "--last"]) == 0
    champion, second_version = (pd.read_csv(path) for path in out.values())
    pd.testing.assert_frame_equal(champion, second_version)


def test_a_champion_that_cannot_be_compared_keeps_the_alias_and_the_new_version(
    tiny_cfg: Config, tiny_task: Task, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Registry:
        """The tracker's alias calls: version 1 holds the alias."""

        uri = "sqlite:///unused.db"

        def __init__(self) -> None:
            self.crowned: list[str] = []

        def champion(self, name: str) -> str:
            return "1"

        def crown(self, name: str, version: str) -> None:
            self.crowned.append(version)

    failure: list[Exception] = [RuntimeError("saved by another torch")]

    class Scores:
        def registered_score(self, model_uri: str, uri: str, path: Path) -> float:
            if model_uri.endswith("/1"):
                raise failure[0]
            return 0.5

    monkeypatch.setattr(select, "evidence_for", lambda task: Scores())
    registry = Registry()
    context = JobContext(tiny_cfg, TaskCache(), registry, "parent", lambda: False)  # type: ignore[arg-type]
    champion = select.Selector(context).crown(tiny_task, "models:/m/2", 0.4)
    assert not champion.crowned and registry.crowned == []
    assert "(RuntimeError: saved by another torch)" in champion.note
    failure[0] = sqlite3.OperationalError("database or disk is full")  # a store fault, not a
    with pytest.raises(sqlite3.OperationalError):  # comparison: it stops the sweep
        select.Selector(context).crown(tiny_task, "models:/m/2", 0.4)


def test_a_retrain_collapses_when_worse_than_its_seeds_beyond_their_spread_or_than_naive(
    tiny_task: Task,
) -> None:
    seeds, naive = [0.30, 0.34, 0.32], 0.9  # mse: mean 0.32, spread 0.02
    assert select.collapse(tiny_task, 0.33, seeds, naive, "naive") == ""  # within the spread
    assert select.collapse(tiny_task, 0.20, seeds, naive, "naive") == ""  # better: fine
    assert select.collapse(tiny_task, 0.345, seeds, naive, "naive") == (
        "mse 0.345 on the test part against its 3 seed models' 0.32 ± 0.02"
    )
    above_naive = select.collapse(tiny_task, 0.29, [0.3], 0.28, "naive")  # its seed: fine
    assert above_naive == "mse 0.29 on the test part, no better than the naive's 0.28"

    class Accuracy:  # a classification task's direction: higher is better
        headline, higher_is_better = "accuracy", True

        def better(self, value: float, than: float) -> bool:
            return value > than

    seeds = [0.94, 0.95, 0.93]
    assert select.collapse(Accuracy(), 0.93, seeds, 0.25, "majority class") == ""  # type: ignore[arg-type]
    assert "seed models' 0.94" in select.collapse(Accuracy(), 0.25, seeds, 0.1, "majority class")  # type: ignore[arg-type]
    assert "majority class's 0.25" in select.collapse(
        Accuracy(), 0.25, [0.2], 0.25, "majority class"
    )  # type: ignore[arg-type]


@pytest.mark.slow
def test_a_retrain_that_collapses_is_not_registered_and_says_so_first(
    stores: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def ruined(self: select.Selector, run_cfg: Config, task: Task, run: Any) -> torch.nn.Module:
        model = build_model(task, run_cfg)  # a retrain gone wrong: weights far off
        with torch.no_grad():
            for weight in model.parameters():
                weight.mul_(50.0)
        return model.eval()

    monkeypatch.setattr(select.Selector, "retrain", ruined)
    args = sweep_args("study.n_trials=2", "closing.ensemble=false", "closing.top_k=1")
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("The retrained final model COLLAPSED (mse ")
    (final,) = runs_of(mlflow_client(stores), "co2-quick", m.ROLE_FINAL)
    found = json.loads(final.data.tags[m.FINAL_TAG])
    assert found["kind"] == "ensemble" and found["collapsed"].startswith("mse ")
    report = (stores / "reports" / "co2-quick" / "report.md").read_text()
    assert "The retrained final model COLLAPSED" in report


@pytest.mark.slow
def test_a_registered_final_model_is_found_again_only_for_the_same_recipe(stores: Path) -> None:
    args = sweep_args(
        "study.n_trials=2", "closing.top_k=1", "closing.seeds=1", "closing.ensemble=true"
    )
    assert main(args) == 0
    two_seeds = [*args, "--set=closing.seeds=2"]
    assert main(two_seeds) == 0  # other seed models: another ensemble, another version
    assert main([*two_seeds, "--set=closing.race=true"]) == 0  # the same recipe: found again
    client = mlflow_client(stores)
    finals = runs_of(client, "co2-quick", m.ROLE_FINAL)
    recipes = sorted(json.loads(r.data.tags[m.FINAL_RECIPE_TAG])["seeds"] for r in finals)
    assert recipes == [[0], [0, 1]]
    assert len(client.search_model_versions("name = 'co2-quick'")) == 2
    assert main([*two_seeds, "--set=closing.model_name=co2-elsewhere"]) == 0  # another name
    assert len(client.search_model_versions("name = 'co2-elsewhere'")) == 1


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_the_closing_race_spares_the_seeds_of_settings_that_trail_beyond_the_noise(
    stores: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    # with two, the re-evaluations are spread out (tiny as they are), and the leader's seed 2
    # starts beside the first round: the race must take the same turns. The search's batches
    # of one leave the second worker idle meanwhile: it fits the baselines
    monkeypatch.setattr(LocalProcesses, "start_seconds", 0.0)
    # learning rates six decades apart: the slow ones stay near where they started
    space = "search={train.learning_rate: {type: float, low: 1.0e-6, high: 0.1, log: true}}"
    args = sweep_args(
        space,
        "train.max_epochs=6",
        "study.n_startup_trials=4",
        "study.pruner.type=none",
        "closing.top_k=3",
        "closing.seeds=3",
        "closing.race=true",
    )
    if workers == 2:  # fitted in another process: all of them, the MLP and the ARIMA too
        args.append("--set=closing.baselines=null")
    args.append(f"--workers={workers}")
    assert main(args) == 0
    said = capsys.readouterr().err
    client = mlflow_client(stores)
    (parent,) = runs_of(client, "co2-quick", m.ROLE_SWEEP)
    # fitted in the driver or beside the search, the same numbers, kept on the parent run
    assert ("baselines: fitting" in said) == (workers == 1)
    kept = {f.path for f in client.list_artifacts(parent.info.run_id, m.BASELINES_FOLDER)}
    assert kept == {f"{m.BASELINES_FOLDER}/val.json", f"{m.BASELINES_FOLDER}/test-refit.json"}
    cfg = load_config(args[0], [a.removeprefix("--set=") for a in args if a.startswith("--set")])
    evidence = evidence_for(TaskCache().get(cfg))
    found = selection_of(client, parent.info.run_id)
    for part, refit in (("val", False), ("test", True)):
        read = pd.DataFrame.from_dict(found[f"baselines_{part}"], orient="index")
        fitted = evidence.baselines(part, refit, cfg.closing.baselines)
        pd.testing.assert_frame_equal(read, fitted, check_exact=True)
    raced = runs_of(client, "co2-quick", m.ROLE_REEVALUATION)
    # seed 0 is each trial itself; seed 1 of all three, then seed 2 of the leader alone
    seeds = sorted((r.data.tags[m.SEED_TAG], r.data.tags[m.TRIAL_TAG]) for r in raced)
    winner = parent.data.tags[m.RECOMMENDED_TRIAL_TAG]
    assert [s for s, _ in seeds] == ["1", "1", "1", "2"] and seeds[-1][1] == winner
    (ahead,) = [r for r in raced if r.data.tags[m.SEED_TAG] == "2"]
    # alone in its round, one process trains it; started early, another process did
    assert (ahead.data.tags[m.WORKER_TAG] == m.this_process()) == (workers == 1)
    losers = {trial for _, trial in seeds} - {winner}
    assert len(losers) == 2
    for loser in losers:
        assert f"#{loser} leaves the race (its mean " in said
    report = (stores / "reports" / "co2-quick" / "report.md").read_text()
    for loser in losers:
        assert f"#{loser} left after seed 1: its mean" in report
    assert "It spared 2 training(s) of the full grid of seeds." in report
    assert "The closing stage trained 5 model(s) in" in report  # 4 seeds and the retrain

    # the full grid on the same trials: the race's seeds and the baselines read back, the
    # rest trained, and the same winner
    assert main([*args, "--set=closing.race=false"]) == 0
    assert "baselines: fitting" not in capsys.readouterr().err
    grid = runs_of(client, "co2-quick", m.ROLE_REEVALUATION)
    assert sorted(r.data.tags[m.SEED_TAG] for r in grid) == ["1", "1", "1", "2", "2", "2"]
    (parent,) = runs_of(client, "co2-quick", m.ROLE_SWEEP)
    assert parent.data.tags[m.RECOMMENDED_TRIAL_TAG] == winner
    report = (stores / "reports" / "co2-quick" / "report.md").read_text()
    assert "The race over seeds" not in report
    assert "The closing stage trained 2 model(s) in" in report  # the registered model stays


@pytest.mark.slow
def test_a_kept_baseline_table_cut_short_is_fitted_again(
    stores: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    args = sweep_args("study.n_trials=2", "closing.top_k=1", "closing.seeds=1")
    assert main(args) == 0
    assert "baselines: fitting and scoring them on the val part" in capsys.readouterr().err
    client = mlflow_client(stores)
    (parent,) = runs_of(client, "co2-quick", m.ROLE_SWEEP)
    whole = selection_of(client, parent.info.run_id)["baselines_val"]
    cut = tmp_path / "cut" / "val.json"  # as a kill mid-write would leave it
    cut.parent.mkdir()
    cut.write_text('{"data": "[\\"forecast\\", {')
    client.log_artifact(parent.info.run_id, str(cut), m.BASELINES_FOLDER)
    assert main([*args, "--set=closing.final_model=false"]) == 0  # a new closing stage
    assert "baselines: fitting and scoring them on the val part" in capsys.readouterr().err
    assert selection_of(client, parent.info.run_id)["baselines_val"] == whole


def selection_of(client: MlflowClient, parent_id: str) -> dict[str, Any]:
    """The closing stage's findings as kept on the sweep's parent run."""
    return json.loads(Path(client.download_artifacts(parent_id, m.SELECTION_FILE)).read_text())
