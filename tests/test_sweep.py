"""A sweep's lifecycle: SIGTERM and Ctrl-C become a graceful stop, the study lock waits with a
bound and says for what, and how workers ended decides how the sweep goes on."""

from __future__ import annotations

import io
import os
import signal
import threading
import time
from pathlib import Path

import optuna
import pytest

from lstm_sweep import metrics as m
from lstm_sweep.config import Config
from lstm_sweep.faults import EXIT_STORE, StoreFailed
from lstm_sweep.study import Objective, open_study
from lstm_sweep.sweep import (
    GracefulStop,
    LockTimeout,
    StudyLock,
    SweepIncomplete,
    WorkerExit,
    check_workers,
)
from lstm_sweep.tasks import TaskCache
from lstm_sweep.tracking import Tracker
from lstm_sweep.train import Interrupted
from tests.helpers import fresh_database, mlflow_client, postgres_or_skip


def test_sigterm_ends_the_current_epoch_and_closes_trial_and_run_as_failed(
    stores: Path, tiny_cfg: Config
) -> None:
    cfg = tiny_cfg.with_values({"train.max_epochs": 500, "train.patience": 500})
    tracker = Tracker(None, cfg.experiment)
    study = optuna.create_study()
    stream = io.StringIO()
    with GracefulStop(stream=stream) as stop:
        objective = Objective(cfg, TaskCache(), tracker, tracker.open_parent("s", {}), stop)
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
        with pytest.raises(Interrupted):
            study.optimize(objective, n_trials=1)
    assert "SIGTERM: stopping after this epoch" in stream.getvalue()
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.FAIL
    run = mlflow_client(stores.resolve()).get_run(trial.user_attrs[m.RUN_ID_ATTR])
    assert run.info.status == "FAILED"
    assert run.data.tags[m.FAILURE_REASON_TAG] == m.INTERRUPTED_REASON
    history = mlflow_client(stores.resolve()).get_metric_history(run.info.run_id, m.VAL_LOSS)
    assert 0 < len(history) < 500  # the epochs up to the signal were kept


def test_a_second_signal_stops_at_once_here_and_in_the_processes_started_here() -> None:
    passed_on: list[int] = []
    with GracefulStop(quiet=True) as stop:
        stop.listeners.append(passed_on.append)
        os.kill(os.getpid(), signal.SIGINT)
        assert stop()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs between bytecodes; give it the chance
    assert passed_on == [signal.SIGINT, signal.SIGTERM]


def test_a_process_the_driver_started_stops_once_on_its_sigterm_not_on_a_terminals_ctrl_c() -> None:
    """A terminal's Ctrl-C reaches every process of the group, and the driver passes the stop
    on as SIGTERM: counted twice, it would stop the process at once, mid-epoch."""
    # what was there before: Python's own handler, or nothing where the shell that started
    # this process in the background had Ctrl-C ignored
    before = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with GracefulStop(quiet=True, driven=True) as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert not stop()
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_busy_file_lock_is_waited_for_with_a_bound_and_a_message(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    holder = StudyLock(url, "s", timeout=5)
    assert holder.try_acquire()
    stream = io.StringIO()
    waiting = StudyLock(url, "s", timeout=0.6, stream=stream)
    with pytest.raises(LockTimeout, match="waited 0.6 s for the study lock of 's'"):
        waiting.acquire()
    assert StudyLock(url, "s", timeout=1, purpose="report").try_acquire()  # another lock
    holder.release()
    assert waiting.try_acquire()


def test_a_postgres_lock_names_the_client_that_holds_it(tiny_cfg: Config) -> None:
    engine = postgres_or_skip()
    with fresh_database(engine) as name:
        url = f"postgresql://postgres@127.0.0.1:5432/{name}"
        holder = StudyLock(url, "s", timeout=5)
        assert holder.try_acquire()
        waiting = StudyLock(url, "s", timeout=0.5, stream=io.StringIO())
        with pytest.raises(LockTimeout) as caught:
            waiting.acquire()
        assert f"lstm_sweep {os.uname().nodename}:{os.getpid()}" in str(caught.value)
        holder.release()
        assert waiting.try_acquire()
        waiting.release()
        for lock in (holder, waiting):
            lock.dispose()


def test_worker_exits_decide_between_a_store_failure_interrupted_incomplete_and_a_warning(
    stores: Path, tiny_cfg: Config, capsys: pytest.CaptureFixture[str]
) -> None:
    study = open_study(tiny_cfg, "sweep.yaml")
    cfg = tiny_cfg.with_values({"study.n_trials": 1})
    said = "the MLflow store sqlite:///x: out of space (disk full); free some space there"
    with pytest.raises(StoreFailed, match="out of space"):  # it outranks the others
        check_workers(study, [WorkerExit(130), WorkerExit(EXIT_STORE, said)], cfg)
    with pytest.raises(Interrupted):
        check_workers(study, [WorkerExit(0), WorkerExit(130)], cfg)
    with pytest.raises(SweepIncomplete, match="holds 0 of 1"):
        check_workers(study, [WorkerExit(-9)], cfg)
    study.add_trial(optuna.trial.create_trial(value=1.0))
    check_workers(study, [WorkerExit(-9)], cfg)
    assert "1 worker(s) lost" in capsys.readouterr().err
    check_workers(study, [WorkerExit(EXIT_STORE, said)], cfg)  # the study is whole
    assert f"warning: a worker stopped: {said}" in capsys.readouterr().err
