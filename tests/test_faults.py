"""Faults on the real code path: what each failing store means, a full disk, a damaged or
read-only store, a worker killed mid-trial, a tracking server lost mid-sweep, an interrupt in the
closing stage. Nothing finished is lost, nothing is left RUNNING after the next run, Optuna and
MLflow agree, and the user reads one line saying what happened and what to do. (The heartbeat
that fails a trial: tests/test_study.py; the exit codes: tests/test_sweep.py.)"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
import psycopg.errors
import pytest
import sqlalchemy
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from sqlalchemy.engine import Engine

from lstm_sweep import metrics as m
from lstm_sweep import tracking
from lstm_sweep.config import Config
from lstm_sweep.faults import (
    DAMAGED,
    EXIT_STORE,
    FULL,
    IO,
    LOCKED,
    READ_ONLY,
    classify,
    store_failure,
)
from lstm_sweep.run import INTERRUPTED, main
from lstm_sweep.study import make_storage, open_study
from lstm_sweep.tracking import Tracker
from tests.conftest import new_stores
from tests.helpers import (
    IN_CI,
    HeldSweep,
    MlflowServer,
    command,
    environment,
    load_study,
    mlflow_client,
    runs_of,
    sweep_args,
)

COUNTED = ("COMPLETE", "PRUNED")
# no pruning, and a closing stage of few trainings and no final model: not under test here
CLOSED_FAST = [
    "study.pruner.type=none",
    "closing.final_model=false",
    "closing.top_k=1",
    "closing.seeds=1",
]
URLS = {"optuna": "sqlite:///o.db", "mlflow": "sqlite:///m.db"}


def wrapped(inner: BaseException) -> BaseException:
    """``inner`` as SQLAlchemy and then Optuna hand it on (explicitly chained)."""
    try:
        try:
            raise inner
        except BaseException as exc:
            raise sqlalchemy.exc.OperationalError("INSERT ...", {}, exc) from exc
    except sqlalchemy.exc.OperationalError as exc:
        try:
            raise optuna.exceptions.StorageInternalError("An exception is raised") from exc
        except optuna.exceptions.StorageInternalError as outer:
            return outer


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (wrapped(sqlite3.OperationalError("database or disk is full")), FULL),
        (OSError(errno.ENOSPC, "No space left on device", "/x/weights.pt"), FULL),
        (psycopg.errors.DiskFull("could not extend file: No space left on device"), FULL),
        (wrapped(sqlite3.DatabaseError("database disk image is malformed")), DAMAGED),
        (sqlite3.DatabaseError("file is not a database"), DAMAGED),
        (sqlite3.OperationalError("attempt to write a readonly database"), READ_ONLY),
        (OSError(errno.EROFS, "Read-only file system"), READ_ONLY),
        (wrapped(sqlite3.OperationalError("disk I/O error")), IO),
        (sqlite3.OperationalError("database is locked"), LOCKED),
        (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), None),
        (MlflowException("API request to http://h/api failed: Connection refused"), None),
        (ValueError("a bug"), None),
    ],
    ids=[
        "sqlite full, wrapped",
        "ENOSPC",
        "postgres disk full",
        "malformed, wrapped",
        "not a database",
        "readonly database",
        "EROFS",
        "disk I/O, wrapped",
        "locked",
        "connection refused",
        "server unreachable",
        "a bug",
    ],
)
def test_a_store_fault_is_told_apart_wherever_it_hides_in_the_chain(
    error: BaseException, kind: str | None
) -> None:
    fault = classify(error)
    assert (fault.kind if fault else None) == kind


def test_a_chain_names_its_first_fault_in_the_drivers_words_not_a_wrappers() -> None:
    first = wrapped(sqlite3.OperationalError("database or disk is full"))
    fault = classify(first)
    assert fault is not None and fault.cause == "database or disk is full"
    try:
        try:
            raise sqlite3.OperationalError("disk I/O error")  # what failed after it
        except sqlite3.OperationalError:
            raise RuntimeError("a store failed in the trial") from first
    except RuntimeError as outer:
        fault = classify(outer)
    assert fault is not None and (fault.kind, fault.cause) == (FULL, "database or disk is full")
    on_file = classify(OSError(errno.ENOSPC, "No space left on device", "/x/weights.pt"))
    assert on_file is not None and on_file.filename == "/x/weights.pt"


@contextmanager
def cannot_grow() -> Iterator[None]:
    """Within the block, no SQLite database can grow: SQLite's own "database or disk is full",
    raised in the real driver under the real clients (a cap on every connection taken)."""

    def cap(connection: object, _record: object, _proxy: object) -> None:
        if isinstance(connection, sqlite3.Connection):
            pages = connection.execute("PRAGMA page_count").fetchone()[0]
            connection.execute(f"PRAGMA max_page_count = {max(pages, 1)}")

    sqlalchemy.event.listen(Engine, "checkout", cap)
    try:
        yield
    finally:
        sqlalchemy.event.remove(Engine, "checkout", cap)


def test_a_full_optuna_storage_is_named_with_its_cause_and_the_way_out(stores: Path) -> None:
    url = f"sqlite:///{stores / 'optuna.db'}"
    study = optuna.create_study(storage=url, study_name="s")
    with cannot_grow(), pytest.raises(Exception) as caught:  # noqa: B017 (Optuna's wrapper)
        for _ in range(50):
            study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    failure = store_failure(caught.value, {"optuna": url, "mlflow": "sqlite:///elsewhere.db"})
    assert str(failure) == (
        f"the Optuna storage {url}: out of space (database or disk is full); free some space"
        " there, then run the same command again: every finished trial is kept"
    )


def test_a_full_mlflow_store_is_named_at_once_not_retried(stores: Path) -> None:
    tracker = Tracker(None, "full")
    parent = tracker.open_parent("full", {})
    with cannot_grow(), pytest.raises(Exception) as caught:  # noqa: B017 (MLflow's wrapper)
        for n in range(500):
            with_no_retries(lambda n=n: tracker.log_params(parent, {f"p{n}": "x" * 400}))
    failure = store_failure(caught.value, {"mlflow": tracker.uri})
    assert str(failure).startswith(f"the MLflow store {tracker.uri}: out of space (")
    assert tracking.failure_reason(caught.value).startswith("a store failed: out of space (")


def test_a_local_store_another_program_holds_locked_is_named_once_its_wait_is_over(
    stores: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tracking, "SQLITE_BUSY_MS", 200)  # SQLite's own wait, not 60 s
    url = f"sqlite:///{stores / 'optuna.db'}"
    study = optuna.create_study(storage=make_storage(url, None, 60, 120), study_name="s")
    holder = sqlite3.connect(stores / "optuna.db")
    holder.execute("BEGIN IMMEDIATE")  # another program, in the middle of its own write
    started = time.monotonic()
    try:
        with pytest.raises(Exception) as caught:  # noqa: B017 (Optuna's wrapper)
            study.set_user_attr("written", True)  # a write Optuna does not retry itself
    finally:
        holder.close()
    assert time.monotonic() - started >= 0.2  # SQLite waited for the lock first
    assert str(store_failure(caught.value, {"optuna": url})) == (
        f"the Optuna storage {url}: locked by another program (database is locked); close"
        " the program that holds it, then run the same command again: every finished trial"
        " is kept"
    )
    with pytest.raises(MlflowException):  # a tracking server's calls: not retried either
        with_no_retries(lambda: tracking.with_retries(locked))


def locked() -> None:
    """What MLflow raises when SQLite's wait for a lock ran out (it retries the others)."""
    raise MlflowException("(sqlite3.OperationalError) database is locked")


def with_no_retries(call: Callable[[], object]) -> object:
    """``call`` with the tracking module's retry loop failing the test if it would wait."""
    waits: list[float] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tracking.time, "sleep", waits.append)
        try:
            return call()
        finally:
            assert waits == [], "retried a fault no wait cures"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 64 MiB file system (tmpfs) the test can fill or make read-only. Mounting needs
    root, as CI runs; elsewhere the test is skipped with the reason."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mount = shutil.which("mount")
    done = (
        subprocess.run(
            [mount or "mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(folder)],
            capture_output=True,
            text=True,
        )
        if mount
        else None
    )
    if done is None or done.returncode != 0:
        reason = (
            f"cannot mount a small file system here ({done.stderr.strip() if done else 'no mount'})"
        )
        if IN_CI:
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=False)


def fill(folder: Path) -> Path:
    """Write a file into ``folder`` until its file system has no byte left; the file, to free
    the space again."""
    filler = folder / "filler"
    block = b"\0" * (1 << 20)
    descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(descriptor, block)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(descriptor)
    return filler


def assert_runs_agree_with_their_trials(root: Path, n_trials: int) -> None:
    """The study holds n_trials, nothing is RUNNING in either store, every trial run ends as
    Optuna recorded its trial, and the sweep's run finished without a failure reason."""
    study = load_study(root)
    states = [t.state.name for t in study.trials]
    assert sum(state in COUNTED for state in states) == n_trials and "RUNNING" not in states
    client = mlflow_client(root)
    runs = {int(r.data.tags[m.TRIAL_TAG]): r for r in runs_of(client, "co2-quick", m.ROLE_TRIAL)}
    assert set(runs) <= {t.number for t in study.trials}
    for trial in study.trials:
        run = runs.get(trial.number)
        if run is None:  # the store failed before the trial's run could be opened
            assert trial.state.name == "FAIL"
            continue
        ended = (run.info.status, run.data.tags.get(m.STATE_TAG))
        assert ended == (m.RUN_STATUS[trial.state.name], trial.state.name), trial.number
    everything = client.search_runs([client.get_experiment_by_name("co2-quick").experiment_id])
    assert all(r.info.status != "RUNNING" for r in everything)
    (parent,) = runs_of(client, "co2-quick", m.ROLE_SWEEP)
    assert parent.info.status == "FINISHED" and m.FAILURE_REASON_TAG not in parent.data.tags


@pytest.mark.slow
def test_a_full_disk_stops_the_sweep_in_one_line_and_the_rerun_finishes_in_agreement(
    small_disk: Path, mlflow_template: Path, tmp_path: Path
) -> None:
    """Two workers held mid-trial, then the disk fills: one line naming the store, the cause
    and the way out, exit status EXIT_STORE, no traceback. Space freed, the same command
    repairs whatever the fault left and finishes the study with both stores in agreement."""
    root = new_stores(small_disk, mlflow_template)
    args = command(*sweep_args("study.n_trials=4", "study.batch=4", *CLOSED_FAST), "--workers=2")
    with HeldSweep(args, m.ROLE_TRIAL, tmp_path, cwd=small_disk) as sweep:
        sweep.held(2)
        filler = fill(small_disk)
        code, err = sweep.finish()
    assert code == EXIT_STORE, err
    (line,) = [said for said in err.strip().splitlines() if not said.startswith("warning: ")]
    assert line.startswith("error: ") and ": out of space (" in line, line
    assert str(small_disk) in line.split(": out of space")[0]  # it names what is on that disk
    assert line.endswith(
        "free some space there, then run the same command again: every finished trial is kept"
    )

    filler.unlink()
    rerun = subprocess.run(args, cwd=small_disk, env=environment(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert_runs_agree_with_their_trials(root, 4)


@pytest.mark.slow
def test_a_killed_worker_and_an_interrupted_closing_stage_lose_nothing_and_say_so(
    stores: Path,
) -> None:
    """Two workers held mid-trial, the forked one killed: the driver fails its trial as soon
    as it next looks (its process is gone: no grace period to wait out), closes its run as
    worker lost and retries its settings. Then Ctrl-C (SIGINT to the command's process group)
    while a re-evaluation trains: exit 130,
    the last line says the closing stage stopped and will resume, the sweep's run ends FAILED
    with that reason. The rerun trains the missing re-evaluation and ends the sweep's run
    FINISHED, no failure reason left, nothing RUNNING, Optuna and MLflow in agreement."""
    args = command(
        *sweep_args("study.n_trials=2", "study.batch=2", *CLOSED_FAST[:3], "closing.seeds=2")
    )
    roles = f"{m.ROLE_TRIAL},{m.ROLE_REEVALUATION}"
    with HeldSweep([*args, "--workers=2"], roles, stores.parent) as sweep:
        (victim,) = [pid for pid in sweep.held(2, m.ROLE_TRIAL) if pid != sweep.process.pid]
        os.kill(victim, signal.SIGKILL)
        sweep.release(m.ROLE_TRIAL)
        sweep.held(1, m.ROLE_REEVALUATION)
        sweep.ctrl_c()
        code, err = sweep.finish()
    assert code == 130, err
    assert "1 worker(s) lost" in err and "Traceback" not in err
    assert "SIGINT: stopping after this epoch" in err
    assert err.strip().splitlines()[-1] == INTERRUPTED["closing stage"]
    study = load_study(stores)
    (lost,) = [t for t in study.trials if t.state.name == "FAIL"]
    assert lost.user_attrs[m.WORKER_ATTR].endswith(f":{victim}")
    (retry,) = [t for t in study.trials if t.system_attrs.get("failed_trial") == lost.number]
    assert retry.params == lost.params and retry.state.name in COUNTED
    client = mlflow_client(stores)
    run = client.get_run(lost.user_attrs[m.RUN_ID_ATTR])
    assert (run.info.status, run.data.tags[m.FAILURE_REASON_TAG]) == (
        "FAILED",
        m.WORKER_LOST_REASON,
    )
    (parent,) = runs_of(client, "co2-quick", m.ROLE_SWEEP)
    assert parent.info.status == "FAILED"
    assert parent.data.tags[m.FAILURE_REASON_TAG] == f"{m.INTERRUPTED_REASON} in the closing stage"
    (stopped,) = runs_of(client, "co2-quick", m.ROLE_REEVALUATION)
    assert stopped.info.status == "FAILED"

    rerun = subprocess.run(args, env=environment(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "closing stage: 1 re-evaluation(s)" in rerun.stderr
    assert_runs_agree_with_their_trials(stores, 2)
    (parent,) = runs_of(client, "co2-quick", m.ROLE_SWEEP)
    assert parent.data.tags[m.STATE_TAG] == "COMPLETE"


def damage(path: Path) -> None:
    """Cut a SQLite file to half its size, its write-ahead log folded in first."""
    with sqlite3.connect(path) as connection:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    os.truncate(path, path.stat().st_size // 2)


@pytest.mark.parametrize(
    ("store", "key"), [("mlflow.db", "tracking.uri"), ("optuna.db", "study.storage")]
)
def test_a_damaged_store_is_named_at_once_in_one_line(
    stores: Path,
    tiny_cfg: Config,
    capsys: pytest.CaptureFixture[str],
    store: str,
    key: str,
) -> None:
    open_study(tiny_cfg, "sweep.yaml")  # both stores exist, with their tables
    damage(stores / store)
    assert main(sweep_args()) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()  # no retry warnings before it
    assert line.startswith(f"error: {sweep_args()[0]}: {key} = 'sqlite:///{stores / store}':")
    assert "the database file is damaged (" in line
    assert line.endswith(f"restore the file from a backup, or point {key} at a new store")


def test_a_read_only_store_is_named_as_such_not_as_unreachable(
    small_disk: Path,
    mlflow_template: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = new_stores(small_disk, mlflow_template)
    monkeypatch.chdir(small_disk)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    assert main(sweep_args()) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"not writable ({root} is not writable)" in line
    assert "unreachable" not in line and line.endswith("point tracking.uri at a writable place")


@pytest.mark.slow
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
        "closing.top_k=1",  # the closing stage is not under test
        "closing.seeds=1",
        "closing.final_model=false",
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
        assert (lost.info.status, lost.data.tags[m.FAILURE_REASON_TAG]) == (
            "FAILED",
            m.UNCLOSED_REASON,
        )
