"""Who runs a sweep's workers, behind one interface: :class:`Engine`.

An engine starts the workers that run the study's missing trials (each runs
``lstm_sweep.sweep.work`` against the shared stores) and may run the closing stage's jobs
beside the process that drives it. The registry below is the one place an engine is chosen; a
new engine is one module in this package and one line in :data:`ENGINES`.

Light on purpose: ``run`` reads the registry and warms an engine up before torch, MLflow and
Optuna load; the engine itself is imported only once it is chosen (Ray is an optional extra).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lstm_sweep.engines import processes

if TYPE_CHECKING:
    from lstm_sweep.config import Config
    from lstm_sweep.sweep import GracefulStop, Sweep

# runs (function, jobs, on_progress) elsewhere while its block runs and until they are done
JobRunner = Callable[[Any, list[Any], Callable[[], None]], AbstractContextManager[None]]


class Engine(ABC):
    """Where the workers of one sweep run."""

    # what a job run elsewhere costs before it trains (a process's start-up): the closing
    # stage hands jobs over only when they take longer than twice this
    start_seconds: float = 0.0

    def __init__(self, address: str | None = None) -> None:
        self.address = address

    def check(self, path: str, overrides: list[str]) -> None:
        """Before any store, study or run exists: ConfigError (one line) when this engine
        cannot run the sweep as configured. Nothing to check by default."""
        return None

    @abstractmethod
    def run_trials(
        self, sweep: Sweep, parent_id: str, stop: GracefulStop, progress: Callable[..., None]
    ) -> None:
        """Run workers until the study holds n_trials; ``progress`` is called as trials end
        and as it waits. Interrupted when asked to stop, StoreFailed when a store failed under
        a worker and the study is short, SweepIncomplete when the workers died short of it."""

    def job_runner(self, sweep: Sweep, parent_id: str, stop: GracefulStop) -> JobRunner | None:
        """How this engine runs the closing stage's jobs beside the driver, or None: the
        driver trains them itself."""
        return None

    def spare_runner(self, sweep: Sweep, parent_id: str, stop: GracefulStop) -> JobRunner | None:
        """How this engine runs jobs on the workers that the search to come leaves idle, while
        it runs, or None where it leaves none."""
        return None


@dataclass(frozen=True)
class Registration:
    target: str  # "module:Class", imported once the engine is chosen
    # light work worth starting before torch loads (it runs beside those imports)
    warm_up: Callable[[Config], None] | None = None


ENGINES = {
    "local": Registration("lstm_sweep.engines.local:LocalProcesses", processes.warm_up),
    "ray": Registration("lstm_sweep.engines.ray:RayCluster"),
}


def warm_up(name: str, cfg: Config) -> None:
    hook = ENGINES[name].warm_up
    if hook is not None:
        hook(cfg)


def create(name: str, address: str | None = None) -> Engine:
    """The engine registered as ``name``, for the cluster at ``address`` where it has one."""
    module, _, attribute = ENGINES[name].target.partition(":")
    engine: type[Engine] = getattr(importlib.import_module(module), attribute)
    return engine(address)
