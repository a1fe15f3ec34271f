"""The Optuna side, driven by hand: the objective on a FixedTrial and through ask/tell, samplers
seeded per trial, the study's record of its settings, and lost trials."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from optuna.trial import FrozenTrial, TrialState

from lstm_sweep import metrics as m
from lstm_sweep import study as study_module
from lstm_sweep.config import Config, ConfigError, load_config
from lstm_sweep.study import (
    Batches,
    BatchPruner,
    Objective,
    Pruning,
    StaleTrialHandler,
    blind_settings,
    decided,
    fail_stale_trials,
    first_prunable_epoch,
    make_pruner,
    make_sampler,
    may_propose,
    open_study,
    outcome,
    proposals,
    reconcile_runs,
    retry_failed,
    settled,
    stopping_point,
    suggest_params,
    target_trials,
)
from lstm_sweep.tasks import TaskCache
from lstm_sweep.tracking import Tracker
from lstm_sweep.train import History, Stop
from tests.helpers import (
    CLASSIFY,
    TINY_CLASSIFY,
    free_port,
    mlflow_client,
    url_with_password,
    wait_for,
)


@pytest.fixture
def tracker(stores: Path, tiny_cfg: Config) -> Tracker:
    return Tracker(None, tiny_cfg.experiment)


def objective(cfg: Config, tracker: Tracker) -> Objective:
    return Objective(cfg, TaskCache(), tracker, tracker.open_parent(cfg.study_name, {}))


def test_the_objective_trains_one_trial_and_records_it_in_its_run(
    tiny_cfg: Config, tracker: Tracker
) -> None:
    values = {"model.dropout": 0.1, "train.weight_decay": 1e-4, "train.learning_rate": 5e-3}
    trial = optuna.trial.FixedTrial(values, number=3)
    value = objective(tiny_cfg, tracker)(trial)
    run = mlflow_client(Path("mlruns").resolve()).get_run(trial.user_attrs[m.RUN_ID_ATTR])
    assert run.info.status == "FINISHED" and run.data.tags[m.TRIAL_TAG] == "3"
    assert float(run.data.params["train.learning_rate"]) == 5e-3
    assert run.data.metrics[m.best(m.VAL_LOSS)] == pytest.approx(value)
    assert trial.user_attrs[m.VERDICT_ATTR] in m.VERDICTS


@pytest.mark.parametrize("task", ["forecast", "classification"])
def test_a_trial_scores_every_fold_and_its_value_is_the_mean_of_their_best_values(
    tiny_cfg: Config, tracker: Tracker, task: str
) -> None:
    cfg = tiny_cfg.with_values({"data.folds": 3})
    values = {"model.dropout": 0.1, "train.weight_decay": 1e-4, "train.learning_rate": 5e-3}
    if task == "classification":  # stratified chunks of the digits' training sequences
        cfg = load_config(CLASSIFY, TINY_CLASSIFY + ["data.folds=3", "train.max_epochs=2"])
        values["model.hidden_size"] = 32
    trial = optuna.trial.FixedTrial(values, number=4)
    value = objective(cfg, tracker)(trial)
    client = mlflow_client(Path("mlruns").resolve())
    run = client.get_run(trial.user_attrs[m.RUN_ID_ATTR])
    best = m.best(cfg.train.monitor)
    metrics = run.data.metrics
    bests = [metrics[m.fold(0, best)], metrics[m.fold(1, best)], metrics[best]]
    assert value == pytest.approx(float(np.mean(bests)))
    assert metrics[m.FOLDS_MEAN] == pytest.approx(value)
    assert len(set(bests)) == 3  # three models on three stretches
    for fold in (0, 1):  # each earlier fold's curves, an epoch a step
        curve = client.get_metric_history(run.info.run_id, m.fold(fold, m.VAL_LOSS))
        assert [p.step for p in curve] == list(range(len(curve))) and curve


@pytest.mark.parametrize("folds", [1, 2])  # with two, the first fold is cut: nothing more trains
def test_a_pruned_trial_is_pruned_in_optuna_killed_in_mlflow_and_undecided(
    tiny_cfg: Config, tracker: Tracker, folds: int
) -> None:
    # a pruner that prunes at once; the config's warm-up is 0, so it is asked from epoch 0
    cfg = tiny_cfg.with_values(
        {"train.max_epochs": 10, "study.pruner.n_warmup_steps": 0, "data.folds": folds}
    )
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=0.0))
    study.optimize(objective(cfg, tracker), n_trials=1)
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert trial.user_attrs[m.EPOCHS_TRAINED] == 1
    run = mlflow_client(Path("mlruns").resolve()).get_run(trial.user_attrs[m.RUN_ID_ATTR])
    assert run.info.status == "KILLED" and run.data.tags[m.STOP_REASON_TAG] == "pruned"
    assert run.data.tags[m.VERDICT_TAG] == "undecided"
    best = m.best(cfg.train.monitor)
    assert (m.fold(0, best) in run.data.metrics) is (folds == 2)  # the cut fold's best, said
    assert best not in run.data.metrics or folds == 1  # the split's own fold never trained


def proposed_by(cfg: Config, storage: str | None, n: int) -> list[dict]:
    study = optuna.create_study(storage=storage, sampler=make_sampler(cfg, Batches(4)))
    study.optimize(lambda t: sum(map(float, suggest_params(t, cfg.search).values())), n_trials=n)
    return [t.params for t in study.trials]


def test_the_same_seed_proposes_the_same_trials_on_any_storage(
    tiny_cfg: Config, tmp_path: Path
) -> None:
    cfg = tiny_cfg.with_values({"study.n_startup_trials": 3})
    in_memory = proposed_by(cfg, None, 6)
    assert proposed_by(cfg, f"sqlite:///{tmp_path / 'a.db'}", 6) == in_memory
    assert proposed_by(cfg.with_values({"train.seed": 1}), None, 6) != in_memory


def test_workers_sharing_a_study_explore_instead_of_repeating_each_other(
    tiny_cfg: Config, tmp_path: Path
) -> None:
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    name = "shared"
    first, second = (
        optuna.create_study(
            study_name=name,
            storage=storage,
            sampler=make_sampler(tiny_cfg, Batches(4)),
            load_if_exists=True,
        )
        for _ in range(2)
    )
    asked = [study.ask() for study in (first, second, first, second)]  # as two processes would
    params = [tuple(suggest_params(t, tiny_cfg.search).values()) for t in asked]
    assert len(set(params)) == 4


def ended(number: int, state: TrialState = TrialState.COMPLETE, **system: Any) -> FrozenTrial:
    """A trial as the storage holds it: ``number`` in ``state``, with system attributes."""
    trial = optuna.trial.create_trial(
        state=state, value=float(number) if state == TrialState.COMPLETE else None
    )
    trial.number, trial.system_attrs = number, system
    return trial


def test_a_retry_belongs_to_the_setting_it_repeats_and_a_batch_waits_for_the_one_before() -> None:
    fail, running, waiting = TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING
    # setting 1 (trial 1) failed, its retry (trial 3) failed, the retry of that (4) runs
    trials = [
        ended(0),
        ended(1, fail),
        ended(2),
        ended(3, fail, retry_history=[1]),
        ended(4, running, retry_history=[1, 3]),
        ended(5, TrialState.PRUNED),
    ]
    chains = proposals(trials)
    assert [[t.number for t in chain] for chain in chains] == [[0], [1, 3, 4], [2], [5]]
    assert [settled(chain) for chain in chains] == [True, False, True, True]
    assert [getattr(outcome(chain), "number", None) for chain in chains] == [0, None, 2, 5]
    # four settings proposed: the fifth opens batch 2 of two, which needs settings 0-3 ended
    assert not may_propose(trials, batch=2)
    assert not may_propose(trials, batch=3)  # batch 1 (settings 3-5) needs settings 0-2
    assert may_propose(trials, batch=5)  # still in batch 0
    assert not may_propose(trials, batch=1)
    trials[4] = ended(4, retry_history=[1, 3])
    assert may_propose(trials, batch=1) and may_propose(trials, batch=2)
    assert may_propose([*trials[:4], ended(4, running), ended(6, waiting, retry_history=[4])], 1)


def valued(values: list[float | None], running: int | None = None) -> list[FrozenTrial]:
    """Settled trials in proposal order with these values (None: pruned); ``running``: that
    one still runs."""
    trials = []
    for number, value in enumerate(values):
        if number == running:
            trial = optuna.trial.create_trial(state=TrialState.RUNNING)
        elif value is None:
            trial = optuna.trial.create_trial(state=TrialState.PRUNED, intermediate_values={0: 9})
        else:
            trial = optuna.trial.create_trial(value=value)
        trial.number = number
        trials.append(trial)
    return trials


def test_the_study_stops_itself_once_its_best_gains_too_little_over_its_last_settings(
    tiny_cfg: Config,
) -> None:
    cfg = tiny_cfg.with_values(
        {
            "study.n_trials": 30,
            "study.n_startup_trials": 2,
            "study.stop.patience": 3,
            "study.stop.min_gain": 0.01,
        }
    )
    # the bests after 2, 3, 5, 6 settings: 4, 3, 2.98, 2.98; from 3 to 2.98 is 0.7 %
    values: list[float | None] = [5.0, 4.0, 3.0, 2.99, 2.98, None, 2.985, 1.0]
    stopped = stopping_point(valued(values), cfg)
    assert stopped is not None and (stopped.settings, stopped.trials) == (6, 6)
    assert (stopped.best, stopped.before) == (2.98, 3.0)
    assert "stopped itself after 6 trials" in str(stopped) and "last 3 settings" in str(stopped)
    assert target_trials(valued(values), cfg) == 6
    assert stopping_point(valued(values[:5]), cfg) is None  # 25 % gained from 4 to 2.98
    assert stopping_point(valued(values, running=2), cfg) is None  # only settled settings count
    assert target_trials(valued(values[:5]), cfg) == 30
    # a larger share to gain stops sooner; batches of 2 decide at even settings only
    lenient = cfg.with_values({"study.stop.min_gain": 0.3})
    in_pairs = lenient.with_values({"study.batch": 2})
    points = [stopping_point(valued(values), c) for c in (lenient, in_pairs)]
    assert [getattr(p, "settings", None) for p in points] == [5, 6]
    assert stopping_point(valued(values), cfg.with_values({"study.stop.patience": None})) is None
    # maximising: gains are rises
    rising = cfg.with_values({"study.direction": "maximize", "train.monitor": "val_loss"})
    assert stopping_point(valued([1.0, 2.0, 3.0, 3.01, 3.02, 3.02]), rising) is not None
    assert stopping_point(valued([1.0, 2.0, 3.0, 3.5, 4.0, 4.5]), rising) is None
    # a budget that runs out at the boundary is no stop: the study ran its n_trials
    assert stopping_point(valued(values), cfg.with_values({"study.n_trials": 6})) is None
    # a failure still to be retried (a later start queues it) holds the point back; one
    # retried as often as it may be decides nothing and does not
    failed = optuna.trial.create_trial(state=TrialState.FAIL)
    failed.number = 1
    assert stopping_point([*valued(values)[:1], failed, *valued(values)[2:]], cfg) is None
    chain = [ended(1, TrialState.FAIL), ended(8, TrialState.FAIL, retry_history=[1])]
    chain.append(ended(9, TrialState.FAIL, retry_history=[1, 8]))
    exhausted = [valued(values)[0], *chain[:1], *valued(values)[2:], *chain[1:]]
    assert [decided(c) for c in proposals(exhausted)][:2] == [True, True]
    assert getattr(stopping_point(exhausted, cfg), "trials", None) == 5  # 6 settings, 5 counted
    tiny_share = cfg.with_values({"study.stop.min_gain": 0.005})
    assert "gained at most 0.5 % over" in str(stopping_point(valued(values), tiny_share))


def test_the_settings_no_trial_decides_start_without_waiting_for_the_batch_before(
    tiny_cfg: Config,
) -> None:
    def blind(**study: Any) -> int:
        values = {"study.n_trials": 30, **{f"study.{k}": v for k, v in study.items()}}
        return blind_settings(tiny_cfg.with_values(values))

    # TPE draws 8 at random; the median pruner, in batches of 2, first sees 5 complete
    # trials at setting 6: it could prune setting 6, so setting 6 waits
    assert blind(n_startup_trials=8, batch=2, **{"pruner.n_startup_trials": 5}) == 6
    assert blind(n_startup_trials=4, batch=2, **{"pruner.n_startup_trials": 5}) == 4
    assert blind(n_startup_trials=8, batch=1, **{"pruner.n_startup_trials": 5}) == 5
    assert blind(sampler="random", **{"pruner.type": "none"}) == 30  # nothing ever waits
    assert blind(sampler="cmaes") == 0  # its state lives in the study: it always waits
    assert blind(n_startup_trials=8, **{"pruner.type": "hyperband"}) == 0
    # where the study may stop itself, whole batches decide: random settings wait there
    stopping = {"sampler": "random", "pruner.type": "none", "stop.patience": 3, "batch": 2}
    assert blind(n_startup_trials=0, **stopping) == 4
    running = [ended(0, TrialState.RUNNING), ended(1, TrialState.RUNNING), ended(2)]
    assert not may_propose(running, batch=1, blind=3)  # the fourth setting sees the others
    assert may_propose(running, batch=1, blind=4)


def test_a_batch_is_proposed_alike_whichever_of_the_batch_before_finished_first(
    tiny_cfg: Config,
) -> None:
    cfg = tiny_cfg.with_values({"study.n_startup_trials": 2})

    def study_finishing(order: list[int]) -> list[dict[str, Any]]:
        """Six trials in batches of two, each batch told in ``order`` (as workers would)."""
        study = optuna.create_study(sampler=make_sampler(cfg, Batches(2)))
        for _ in range(3):
            batch = [study.ask() for _ in range(2)]
            for trial in batch:
                suggest_params(trial, cfg.search)
            for index in order:
                study.tell(batch[index], sum(map(float, batch[index].params.values())))
        return [t.params for t in study.trials]

    in_order = study_finishing([0, 1])
    assert study_finishing([1, 0]) == in_order
    # sequential proposals (batches of one) differ from the fourth on: it sees three trials
    study = optuna.create_study(sampler=make_sampler(cfg, Batches(1)))
    study.optimize(lambda t: sum(map(float, suggest_params(t, cfg.search).values())), n_trials=4)
    assert [t.params for t in study.trials][:3] == in_order[:3]
    assert study.trials[3].params != in_order[3]


def test_the_median_pruner_compares_a_trial_with_the_batches_before_its_own_only() -> None:
    pruner = BatchPruner(optuna.pruners.MedianPruner(n_startup_trials=1), Batches(2))
    study = optuna.create_study(pruner=pruner)
    first = study.ask()
    first.report(1.0, 0)
    study.tell(first, 1.0)
    second = study.ask()  # the same batch as the first: nothing to compare with
    second.report(5.0, 0)
    assert not second.should_prune()
    study.tell(second, 5.0)
    third = study.ask()  # batch 1: compared with both
    third.report(5.0, 0)
    assert third.should_prune()


def test_a_changed_sweep_file_is_refused_with_the_changed_key_and_a_way_out(
    tiny_cfg: Config, stores: Path
) -> None:
    study = open_study(tiny_cfg, "sweep.yaml")
    study.add_trial(optuna.trial.create_trial(value=1.0))
    assert open_study(tiny_cfg.with_values({"study.n_trials": 9}), "sweep.yaml").trials
    with pytest.raises(ConfigError) as caught:
        open_study(tiny_cfg.with_values({"train.max_epochs": 9}), "sweep.yaml")
    message = str(caught.value)
    assert caught.value.key == "train.max_epochs"
    assert "was run with 4" in message and "--set study.name=co2-quick-2" in message
    maximize = tiny_cfg.with_values({"study.direction": "maximize", "train.monitor": "val_loss"})
    with pytest.raises(ConfigError, match="study.direction"):
        open_study(maximize, "sweep.yaml")


def test_a_running_trial_that_never_beat_is_failed_and_its_settings_retried(
    tiny_cfg: Config, tracker: Tracker
) -> None:
    cfg = tiny_cfg.with_values({"study.heartbeat_seconds": 1, "study.grace_seconds": 2})
    handler = StaleTrialHandler(tracker)
    study = open_study(cfg, "sweep.yaml", handler)
    lost = study.ask()  # RUNNING; its worker "died" before the first heartbeat
    suggest_params(lost, cfg.search)
    assert fail_stale_trials(study, cfg.study.grace_seconds, handler) == []  # still young
    time.sleep(2.5)
    assert fail_stale_trials(study, cfg.study.grace_seconds, handler) == [0]
    states = [t.state.name for t in study.trials]
    assert states == ["FAIL", "WAITING"]
    assert study.trials[1].params == study.trials[0].params
    assert retry_failed(study) == 0  # already queued once


def test_a_running_trial_whose_local_process_is_gone_is_failed_at_once(
    tiny_cfg: Config, tracker: Tracker
) -> None:
    handler = StaleTrialHandler(tracker)
    study = open_study(tiny_cfg, "sweep.yaml", handler)  # SQLite: every worker is local
    ended = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    gone, here, namespace = int(ended.stdout), socket.gethostname(), m.process_namespace()
    workers = [  # (host:pid, process namespace)
        (f"{here}:{gone}", namespace),  # gone: failed at once
        (m.this_process(), namespace),  # alive
        (f"another-host:{gone}", namespace),  # cannot be told from here
        (f"{here}:{gone}", "pid:[another container]"),  # nor can this
    ]
    for worker, space in workers:
        trial = study.ask()
        trial.set_user_attr(m.WORKER_ATTR, worker)
        trial.set_user_attr(m.PID_NAMESPACE_ATTR, space)
    assert fail_stale_trials(study, tiny_cfg.study.grace_seconds, handler) == [0]
    states = [t.state.name for t in study.trials]
    assert states == ["FAIL", "RUNNING", "RUNNING", "RUNNING", "WAITING"]


def test_each_trial_run_is_made_to_end_as_optuna_recorded_its_trial(
    tiny_cfg: Config, tracker: Tracker
) -> None:
    """What a fault between the two stores' writes leaves, repaired: Optuna is the truth."""
    study = open_study(tiny_cfg, "sweep.yaml")
    parent = tracker.open_parent(tiny_cfg.study_name, {})
    left = [  # (Optuna's state, how its run was left: closed as a state or RUNNING, recorded)
        (TrialState.FAIL, m.COMPLETE, True),  # closed, then Optuna failed to record the value
        (TrialState.COMPLETE, None, True),  # Optuna recorded it, the run was never closed
        (TrialState.FAIL, None, True),  # the process died mid-trial
        (TrialState.PRUNED, m.PRUNED, True),  # in agreement
        (TrialState.RUNNING, None, True),  # still training somewhere
        (TrialState.FAIL, None, False),  # the store failed before the trial recorded its run
        (TrialState.COMPLETE, m.FAIL, False),  # another study's run of the same number
    ]
    runs = []
    for state, run_state, recorded in left:
        trial = study.ask()
        tags = {MLFLOW_PARENT_RUN_ID: parent, m.ROLE_TAG: m.ROLE_TRIAL, m.TRIAL_TAG: trial.number}
        run_id = tracker.client.create_run(tracker.experiment_id, tags=tags).info.run_id
        if recorded:
            trial.set_user_attr(m.RUN_ID_ATTR, run_id)
        if run_state is not None:
            tracker.close_as(run_id, run_state, None)
        if state != TrialState.RUNNING:
            study.tell(trial, 1.0 if state == TrialState.COMPLETE else None, state=state)
        runs.append(run_id)

    assert reconcile_runs(study, tracker, parent) == [0, 1, 2, 5]
    ended = [tracker.client.get_run(run_id) for run_id in runs]
    assert [(r.info.status, r.data.tags.get(m.STATE_TAG)) for r in ended] == [
        ("FAILED", "FAIL"),
        ("FINISHED", "COMPLETE"),
        ("FAILED", "FAIL"),
        ("KILLED", "PRUNED"),
        ("RUNNING", None),
        ("FAILED", "FAIL"),
        ("FAILED", "FAIL"),  # left as it was
    ]
    reasons = [r.data.tags.get(m.FAILURE_REASON_TAG) for r in ended]
    assert reasons[:3] == [m.UNRECORDED_REASON, None, m.UNCLOSED_REASON]
    assert reasons[5] == m.UNCLOSED_REASON
    assert reconcile_runs(study, tracker, parent) == []  # once repaired, left alone


def test_an_unreachable_storage_is_one_masked_line(
    tiny_cfg: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(study_module, "OPEN_FIRST_WAIT", 0.0)  # the retries, without the waits
    secret = "pw-secret-123"  # never a real one: nothing listens at port 1
    cfg = tiny_cfg.with_values(
        {"study.storage": url_with_password("postgresql://u@127.0.0.1:1/x", secret)}
    )
    with pytest.raises(ConfigError) as caught:
        open_study(cfg, "sweep.yaml")
    message = str(caught.value)
    assert "unreachable" in message and secret not in message and "\n" not in message


class AskedAt:
    """An Optuna trial that notes the step of each should_prune call."""

    def __init__(self, trial: optuna.Trial, asked: list[int]) -> None:
        self.trial, self.asked, self.step = trial, asked, -1

    def report(self, value: float, step: int) -> None:
        self.step = step
        self.trial.report(value, step)

    def should_prune(self) -> bool:
        self.asked.append(self.step)
        return self.trial.should_prune()


@pytest.mark.parametrize("pruner", ["median", "successive_halving", "hyperband"])
def test_the_pruner_is_asked_only_from_its_first_prunable_epoch_with_the_same_decisions(
    tiny_cfg: Config, pruner: str
) -> None:
    cfg = tiny_cfg.with_values(
        {
            "study.pruner.type": pruner,
            "study.pruner.n_startup_trials": 2,
            "study.pruner.n_warmup_steps": 4,
            "study.pruner.min_resource": 3,
            "train.max_epochs": 30,
        }
    )
    first = first_prunable_epoch(cfg)
    assert first == (4 if pruner == "median" else 3)

    def pruned_at(first_epoch: float) -> tuple[list[int | None], list[int]]:
        """Four good trials, then four worse ones; when each stopped, and when it asked."""
        # one name: hyperband puts a trial in a bracket by a hash of study name and number
        study = optuna.create_study(study_name="pruning", pruner=make_pruner(cfg, Batches(1)))
        stops: list[int | None] = []
        asked: list[int] = []
        for number in range(8):
            trial = study.ask()
            callback = Pruning(AskedAt(trial, asked), m.VAL_LOSS, first_epoch)
            level = 1.0 if number < 4 else 3.0
            stop = None
            for epoch in range(30):
                row = {m.VAL_LOSS: level + 1.0 / (epoch + 1)}
                if callback.on_epoch_end(epoch, row, History()) is Stop.PRUNED:
                    stop = epoch
                    break
            stops.append(stop)
            if stop is None:
                study.tell(trial, level)
            else:
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return stops, asked

    every_epoch, asked_always = pruned_at(0)
    skipping, asked_from_first = pruned_at(first)
    assert skipping == every_epoch
    assert any(stop is not None for stop in skipping)  # the comparison means something
    assert min(asked_from_first) == first and min(asked_always) == 0
    assert len(asked_from_first) < len(asked_always)


@pytest.mark.slow
def test_optuna_dashboard_serves_the_study_a_sweep_wrote(finished) -> None:
    """The `dashboard` extra: optuna-dashboard, run as README says on the local Optuna store,
    serves the sweep's study with every one of its trials."""
    dashboard = shutil.which("optuna-dashboard", path=str(Path(sys.executable).parent))
    assert dashboard is not None, "pip install -e '.[dashboard]' (the dev extra has it)"
    port = free_port()
    storage = f"sqlite:///{finished.root / 'optuna.db'}"
    server = subprocess.Popen(
        [dashboard, storage, "--host", "127.0.0.1", "--port", str(port), "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        studies = wait_for(lambda: api(port, "/api/studies"), timeout=60)["study_summaries"]
        (study,) = [s for s in studies if s["study_name"] == finished.study.study_name]
        served = api(port, f"/api/studies/{study['study_id']}?after=0")
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert served is not None
    assert [t["number"] for t in served["trials"]] == [t.number for t in finished.study.trials]


def api(port: int, path: str) -> Any:
    """The dashboard's JSON answer, or None while nothing answers yet."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return json.load(answer)
    except OSError:
        return None
