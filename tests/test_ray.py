"""Workers on a Ray cluster (``--ray``): a real cluster started with ``ray start --head``, the
real command, one Optuna study in PostgreSQL and a real ``mlflow server``; the driver stopped by
SIGTERM, then the sweep resumed and a worker killed mid-trial; and the set-ups Ray workers
cannot use, refused before anything exists.

The cluster keeps to the loopback: on Linux, Ray swaps a node address of 127.0.0.1 for the
host's outward address and listens on every interface; with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
(its single-machine mode) it binds 127.0.0.1 only. That mode refuses a second node
(``ray start --address``), and a second node started outside it registers under the outward
address, where the loopback-only head does not answer: so the cluster is one node of 2 CPUs
running both workers. The placement across hosts is Ray's; what is tested here is ours
(restart, heartbeat, retry, one report).

Time is the budget: one cluster, one tracking server and one study serve every slow test, and
two runs of the command (each pays ~6 s of imports per process) show all of it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import pytest
from mlflow.tracking import MlflowClient

from lstm_sweep import metrics as m
from lstm_sweep.config import Config, ConfigError, load_config
from lstm_sweep.engines.ray import (
    check_answers,
    is_loopback,
    other_hosts,
    refuse_loopback,
    start_workers,
)
from lstm_sweep.run import main
from tests.helpers import (
    IN_CI,
    MASK,
    QUICK,
    TINY,
    command,
    environment,
    free_port,
    fresh_database,
    postgres_or_skip,
    runs_of,
    sweep_args,
    url_with_password,
    wait_for,
)

STUDY = "ray-sweep"
N_TRIALS = 4
EPOCHS = 90  # unpruned trials of seconds: time to stop or kill a worker mid-trial
PASSWORD = "s3cret-in-uri"  # trust auth accepts any password: it must never be printed
# Ray's single-machine mode (see above), and no token authentication: with RAY_AUTH_MODE unset,
# `ray start` turns it on wherever ~/.ray/auth_token exists (any local ray.init() writes one)
# while a driver leaves it off, and the two would not talk
LOOPBACK_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
RAY = Path(sys.executable).with_name("ray")  # the venv's own CLI, as CI installs it
SERVERS = [
    "study.storage=postgresql://postgres@127.0.0.1:5432/x",
    "tracking.uri=http://127.0.0.1:1",
]


def ray_environment() -> dict[str, str]:
    return {**environment(), **LOOPBACK_ONLY}


@pytest.fixture(scope="module")
def cluster(tracking_server: str) -> Iterator[SimpleNamespace]:
    """A one-node Ray cluster on 127.0.0.1 (2 CPUs) beside the session's ``mlflow server``. The
    cluster runs in a process group of its own that is killed at the end: ``ray stop`` would
    stop every Ray process of this user on the machine, other clusters included."""
    if not RAY.exists():
        reason = f"no Ray CLI at {RAY}: pip install -e '.[dev]'"
        if IN_CI:
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)
    temp = Path(tempfile.mkdtemp(prefix="ray_", dir="/tmp"))  # socket paths: 107 bytes at most
    port, dashboard = free_port(), free_port()
    log = temp / "head.log"
    ports = {
        "--port": port,
        "--dashboard-port": dashboard,
        "--ray-client-server-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
    }
    head = [
        str(RAY),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        "--num-cpus=2",
        "--object-store-memory=100000000",  # 100 MB: the workers pass no data through it
        "--disable-usage-stats",
        f"--temp-dir={temp}",
        *(f"{flag}={value}" for flag, value in ports.items()),
    ]
    # two metrics ports are fixed unless set here: another Ray on the machine may hold them
    metrics = {
        "AUTOSCALER_METRIC_PORT": str(free_port()),
        "DASHBOARD_METRIC_PORT": str(free_port()),
    }
    with log.open("w") as out:
        process = subprocess.Popen(
            head, stdout=out, stderr=out, start_new_session=True, env=ray_environment() | metrics
        )
    try:
        wait_for(lambda: "Ray runtime started" in log.read_text() or process.poll(), 90)
        assert process.poll() is None, log.read_text()[-2000:]
        yield SimpleNamespace(
            address=f"127.0.0.1:{port}",
            dashboard=f"http://127.0.0.1:{dashboard}",
            tracking=tracking_server,
        )
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # gcs, raylet, dashboard, workers: one group
        process.wait(timeout=30)
        shutil.rmtree(temp, ignore_errors=True)


class Trials:
    """The study's trials as the test sees them while the command runs (none before the driver
    has created the study)."""

    def __init__(self, storage: str) -> None:
        self.storage = storage
        self.study: optuna.Study | None = None

    def now(self) -> list[optuna.trial.FrozenTrial]:
        if self.study is None:
            try:
                self.study = optuna.load_study(study_name=STUDY, storage=self.storage)
            except Exception:  # the tables or the study do not exist yet
                return []
        return self.study.get_trials()

    def training(self, most_epochs: int = EPOCHS) -> list[optuna.trial.FrozenTrial]:
        """RUNNING trials that have reported an epoch, at most ``most_epochs``; fewest first."""
        running = [t for t in self.now() if t.state.name == "RUNNING"]
        reported = [t for t in running if 0 < len(t.intermediate_values) <= most_epochs]
        return sorted(reported, key=lambda t: len(t.intermediate_values))

    def workers_done(self) -> set[str]:
        """The workers that have finished a counted trial."""
        counted = [t for t in self.now() if t.state.name in ("COMPLETE", "PRUNED")]
        return {t.user_attrs[m.WORKER_ATTR] for t in counted}


def worker_pid(trial: optuna.trial.FrozenTrial) -> int:
    return int(trial.user_attrs[m.WORKER_ATTR].rsplit(":", 1)[1])


def sweep_workers(dashboard: str) -> list[dict[str, Any]]:
    """The cluster's SweepWorker actors, alive or dead, from Ray's state API (as `ray list
    actors --detail` shows them, without the seconds its CLI takes to start)."""
    query = urllib.parse.urlencode(
        {
            "detail": "true",
            "filter_keys": "class_name",
            "filter_predicates": "=",
            "filter_values": "SweepWorker",
        }
    )
    with urllib.request.urlopen(f"{dashboard}/api/v0/actors?{query}", timeout=30) as response:
        return json.load(response)["data"]["result"]["result"]


def stores(storage: str, client: MlflowClient) -> dict[str, Any]:
    """What a run of the command left behind in Optuna and MLflow."""
    return {
        "trials": optuna.load_study(study_name=STUDY, storage=storage).get_trials(),
        "runs": runs_of(client, STUDY, m.ROLE_TRIAL),
        "parent": runs_of(client, STUDY, m.ROLE_SWEEP),
    }


@pytest.fixture(scope="module")
def stopped_then_killed(
    cluster: SimpleNamespace, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SimpleNamespace]:
    """One study on the Ray cluster, two workers, two runs of the same command: the first is
    stopped by SIGTERM once both workers train; the second resumes it and, once both workers
    have finished a trial, one worker is killed (SIGKILL) early in its next one. What each run
    left behind is read back for the tests below."""
    folder = tmp_path_factory.mktemp("ray_sweep")
    with fresh_database(postgres_or_skip()) as name:
        storage = url_with_password(f"postgresql://postgres@127.0.0.1:5432/{name}", PASSWORD)
        args = sweep_args(
            f"experiment={STUDY}",
            f"study.storage={storage}",
            f"tracking.uri={cluster.tracking}",
            f"study.n_trials={N_TRIALS}",
            "study.batch=2",  # both workers train at once
            f"train.max_epochs={EPOCHS}",
            f"train.patience={EPOCHS}",
            "study.pruner.type=none",
            "study.heartbeat_seconds=1",  # a lost trial is failed after 3 s without a beat
            "study.grace_seconds=3",
            "closing.top_k=1",  # the closing stage reuses the best trial: one training only
            "closing.seeds=1",
            f"closing.model_name={STUDY}",
        )
        trials = Trials(storage)
        client = MlflowClient(cluster.tracking, registry_uri=cluster.tracking)

        def run_until(ready: Callable[[], Any], log: Path) -> tuple[subprocess.Popen[str], Any]:
            """The command, started (its output to ``log``: a full pipe would block it) and
            left running once ``ready()`` holds; returns it and what ``ready()`` returned."""
            with log.open("w") as out:
                process = subprocess.Popen(
                    command(*args, "--ray", cluster.address, "--workers", "2"),
                    cwd=folder,
                    env=ray_environment(),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            found = wait_for(lambda: process.poll() is not None or ready(), timeout=240)
            assert process.poll() is None, log.read_text()[-3000:]
            return process, found

        def both_started_one_early() -> list[optuna.trial.FrozenTrial]:
            """Once both workers have started a trial: one in the first third of a trial, so
            that the stop reaches it before the trial ends; or nothing."""
            started = {t.user_attrs.get(m.WORKER_ATTR) for t in trials.now()} - {None}
            return trials.training(EPOCHS // 3) if len(started) == 2 else []

        def both_done_then_one_early() -> list[optuna.trial.FrozenTrial]:
            """Once both workers have finished a trial: one in the first half of its next, so
            that it cannot end before the kill; or nothing."""
            return trials.training(EPOCHS // 2) if len(trials.workers_done()) == 2 else []

        first, training = run_until(both_started_one_early, folder / "first.log")
        try:
            first.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            first.wait(timeout=120)
            stop_seconds = time.monotonic() - sent
        finally:
            first.kill()
        left = stores(storage, client)
        stopped = SimpleNamespace(
            returncode=first.returncode,
            output=(folder / "first.log").read_text(),
            training=[t.number for t in training],
            failed=[t.number for t in left["trials"] if t.state.name == "FAIL"],
            seconds=stop_seconds,
            **left,
        )

        second, (victim, *_) = run_until(both_done_then_one_early, folder / "second.log")
        try:
            os.kill(worker_pid(victim), signal.SIGKILL)
            second.wait(timeout=300)
        finally:
            second.kill()
        actors = sweep_workers(cluster.dashboard)
        yield SimpleNamespace(
            stopped=stopped,
            returncode=second.returncode,
            output=(folder / "second.log").read_text(),
            victim=victim,
            versions=client.search_model_versions(f"name = '{STUDY}'"),
            restarts=sorted(int(a["num_restarts"]) for a in actors),
            **stores(storage, client),
        )


@pytest.mark.slow
def test_sigterm_on_the_driver_stops_every_worker_gracefully_and_exits_130(
    stopped_then_killed: SimpleNamespace,
) -> None:
    stopped = stopped_then_killed.stopped
    assert stopped.returncode == 130, stopped.output[-3000:]
    assert "SIGTERM: stopping after this epoch" in stopped.output
    assert stopped.seconds < 60  # the workers ended their epoch, nobody hung
    states = {t.number: t.state.name for t in stopped.trials}
    assert "RUNNING" not in states.values()
    # each worker was mid-trial: it ended that trial as failed, or (the stop reaches a worker
    # at the driver's next poll) finished it just before and stopped before the next one
    assert {states[number] for number in stopped.training} <= {"FAIL", "COMPLETE"}
    assert stopped.failed
    runs = {int(r.data.tags[m.TRIAL_TAG]): r for r in stopped.runs}
    for number in stopped.failed:
        assert runs[number].info.status == "FAILED"
        assert runs[number].data.tags[m.FAILURE_REASON_TAG] == m.INTERRUPTED_REASON
    assert all(r.info.status != "RUNNING" for r in stopped.runs)
    (parent,) = stopped.parent
    assert parent.info.status == "FAILED"


@pytest.mark.slow
def test_two_ray_workers_finish_one_study_exactly_with_one_report_and_one_model(
    stopped_then_killed: SimpleNamespace,
) -> None:
    ran = stopped_then_killed
    assert ran.returncode == 0, ran.output[-3000:]
    assert PASSWORD not in ran.output + ran.stopped.output
    assert "Ray cluster 127.0.0.1:" in ran.output
    assert "Ray dashboard: http://127.0.0.1:" in ran.output
    counted = [t for t in ran.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(counted) == N_TRIALS
    assert not [t for t in ran.trials if t.state.name in ("RUNNING", "WAITING")]
    assert len({t.user_attrs[m.WORKER_ATTR] for t in counted}) >= 2  # both workers ran trials

    (parent,) = ran.parent
    assert parent.info.status == "FINISHED" and m.NOTE_TAG in parent.data.tags  # one report
    assert sorted(int(r.data.tags[m.TRIAL_TAG]) for r in ran.runs) == [t.number for t in ran.trials]
    by_id = {r.info.run_id: r for r in ran.runs}
    for trial in ran.trials:
        run = by_id[trial.user_attrs[m.RUN_ID_ATTR]]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status == m.RUN_STATUS[trial.state.name]
    assert len(ran.versions) == 1


@pytest.mark.slow
def test_a_worker_killed_mid_trial_is_restarted_and_its_trial_failed_and_retried(
    stopped_then_killed: SimpleNamespace,
) -> None:
    ran = stopped_then_killed
    failed = [t.number for t in ran.trials if t.state.name == "FAIL"]
    assert failed == sorted([*ran.stopped.failed, ran.victim.number])
    # the trial each retry replaces (Optuna's "failed_trial" names the first of a chain: the
    # victim may itself be a retry of a trial the SIGTERM failed)
    retried = [
        t.system_attrs["retry_history"][-1] for t in ran.trials if "retry_history" in t.system_attrs
    ]
    assert all(retried.count(number) == 1 for number in failed)  # each retried once
    (lost,) = [r for r in ran.runs if r.data.tags[m.TRIAL_TAG] == str(ran.victim.number)]
    assert lost.info.status == "FAILED"
    assert lost.data.tags[m.FAILURE_REASON_TAG] == m.WORKER_LOST_REASON
    assert not [t for t in ran.trials if t.state.name in ("RUNNING", "WAITING")]
    assert all(r.info.status != "RUNNING" for r in ran.runs)
    # the first run's two workers and the second's, of which Ray restarted the killed one
    assert ran.restarts == [0, 0, 0, 1]


def test_sqlite_is_refused_with_ray_in_one_line_before_anything_is_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main([*sweep_args(), "--ray", "127.0.0.1:1"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {QUICK}: study.storage = None: Ray workers share one study")
    assert "postgresql://" in line
    local = [SERVERS[0], f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    assert main([*sweep_args(*local), "--ray"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {QUICK}: tracking.uri = 'sqlite:///") and "http://" in line
    assert list(tmp_path.iterdir()) == []  # no store, no study, no run, no Ray


def test_without_ray_the_flag_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    assert main([*sweep_args(*SERVERS), "--ray"]) == 2
    assert capsys.readouterr().err.strip() == 'error: --ray needs Ray: pip install -e ".[ray]"'
    assert list(tmp_path.iterdir()) == []


def test_nothing_listening_at_the_ray_address_is_one_line_at_once() -> None:
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"^--ray: ADDRESS = '127\.0\.0\.1:\d+': no Ray cluster"):
        check_answers(f"127.0.0.1:{free_port()}")
    assert time.monotonic() - started < 5  # Ray itself would retry for minutes


@pytest.mark.parametrize(
    ("url", "loopback"),
    [
        (url_with_password("postgresql://u@127.0.0.1:5432/db", PASSWORD), True),
        ("postgresql://u@localhost/db", True),
        ("postgresql:///db", True),  # a Unix socket
        ("postgresql://u@/db?host=/var/run/postgresql", True),
        ("http://[::1]:5000", True),
        ("http://127.0.0.2:5000", True),
        ("postgresql://u@db.internal:5432/db", False),
        ("http://10.1.2.3:5000", False),
    ],
)
def test_a_loopback_store_is_told_apart(url: str, loopback: bool) -> None:
    assert is_loopback(url) is loopback


def test_a_loopback_store_is_refused_once_ray_nodes_run_on_other_hosts() -> None:
    storage = f"study.storage={url_with_password('postgresql://u@127.0.0.1:5432/db', PASSWORD)}"
    cfg = load_config(QUICK, [*TINY, storage, "tracking.uri=http://mlflow.internal:5000"])
    refuse_loopback(cfg, str(QUICK), [])  # every node on this machine: its loopback is theirs
    with pytest.raises(ConfigError) as refused:
        refuse_loopback(cfg, str(QUICK), ["node-b", "node-c"])
    message = str(refused.value)
    assert message.startswith(
        f"{QUICK}: study.storage = '{url_with_password('postgresql://u@127.0.0.1', MASK)}"
    )
    assert "node-b, node-c cannot reach" in message and PASSWORD not in message
    nodes = [
        {"NodeManagerHostname": socket.gethostname(), "Alive": True},
        {"NodeManagerHostname": "node-b", "Alive": True},
        {"NodeManagerHostname": "node-c", "Alive": False},
    ]
    assert other_hosts(nodes) == ["node-b"]


def test_ray_workers_ask_for_the_gpu_share_and_cpus_of_study_ray(tiny_cfg: Config) -> None:
    class FakeActor:
        """Stands in for ``ray.remote(SweepWorker)``: records what the actors ask for."""

        def options(self, **asked: Any) -> FakeActor:
            self.asked = asked
            return self

        def remote(self, *args: Any) -> tuple[Any, ...]:
            return args

    actor = FakeActor()
    fake_ray = SimpleNamespace(remote=lambda cls: actor)
    asked = {"study.workers": 4, "study.ray.num_gpus": 0.25, "study.ray.num_cpus": 2.0}
    cfg = tiny_cfg.with_values({**asked, "study.batch": 4})
    sweep = SimpleNamespace(cfg=cfg, path="sweep.yaml", overrides=["a=1"])
    started = start_workers(fake_ray, sweep, "parent")  # type: ignore[arg-type]
    assert actor.asked["num_gpus"] == 0.25 and actor.asked["num_cpus"] == 2.0  # 4 on one GPU
    assert started == [(os.path.abspath("sweep.yaml"), ["a=1"], "parent", 2)] * 4
    # no more actors than a batch has trials to train
    sweep.cfg = tiny_cfg.with_values({**asked, "study.batch": 3})
    assert len(start_workers(fake_ray, sweep, "parent")) == 3  # type: ignore[arg-type]
