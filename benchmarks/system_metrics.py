"""What MLflow's system metrics cost a trained run: the same training with them off and on, side
by side in one process.

    python benchmarks/system_metrics.py                          # sunspots, 20 pairs
    python benchmarks/system_metrics.py --sweep sweeps/forecast.yaml --pairs 6 --epochs 5

Each pair trains the sweep file's own settings (same seed, so the same work) twice inside a
nested run of a fresh local store, ``tracking.system_metrics_seconds`` 0 and the value given
(default 1), the order alternating from pair to pair; a run's wall is timed from opening to
closing it, the monitor's start and stop included. Separate sweeps would compare processes
whose trial walls differ by 10 % from one run to the next; pairs in one process see the cost
itself. A run's wall still varies by tens of milliseconds, so the fixed cost (the monitor's
start and stop, its last samples) is also timed alone, on pairs of runs that train nothing.
Prints the median wall of each side, the median of the pairs' differences, the fixed cost, and
both as a share of the median wall.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lstm_sweep import metrics as m
from lstm_sweep.config import load_config
from lstm_sweep.tasks import TaskCache
from lstm_sweep.tracking import Tracker
from lstm_sweep.train import build_model, fit

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", type=Path, default=ROOT / "sweeps" / "sunspots.yaml")
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=None, help="default: the sweep file's")
    parser.add_argument("--seconds", type=float, default=1.0, help="the sampling interval on")
    args = parser.parse_args()
    overrides = [f"train.max_epochs={args.epochs}"] if args.epochs else []
    cfg = load_config(args.sweep, [*overrides, "train.device=cpu"])
    task = TaskCache().get(cfg)
    torch.set_num_threads(1)  # as every worker trains
    with tempfile.TemporaryDirectory(prefix="system_metrics_") as tmp:
        os.chdir(tmp)  # the default local stores, under ./mlruns
        tracker = Tracker(None, "system-metrics-bench")
        parent = tracker.open_parent("system-metrics-bench", {})

        def pairs(count: int, train: bool) -> tuple[list[float], list[float]]:
            walls: dict[float, list[float]] = {0.0: [], args.seconds: []}
            tags = {m.ROLE_TAG: m.ROLE_TRIAL, m.TRIAL_TAG: 0}
            for pair in range(count + 1):  # the first pair warms up and is not counted
                for seconds in list(walls) if pair % 2 else list(walls)[::-1]:
                    started = time.perf_counter()
                    with tracker.child_run(parent, "run", tags, {}, 10.0, None, seconds) as run:
                        if train:
                            fit(build_model(task, cfg), task, cfg, [run])
                    if pair:
                        walls[seconds].append(time.perf_counter() - started)
            return walls[0.0], walls[args.seconds]

        off, on = pairs(args.pairs, train=True)
        empty_off, empty_on = pairs(args.pairs, train=False)
    differences = [b - a for a, b in zip(off, on, strict=True)]
    extra = statistics.median(differences)
    low, _, high = statistics.quantiles(differences, n=4)
    fixed = statistics.median(b - a for a, b in zip(empty_off, empty_on, strict=True))
    typical = statistics.median(off)
    print(f"{args.sweep.name}: {args.pairs} pairs, {cfg.train.max_epochs} epochs a run")
    print(f"median run wall: off {typical:.3f} s, on {statistics.median(on):.3f} s")
    print(
        f"median extra per run with system metrics every {args.seconds:g} s:"
        f" {1000 * extra:.1f} ms, {extra / typical:.1%} of a run (quartiles of the pairs'"
        f" differences: {1000 * low:.1f} to {1000 * high:.1f} ms)"
    )
    print(
        f"fixed cost, timed on runs that train nothing: {1000 * fixed:.1f} ms,"
        f" {fixed / typical:.1%} of a run"
    )


if __name__ == "__main__":
    main()
