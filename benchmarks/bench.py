"""Benchmarks of issue 7: lstm_sweep beside two yardsticks, on the same data and model, in one run.

- the floor: a bare PyTorch loop for the same LSTM (``train.build_model``) on the same windows
  (pre-built tensors sliced by a random permutation, no tracking, no diagnostics): what the
  machine can do;
- the hand-written peer: what a practitioner writes from a typical blog post (a DataLoader over a
  TensorDataset, Optuna with a median pruner, ``mlflow.log_metric`` per metric per epoch on a
  local SQLite store, nested runs through the fluent API, a plain loop).

Every lstm_sweep figure comes from the real command (``python -m lstm_sweep.run``) in a fresh
working directory, read back from its own Optuna and MLflow stores; the floor and the peer run as
subcommands of this script in fresh processes too, so every figure pays its own start-up.

    python benchmarks/bench.py            # every figure of issue 7 (aimed at < 15 min, 2 cores)
    python benchmarks/bench.py --quick    # the same figures, fewer trials and epochs (~5 min)
    python benchmarks/bench.py floor --epochs 20 --trainings 3    # one yardstick alone
    python benchmarks/bench.py peer --trials 30
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "sweeps" / "forecast.yaml"
PYTHON = sys.executable
TARGET_SLACK = 1.02  # the time-to-target figure aims at 2 % above the worse of the two best losses
# Runs that measure trials only skip most of the closing report (seeded re-evaluations, final
# model): it comes after the last trial and would only lengthen the benchmark.
LEAN_REPORT = ("report.top_k=1", "report.seeds=1", "report.final_model=false")


@dataclass(frozen=True)
class Plan:
    """How much of each figure to run: the full plan fits in 15 minutes on 2 quiet cores."""

    epochs: int  # per-epoch figure: epochs per training, no pruning, no early stopping
    trainings: int  # per-epoch figure: trainings per diagnostics level (the median is reported)
    sweep_trials: int  # lstm_sweep and the peer, head to head
    prune_trials: int  # pruning on against off: the first trials of the head-to-head sweep
    worker_trials: int  # trials per minute with 2 workers
    overrides: tuple[str, ...] = ()  # --set overrides for every command, e.g. a smaller model


FULL = Plan(epochs=20, trainings=3, sweep_trials=30, prune_trials=15, worker_trials=16)
QUICK = Plan(epochs=5, trainings=2, sweep_trials=6, prune_trials=6, worker_trials=6)


# --- the two yardsticks, each run as a subcommand in its own process --------------------------


def floor(overrides: list[str], epochs: int, trainings: int) -> dict[str, Any]:
    """Train the sweep's model ``trainings`` times for ``epochs`` epochs with nothing around it
    but a validation loss per epoch (every sweep needs one to stop or prune)."""
    import torch
    from torch import nn

    from lstm_sweep.config import load_config
    from lstm_sweep.data import load_forecast_data
    from lstm_sweep.study import torch_threads_per_worker
    from lstm_sweep.train import build_model, make_optimizer, predict

    cfg = load_config(SWEEP, overrides)
    torch.set_num_threads(torch_threads_per_worker(1))  # what one lstm_sweep worker uses
    data = load_forecast_data(cfg.data)
    x, y = data.train.x, data.train.y
    seconds = []
    for _ in range(trainings):
        started = time.perf_counter()
        model = build_model(data, cfg)
        optimizer = make_optimizer(model, cfg.train)
        batches = torch.Generator().manual_seed(cfg.train.seed)
        for _epoch in range(epochs):
            order = torch.randperm(len(x), generator=batches)
            for start in range(0, len(x), cfg.train.batch_size):
                idx = order[start : start + cfg.train.batch_size]
                optimizer.zero_grad(set_to_none=True)
                loss = nn.functional.mse_loss(model(x[idx]), y[idx])
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
                optimizer.step()
            float(nn.functional.mse_loss(predict(model, data.val.x), data.val.y))
        seconds.append(time.perf_counter() - started)
    return {"seconds": seconds, "epochs": epochs}


def peer(overrides: list[str], trials: int) -> dict[str, Any]:
    """The hand-written sweep: same data, model, search space, sampler, pruner, patience and
    trial count as lstm_sweep, written the way a blog post writes it."""
    import mlflow
    import optuna
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lstm_sweep.config import load_config
    from lstm_sweep.data import load_forecast_data
    from lstm_sweep.study import suggest_params
    from lstm_sweep.train import build_model

    cfg = load_config(SWEEP, overrides)
    data = load_forecast_data(cfg.data)
    train_loader = DataLoader(
        TensorDataset(data.train.x, data.train.y), batch_size=cfg.train.batch_size, shuffle=True
    )
    val_loader = DataLoader(TensorDataset(data.val.x, data.val.y), batch_size=512)
    mlflow.set_tracking_uri(f"sqlite:///{Path.cwd() / 'mlflow.db'}")
    mlflow.set_experiment("peer")

    def objective(trial: optuna.Trial) -> float:
        values = suggest_params(trial, cfg.search)
        trial_cfg = cfg.with_values(values)
        with mlflow.start_run(nested=True):
            mlflow.log_params(values)
            model = build_model(data, trial_cfg)
            optimizer = torch.optim.AdamW(
                model.parameters(),
                lr=trial_cfg.train.learning_rate,
                weight_decay=trial_cfg.train.weight_decay,
            )
            best, since_best = math.inf, 0
            for epoch in range(trial_cfg.train.max_epochs):
                model.train()
                total = 0.0
                for xb, yb in train_loader:
                    optimizer.zero_grad()
                    loss = nn.functional.mse_loss(model(xb), yb)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), trial_cfg.train.grad_clip)
                    optimizer.step()
                    total += loss.item() * len(xb)
                model.eval()
                with torch.no_grad():
                    val = (
                        sum(
                            nn.functional.mse_loss(model(xb), yb, reduction="sum").item()
                            for xb, yb in val_loader
                        )
                        / data.val.y.numel()
                    )
                mlflow.log_metric("train_loss", total / len(data.train), step=epoch)
                mlflow.log_metric("val_loss", val, step=epoch)
                trial.set_user_attr("epochs_trained", epoch + 1)  # in memory: for the table only
                if val < best:
                    best, since_best = val, 0
                else:
                    since_best += 1
                trial.report(val, epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned()
                if since_best >= trial_cfg.train.patience:
                    break
            return best

    study = optuna.create_study(
        direction=cfg.study.direction,
        sampler=optuna.samplers.TPESampler(
            seed=cfg.train.seed, n_startup_trials=cfg.study.n_startup_trials
        ),
        pruner=optuna.pruners.MedianPruner(
            cfg.study.pruner.n_startup_trials, cfg.study.pruner.n_warmup_steps
        ),
    )
    with mlflow.start_run(run_name="sweep"):
        study.optimize(objective, n_trials=trials)
    return {
        "best_value": study.best_value,
        "trials_seconds": trials_span(study.trials),
        "epochs": epochs_of(study.trials),
    }


# --- running lstm_sweep and the yardsticks, and reading their stores back --------------------


@dataclass
class Run:
    """One command in its own fresh working directory, timed from launch to exit."""

    label: str
    argv: list[str]
    folder: Path
    seconds: float = 0.0
    started: float = 0.0  # epoch seconds at launch, for time-to-target
    output: str = ""

    @property
    def command(self) -> str:
        return shell_text(self.argv)


def shell_text(argv: list[str], hidden: tuple[str, ...] = ()) -> str:
    """The command as a user types it from the project root, without the ``hidden`` overrides
    that every command of the run carries."""
    kept = [a for a in argv[1:] if a.removeprefix("--set=") not in hidden]
    shown = [a.replace(str(ROOT) + "/", "") for a in kept]
    return " ".join(shlex.quote(a) for a in ["python", *shown])


def launch(label: str, argv: list[str], scratch: Path) -> Run:
    run = Run(label, argv, scratch / label)
    run.folder.mkdir(parents=True)
    print(f"[bench] {label}: {run.command}", file=sys.stderr, flush=True)
    run.started = time.time()
    began = time.perf_counter()
    done = subprocess.run(argv, cwd=run.folder, capture_output=True, text=True)
    run.seconds = time.perf_counter() - began
    run.output = done.stdout
    if done.returncode != 0:
        raise RuntimeError(f"{label} exited {done.returncode}:\n{done.stderr[-3000:]}")
    print(f"[bench] {label}: {run.seconds:.1f} s", file=sys.stderr, flush=True)
    return run


def sweep_argv(plan: Plan, *overrides: str, workers: int = 1) -> list[str]:
    argv = [PYTHON, "-m", "lstm_sweep.run", str(SWEEP), "--no-progress"]
    argv += [f"--set={o}" for o in (*plan.overrides, *overrides)]
    return argv + (["--workers", str(workers)] if workers > 1 else [])


def self_argv(plan: Plan, *args: str) -> list[str]:
    return [PYTHON, str(Path(__file__).resolve()), *args, *(f"--set={o}" for o in plan.overrides)]


@dataclass
class SweepResult:
    """What a finished lstm_sweep run left in its stores."""

    trials: list[Any]  # Optuna FrozenTrials, by number
    fit_seconds: dict[int, float]  # trial number -> fit() time, from MLflow
    val_points: list[tuple[float, float]] = field(default_factory=list)  # (epoch s, val_loss)


def read_sweep(run: Run, plan: Plan) -> SweepResult:
    import optuna
    from mlflow.tracking import MlflowClient

    from lstm_sweep import diagnostics as dg
    from lstm_sweep.config import load_config
    from lstm_sweep.tracking import ROLE_TAG, STORE_ROOT, TRIAL_TAG

    cfg = load_config(SWEEP, plan.overrides)
    stores = run.folder / STORE_ROOT
    study = optuna.load_study(
        study_name=cfg.study_name, storage=f"sqlite:///{stores / 'optuna.db'}"
    )
    client = MlflowClient(f"sqlite:///{stores / 'mlflow.db'}")
    runs = experiment_runs(client, cfg.experiment, f"tags.`{ROLE_TAG}` = 'trial'")
    fit_seconds = {  # the time inside fit(), logged by the objective as `train_seconds`
        int(r.data.tags[TRIAL_TAG]): r.data.metrics["train_seconds"]
        for r in runs
        if "train_seconds" in r.data.metrics
    }
    return SweepResult(
        sorted(study.trials, key=lambda t: t.number),
        fit_seconds,
        val_points(client, [r.info.run_id for r in runs], dg.VAL_LOSS),
    )


def read_peer(run: Run) -> tuple[dict[str, float], list[tuple[float, float]]]:
    """The peer's printed summary, and every epoch's val loss from its MLflow store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run.folder / 'mlflow.db'}")
    runs = experiment_runs(client, "peer")
    summary = json.loads(run.output.strip().splitlines()[-1])
    return summary, val_points(client, [r.info.run_id for r in runs], "val_loss")


def experiment_runs(client: Any, name: str, filter_string: str = "") -> list[Any]:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        raise RuntimeError(f"no MLflow experiment {name!r} in {client.tracking_uri}")
    return client.search_runs([experiment.experiment_id], filter_string)


def val_points(client: Any, run_ids: list[str], key: str) -> list[tuple[float, float]]:
    """Every epoch's validation loss with the time it was measured, in epoch seconds."""
    return [
        (m.timestamp / 1000, m.value)
        for run_id in run_ids
        for m in client.get_metric_history(run_id, key)
    ]


def first_reach(points: list[tuple[float, float]], target: float, started: float) -> float:
    """Seconds from launch to the first epoch whose validation loss is at or below ``target``."""
    hits = [t for t, value in points if value <= target]
    return min(hits) - started if hits else math.inf


def counted(trials: list[Any]) -> list[Any]:
    return [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]


def epochs_of(trials: list[Any]) -> int:
    return sum(int(t.user_attrs.get("epochs_trained", 0)) for t in counted(trials))


def best_of(trials: list[Any]) -> float:
    return min((t.value for t in trials if t.state.name == "COMPLETE"), default=math.inf)


def trials_span(trials: list[Any]) -> float:
    """Seconds from the first trial's start to the last one's end: the sweep without the
    start-up before it and the report after it."""
    done = counted(trials)
    span = max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)
    return span.total_seconds()


def trials_per_minute(trials: list[Any]) -> float:
    return 60 * len(counted(trials)) / trials_span(trials)


# --- the figures -----------------------------------------------------------------------------


@dataclass
class Figure:
    name: str
    ours: float
    theirs: float
    ratio: float  # ours / theirs, or the figure's own ratio
    goal: str
    commands: list[int]  # indices into the command list
    note: str = ""
    unit: str = "s"


def per_epoch_figures(plan: Plan, scratch: Path, commands: list[list[str]]) -> list[Figure]:
    fixed = [
        "search={}",
        f"study.n_trials={plan.trainings}",
        f"train.max_epochs={plan.epochs}",
        f"train.patience={plan.epochs}",
        "study.pruner.type=none",
        *LEAN_REPORT,
    ]
    floor_run = launch(
        "floor",
        self_argv(plan, "floor", "--epochs", str(plan.epochs), "--trainings", str(plan.trainings)),
        scratch,
    )
    commands.append(floor_run.argv)
    floor_index = len(commands) - 1
    floor_epoch = statistics.median(json.loads(floor_run.output)["seconds"]) / plan.epochs
    goals = {"off": 1.05, "basic": None, "full": 1.10}
    figures = []
    for level, goal in goals.items():
        run = launch(
            f"epoch-{level}", sweep_argv(plan, *fixed, f"diagnostics.level={level}"), scratch
        )
        commands.append(run.argv)
        result = read_sweep(run, plan)
        trial_epoch = statistics.median(
            trials_span([t]) / t.user_attrs["epochs_trained"] for t in counted(result.trials)
        )
        fit_epoch = statistics.median(result.fit_seconds.values()) / plan.epochs
        goal_text = f"<= {goal:.2f}" if goal else "-"
        figures += [
            Figure(
                f"per-epoch, trial wall, diagnostics {level}",
                trial_epoch,
                floor_epoch,
                trial_epoch / floor_epoch,
                goal_text,
                [len(commands) - 1, floor_index],
                f"median of {plan.trainings} trials x {plan.epochs} epochs",
            ),
            Figure(
                f"per-epoch, fit() only, diagnostics {level}",
                fit_epoch,
                floor_epoch,
                fit_epoch / floor_epoch,
                goal_text,
                [len(commands) - 1, floor_index],
            ),
        ]
    return figures


def sweep_figures(
    plan: Plan, scratch: Path, commands: list[list[str]], target: float | None
) -> list[Figure]:
    n = plan.sweep_trials
    ours = launch("sweep", sweep_argv(plan, f"study.n_trials={n}"), scratch)
    commands.append(ours.argv)
    ours_index = len(commands) - 1
    theirs = launch("peer", self_argv(plan, "peer", "--trials", str(n)), scratch)
    commands.append(theirs.argv)
    ours_result = read_sweep(ours, plan)
    ours_best = best_of(ours_result.trials)
    theirs_summary, theirs_points = read_peer(theirs)
    theirs_best = theirs_summary["best_value"]
    target = target or TARGET_SLACK * max(ours_best, theirs_best)
    ours_span, theirs_span = trials_span(ours_result.trials), theirs_summary["trials_seconds"]
    ours_epoch = ours_span / epochs_of(ours_result.trials)
    theirs_epoch = theirs_span / theirs_summary["epochs"]
    ours_reach = first_reach(ours_result.val_points, target, ours.started)
    theirs_reach = first_reach(theirs_points, target, theirs.started)
    figures = [
        Figure(
            f"whole default sweep, wall ({n} trials)",
            ours.seconds,
            theirs.seconds,
            ours.seconds / theirs.seconds,
            "<= 0.33",
            [ours_index, ours_index + 1],
            "launch to exit; lstm_sweep's includes its closing report (seeded re-evaluations,"
            " final model)",
        ),
        Figure(
            "trials only, first start to last end",
            ours_span,
            theirs_span,
            ours_span / theirs_span,
            "<= 0.33",
            [ours_index, ours_index + 1],
        ),
        Figure(
            "trials only, per epoch trained",
            ours_epoch,
            theirs_epoch,
            ours_epoch / theirs_epoch,
            "-",
            [ours_index, ours_index + 1],
            f"{epochs_of(ours_result.trials)} and {theirs_summary['epochs']} epochs: overhead"
            " per epoch, apart from how many epochs each search trains",
        ),
        Figure(
            "best val loss, sweep vs peer",
            ours_best,
            theirs_best,
            ours_best / theirs_best,
            "<= 1.00",
            [ours_index, ours_index + 1],
            unit="",
        ),
        Figure(
            f"time to first val loss <= {target:.4g}",
            ours_reach,
            theirs_reach,
            ours_reach / theirs_reach,
            "-",
            [ours_index, ours_index + 1],
            "launch to the first epoch at or below the target",
        ),
    ]

    p = plan.prune_trials
    unpruned = launch(
        "no-pruning",
        sweep_argv(plan, f"study.n_trials={p}", "study.pruner.type=none", *LEAN_REPORT),
        scratch,
    )
    commands.append(unpruned.argv)
    pruned_trials = [t for t in ours_result.trials if t.number < p]  # same seed: same start
    unpruned_trials = read_sweep(unpruned, plan).trials
    pruned_best, unpruned_best = best_of(pruned_trials), best_of(unpruned_trials)
    pruned_epochs, unpruned_epochs = epochs_of(pruned_trials), epochs_of(unpruned_trials)
    figures += [
        Figure(
            f"epochs trained, pruning on vs off ({p} trials)",
            pruned_epochs,
            unpruned_epochs,
            pruned_epochs / unpruned_epochs,
            "<= 0.50",
            [ours_index, len(commands) - 1],
            f"pruning on: the first {p} trials of [{ours_index}]",
            unit="epochs",
        ),
        Figure(
            "best val loss, pruning on vs off",
            pruned_best,
            unpruned_best,
            pruned_best / unpruned_best,
            "<= 1.02",
            [ours_index, len(commands) - 1],
            unit="",
        ),
    ]

    w = plan.worker_trials
    two = launch(
        "workers-2", sweep_argv(plan, f"study.n_trials={w}", *LEAN_REPORT, workers=2), scratch
    )
    commands.append(two.argv)
    one_rate = trials_per_minute([t for t in ours_result.trials if t.number < w])
    two_rate = trials_per_minute(read_sweep(two, plan).trials)
    figures.append(
        Figure(
            "trials per minute, 2 workers vs 1",
            two_rate,
            one_rate,
            two_rate / one_rate,
            "-",
            [len(commands) - 1, ours_index],
            f"{w} trials each; 1 worker: the first {w} trials of [{ours_index}]",
            unit="/min",
        )
    )
    return figures


def machine() -> str:
    import torch

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown CPU",
    )
    load = os.getloadavg()[0]
    return f"{os.cpu_count()} cores, {cpu}, torch {torch.__version__}, load average {load:.2f}"


def format_table(figures: list[Figure], commands: list[list[str]], plan: Plan) -> str:
    header = f"{'figure':<46} {'lstm_sweep':>12} {'yardstick':>12} {'ratio':>7} {'goal':>8}  cmd"
    lines = [header, "-" * len(header)]
    for f in figures:
        cmd = ",".join(f"[{i}]" for i in f.commands)
        lines.append(
            f"{f.name:<46} {_value(f.ours, f.unit):>12} {_value(f.theirs, f.unit):>12}"
            f" {f.ratio:>7.3f} {f.goal:>8}  {cmd}"
        )
        if f.note:
            lines.append(f"{'':<4}({f.note})")
    lines += ["", "commands (each in a fresh working directory):"]
    lines += [f"[{i}] {shell_text(c, plan.overrides)}" for i, c in enumerate(commands)]
    if plan.overrides:
        carried = " ".join(shlex.quote(f"--set={o}") for o in plan.overrides)
        lines.append(f"every command also carries: {carried}")
    return "\n".join(lines)


def _value(value: float, unit: str) -> str:
    if unit == "s":
        return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.1f} s"
    return f"{value:.4g} {unit}".strip()


def run_all(plan: Plan, target: float | None, json_path: Path | None) -> None:
    commands: list[list[str]] = []
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lstm_sweep_bench_") as tmp:
        scratch = Path(tmp)
        figures = per_epoch_figures(plan, scratch, commands)
        figures += sweep_figures(plan, scratch, commands, target)
    minutes = (time.perf_counter() - began) / 60
    print(f"machine: {machine()}")
    print(f"plan: {plan}; the whole benchmark took {minutes:.1f} min\n")
    print(format_table(figures, commands, plan))
    if json_path:
        rows = [f.__dict__ for f in figures]
        shown = [shell_text(c) for c in commands]
        json_path.write_text(
            json.dumps({"machine": machine(), "figures": rows, "commands": shown}, indent=1)
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/bench.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="fewer trials and epochs (~5 min)")
    parser.add_argument(
        "--target", type=float, help="validation loss for the time-to-target figure"
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of sweeps/forecast.yaml in every command",
    )
    sub = parser.add_subparsers(dest="yardstick")
    floor_args = sub.add_parser("floor", help="the bare PyTorch loop alone; prints JSON")
    floor_args.add_argument("--epochs", type=int, default=FULL.epochs)
    floor_args.add_argument("--trainings", type=int, default=FULL.trainings)
    peer_args = sub.add_parser("peer", help="the hand-written sweep alone; prints JSON")
    peer_args.add_argument("--trials", type=int, default=FULL.sweep_trials)
    for yardstick in (floor_args, peer_args):
        yardstick.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a key of sweeps/forecast.yaml, as lstm_sweep.run does",
        )
    args = parser.parse_args(argv)
    if args.yardstick == "floor":
        print(json.dumps(floor(args.set, args.epochs, args.trainings)))
    elif args.yardstick == "peer":
        print(json.dumps(peer(args.set, args.trials)))
    else:
        plan = replace(QUICK if args.quick else FULL, overrides=tuple(args.set))
        run_all(plan, args.target, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
