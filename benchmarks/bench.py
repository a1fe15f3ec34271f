"""Issue 12: lstm_sweep beside two yardsticks, on a small series and on CO2, in one run.

- the floor: a bare PyTorch loop for the same LSTM (``train.build_model``) on the same windows
  (pre-built tensors sliced by a random permutation, ``train.make_optimizer``, the same clipping,
  one validation pass per epoch, one torch thread as in one lstm_sweep worker; no tracking, no
  diagnostics): what the machine can do;
- the hand-written peer: what a practitioner writes from a typical blog post (a DataLoader over a
  TensorDataset built in the objective, Optuna TPE and a median pruner in memory,
  ``mlflow.log_metric`` per metric per epoch on a local SQLite store under fluent nested runs,
  patience), over the sweep file's own search space, trial count, max_epochs and patience.

Every lstm_sweep figure comes from the real command (``python -m lstm_sweep.run``) in a fresh
working directory, read back from its own Optuna and MLflow stores; the floor, the peer and the
bookkeeping probe run as subcommands of this script in fresh processes too, so every figure pays
its own start-up. Every command's output is timestamped as it arrives (tqdm's carriage-return
updates included), which gives the phases of the default command and its longest silence.

    python benchmarks/bench.py                 # every figure, both series (< 15 min, 2 cores)
    python benchmarks/bench.py --quick         # the same figures, smaller (a smoke test)
    python benchmarks/bench.py --series sunspots --json out.json
    python benchmarks/bench.py floor sweeps/sunspots.yaml --epochs 40 --trainings 3
    python benchmarks/bench.py peer sweeps/forecast.yaml --set study.n_trials=6
    python benchmarks/bench.py bookkeeping sweeps/sunspots.yaml
"""

from __future__ import annotations

import argparse
import bisect
import copy
import fcntl
import json
import math
import os
import platform
import pty
import shlex
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from lstm_sweep.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SERIES = {  # name -> the sweep file as shipped
    "sunspots": ROOT / "sweeps" / "sunspots.yaml",  # 168 training windows of 48, one layer
    "co2": ROOT / "sweeps" / "forecast.yaml",  # ~1,600 windows of 52, two layers
}
PYTHON = sys.executable
# Runs that time trials only skip the closing stage's trainings: they come after the last trial
# and would only lengthen the benchmark.
LEAN_REPORT = ("closing.top_k=1", "closing.seeds=1", "closing.final_model=false")
# The first optimizer a process builds imports torch._dynamo (torch 2.13: ~2 s), so the first
# training of every process (a worker's first trial, the floor's) pays it once; the per-epoch
# figures time it apart and leave it out of their medians.
WARM_UP = 1
SILENCE_GOAL = 5.0  # seconds: no phase longer than this without visible progress
POSTGRES_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"  # trust auth, if reachable


@dataclass(frozen=True)
class SeriesPlan:
    """How much of each figure one series gets."""

    epochs: int  # per-epoch figures: epochs of every trial and floor training (no early stop)
    trainings: int  # per-epoch figures: timed trainings per process (after the warm-up one)
    rounds: int  # per-epoch figures: fresh processes per side (floor, off, full)
    default_overrides: tuple[str, ...]  # the default command: () runs it as shipped


PLANS = {
    "full": {
        "sunspots": SeriesPlan(40, 3, 4, ()),  # the default command as shipped: 30 trials
        # CO2 head to head at 10 of the shipped 30 trials: at 30 the peer alone took 12.7 min
        # (2026-11-26), most of the 15-minute budget; the first 10 took it 4.8 min
        "co2": SeriesPlan(10, 3, 2, ("study.n_trials=10",)),
    },
    # smoke test: every figure runs, none means much (few trials, few epochs)
    "quick": {
        "sunspots": SeriesPlan(
            10, 2, 1, ("study.n_trials=4", "closing.top_k=2", "closing.seeds=2")
        ),
        "co2": SeriesPlan(
            3,
            2,
            1,
            ("study.n_trials=4", "closing.top_k=2", "closing.seeds=2", "train.max_epochs=3"),
        ),
    },
}
BOOKKEEPING_REPEATS = {"full": 20, "quick": 5}


# --- the yardsticks and the probe, each run as a subcommand in its own process ---------------


def floor(sweep: Path, overrides: list[str], epochs: int, trainings: int) -> dict[str, Any]:
    """Train the sweep's base model ``trainings`` times for ``epochs`` epochs with nothing around
    it but a validation loss per epoch (every sweep needs one to stop or prune)."""
    import torch

    from lstm_sweep.tasks import TaskCache
    from lstm_sweep.train import build_model, make_optimizer, predict

    cfg = load_config(sweep, overrides)
    torch.set_num_threads(1)  # what one lstm_sweep worker process uses
    task = TaskCache().get(cfg)
    x, y = task.data.train.x, task.data.train.y
    val_x, val_y = task.data.val.x, task.data.val.y
    seconds = []
    for _ in range(trainings):
        started = time.perf_counter()
        model = build_model(task, cfg)
        optimizer = make_optimizer(model, cfg.train)
        params = [p for p in model.parameters() if p.requires_grad]
        batches = torch.Generator().manual_seed(cfg.train.seed)
        model.train()
        for _epoch in range(epochs):
            order = torch.randperm(len(x), generator=batches)
            for start in range(0, len(x), cfg.train.batch_size):
                idx = order[start : start + cfg.train.batch_size]
                optimizer.zero_grad(set_to_none=True)
                loss = task.loss(model(x[idx]), y[idx])
                loss.backward()
                if cfg.train.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
                optimizer.step()
            float(task.loss(predict(model, val_x), val_y))  # predict: eval mode, then back
        seconds.append(time.perf_counter() - started)
    return {"seconds": seconds, "epochs": epochs, "train_windows": len(x)}


def peer(sweep: Path, overrides: list[str], threads: int) -> dict[str, Any]:
    """The hand-written sweep: the sweep file's search space, trial count, sampler seed and
    startup trials, pruner settings, max_epochs and patience, written the way a blog post
    writes it. It optimises the sweep's monitor (``val_nmse`` for CO2: the MSE in ppmv over the
    naive forecast's, scored by the same Task function, so the two best values compare), keeps
    each trial's best epoch's weights, and scores the best trial's model on the test part once
    (``test_mae``, in the series' units, as lstm_sweep scores its registered model).
    ``threads`` torch threads, 0 for torch's default (one per core)."""
    import mlflow
    import optuna
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lstm_sweep.data import load_data
    from lstm_sweep.evidence import evidence_for
    from lstm_sweep.study import suggest_params
    from lstm_sweep.tasks import make_task
    from lstm_sweep.train import build_model

    if threads:
        torch.set_num_threads(threads)
    cfg = load_config(sweep, overrides)
    monitor = cfg.train.monitor
    mlflow.set_tracking_uri(f"sqlite:///{Path.cwd() / 'mlflow.db'}")
    mlflow.set_experiment("peer")
    # the best completed trial so far: its value, task and best epoch's model
    leader: dict[str, Any] = {"value": math.inf}

    def objective(trial: optuna.Trial) -> float:
        values = suggest_params(trial, cfg.search)
        trial_cfg = cfg.with_values(values)
        train = trial_cfg.train
        # windows built in the objective, as a blog post does: window and transform may be
        # among the searched keys
        task = make_task(load_data(trial_cfg))
        data = task.data
        train_loader = DataLoader(
            TensorDataset(data.train.x, data.train.y), batch_size=train.batch_size, shuffle=True
        )
        val_loader = DataLoader(TensorDataset(data.val.x, data.val.y), batch_size=512)
        with mlflow.start_run(nested=True):
            mlflow.log_params(values)
            model = build_model(task, trial_cfg)
            optimizer = torch.optim.AdamW(
                model.parameters(), lr=train.learning_rate, weight_decay=train.weight_decay
            )
            best, since_best, kept = math.inf, 0, None
            for epoch in range(train.max_epochs):
                model.train()
                total = 0.0
                for xb, yb in train_loader:
                    optimizer.zero_grad()
                    loss = nn.functional.mse_loss(model(xb), yb)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
                    optimizer.step()
                    total += loss.item() * len(xb)
                model.eval()
                with torch.no_grad():
                    output = torch.cat([model(xb) for xb, _ in val_loader])
                val_loss = nn.functional.mse_loss(output, data.val.y).item()
                # val_nmse when the sweep monitors it; epoch_scores has no val_loss
                value = task.epoch_scores("val", output, data.val.y).get(monitor, val_loss)
                mlflow.log_metric("train_loss", total / len(data.train), step=epoch)
                mlflow.log_metric("val_loss", val_loss, step=epoch)
                if monitor != "val_loss":
                    mlflow.log_metric(monitor, value, step=epoch)
                trial.set_user_attr("epochs_trained", epoch + 1)  # in memory: for the table only
                if value < best:
                    best, since_best = value, 0
                    kept = copy.deepcopy(model)
                else:
                    since_best += 1
                trial.report(value, epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned()
                if since_best >= train.patience:
                    break
            if best < leader["value"]:
                leader.update(value=best, task=task, model=kept)
            return best

    study = optuna.create_study(
        direction=cfg.direction,
        sampler=optuna.samplers.TPESampler(
            seed=cfg.train.seed, n_startup_trials=cfg.study.n_startup_trials
        ),
        pruner=optuna.pruners.MedianPruner(
            cfg.study.pruner.n_startup_trials, cfg.study.pruner.n_warmup_steps
        ),
    )
    with mlflow.start_run(run_name="sweep"):
        study.optimize(objective, n_trials=cfg.study.n_trials)
    task, model = leader["task"], leader["model"]  # study.best_trial's
    with torch.no_grad():
        output = model.eval()(task.data.test.x).numpy()
    return {
        "best_value": study.best_value,
        "test_mae": evidence_for(task).errors(output, "test")["mae"],
        "trials_seconds": trials_span(study.trials),
        "epochs": epochs_of(study.trials),
        "torch_threads": torch.get_num_threads(),
    }


def bookkeeping(
    sweep: Path, overrides: list[str], mlflow_uri: str, optuna_url: str, repeats: int
) -> dict[str, Any]:
    """What lstm_sweep's own bookkeeping costs on one pair of stores, through its own code:
    creating them at start-up, a nested run's life (create + params, then tags + close), one
    epoch's row of metrics (the sweep's diagnostics level) in one batch, and Optuna's ask +
    tell per trial and report + should_prune per epoch with the sweep's sampler and pruner."""
    import torch

    from lstm_sweep import metrics as m
    from lstm_sweep.config import flatten
    from lstm_sweep.study import open_study, suggest_params
    from lstm_sweep.tasks import TaskCache
    from lstm_sweep.tracking import Tracker
    from lstm_sweep.train import build_model, fit

    warnings.simplefilter("ignore")  # Optuna's heartbeat warning: trials are asked by hand here
    torch.set_num_threads(1)
    stores = [f"tracking.uri={mlflow_uri}", f"study.storage={optuna_url}"]
    cfg = load_config(sweep, [*overrides, *stores])
    started = time.perf_counter()
    tracker = Tracker(cfg.tracking.uri, cfg.experiment)
    tracker.experiment_id  # noqa: B018 (creating the experiment is part of a new store)
    mlflow_store = time.perf_counter() - started
    started = time.perf_counter()
    study = open_study(cfg, str(sweep))
    optuna_store = time.perf_counter() - started

    params = flatten(cfg.model_dump(mode="json"))
    parent = tracker.open_parent(cfg.study_name, params)
    task = TaskCache().get(cfg)
    one_epoch = cfg.with_values({"train.max_epochs": 1})
    row = fit(build_model(task, one_epoch), task, one_epoch).rows[0]
    run_seconds, row_seconds = [], []
    for i in range(repeats):
        opened = time.perf_counter()
        with tracker.child_run(parent, f"probe {i}", {m.ROLE_TAG: "probe"}, params, 60) as run:
            logging = time.perf_counter()
            run.log_step(0, row)
            run.flush()
            closing = time.perf_counter()
            run.end_as(m.COMPLETE, {m.STOP_REASON_TAG: "probe"})
        ended = time.perf_counter()
        run_seconds.append((logging - opened) + (ended - closing))
        row_seconds.append(closing - logging)

    ask_tell, report_prune = [], []
    for i in range(repeats):
        asked = time.perf_counter()
        trial = study.ask()
        suggest_params(trial, cfg.search)
        sampled = time.perf_counter()
        for epoch in range(5):
            reported = time.perf_counter()
            trial.report(1.0 / (epoch + 1) + 0.01 * i, epoch)
            trial.should_prune()
            report_prune.append(time.perf_counter() - reported)
        told = time.perf_counter()
        study.tell(trial, 0.2 + 0.01 * i)
        ask_tell.append((sampled - asked) + (time.perf_counter() - told))
    return {
        "mlflow_store_seconds": mlflow_store,
        "optuna_store_seconds": optuna_store,
        "run_seconds": statistics.median(run_seconds),
        "row_seconds": statistics.median(row_seconds),
        "row_metrics": len(row),
        "params": len(params),
        "ask_tell_seconds": statistics.median(ask_tell),
        "report_prune_seconds": statistics.median(report_prune),
    }


# --- running commands and reading their stores back -------------------------------------------


@dataclass
class Run:
    """One command in its own fresh working directory, timed from launch to exit, its output
    timestamped as it arrived."""

    label: str
    argv: list[str]
    folder: Path
    started: float = 0.0  # epoch seconds at launch
    seconds: float = 0.0  # launch to exit
    cpu_seconds: float = 0.0  # user + system time of the command and every process it started
    # (seconds since launch, CPU seconds so far) a few times a second, where a cgroup counts
    cpu_samples: list[tuple[float, float]] = field(default_factory=list)
    stdout: str = ""
    # (seconds since launch, text) for every read from either stream: a tqdm update, a line
    events: list[tuple[float, str]] = field(default_factory=list)


def shell_text(argv: list[str]) -> str:
    """The command as a user types it from the project root."""
    shown = [a.replace(str(ROOT) + "/", "") for a in argv[1:]]
    return " ".join(shlex.quote(a) for a in ["python", *shown])


CPU_SAMPLE = 0.25  # seconds between two readings of a command's CPU time
LINGER = 10.0  # seconds a command's last processes (the fork server) may outlive it


def cgroup_root() -> Path | None:
    """A cgroup v2 hierarchy this process may create groups in, or None."""
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mount, kind, *_ = line.split()
        if kind == "cgroup2" and os.access(mount, os.W_OK):
            return Path(mount)
    return None


def cpu_usage(group: Path) -> float:
    """CPU seconds of every process that ever ran in the group."""
    stat = dict(line.split() for line in (group / "cpu.stat").read_text().splitlines())
    return int(stat["usage_usec"]) / 1e6


@contextmanager
def cpu_group(label: str) -> Iterator[Path | None]:
    """A cgroup of its own for one command, removed once its last process has gone; None where
    no cgroup v2 hierarchy is writable (then only rusage counts, which misses the processes the
    fork server starts: they are not the command's descendants by wait())."""
    root = cgroup_root()
    if root is None:
        yield None
        return
    group = root / f"lstm_sweep_bench_{os.getpid()}_{label}"
    group.mkdir()
    try:
        yield group
    finally:
        try:
            group.rmdir()
        except OSError:  # a process outlived LINGER: its group stays for a look
            say(f"{label}: processes left in {group}")


def processes_in(group: Path) -> bool:
    return bool((group / "cgroup.procs").read_text().strip())


def launch(label: str, argv: list[str], scratch: Path) -> Run:
    with cpu_group(label) as group:
        run = launch_in(label, argv, scratch, group)
    if run.cpu_samples:  # the last one taken once the last process had gone
        run.cpu_seconds = run.cpu_samples[-1][1]
    say(f"{label}: {run.seconds:.1f} s, CPU {run.cpu_seconds:.1f} s")
    return run


def launch_in(label: str, argv: list[str], scratch: Path, group: Path | None) -> Run:
    """Run one command (in ``group``, if any) and wait for it; its CPU time sampled meanwhile."""
    run = Run(label, argv, scratch / label)
    run.folder.mkdir(parents=True)
    say(f"{label}: {shell_text(argv)}")
    # as a person at a terminal sees it: stdout unbuffered, stderr on a pseudo-terminal (the
    # step lines lstm_sweep draws only on a terminal count as output too)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    streams: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
    lock = threading.Lock()
    terminal, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    run.started = time.time()
    began = time.perf_counter()

    def join_group() -> None:  # in the child, before exec: "0" is the writing process
        if group is not None:
            (group / "cgroup.procs").write_text("0")

    process = subprocess.Popen(
        argv,
        cwd=run.folder,
        stdout=subprocess.PIPE,
        stderr=follower,
        env=env,
        preexec_fn=join_group,
    )
    os.close(follower)  # the children hold it; reading the terminal ends when they all exit
    assert process.stdout is not None

    def pump(name: str, fd: int) -> None:
        while True:
            try:
                chunk = os.read(fd, 65536)  # returns as soon as anything was written
            except OSError:  # EIO: every writer of the pseudo-terminal has exited
                break
            if not chunk:
                break
            arrived = time.perf_counter() - began
            with lock:
                run.events.append((arrived, chunk.decode(errors="replace")))
                streams[name].append(chunk)

    readers = [
        threading.Thread(target=pump, args=("stdout", process.stdout.fileno())),
        threading.Thread(target=pump, args=("stderr", terminal)),
    ]
    exited = threading.Event()

    def sample() -> None:  # until the command and the last process it started have exited
        while group is not None:
            run.cpu_samples.append((time.perf_counter() - began, cpu_usage(group)))
            if exited.is_set() and (not processes_in(group) or time.monotonic() > deadline):
                return
            time.sleep(0.05 if exited.is_set() else CPU_SAMPLE)

    readers = [*readers, threading.Thread(target=sample)]
    for reader in readers:
        reader.start()
    _, status, usage = os.wait4(process.pid, 0)  # wait() with the child's CPU time
    run.seconds = time.perf_counter() - began
    run.cpu_seconds = usage.ru_utime + usage.ru_stime
    code = process.returncode = os.waitstatus_to_exitcode(status)
    deadline = time.monotonic() + LINGER  # the fork server exits just after the command
    exited.set()
    for reader in readers:
        reader.join()
    os.close(terminal)
    run.events.sort(key=lambda event: event[0])
    run.stdout = b"".join(streams["stdout"]).decode(errors="replace")
    if code != 0:
        error = b"".join(streams["stderr"]).decode(errors="replace")
        raise RuntimeError(f"{label} exited {code}:\n{error[-3000:]}")
    return run


def say(line: str) -> None:
    print(f"[bench {datetime.now():%H:%M:%S}] {line}", file=sys.stderr, flush=True)


def sweep_argv(sweep: Path, overrides: tuple[str, ...], *extra: str) -> list[str]:
    return [PYTHON, "-m", "lstm_sweep.run", str(sweep), *(f"--set={o}" for o in overrides), *extra]


def self_argv(command: str, sweep: Path, overrides: tuple[str, ...], *extra: str) -> list[str]:
    sets = [f"--set={o}" for o in overrides]
    return [PYTHON, str(Path(__file__).resolve()), command, str(sweep), *sets, *extra]


def last_json(run: Run) -> dict[str, Any]:
    """A subcommand's result: the last line it printed."""
    result: dict[str, Any] = json.loads(run.stdout.strip().splitlines()[-1])
    return result


@dataclass
class SweepResult:
    """What a finished lstm_sweep run left in its stores."""

    trials: list[Any]  # Optuna FrozenTrials, by number
    fit_seconds: dict[int, float]  # trial number -> time inside fit(), from MLflow
    closing_end: float | None  # epoch seconds: the closing stage's findings logged on the parent


def read_sweep(run: Run, sweep: Path, overrides: tuple[str, ...]) -> SweepResult:
    import optuna
    from mlflow.tracking import MlflowClient

    from lstm_sweep import metrics as m
    from lstm_sweep.tracking import STORE_ROOT

    cfg = load_config(sweep, list(overrides))
    stores = run.folder / STORE_ROOT
    study = optuna.load_study(
        study_name=cfg.study_name, storage=f"sqlite:///{stores / 'optuna.db'}"
    )
    client = MlflowClient(f"sqlite:///{stores / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(cfg.experiment)
    if experiment is None:
        raise RuntimeError(f"no MLflow experiment {cfg.experiment!r} under {stores}")

    def runs(role: str) -> list[Any]:
        query = f"tags.`{m.ROLE_TAG}` = '{role}'"
        return list(client.search_runs([experiment.experiment_id], query))

    fit_seconds = {
        int(r.data.tags[m.TRIAL_TAG]): r.data.metrics[m.TRAIN_SECONDS]
        for r in runs(m.ROLE_TRIAL)
        if m.TRAIN_SECONDS in r.data.metrics
    }
    # logged right after the closing stage returns, before the report is rendered
    closing = client.get_metric_history(runs(m.ROLE_SWEEP)[0].info.run_id, "recommended_val_mean")
    return SweepResult(
        sorted(study.trials, key=lambda t: t.number),
        fit_seconds,
        closing[0].timestamp / 1000 if closing else None,
    )


def counted(trials: list[Any]) -> list[Any]:
    return [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]


def epochs_of(trials: list[Any]) -> int:
    return sum(int(t.user_attrs.get("epochs_trained", 0)) for t in counted(trials))


def best_of(trials: list[Any]) -> float:
    return min((t.value for t in trials if t.state.name == "COMPLETE"), default=math.inf)


def first_start(trials: list[Any]) -> float:
    return min(t.datetime_start for t in counted(trials)).timestamp()


def last_end(trials: list[Any]) -> float:
    return max(t.datetime_complete for t in counted(trials)).timestamp()


def trials_span(trials: list[Any]) -> float:
    """Seconds from the first trial's start to the last one's end: the sweep without the
    start-up before it and the closing stage and report after it."""
    return last_end(trials) - first_start(trials)


def trial_seconds(trial: Any) -> float:
    return float((trial.datetime_complete - trial.datetime_start).total_seconds())


# --- the figures -----------------------------------------------------------------------------


@dataclass
class Figure:
    """One row of the table: lstm_sweep's value against a yardstick (their ratio), or alone;
    with a goal, an upper bound on the ratio (or on the value, without a yardstick)."""

    name: str
    series: str
    ours: float
    theirs: float | None
    commands: list[int]  # indices into the command list
    bound: float | None = None
    note: str = ""
    unit: str = "s"
    ratio_value: float | None = None  # when the ratio is not ours / theirs (a median of ratios)

    @property
    def ratio(self) -> float | None:
        if self.ratio_value is not None:
            return self.ratio_value
        return self.ours / self.theirs if self.theirs else None

    @property
    def met(self) -> bool | None:
        judged = self.ours if self.theirs is None else self.ratio
        if self.bound is None or judged is None or not math.isfinite(judged):
            return None
        return judged <= self.bound

    @property
    def goal(self) -> str:
        if self.bound is None:
            return "-"
        return f"<= {self.bound:.3g}" + (f" {self.unit}" if self.theirs is None else "")


class Bench:
    """One benchmark run: its scratch folder and every command it launched, in order."""

    def __init__(self, scratch: Path, peer_threads: int) -> None:
        self.scratch, self.peer_threads = scratch, peer_threads
        self.commands: list[list[str]] = []
        self.cpu_seconds = 0.0  # of every command, for a quiet machine's wall time

    def run(self, label: str, argv: list[str]) -> tuple[Run, int]:
        result = launch(label, argv, self.scratch)
        self.commands.append(argv)
        self.cpu_seconds += result.cpu_seconds
        return result, len(self.commands) - 1

    def per_epoch(self, series: str, plan: SeriesPlan, flip: bool) -> list[Figure]:
        """Goal 1: the cost of an epoch inside a trial with diagnostics off and full, against
        the floor; each process's first training left out. The same code runs up to 15 % faster
        or slower from one process to the next on a shared VM (measured: `off` at 20.6-25.8 ms
        per sunspots epoch in four processes in a row), so every side runs once per round in a
        fresh process, the order rotating, and each ratio is the median of its rounds'."""
        sweep, epochs, n = SERIES[series], plan.epochs, plan.trainings
        fixed = (
            "search={}",
            f"study.n_trials={WARM_UP + n}",
            f"train.max_epochs={epochs}",
            f"train.patience={epochs}",
            "study.pruner.type=none",
            *LEAN_REPORT,
        )
        argvs = {
            "floor": self_argv(
                "floor", sweep, (), "--epochs", str(epochs), "--trainings", str(WARM_UP + n)
            ),
            **{
                level: sweep_argv(sweep, (*fixed, f"diagnostics.level={level}"), "--workers", "1")
                for level in ("off", "full")
            },
        }
        sides = list(argvs)
        # per round and side, seconds per epoch: the trial wall (Optuna's trial start to end)
        # and inside fit() (the run's train_seconds); the floor's trainings count as both
        wall: dict[str, list[float]] = {side: [] for side in sides}
        fit: dict[str, list[float]] = {side: [] for side in sides}
        indices: dict[str, list[int]] = {side: [] for side in sides}
        for r in range(plan.rounds):
            shift = (r + flip) % len(sides)
            for side in sides[shift:] + sides[:shift]:
                run, index = self.run(f"{series}-epoch-{side}-{r}", argvs[side])
                indices[side].append(index)
                if side == "floor":
                    trainings = last_json(run)["seconds"][WARM_UP:]
                    wall[side].append(statistics.median(trainings) / epochs)
                    fit[side].append(wall[side][-1])
                    continue
                result = read_sweep(run, sweep, (*fixed, f"diagnostics.level={side}"))
                steady = counted(result.trials)[WARM_UP:]
                if any(t.user_attrs["epochs_trained"] != epochs for t in steady):
                    raise RuntimeError(f"{series} {side}: a trial stopped before {epochs} epochs")
                wall[side].append(statistics.median(trial_seconds(t) for t in steady) / epochs)
                fit[side].append(
                    statistics.median(result.fit_seconds[t.number] for t in steady) / epochs
                )
        note = f"{plan.rounds} rounds of fresh processes, each the median of {n} x {epochs} epochs"

        def figure(
            name: str, ours: str, theirs: str, times: dict[str, list[float]], bound: float | None
        ) -> Figure:
            per_round = [a / b for a, b in zip(times[ours], times[theirs], strict=True)]
            return Figure(
                name,
                series,
                statistics.median(times[ours]),
                statistics.median(times[theirs]),
                indices[ours][:1] + indices[theirs][:1],
                bound=bound,
                note=f"{note}; ratio: median of the rounds' "
                + ", ".join(f"{x:.3f}" for x in per_round),
                ratio_value=statistics.median(per_round),
            )

        return [
            figure("per epoch, trial wall: off vs floor", "off", "floor", wall, 1.05),
            figure("per epoch, in fit(): off vs floor", "off", "floor", fit, None),
            figure("per epoch, trial wall: full vs off", "full", "off", wall, 1.10),
            figure("per epoch, in fit(): full vs off", "full", "off", fit, None),
        ]

    def default_command(
        self, series: str, plan: SeriesPlan, flip: bool
    ) -> tuple[list[Figure], dict[str, Any]]:
        """Goals 2 and 3: the whole default command against the peer at the same trials, and
        the default command's phases and longest silence."""
        sweep, overrides = SERIES[series], plan.default_overrides
        cfg = load_config(sweep, list(overrides))
        launches = {
            "ours": (f"{series}-default", sweep_argv(sweep, overrides)),
            "peer": (
                f"{series}-peer",
                self_argv("peer", sweep, overrides, "--threads", str(self.peer_threads)),
            ),
        }
        # the second series runs the peer first, so a drifting load favours neither side
        done = {
            side: self.run(*launches[side]) for side in (reversed(launches) if flip else launches)
        }
        (ours, ours_index), (theirs, theirs_index) = done["ours"], done["peer"]
        both = [ours_index, theirs_index]
        result = read_sweep(ours, sweep, overrides)
        peer_result = last_json(theirs)
        timeline = phases(ours, result)
        cores = timeline["cores"]
        phase_note = ", ".join(
            f"{k} {v:.1f} s" + (f" ({cores[k]:.2f} cores)" if k in cores else "")
            for k, v in timeline["phases"].items()
        )
        longest = max(timeline["silences"].items(), key=lambda item: item[1]["seconds"])
        name, silence = longest
        figures = [
            Figure(
                f"whole default command ({cfg.study.n_trials} trials)",
                series,
                ours.seconds,
                theirs.seconds,
                both,
                bound=1 / 3,
                note=f"launch to exit; lstm_sweep: {cfg.study.workers} workers, {phase_note};"
                f" peer: one process, {peer_result['torch_threads']} torch thread(s)",
            ),
            Figure(
                "CPU time of the default command",
                series,
                ours.cpu_seconds,
                theirs.cpu_seconds,
                both,
                note="every process each started (a cgroup)"
                if ours.cpu_samples
                else "no cgroup: lstm_sweep's figure misses the fork server's workers",
            ),
            Figure(
                f"that CPU time over {os.cpu_count()} cores vs peer's wall",
                series,
                ours.cpu_seconds / (os.cpu_count() or 1),
                theirs.seconds,
                both,
                note="the default command's wall time if every core were busy throughout:"
                " how far scheduling alone could take the first ratio",
            ),
            Figure(
                "trials only, first start to last end",
                series,
                trials_span(result.trials),
                peer_result["trials_seconds"],
                both,
            ),
            Figure(
                "epochs trained by the trials",
                series,
                epochs_of(result.trials),
                peer_result["epochs"],
                both,
                unit="epochs",
            ),
            Figure(
                f"best {cfg.train.monitor}",
                series,
                best_of(result.trials),
                peer_result["best_value"],
                both,
                bound=1.0,
                note="best completed trial of each",
                unit="",
            ),
            Figure(
                "longest silence, default command",
                series,
                silence["seconds"],
                None,
                [ours_index],
                bound=SILENCE_GOAL,
                note=f"in the {name}, {silence['at']:.1f} s after launch, after:"
                f" {silence['after']!r}",
            ),
        ]
        return figures, timeline

    def bookkeeping(self, repeats: int, postgres: str) -> list[Figure]:
        """lstm_sweep's bookkeeping on SQLite against PostgreSQL, if reachable."""
        sweep = SERIES["sunspots"]
        lite, index = self.probe("sqlite", sweep, [], repeats)  # in its working directory
        server, indices = None, [index]
        with postgres_databases(postgres, ("mlflow", "optuna")) as urls:
            if urls:
                stores = [arg for name, url in urls.items() for arg in (f"--{name}", url)]
                server, index = self.probe("postgresql", sweep, stores, repeats)
                indices.append(index)
        against = "PostgreSQL" if server else "PostgreSQL not reachable"
        rows = [
            ("fresh MLflow store (migrations)", "mlflow_store_seconds", f"SQLite vs {against}"),
            ("fresh Optuna storage", "optuna_store_seconds", "per sweep"),
            ("nested run: create + params, close", "run_seconds", f"{lite['params']} params"),
            ("one epoch's metrics, one log_batch", "row_seconds", f"{lite['row_metrics']} keys"),
            ("Optuna ask + suggest + tell", "ask_tell_seconds", "per trial"),
            ("Optuna report + should_prune", "report_prune_seconds", "per epoch"),
        ]
        return [
            Figure(name, "stores", lite[key], server[key] if server else None, indices, note=note)
            for name, key, note in rows
        ]

    def probe(
        self, label: str, sweep: Path, stores: list[str], repeats: int
    ) -> tuple[dict[str, Any], int]:
        """The bookkeeping subcommand on the stores given as ``--mlflow URI --optuna URL``
        (none: SQLite files in its working directory)."""
        argv = self_argv("bookkeeping", sweep, (), *stores, "--repeats", str(repeats))
        run, index = self.run(f"bookkeeping-{label}", argv)
        return last_json(run), index


def phases(run: Run, result: SweepResult) -> dict[str, Any]:
    """The default command's timeline: start-up (launch to the first trial's start), trials
    (to the last trial's end), closing stage (to the moment its findings reach the parent run),
    report (to exit); and in each phase the longest stretch without any output, a tqdm redraw
    counting as output."""
    first = first_start(result.trials) - run.started
    last = last_end(result.trials) - run.started
    closing = (result.closing_end - run.started) if result.closing_end else last
    ends = {"start-up": first, "trials": last, "closing stage": closing, "report": run.seconds}
    starts = dict(zip(ends, [0.0, *list(ends.values())[:-1]], strict=True))
    times = [0.0, *(t for t, _ in run.events), run.seconds]
    texts = ["(launch)", *(text for _, text in run.events)]
    silences = {}
    for name, end in ends.items():
        # each silence between two outputs, as much of it as falls inside this phase
        inside = [
            (min(times[i + 1], end) - max(times[i], starts[name]), i)
            for i in range(len(times) - 1)
            if times[i] < end and times[i + 1] > starts[name]
        ]
        seconds, i = max(inside, default=(0.0, 0))
        silences[name] = {
            "seconds": seconds,
            "at": max(times[i], starts[name]),
            "after": last_line(texts[: i + 1])[:70],
        }
    return {
        "phases": {name: end - starts[name] for name, end in ends.items()},
        "cores": {  # the cores busy on average in each phase, where a cgroup counted them
            name: (cpu_at(run, end) - cpu_at(run, starts[name])) / (end - starts[name])
            for name, end in ends.items()
            if run.cpu_samples and end > starts[name]
        },
        "silences": silences,
        "events": [(round(t, 2), text[-120:]) for t, text in run.events],
    }


def cpu_at(run: Run, seconds: float) -> float:
    """The command's CPU seconds so far ``seconds`` after launch, between two samples linear."""
    times = [t for t, _ in run.cpu_samples]
    i = bisect.bisect_left(times, seconds)
    if i == 0:
        return run.cpu_samples[0][1]
    if i == len(times):
        return run.cpu_samples[-1][1]
    (t0, c0), (t1, c1) = run.cpu_samples[i - 1], run.cpu_samples[i]
    return c0 + (c1 - c0) * (seconds - t0) / (t1 - t0)


def last_line(texts: list[str]) -> str:
    """The last non-blank line (or tqdm redraw) of the outputs so far."""
    for text in reversed(texts):
        lines = [line.strip() for line in text.replace("\r", "\n").split("\n") if line.strip()]
        if lines:
            return lines[-1]
    return ""


@contextmanager
def postgres_databases(admin: str, names: tuple[str, ...]) -> Iterator[dict[str, str]]:
    """Fresh PostgreSQL databases for a block (name -> URL), dropped afterwards; an empty
    mapping when the server at ``admin`` is not reachable (or ``admin`` is empty)."""
    if not admin:
        yield {}
        return
    import sqlalchemy

    engine = sqlalchemy.create_engine(
        admin, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3}
    )
    stem = f"bench_{uuid.uuid4().hex[:8]}"
    created: dict[str, str] = {}
    try:
        try:
            with engine.connect() as connection:
                for name in names:
                    connection.execute(sqlalchemy.text(f"CREATE DATABASE {stem}_{name}"))
                    created[name] = f"{admin.rsplit('/', 1)[0]}/{stem}_{name}"
        except sqlalchemy.exc.OperationalError as exc:
            say(f"PostgreSQL skipped: {str(exc).splitlines()[0]}")
        yield dict(created)
    finally:
        with engine.connect() as connection:
            for name in created:
                connection.execute(sqlalchemy.text(f"DROP DATABASE {stem}_{name} WITH (FORCE)"))
        engine.dispose()


# --- the table ---------------------------------------------------------------------------------


def machine(load_before: str) -> dict[str, Any]:
    import torch

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown CPU",
    )
    return {
        "date": datetime.now().strftime("%Y-%m-%d %H:%M"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "uptime_before": load_before,
        "uptime_after": uptime(),
    }


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def format_table(figures: list[Figure], commands: list[list[str]]) -> str:
    header = (
        f"{'figure':<40} {'series':<8} {'lstm_sweep':>11} {'yardstick':>11} {'ratio':>6}"
        f" {'goal':>8} {'met':>4}  cmd"
    )
    lines = [header, "-" * len(header)]
    for f in figures:
        ratio = f"{f.ratio:.3f}" if f.ratio is not None else "-"
        met = {True: "yes", False: "NO", None: "-"}[f.met]
        theirs = format_value(f.theirs, f.unit) if f.theirs is not None else "-"
        lines.append(
            f"{f.name:<40} {f.series:<8} {format_value(f.ours, f.unit):>11} {theirs:>11}"
            f" {ratio:>6} {f.goal:>8} {met:>4}  {','.join(f'[{i}]' for i in f.commands)}"
        )
        if f.note:
            lines.append(f"{'':<4}({f.note})")
    lines += ["", "commands (each in a fresh working directory):"]
    lines += [f"[{i}] {shell_text(c)}" for i, c in enumerate(commands)]
    return "\n".join(lines)


def format_value(value: float, unit: str) -> str:
    if unit == "s":
        return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.1f} s"
    if unit == "epochs":
        return f"{value:.0f}"
    return f"{value:.4g}"


def run_all(
    plan_name: str, series: list[str], peer_threads: int, postgres: str, json_path: Path | None
) -> None:
    plans = PLANS[plan_name]
    load_before = uptime()
    say(load_before)
    began = time.perf_counter()
    figures: list[Figure] = []
    timelines: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="lstm_sweep_bench_") as tmp:
        bench = Bench(Path(tmp), peer_threads)
        # the second series runs each pair in the other order
        for i, name in enumerate(series):
            figures += bench.per_epoch(name, plans[name], flip=i % 2 == 1)
        for i, name in enumerate(series):
            found, timelines[name] = bench.default_command(name, plans[name], flip=i % 2 == 1)
            figures += found
        figures += bench.bookkeeping(BOOKKEEPING_REPEATS[plan_name], postgres)
    minutes = (time.perf_counter() - began) / 60
    cpu_minutes = bench.cpu_seconds / 60
    about = machine(load_before)
    print(
        f"machine: {about['nproc']} cores ({about['cpu']}), torch {about['torch']},"
        f" Python {about['python']}, {about['date']}\n"
        f"before: {about['uptime_before']}\n"
        f"after:  {about['uptime_after']}\n"
        f"plan: {plan_name}, series {', '.join(series)}; the benchmark took {minutes:.1f} min,"
        f" its commands {cpu_minutes:.1f} CPU min\n"
    )
    print(format_table(figures, bench.commands))
    if json_path:
        rows = [{**asdict(f), "ratio": f.ratio, "met": f.met, "goal": f.goal} for f in figures]
        report = {
            "machine": about,
            "plan": plan_name,
            "minutes": minutes,
            "cpu_minutes": cpu_minutes,
            "figures": rows,
            "commands": [shell_text(c) for c in bench.commands],
            "timelines": timelines,
        }
        json_path.write_text(json.dumps(report, indent=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/bench.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="smaller plan, for smoke tests")
    parser.add_argument(
        "--series", action="append", choices=list(SERIES), help="one series (default: both)"
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument(
        "--peer-threads",
        type=int,
        default=1,
        help="torch threads of the peer (default 1, as one lstm_sweep worker; 0: torch's"
        " default, one per core)",
    )
    parser.add_argument(
        "--postgres",
        default=POSTGRES_ADMIN,
        help="server to create (and drop) two databases on for the bookkeeping; '' to skip",
    )
    sub = parser.add_subparsers(dest="command")
    floor_args = sub.add_parser("floor", help="the bare PyTorch loop alone; prints JSON")
    floor_args.add_argument("--epochs", type=int, default=20)
    floor_args.add_argument("--trainings", type=int, default=3)
    peer_args = sub.add_parser("peer", help="the hand-written sweep alone; prints JSON")
    peer_args.add_argument("--threads", type=int, default=1, help="torch threads; 0: default")
    probe_args = sub.add_parser("bookkeeping", help="lstm_sweep's store costs; prints JSON")
    probe_args.add_argument("--mlflow", default=f"sqlite:///{Path.cwd() / 'mlflow.db'}")
    probe_args.add_argument("--optuna", default=f"sqlite:///{Path.cwd() / 'optuna.db'}")
    probe_args.add_argument("--repeats", type=int, default=BOOKKEEPING_REPEATS["full"])
    for yardstick in (floor_args, peer_args, probe_args):
        yardstick.add_argument("sweep", type=Path, help="the sweep file")
        yardstick.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a key of the sweep file, as lstm_sweep.run does",
        )
    args = parser.parse_args(argv)
    if args.command == "floor":
        result = floor(args.sweep, args.set, args.epochs, args.trainings)
    elif args.command == "peer":
        result = peer(args.sweep, args.set, args.threads)
    elif args.command == "bookkeeping":
        result = bookkeeping(args.sweep, args.set, args.mlflow, args.optuna, args.repeats)
    else:
        plan = "quick" if args.quick else "full"
        run_all(plan, args.series or list(SERIES), args.peer_threads, args.postgres, args.json)
        return 0
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
