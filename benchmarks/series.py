"""The recommended LSTM beside every baseline on the shipped series: sweeps/series/RESULTS.md.

    python benchmarks/series.py                                   # every file in sweeps/series/
    python benchmarks/series.py sweeps/series/nile.yaml --set study.n_trials=10

Each sweep runs once, as shipped, in a fresh folder (the search is the same with any number of
workers). Read back from the sweep's run: the test MAE of the registered model and of every
baseline, and the summary's first line (what the user reads first). Prints one Markdown row per
series: the LSTM, each baseline, the best baseline and by how much it trails or leads.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from mlflow import MlflowClient

from lstm_sweep import metrics as m
from lstm_sweep.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def run_series(sweep: Path, overrides: list[str]) -> tuple[dict[str, float], str]:
    """The sweep in a fresh folder: test MAE by method (the LSTM as ``lstm``), first line."""
    cfg = load_config(sweep, overrides)
    with tempfile.TemporaryDirectory(prefix="series_") as tmp:
        argv = [sys.executable, "-m", "lstm_sweep.run", str(sweep), "--no-progress"]
        argv += [f"--set={o}" for o in overrides]
        done = subprocess.run(argv, cwd=tmp, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{sweep} exited {done.returncode}:\n{done.stderr[-3000:]}")
        client = MlflowClient(f"sqlite:///{Path(tmp) / 'mlruns' / 'mlflow.db'}")
        found = client.get_experiment_by_name(cfg.experiment)
        assert found is not None
        role = f"tags.`{m.ROLE_TAG}` = '{m.ROLE_SWEEP}'"
        (parent,) = client.search_runs([found.experiment_id], role)
        metrics = parent.data.metrics
        methods = ["lstm", *m.FORECAST_BASELINES]
        errors = {
            k: metrics[m.baseline(k, "test", "mae")]
            for k in methods
            if m.baseline(k, "test", "mae") in metrics
        }
        first = next(line for line in done.stdout.splitlines() if line.strip())
        return errors, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweeps", type=Path, nargs="*")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    args = parser.parse_args()
    sweeps = args.sweeps or sorted((ROOT / "sweeps" / "series").glob("*.yaml"))
    columns = ["lstm", *m.FORECAST_BASELINES]
    print(f"| series | {' | '.join(columns)} | best baseline, against the LSTM | first line |")
    print(f"|{'---|' * (len(columns) + 3)}")
    for sweep in sweeps:
        errors, first = run_series(sweep.resolve(), args.overrides)
        baselines = {k: v for k, v in errors.items() if k != "lstm"}
        best = min(baselines, key=baselines.__getitem__)
        lead = errors["lstm"] / baselines[best] - 1
        cells = " | ".join(f"{errors[k]:.4g}" if k in errors else "-" for k in columns)
        print(f"| {sweep.stem} | {cells} | {best} ({lead:+.0%}) | {first} |", flush=True)


if __name__ == "__main__":
    main()
