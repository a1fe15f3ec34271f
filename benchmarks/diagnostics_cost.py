"""What each diagnostics level costs per epoch, inside ``fit()``: the same model trained at
levels off, basic and full in turn, in one process (one torch thread, as a worker trains), the
order reversed every round; each level's seconds per epoch over off's of the same round, the
median over the rounds (the same code runs several per cent faster or slower from one minute
to the next here, so only ratios within a round are worth comparing).

    python benchmarks/diagnostics_cost.py                        # sunspots as shipped
    python benchmarks/diagnostics_cost.py --sweep sweeps/forecast.yaml --epochs 5 --rounds 6
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from lstm_sweep.config import load_config
from lstm_sweep.tasks import TaskCache
from lstm_sweep.train import build_model, fit

ROOT = Path(__file__).resolve().parents[1]
LEVELS = ("off", "basic", "full")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", type=Path, default=ROOT / "sweeps" / "sunspots.yaml")
    parser.add_argument("--epochs", type=int, default=20, help="per training")
    parser.add_argument("--rounds", type=int, default=50, help="timed rounds (after a warm-up)")
    parser.add_argument("--set", action="append", default=[], help="an override, key=value")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cache = TaskCache()
    per_epoch: dict[str, list[float]] = {level: [] for level in LEVELS}
    for index in range(args.rounds + 1):
        for level in LEVELS if index % 2 else LEVELS[::-1]:
            overrides = [
                f"diagnostics.level={level}",
                f"train.max_epochs={args.epochs}",
                f"train.patience={args.epochs}",  # every training runs all its epochs
                *args.set,
            ]
            cfg = load_config(args.sweep, overrides)
            task = cache.get(cfg)
            history = fit(build_model(task, cfg), task, cfg)
            if index:  # the first round warms up
                per_epoch[level].append(history.seconds / len(history.rows))
    for level, seconds in per_epoch.items():
        ratios = [s / off for s, off in zip(seconds, per_epoch["off"], strict=True)]
        print(
            f"{level}: {statistics.median(seconds) * 1e3:.2f} ms per epoch,"
            f" {statistics.median(ratios):.3f} x off (median of {len(ratios)} rounds)"
        )


if __name__ == "__main__":
    main()
