"""How much of the answer's spread over train.seed is the final retrain's own seed? For each
train.seed: the sweep as shipped, then each of its top settings retrained on training +
validation once per closing-stage seed (train.seed, +1, ...) for the epochs the closing stage
gave it; each retrain's test error, their spread, and the test error of their mean.

    python benchmarks/retrain_noise.py                                 # sunspots, seeds 0-3
    python benchmarks/retrain_noise.py --sweep sweeps/series/nile.yaml --seeds 0 1

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
from lstm_sweep.tasks import TaskCache, make_task
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
    cfg: Config, values: dict, epochs: int, seeds: list[int], metric: str
) -> tuple[list, float]:
    """The setting retrained on training + validation with each seed: each one's test error
    (``metric``), and that of their mean."""
    cache, outputs, errors = TaskCache(), [], []
    for seed in seeds:
        run_cfg = cfg.with_values(
            {**values, "train.seed": seed, "train.max_epochs": epochs, "train.patience": epochs}
        )
        task = cache.get(run_cfg)
        model = build_model(task, run_cfg)
        fit(model, make_task(with_validation_in_training(task.data)), run_cfg, restore_best=False)
        output = predict(model.cpu().eval(), task.data.test.x).cpu().numpy()
        errors.append(evidence_for(task).errors(output, "test")[metric])
        outputs.append(output)
    return errors, evidence_for(task).errors(np.mean(outputs, axis=0), "test")[metric]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", type=Path, default=ROOT / "sweeps" / "sunspots.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    args = parser.parse_args()
    torch.set_num_threads(1)  # as a worker trains
    registered, means = [], []
    for seed in args.seeds:
        cfg = load_config(args.sweep, [f"train.seed={seed}"])
        metric = "accuracy" if cfg.task == "classification" else "mae"
        seeds = list(range(seed, seed + cfg.closing.seeds))
        with tempfile.TemporaryDirectory(prefix="retrain_noise_") as tmp:
            command = [sys.executable, "-m", "lstm_sweep.run", str(args.sweep.resolve())]
            command += ["--no-progress", f"--set=train.seed={seed}"]
            subprocess.run(command, cwd=tmp, check=True, capture_output=True)
            found = selection(Path(tmp), cfg)
        epochs = {row["number"]: row["epochs"] for row in found["spread"]}
        registered.append(found["final"]["test"][metric])
        print(f"train.seed={seed}: registered {found['final']['kind']}, {registered[-1]:.4g}")
        for setting in found["settings"]:
            number = setting["number"]
            errors, mean = retrain_errors(cfg, setting["values"], epochs[number], seeds, metric)
            winner = number == found["recommended"]
            if winner:
                means.append(mean)
            listed = ", ".join(f"{e:.4g}" for e in errors)
            print(
                f"  #{number}{' (recommended)' if winner else ''}: retrained with seeds {seeds}:"
                f" {listed} (max/min {max(errors) / min(errors):.3f}); their mean {mean:.4g}"
            )
    for name, values in (("registered", registered), ("mean of the winner's retrains", means)):
        print(
            f"{name}: median {statistics.median(values):.4g}, max/min"
            f" {max(values) / min(values):.3f} ({', '.join(f'{v:.4g}' for v in values)})"
        )


if __name__ == "__main__":
    main()
