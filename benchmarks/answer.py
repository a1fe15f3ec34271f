"""The answer over seeds: the default command's best value and recommended model, run by run,
beside the hand-written peer (benchmarks/bench.py's) at the same trial count.

    python benchmarks/answer.py                                   # sunspots, train.seed 0-3
    python benchmarks/answer.py --variant one=study.batch=1 --variant four=study.batch=4
    python benchmarks/answer.py --sweep sweeps/forecast.yaml --set study.n_trials=10 --no-peer

Each variant (a name and its overrides; by default the sweep file as shipped) runs the real
command once per train.seed in a fresh folder, with the default workers unless --workers says
otherwise, and is read back from its own stores: the study's best value, the recommended model's
test error (the registered model's, from the sweep's run), the trial values (so two variants
that should give one study can be compared), the wall time and the closing stage's seconds and
trainings. The peer runs once per seed with
torch's default threads and scores its best trial's model on the test part (the error the
default command's recommendation has to match). Prints one line per run, then per variant the
median and max/min of each figure and its ratios to the peer's, seed by seed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna
from mlflow import MlflowClient

from lstm_sweep import metrics as m
from lstm_sweep.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def command_run(sweep: Path, overrides: list[str], workers: int | None) -> dict[str, Any]:
    """The real command in a fresh folder; its best value, test error, trial values, wall."""
    cfg = load_config(sweep, overrides)
    metric = "accuracy" if cfg.task == "classification" else "mae"
    with tempfile.TemporaryDirectory(prefix="answer_") as tmp:
        folder = Path(tmp)
        argv = [sys.executable, "-m", "lstm_sweep.run", str(sweep), "--no-progress"]
        argv += ["--workers", str(workers)] if workers else []
        argv += [f"--set={o}" for o in overrides]
        started = time.monotonic()
        done = subprocess.run(argv, cwd=folder, capture_output=True, text=True)
        wall = time.monotonic() - started
        if done.returncode:
            raise SystemExit(f"{' '.join(argv)} exited {done.returncode}:\n{done.stderr[-3000:]}")
        study = optuna.load_study(
            study_name=cfg.study_name, storage=f"sqlite:///{folder / 'mlruns' / 'optuna.db'}"
        )
        client = MlflowClient(f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}")
        found = client.get_experiment_by_name(cfg.experiment)
        assert found is not None
        role = f"tags.`{m.ROLE_TAG}` = '{m.ROLE_SWEEP}'"
        (parent,) = client.search_runs([found.experiment_id], role)
        return {
            "best_value": study.best_value,
            "test": float(parent.data.metrics[m.baseline("lstm", "test", metric)]),
            "values": [t.value for t in study.trials],
            "wall": wall,
            "closing": parent.data.metrics["closing_seconds"],
            "trainings": int(parent.data.metrics["closing_trainings"]),
        }


def peer_run(sweep: Path, overrides: list[str]) -> dict[str, Any]:
    """benchmarks/bench.py's hand-written peer, torch's default threads, in a fresh folder."""
    with tempfile.TemporaryDirectory(prefix="answer_peer_") as tmp:
        argv = [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "peer", str(sweep)]
        argv += ["--threads", "0", *[f"--set={o}" for o in overrides]]
        started = time.monotonic()
        done = subprocess.run(argv, cwd=tmp, capture_output=True, text=True, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        return {
            "best_value": result["best_value"],
            "test": result["test_mae"],
            "wall": time.monotonic() - started,
        }


def spread(values: list[float]) -> str:
    low, high = min(values), max(values)
    ratio = high / low if low > 0 else float("nan")
    return f"median {statistics.median(values):.4g}, max/min {ratio:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", type=Path, default=ROOT / "sweeps" / "sunspots.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    parser.add_argument(
        "--variant", action="append", default=[], metavar="NAME=K=V,K=V", help="repeatable"
    )
    parser.add_argument("--workers", type=int, help="default: the command's own default")
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()
    sweep = args.sweep.resolve()
    variants: dict[str, list[str]] = {"shipped": []}
    if args.variant:
        variants = {}
        for text in args.variant:
            name, _, keys = text.partition("=")
            variants[name] = [k for k in keys.split(",") if k]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    peers: list[dict[str, Any]] = []
    for seed in args.seeds:
        overrides = [*args.overrides, f"train.seed={seed}"]
        if not args.no_peer:
            peer = peer_run(sweep, overrides)
            peers.append(peer)
            print(
                f"seed {seed} peer: best {peer['best_value']:.4g}, its test {peer['test']:.4g},"
                f" {peer['wall']:.0f} s",
                flush=True,
            )
        for name, keys in variants.items():
            ran = command_run(sweep, [*overrides, *keys], args.workers)
            runs[name].append(ran)
            print(
                f"seed {seed} {name}: best {ran['best_value']:.4g}, test {ran['test']:.4g},"
                f" {ran['wall']:.0f} s, of which the closing stage {ran['closing']:.0f} s"
                f" ({ran['trainings']} trainings)",
                flush=True,
            )
    for name, done in runs.items():
        print(f"{name}: best value {spread([r['best_value'] for r in done])}")
        print(f"{name}: test error {spread([r['test'] for r in done])}")
        print(f"{name}: wall {spread([r['wall'] for r in done])}")
        print(f"{name}: closing stage {spread([r['closing'] for r in done])}")
        if peers:
            ratios = [r["best_value"] / p["best_value"] for r, p in zip(done, peers, strict=True)]
            walls = [r["wall"] / p["wall"] for r, p in zip(done, peers, strict=True)]
            print(f"{name}: best value / peer's {[round(x, 3) for x in ratios]}, {spread(ratios)}")
            print(f"{name}: wall / peer's {spread(walls)}")
            tests = [r["test"] / p["test"] for r, p in zip(done, peers, strict=True)]
            print(f"{name}: test error / peer's best trial's {spread(tests)}")
    if peers:
        print(f"peer: best value {spread([p['best_value'] for p in peers])}")
        print(f"peer: its best trial's test error {spread([p['test'] for p in peers])}")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "peer": peers}, indent=1))


if __name__ == "__main__":
    main()
