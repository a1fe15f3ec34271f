"""Where this machine's worker processes come from: a fork server that imported torch, MLflow and
Optuna once, so a worker starts in a fraction of a second rather than after seconds of imports.

Light on purpose (no torch here): ``run`` starts the server (:func:`warm_up`) before it loads
torch itself, and the two imports then share the cores.
"""

from __future__ import annotations

import multiprocessing
import sys
from multiprocessing import forkserver
from multiprocessing.context import ForkServerContext, SpawnContext
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lstm_sweep.config import Config

# What every worker needs, imported once in the server: the local engine and the closing stage
# (torch, MLflow, Optuna, SQLAlchemy, pandas, matplotlib) and torch._dynamo, which torch.optim
# imports on a process's first optimizer (1.2 s of a small series' first trial, measured);
# then the server's own exit.
PRELOAD = [
    "lstm_sweep.engines.local",
    "lstm_sweep.select",
    "torch._dynamo",
    "lstm_sweep.engines.preloaded",
]
# macOS's system frameworks do not survive a fork once loaded (why CPython spawns there by
# default), and Windows cannot fork
FORK_SERVER = sys.platform.startswith("linux")


def process_context() -> ForkServerContext | SpawnContext:
    """Forked from the server on Linux: the child starts as a copy of a process that has only
    imported modules (no torch op run, no store opened), with the caller's working directory and
    sys.path, as under spawn. Spawned elsewhere (FORK_SERVER)."""
    if not FORK_SERVER:
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def start_seconds() -> float:
    """What a new worker costs before its first training: forked, its data and stores (1-1.5 s
    on a busy 2-core machine); spawned, its imports too."""
    return 1.5 if FORK_SERVER else 10.0


def warm_up(cfg: Config) -> None:
    """Before torch loads here: start the fork server when the sweep will start workers."""
    if cfg.study.workers > 1:
        start_server()


def start_server() -> None:
    """Start the fork server now, so its imports run beside this process's own; otherwise the
    first worker started waits for them. Idempotent."""
    if FORK_SERVER:
        process_context()  # its preload list, read when the server starts
        forkserver.ensure_running()
