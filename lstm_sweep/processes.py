"""Where this machine's worker processes come from: a fork server that imported torch, MLflow and
Optuna once, so a worker starts in a fraction of a second rather than after seconds of imports.

Light on purpose (no torch here): ``run`` starts the server before it loads torch itself, and the
two imports then share the cores.
"""

from __future__ import annotations

import multiprocessing
from multiprocessing import forkserver
from multiprocessing.context import ForkServerContext, SpawnContext

# What every worker needs, imported once in the server: the stages (torch, MLflow, Optuna,
# SQLAlchemy, pandas, matplotlib) and torch._dynamo, which torch.optim imports on a process's
# first optimizer (1.2 s of a small series' first trial, measured); then the server's own exit.
PRELOAD = ["lstm_sweep.stages", "torch._dynamo", "lstm_sweep.preloaded"]


def process_context() -> ForkServerContext | SpawnContext:
    """Forked from the server where the platform has one (Linux, macOS): the child is a clean
    interpreter as under spawn (the server ran no torch op, opened no store and no thread pool),
    with the parent's working directory and sys.path. Spawned elsewhere (Windows)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def start_seconds() -> float:
    """What a new worker costs before its first training: forked, its data and stores (1-1.5 s
    on a busy 2-core machine); spawned, its imports too."""
    return 1.5 if process_context().get_start_method() == "forkserver" else 10.0


def start_server() -> None:
    """Start the fork server now, so its imports run beside this process's own; otherwise the
    first worker started waits for them. Idempotent."""
    if process_context().get_start_method() == "forkserver":
        forkserver.ensure_running()
