"""Which final model to register by default: the winner retrained on training + validation, or
the mean of its seed models? The same studies, both answers, over seeds.

    python benchmarks/final_model.py                          # sunspots, train.seed 0-3
    python benchmarks/final_model.py --sweep sweeps/series/nile.yaml --seeds 0 1 2 3

For each train.seed the sweep runs once with one worker (so the study is the same whatever else
runs) and ``closing.ensemble=false``, then again with ``closing.ensemble=true``: the second run
finds the study complete and runs only a new closing stage, which reuses every re-evaluation, so
the two final models come from the very same trials and seed models. Each one's test errors are
read back from the sweep's parent run. Prints, per kind, each seed's test MAE (or accuracy), the
median and the worst over the best.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from mlflow import MlflowClient

from lstm_sweep import metrics as m
from lstm_sweep.config import load_config

ROOT = Path(__file__).resolve().parents[1]
KINDS = {"retrained": "false", "ensemble": "true"}


def final_error(folder: Path, experiment: str, metric: str) -> float:
    client = MlflowClient(f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}")
    found = client.get_experiment_by_name(experiment)
    assert found is not None
    (parent,) = client.search_runs([found.experiment_id], f"tags.`{m.ROLE_TAG}` = '{m.ROLE_SWEEP}'")
    return float(parent.data.metrics[m.baseline("lstm", "test", metric)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", type=Path, default=ROOT / "sweeps" / "sunspots.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    args = parser.parse_args()
    cfg = load_config(args.sweep)
    metric = "accuracy" if cfg.task == "classification" else "mae"
    errors: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(prefix="final_model_") as tmp:
            folder = Path(tmp)
            for kind, ensemble in KINDS.items():
                overrides = [f"train.seed={seed}", f"closing.ensemble={ensemble}"]
                command = [sys.executable, "-m", "lstm_sweep.run", str(args.sweep.resolve())]
                command += ["--workers", "1", "--no-progress"]
                command += [f"--set={o}" for o in overrides]
                subprocess.run(command, cwd=folder, check=True, capture_output=True)
                errors[kind].append(final_error(folder, cfg.experiment, metric))
        print(f"train.seed={seed}: " + ", ".join(f"{k} {v[-1]:.4g}" for k, v in errors.items()))
    for kind, values in errors.items():
        spread = max(values) / min(values) if metric == "mae" else min(values) / max(values)
        print(
            f"{kind}: test {metric} median {statistics.median(values):.4g},"
            f" {'max/min' if metric == 'mae' else 'min/max'} {spread:.3g}"
            f" ({', '.join(f'{v:.4g}' for v in values)})"
        )


if __name__ == "__main__":
    main()
