"""How much of the answer's spread over train.seed is the final retrain's own seed? For each
train.seed: the sweep as shipped, then each of its top settings retrained on training +
validation once per closing-stage seed (train.seed, +1, ...) for the epochs the closing stage
gave it; each retrain's test error, their spread, and the test error of their mean. With
``--replay``, the recommended setting's seed models' own recipes instead (each seed for its
best epoch + 1), replayed on training + validation and averaged: all of them, and the first
three.

    python benchmarks/retrain_noise.py                                 # sunspots, seeds 0-3
    python benchmarks/retrain_noise.py --sweep sweeps/series/nile.yaml --seeds 0 1
    python benchmarks/retrain_noise.py --replay --set closing.seeds=5 --seeds 0 1 2 3 4 5 6 7

The registered model is the retrain with train.seed (or, where it collapsed, the mean of the
seed models): the first column of each line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from mlflow import MlflowClient

from lstm_sweep import metrics as m
from lstm_sweep.config import Config, load_config
from lstm_sweep.evidence import evidence_for
from lstm_sweep.select import with_validation_in_training
from lstm_sweep.tasks import Task, TaskCache, make_task
from lstm_sweep.train import build_model, fit, predict

ROOT = Path(__file__).resolve().parents[1]


def selection(folder: Path, cfg: Config) -> dict:
    """The closing stage's findings of the sweep run in ``folder``."""
    client = MlflowClient(f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}")
    found = client.get_experiment_by_name(cfg.experiment)
    assert found is not None
    (parent,) = client.search_runs([found.experiment_id], f"tags.`{m.ROLE_TAG}` = '{m.ROLE_SWEEP}'")
    path = client.download_artifacts(parent.info.run_id, m.SELECTION_FILE)
    return json.loads(Path(path).read_text())


def retrain_errors(
    cfg: Config, values: dict, recipes: list[tuple[int, int]], metric: str
) -> tuple[list, list, Task]:
    """The setting retrained on training + validation once per (seed, epochs) recipe: each
    retrain's test error (``metric``) and test outputs, and the task they were scored on."""
    cache, outputs, errors = TaskCache(), [], []
    for seed, epochs in recipes:
        run_cfg = cfg.with_values(
            {**values, "train.seed": seed, "train.max_epochs": epochs, "train.patience": epochs}
        )
        task = cache.get(run_cfg)
        model = build_model(task, run_cfg)
        fit(model, make_task(with_validation_in_training(task.data)), run_cfg, restore_best=False)
        output = predict(model.cpu().eval(), task.data.test.x).cpu().numpy()
        errors.append(evidence_for(task).errors(output, "test")[metric])
        outputs.append(output)
    return errors, outputs, task


def mean_error(task: Task, outputs: list, metric: str) -> float:
    """The test error of the retrains' mean output."""
    return evidence_for(task).errors(np.mean(outputs, axis=0), "test")[metric]


def spread_line(name: str, values: list[float]) -> str:
    return (
        f"{name}: median {statistics.median(values):.4g}, max/min"
        f" {max(values) / min(values):.3f} ({', '.join(f'{v:.4g}' for v in values)})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", type=Path, default=ROOT / "sweeps" / "sunspots.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--set", action="append", default=[], help="an override, key=value")
    parser.add_argument("--replay", action="store_true", help="the winner's seed recipes")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as a worker trains
    found_by: dict[str, list[float]] = {"registered": []}
    for seed in args.seeds:
        cfg = load_config(args.sweep, [*args.set, f"train.seed={seed}"])
        metric = "accuracy" if cfg.task == "classification" else "mae"
        seeds = list(range(seed, seed + cfg.closing.seeds))
        with tempfile.TemporaryDirectory(prefix="retrain_noise_") as tmp:
            command = [sys.executable, "-m", "lstm_sweep.run", str(args.sweep.resolve())]
            command += ["--no-progress", *(f"--set={o}" for o in args.set)]
            command += [f"--set=train.seed={seed}"]
            subprocess.run(command, cwd=tmp, check=True, capture_output=True)
            found = selection(Path(tmp), cfg)
        epochs = {row["number"]: row["epochs"] for row in found["spread"]}
        registered = found["final"]["test"][metric]
        found_by["registered"].append(registered)
        print(f"train.seed={seed}: registered {found['final']['kind']}, {registered:.4g}")
        for setting in found["settings"]:
            number, winner = setting["number"], setting["number"] == found["recommended"]
            if args.replay and not winner:
                continue
            recipes = [(s, epochs[number]) for s in seeds]
            if args.replay:
                mine = [r for r in found["seeds"] if r["number"] == number]
                recipes = [(r["seed"], r["best_epoch"] + 1) for r in mine if r["best_epoch"] >= 0]
            errors, outputs, task = retrain_errors(cfg, setting["values"], recipes, metric)
            means = {"their mean": mean_error(task, outputs, metric)}
            if args.replay and len(outputs) > 3:
                means["the first three's"] = mean_error(task, outputs[:3], metric)
            for name, value in means.items():
                if winner:
                    found_by.setdefault(f"{name}, the winner's", []).append(value)
            listed = ", ".join(f"{e:.4g}" for e in errors)
            print(
                f"  #{number}{' (recommended)' if winner else ''}: retrained as {recipes}"
                f" (seed, epochs): {listed} (max/min {max(errors) / min(errors):.3f}); "
                + "; ".join(f"{name} {value:.4g}" for name, value in means.items())
            )
    for name, values in found_by.items():
        print(spread_line(name, values))


if __name__ == "__main__":
    main()
