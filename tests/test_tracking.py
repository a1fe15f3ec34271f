"""The one run lifecycle, read back from a real MLflow store: every way out of a run closes it
with the right status, tags and flushed metrics; secrets never reach the store."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from lstm_sweep import metrics as m
from lstm_sweep import tracking
from lstm_sweep.study import make_storage
from lstm_sweep.tracking import Tracker, TrackingUnavailable, with_retries
from tests.helpers import MASK, mlflow_client, url_with_password

PASSWORD = "pw-secret-123"


@pytest.fixture
def tracker(stores: Path) -> Tracker:
    return Tracker(None, "it's a test")  # a quote in the name: legal in MLflow, must just work


def open_child(tracker: Tracker, parent: str, name: str = "child"):
    tags = {m.ROLE_TAG: m.ROLE_TRIAL, m.TRIAL_TAG: 7}
    params = {
        "study.storage": url_with_password("postgresql://u@db/optuna", PASSWORD),
        "model.dropout": 0.1,
    }
    return tracker.child_run(parent, name, tags, params, flush_seconds=3600)


def log_two_epochs(run: tracking.RunRecorder) -> None:
    for epoch in range(2):
        run.on_epoch_end(epoch, {m.VAL_LOSS: 1.0 - epoch / 10}, None)  # type: ignore[arg-type]


def read(tracker: Tracker, run_id: str):
    return mlflow_client(Path("mlruns").resolve()).get_run(run_id)


def test_a_finished_run_is_closed_finished_with_its_buffered_metrics(tracker: Tracker) -> None:
    parent = tracker.open_parent("it's a study", {})
    with open_child(tracker, parent) as run:
        log_two_epochs(run)
        assert run.pending  # buffered: flush_seconds is an hour
        run.end_as(m.COMPLETE, {m.VERDICT_TAG: "healthy"})
    found = read(tracker, run.run_id)
    assert found.info.status == "FINISHED"
    assert (
        found.data.tags[m.STATE_TAG] == m.COMPLETE and found.data.tags[m.VERDICT_TAG] == "healthy"
    )
    assert found.data.tags["mlflow.parentRunId"] == parent
    assert found.data.metrics[m.VAL_LOSS] == pytest.approx(0.9)


def test_a_run_records_system_metrics_when_asked_even_one_shorter_than_an_interval(
    tracker: Tracker,
) -> None:
    parent = tracker.open_parent("s", {})
    tags, params = {m.ROLE_TAG: m.ROLE_TRIAL, m.TRIAL_TAG: 1}, {"model.dropout": 0.1}
    with tracker.child_run(parent, "on", tags, params, 3600, system_seconds=10) as run:
        time.sleep(0.05)  # far shorter than the interval: its one sample is kept all the same
    system = {k for k in read(tracker, run.run_id).data.metrics if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system
    with tracker.child_run(parent, "off", tags, params, 3600, system_seconds=0) as quiet:
        time.sleep(0.05)
    assert not [k for k in read(tracker, quiet.run_id).data.metrics if k.startswith("system/")]


def test_a_pruned_run_is_closed_killed(tracker: Tracker) -> None:
    parent = tracker.open_parent("s", {})
    with open_child(tracker, parent) as run:
        log_two_epochs(run)
        run.end_as(m.PRUNED, {m.STOP_REASON_TAG: "pruned"})
    found = read(tracker, run.run_id)
    assert (found.info.status, found.data.tags[m.STATE_TAG]) == ("KILLED", m.PRUNED)
    assert found.data.metrics[m.VAL_LOSS] == pytest.approx(0.9)


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (
            ValueError(f"bad value near {url_with_password('postgresql://u@db', PASSWORD)}"),
            "ValueError: bad value",
        ),
        (KeyboardInterrupt(), m.INTERRUPTED_REASON),
    ],
    ids=["crash", "interrupted"],
)
def test_a_failed_or_interrupted_run_is_closed_failed_with_its_reason_and_curves(
    tracker: Tracker, error: BaseException, reason: str
) -> None:
    parent = tracker.open_parent("s", {})
    with pytest.raises(type(error)), open_child(tracker, parent) as run:
        log_two_epochs(run)
        raise error
    found = read(tracker, run.run_id)
    assert (found.info.status, found.data.tags[m.STATE_TAG]) == ("FAILED", m.FAIL)
    assert found.data.tags[m.FAILURE_REASON_TAG].startswith(reason)
    assert PASSWORD not in found.data.tags[m.FAILURE_REASON_TAG]
    assert found.data.metrics[m.VAL_LOSS] == pytest.approx(0.9)  # flushed on the way out


def test_params_and_tags_never_hold_a_password(tracker: Tracker) -> None:
    parent = tracker.open_parent(
        "s", {"tracking.uri": url_with_password("http://me@mlflow:5000", PASSWORD)}
    )
    with open_child(tracker, parent) as run:
        run.set_tags({"note": url_with_password("postgresql://u@db/x", PASSWORD)})
    for run_id in (parent, run.run_id):
        data = read(tracker, run_id).data
        assert not any(PASSWORD in v for v in [*data.params.values(), *data.tags.values()])
    assert read(tracker, run.run_id).data.params["study.storage"] == url_with_password(
        "postgresql://u@db/optuna", MASK
    )


def test_the_parent_is_found_again_by_its_study_name_and_the_experiment_is_model_training(
    tracker: Tracker,
) -> None:
    first = tracker.open_parent("it's a study", {})
    tracker.finish_parent(first, m.COMPLETE)
    assert tracker.open_parent("it's a study", {}) == first
    assert tracker.open_parent("another", {}) != first
    experiment = mlflow_client(Path("mlruns").resolve()).get_experiment(tracker.experiment_id)
    assert experiment.tags[m.EXPERIMENT_KIND_TAG] == m.EXPERIMENT_KIND


def test_a_run_left_running_is_closed_failed_once(tracker: Tracker) -> None:
    parent = tracker.open_parent("s", {})
    with open_child(tracker, parent) as run:
        assert tracker.close_if_running(run.run_id, m.WORKER_LOST_REASON)
    assert not tracker.close_if_running(run.run_id, m.WORKER_LOST_REASON)
    assert read(tracker, run.run_id).data.tags[m.FAILURE_REASON_TAG] == m.WORKER_LOST_REASON


def test_with_retries_backs_off_through_a_blink_and_gives_up_with_a_masked_reason(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
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
    said = capsys.readouterr().err.splitlines()  # one line while it waits, not one per try
    assert said == ["waiting for the tracking store (blink): retrying for up to 7 s"]

    def down() -> None:
        raise OSError(f"no route to {url_with_password('http://user@mlflow:5000', PASSWORD)}")

    with pytest.raises(TrackingUnavailable, match=r"failed 3 times over 3 s") as caught:
        with_retries(down, attempts=3, first_wait=1.0)
    assert "user:***@mlflow" in str(caught.value) and PASSWORD not in str(caught.value)


def test_a_local_store_is_called_once_and_a_networked_one_retried() -> None:
    assert tracking.calls_for("sqlite:////data/mlruns/mlflow.db") is tracking.call_once
    for uri in ("http://mlflow:5000", "https://mlflow.example", "postgresql://u@db/mlflow"):
        assert tracking.calls_for(uri) is tracking.with_retries


def test_an_unreachable_server_is_one_masked_line_within_seconds(stores: Path) -> None:
    from lstm_sweep.config import ConfigError
    from tests.helpers import free_port

    uri = url_with_password(f"http://user@127.0.0.1:{free_port()}", PASSWORD)
    started = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        Tracker(uri, "x", "sweep.yaml")
    assert time.monotonic() - started < 10  # MLflow's own retries would take minutes
    message = str(caught.value)
    assert message.startswith(
        f"sweep.yaml: tracking.uri = '{url_with_password('http://user@127.0.0.1:', MASK)}"
    )
    assert PASSWORD not in message and "\n" not in message


def test_the_local_stores_write_ahead_and_sync_only_at_checkpoints(stores: Path) -> None:
    assert Tracker(None, "wal").experiment_id  # the store began as a rollback-journal copy
    storage = make_storage(f"sqlite:///{stores / 'optuna.db'}", None, 60, 120)
    for name in ("mlflow.db", "optuna.db"):
        with sqlite3.connect(stores / name) as db:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal", name
    with storage.engine.connect() as connection:  # synchronous is set per connection
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
