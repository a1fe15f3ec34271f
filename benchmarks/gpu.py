"""The GPU against the CPU, and workers sharing one GPU: one command, under 8 minutes.

    python benchmarks/gpu.py            # on a CUDA machine: the table for benchmarks/README.md
    python benchmarks/gpu.py --quick    # anywhere, on the CPU: every step, small (tested)
    python benchmarks/gpu.py --json gpu.json

1. Seconds per epoch of one model, on the CPU (torch's default threads, all cores: the fair
   single-model baseline) and on the GPU: CO2 (sweeps/forecast.yaml's own settings) and a
   synthetic series of 120,000 rows and 6 columns (sums of sines, a random walk and noise,
   written to a temporary folder). The median of the epochs after the first, which pays the
   kernels' and the allocator's warm-up. Each epoch ends with a host read of its numbers, so
   its wall includes the GPU's work.
2. Trials per minute on one GPU with 1, 2, 4 and 8 local workers (``--workers K --set
   study.workers_per_device=K --set study.batch=K``): the real command on CO2's sweep for a
   fixed time (``study.timeout``), each on a fresh study; the rate is the trials finished
   (complete or pruned) over the span from the first trial's start to the last one's end,
   read back from the study.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import torch
import yaml

from lstm_sweep.config import Config, load_config
from lstm_sweep.tasks import TaskCache
from lstm_sweep.train import Callback, History, build_model, fit

ROOT = Path(__file__).resolve().parents[1]
CO2 = ROOT / "sweeps" / "forecast.yaml"


@dataclass(frozen=True)
class Plan:
    """How big each measurement is."""

    synthetic_rows: int
    epochs: int  # per-epoch timing: the first is warm-up, the rest are timed
    co2_overrides: tuple[str, ...]
    synthetic_overrides: tuple[str, ...]
    workers: tuple[int, ...]
    seconds: float  # each trials-per-minute measurement runs this long
    trial_overrides: tuple[str, ...]


PLANS = {
    "full": Plan(120_000, 4, (), (), (1, 2, 4, 8), 50.0, ()),
    "quick": Plan(
        2_000,
        2,
        ("model.hidden_size=8",),
        ("model.hidden_size=8", "diagnostics.level=off"),
        (1, 2),
        2.0,
        (
            "data.window=8",
            "model.hidden_size=8",
            "model.num_layers=1",
            "train.max_epochs=3",
            "diagnostics.level=off",
            "tracking.system_metrics_seconds=0",
            "closing.top_k=1",
            "closing.seeds=1",
            "train.device=cpu",
        ),
    ),
}


class EpochClock(Callback):
    """The wall time of every epoch, from the end of the one before."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_fit_start(self, model: torch.nn.Module, history: History) -> None:
        self.ends = [time.perf_counter()]

    def on_epoch_end(self, epoch: int, row: dict[str, float], history: History) -> None:
        self.ends.append(time.perf_counter())

    def per_epoch(self) -> float:
        """The median epoch after the first."""
        return statistics.median(np.diff(self.ends)[1:])


def write_synthetic(folder: Path, rows: int, seed: int = 0) -> Path:
    """A sweep file over a synthetic hourly series: a target and five features, each a sum of
    daily and weekly sines, a slow random walk and noise."""
    generator = np.random.default_rng(seed)
    hours = np.arange(rows)
    columns = {}
    for k, name in enumerate(["target", "f1", "f2", "f3", "f4", "f5"]):
        daily = np.sin(2 * np.pi * (hours / 24 + k / 6))
        weekly = 0.5 * np.sin(2 * np.pi * hours / 168 + k)
        walk = np.cumsum(generator.normal(0, 0.01, rows))
        columns[name] = daily + weekly + walk + generator.normal(0, 0.1, rows)
    table = pd.DataFrame({"time": pd.date_range("2020-01-01", periods=rows, freq="h"), **columns})
    table.to_csv(folder / "synthetic.csv", index=False)
    sweep = {
        "experiment": "gpu-synthetic",
        "data": {
            "path": "synthetic.csv",
            "time_column": "time",
            "target": "target",
            "features": ["f1", "f2", "f3", "f4", "f5"],
            "window": 48,
            "horizon": 6,
            "season": 24,
        },
        "model": {"num_layers": 2, "hidden_size": 128},
        "train": {"batch_size": 256},
    }
    path = folder / "synthetic.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def seconds_per_epoch(cfg: Config, device: str) -> float:
    cfg = cfg.with_values({"train.device": device, "train.patience": cfg.train.max_epochs})
    task = TaskCache().get(cfg)
    clock = EpochClock()
    fit(build_model(task, cfg), task, cfg, [clock])
    return clock.per_epoch()


def trials_per_minute(sweep: Path, folder: Path, workers: int, plan: Plan) -> float:
    """The real command with ``workers`` workers on one device for ``plan.seconds``."""
    name = f"rate-{workers}"
    overrides = [
        *plan.trial_overrides,
        f"study.name={name}",
        "study.n_trials=100000",
        f"study.timeout={plan.seconds}",
        f"study.workers_per_device={workers}",
        f"study.batch={workers}",  # every worker trains at once
        "closing.final_model=false",
    ]
    command = [sys.executable, "-m", "lstm_sweep.run", str(sweep), "--workers", str(workers)]
    command += ["--no-progress", *(f"--set={o}" for o in overrides)]
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    one_gpu = {**os.environ, "CUDA_VISIBLE_DEVICES": first}  # every worker on the same device
    subprocess.run(command, cwd=folder, check=True, capture_output=True, env=one_gpu)
    storage = f"sqlite:///{folder / 'mlruns' / 'optuna.db'}"
    study = optuna.load_study(study_name=name, storage=storage)
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    done = study.get_trials(deepcopy=False, states=states)
    if not done:  # the timeout ends the study between trials: the first always finishes
        return float("nan")
    ends = [t.datetime_complete for t in done if t.datetime_complete is not None]
    starts = [t.datetime_start for t in done if t.datetime_start is not None]
    span = max(ends) - min(starts)
    return len(done) / (span.total_seconds() / 60)


def measure(plan: Plan, device: str) -> dict[str, Any]:
    devices = ["cpu", device] if device != "cpu" else ["cpu"]
    epoch_rows: list[dict[str, Any]] = []
    rates: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="gpu_bench_") as tmp:
        folder = Path(tmp)
        synthetic = write_synthetic(folder, plan.synthetic_rows)
        epochs = f"train.max_epochs={plan.epochs}"
        series = {
            "co2": load_config(CO2, [epochs, *plan.co2_overrides]),
            f"synthetic ({plan.synthetic_rows:,} rows)": load_config(
                synthetic, [epochs, *plan.synthetic_overrides]
            ),
        }
        for name, cfg in series.items():
            row: dict[str, Any] = {"series": name}
            for each in devices:
                row[f"{each} s/epoch"] = seconds_per_epoch(cfg, each)
            if device != "cpu":
                row["gpu/cpu"] = row[f"{device} s/epoch"] / row["cpu s/epoch"]
            epoch_rows.append(row)
        for workers in plan.workers:
            rate = trials_per_minute(CO2, folder, workers, plan)
            rates.append({"workers": workers, "trials/min": rate})
    one = rates[0]["trials/min"]
    for row in rates:
        row["x one worker"] = row["trials/min"] / one
    return {"device": describe_device(device), "epochs": epoch_rows, "rates": rates}


def describe_device(device: str) -> str:
    if device == "cpu":
        return f"CPU only ({torch.get_num_threads()} torch threads)"
    return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small, on the CPU: a smoke test")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if not args.quick and not torch.cuda.is_available():
        print("error: no CUDA device here; --quick runs every step on the CPU", file=sys.stderr)
        return 2
    device = "cpu" if args.quick else "cuda"
    started = time.monotonic()
    found = measure(PLANS["quick" if args.quick else "full"], device)
    found["seconds"] = time.monotonic() - started
    print(f"{found['device']}; {found['seconds']:.0f} s")
    print(pd.DataFrame(found["epochs"]).to_markdown(index=False, floatfmt=".3g"))
    print()
    print(pd.DataFrame(found["rates"]).to_markdown(index=False, floatfmt=".3g"))
    if args.json:
        args.json.write_text(json.dumps(found, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
