"""The engines: one registry chooses them; the local engine's processes start warm from the fork
server and send back how they ended, so the driver says each line once. (Ray: test_ray.py.)"""

from __future__ import annotations

import gc
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from lstm_sweep import engines
from lstm_sweep import metrics as m
from lstm_sweep.config import Config, StudyConfig
from lstm_sweep.engines import Engine, Registration, processes
from lstm_sweep.engines.local import (
    LocalProcesses,
    describe_plan,
    device_plan,
    gpus_for,
    pin,
    running,
    serve,
)
from lstm_sweep.faults import EXIT_STORE, StoreFailed
from lstm_sweep.run import main
from lstm_sweep.sweep import GracefulStop, Sweep, WorkerExit, work
from tests.helpers import load_study, mlflow_client, runs_of, sweep_args


def test_every_registered_engine_is_an_engine_that_names_itself_once() -> None:
    assert set(engines.ENGINES) == {"local", "ray"}
    local = engines.create("local")
    assert isinstance(local, LocalProcesses) and local.start_seconds > 0
    with pytest.raises(KeyError):
        engines.create("nowhere")


class OneProcess(Engine):
    """A third engine, as a user would write one: every trial in the driver's process, and
    the closing stage's jobs too (no job runner)."""

    def run_trials(
        self, sweep: Sweep, parent_id: str, stop: GracefulStop, progress: Callable[..., None]
    ) -> None:
        work(sweep, parent_id, stop, [progress])


@pytest.mark.slow
def test_a_third_engine_is_one_class_and_one_registration(
    stores: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(engines.ENGINES, "one", Registration(f"{__name__}:OneProcess"))
    args = sweep_args("study.n_trials=3", "closing.final_model=false", "closing.seeds=2")
    assert main([*args, "--engine", "one", "--workers", "2"]) == 0
    study = load_study(stores)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    client = mlflow_client(stores)
    (parent,) = runs_of(client, "co2-quick", m.ROLE_SWEEP)
    assert parent.info.status == "FINISHED"
    reevaluations = runs_of(client, "co2-quick", m.ROLE_REEVALUATION)
    # the closing stage trained here, whatever study.workers says: this engine runs no jobs
    assert reevaluations and {r.data.tags[m.WORKER_TAG] for r in reevaluations} == {
        m.this_process()
    }


def fail_with(line: str, reports: Any) -> None:
    """Run in a process started by ``running``: a store failure with ``line``, or nothing."""

    def life(stop: GracefulStop) -> None:
        if line:
            raise StoreFailed(line)

    serve(reports, life)


@pytest.mark.slow
def test_the_processes_a_sweep_starts_send_their_store_failure_to_the_driver() -> None:
    args = [("",), ("full",)]
    with GracefulStop(quiet=True) as stop, running(fail_with, args, stop) as started:
        for process in started.processes:
            process.join()
    assert [p.exitcode for p in started.processes] == [0, EXIT_STORE]
    assert started.exits() == [WorkerExit(0), WorkerExit(EXIT_STORE, "full")]


def what_a_worker_finds(answers: Any) -> None:
    """Run in a worker process: what it has without importing anything itself."""
    loaded = [name for name in processes.PRELOAD if name in sys.modules]
    answers.put((loaded, os.getcwd(), gc.get_freeze_count() > 0))


@pytest.mark.slow
def test_a_worker_starts_with_the_preloaded_modules_in_the_callers_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # after the server started, if another test started it
    processes.start_server()
    context = processes.process_context()
    assert context.get_start_method() == "forkserver"  # Linux, where CI runs
    answers = context.SimpleQueue()
    worker = context.Process(target=what_a_worker_finds, args=(answers,))
    worker.start()
    worker.join()
    assert worker.exitcode == 0
    assert answers.get() == (processes.PRELOAD, str(tmp_path), True)


def test_local_workers_spread_over_the_gpus_one_per_device_unless_asked_to_pack() -> None:
    study = StudyConfig(workers=16)
    assert device_plan(3, [], study) == [None, None, None]  # the CPU: as many as asked
    assert device_plan(16, ["0", "1"], study) == ["0", "1"]
    packed = StudyConfig(workers=5, workers_per_device=4)
    assert device_plan(5, ["0", "1"], packed) == ["0", "1", "0", "1", "0"]
    assert device_plan(1, ["0", "1"], packed) == ["0"]  # one trial missing: one worker
    assert describe_plan(["0", "1", "0"]) == "2 on GPU 0, 1 on GPU 1"


def test_the_gpus_are_those_cuda_would_show_and_none_for_a_cpu_sweep(
    tiny_cfg: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    auto = tiny_cfg.with_values({"train.device": "auto"})
    assert gpus_for(auto) == ["0", "1", "2"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, GPU-5fa1")
    assert gpus_for(auto) == ["2", "GPU-5fa1"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # CUDA stops at one it lacks
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,9")
    assert gpus_for(auto) == ["2"]
    assert gpus_for(tiny_cfg.with_values({"train.device": "cpu"})) == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpus_for(auto) == []


def pinned(device: str, answers: Any) -> None:
    """Run in a process forked from the server: pin it, then say what CUDA will see."""
    started_before = torch.cuda.is_initialized()
    pin(device)
    answers.put((started_before, os.environ.get("CUDA_VISIBLE_DEVICES")))


@pytest.mark.slow
def test_a_worker_is_pinned_to_its_gpu_before_cuda_starts_in_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    context = processes.process_context()
    answers = context.SimpleQueue()
    worker = context.Process(target=pinned, args=("1", answers))
    worker.start()
    worker.join()
    assert worker.exitcode == 0
    assert answers.get() == (False, "1")  # the fork server had not started CUDA
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(RuntimeError, match="before it was pinned to GPU 3"):
        pin("3")
    pin(None)  # a CPU worker: nothing to pin


@pytest.mark.slow
def test_the_gpu_benchmark_runs_every_step_quickly_on_the_cpu(tmp_path: Path) -> None:
    from benchmarks import gpu

    out = tmp_path / "gpu.json"
    assert gpu.main(["--quick", "--json", str(out)]) == 0
    found = json.loads(out.read_text())
    assert [row["series"] for row in found["epochs"]] == ["co2", "synthetic (2,000 rows)"]
    assert all(row["cpu s/epoch"] > 0 for row in found["epochs"])
    rates = {row["workers"]: row["trials/min"] for row in found["rates"]}
    assert set(rates) == {1, 2} and all(rate > 0 for rate in rates.values())
