"""The engines: one registry chooses them; the local engine's processes start warm from the fork
server and send back how they ended, so the driver says each line once. (Ray: test_ray.py.)"""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from lstm_sweep import engines
from lstm_sweep.engines import processes
from lstm_sweep.engines.local import LocalProcesses, running, serve
from lstm_sweep.faults import EXIT_STORE, StoreFailed
from lstm_sweep.sweep import GracefulStop, WorkerExit


def test_every_registered_engine_is_an_engine_that_names_itself_once() -> None:
    assert set(engines.ENGINES) == {"local", "ray"}
    local = engines.create("local")
    assert isinstance(local, LocalProcesses) and local.start_seconds > 0
    with pytest.raises(KeyError):
        engines.create("nowhere")


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
