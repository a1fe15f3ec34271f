"""A test's hold on a sweep it runs as a real command, imported at start-up by every Python
process of that sweep (the test puts this folder on PYTHONPATH: the driver, the fork server and
so every worker find it).

A nested run whose role is listed in LSTM_SWEEP_PAUSE (comma-separated: trial, reevaluation,
final) writes ``<role>-<pid>`` into the folder LSTM_SWEEP_PAUSE_DIR at the end of its second
epoch, then holds until a file ``go-<role>`` appears there. The test waits for those files,
acts (a signal, a kill, a full disk) while the runs are known to be mid-training, then lets
them go: nothing depends on how fast the machine is.

The hold is put on lstm_sweep.tracking when a process first imports it, not here: importing it
here would load torch and MLflow before the sweep's own start-up, which runs them beside the
fork server's.
"""

import importlib.abc
import importlib.machinery
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROLES = {role for role in os.environ.get("LSTM_SWEEP_PAUSE", "").split(",") if role}
FOLDER = os.environ.get("LSTM_SWEEP_PAUSE_DIR", "")
HOLD_SECONDS = 300  # a test that never says go fails on its own timeout, not here
TARGET = "lstm_sweep.tracking"


def hold(tracking):  # type: ignore[no-untyped-def]
    """Record each nested run's role; hold a run of a listed role after its second epoch."""
    child_run = tracking.Tracker.child_run
    on_epoch_end = tracking.RunRecorder.on_epoch_end

    @contextmanager
    def child_run_with_role(self, parent_id, name, tags, *args, **kwargs):  # type: ignore[no-untyped-def]
        with child_run(self, parent_id, name, tags, *args, **kwargs) as run:
            run.role = tags.get("lstm_sweep.role")
            yield run

    def on_epoch_end_holding(self, epoch, row, history):  # type: ignore[no-untyped-def]
        on_epoch_end(self, epoch, row, history)
        role = getattr(self, "role", None)
        if epoch == 1 and role in ROLES:
            folder = Path(FOLDER)
            (folder / f"{role}-{os.getpid()}").touch()
            deadline = time.monotonic() + HOLD_SECONDS
            while not (folder / f"go-{role}").exists() and time.monotonic() < deadline:
                time.sleep(0.01)

    tracking.Tracker.child_run = child_run_with_role
    tracking.RunRecorder.on_epoch_end = on_epoch_end_holding


class HoldOnImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds lstm_sweep.tracking as usual, then puts the hold on it once it has run."""

    def find_spec(self, name, path, target=None):  # type: ignore[no-untyped-def]
        if name != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None:
            self.loader = spec.loader
            spec.loader = self
        return spec

    def create_module(self, spec):  # type: ignore[no-untyped-def]
        return self.loader.create_module(spec)

    def exec_module(self, module):  # type: ignore[no-untyped-def]
        self.loader.exec_module(module)
        hold(module)


if ROLES and FOLDER:
    sys.meta_path.insert(0, HoldOnImport())
