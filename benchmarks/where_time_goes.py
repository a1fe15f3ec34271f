"""Where a real sweep spends its time: py-spy samples ``python -m lstm_sweep.run`` and this
script sorts the main thread's samples into what is training and what is not.

    pip install py-spy
    python benchmarks/where_time_goes.py                      # 12 trials of the default sweep
    python benchmarks/where_time_goes.py --trials 30 --set diagnostics.level=off
    python benchmarks/where_time_goes.py --raw profile.txt    # sort an existing py-spy raw file

Samples include idle time (``--idle``): a wait on SQLite or a sleep costs wall time too.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "sweeps" / "forecast.yaml"
RATE = 50  # samples per second

# (category, a frame that puts a sample in it), first match wins; frames read "function (file)".
CATEGORIES = [
    ("imports", "_find_and_load ("),
    ("per-epoch eval passes (val, train subsample)", "evaluate (lstm_sweep/train.py)"),
    ("per-epoch eval passes (val, train subsample)", "predict (lstm_sweep/train.py)"),
    ("diagnostics in fit (grad groups, weights, hidden)", "lstm_sweep/diagnostics.py)"),
    ("diagnostics in fit (grad groups, weights, hidden)", "layer_outputs (lstm_sweep/model.py)"),
    ("MLflow calls inside fit (epoch logger)", "EpochLogger"),
    ("Optuna report/prune inside fit", "PruneCallback"),
    ("training steps (forward, backward, clip, step)", "fit (lstm_sweep/train.py)"),
    ("trial artifacts (plots, CSV, upload)", "log_trial_artifacts"),
    ("closing report (re-evaluation, final model)", "lstm_sweep/report.py)"),
    ("MLflow store (runs, params, metrics, tags)", "mlflow/"),
    ("Optuna storage, sampler, lock", "optuna/"),
    ("config and data loading", "load_config ("),
    ("config and data loading", "lstm_sweep/data.py)"),
]


def frames(stack: str) -> list[str]:
    return [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]


def read_raw(path: Path) -> list[tuple[list[str], int]]:
    """The main thread's samples of a py-spy raw (collapsed) file: (frames, count)."""
    samples = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack.startswith("_run_module_as_main"):  # other threads: heartbeats, queues
            samples.append((frames(stack), int(count)))
    return samples


def category(stack: list[str]) -> str:
    for name, marker in CATEGORIES:
        if any(marker in frame for frame in stack):
            return name
    return "other"


def summarise(samples: list[tuple[list[str], int]], top: int) -> str:
    total = sum(n for _, n in samples)
    by_category: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    for stack, n in samples:
        by_category[category(stack)] += n
        for frame in set(stack):
            if "lstm_sweep/" in frame:
                inclusive[frame] += n
        leaves[stack[-1]] += n

    def rows(counter: Counter[str], limit: int) -> list[str]:
        return [
            f"  {n / total:6.1%} {n / RATE:8.1f} s  {name[:110]}"
            for name, n in counter.most_common(limit)
        ]

    return "\n".join(
        [
            f"main thread: {total / RATE:.1f} s sampled at {RATE} Hz",
            "",
            "by category (first match wins):",
            *rows(by_category, len(by_category)),
            "",
            f"top {top} lstm_sweep functions, inclusive:",
            *rows(inclusive, top),
            "",
            f"top {top} innermost frames (self time):",
            *rows(leaves, top),
        ]
    )


def record(trials: int, overrides: list[str], raw: Path) -> None:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        sys.exit("py-spy not found: pip install py-spy")
    sweep = [
        sys.executable,
        "-m",
        "lstm_sweep.run",
        str(SWEEP),
        "--no-progress",
        f"--set=study.n_trials={trials}",
        *(f"--set={o}" for o in overrides),
    ]
    with tempfile.TemporaryDirectory(prefix="lstm_sweep_profile_") as folder:  # fresh stores
        subprocess.run(
            [
                py_spy,
                "record",
                "--idle",
                "--rate",
                str(RATE),
                "--format",
                "raw",
                "--output",
                str(raw),
                "--",
                *sweep,
            ],
            cwd=folder,
            check=True,
            stdout=subprocess.DEVNULL,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/where_time_goes.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--trials", type=int, default=12, help="trials of the default sweep")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--raw", type=Path, help="sort this py-spy raw file instead of recording")
    parser.add_argument("--keep", type=Path, help="keep the recorded raw file here")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    raw = args.raw
    if raw is None:
        raw = args.keep or Path(tempfile.mkdtemp(prefix="lstm_sweep_profile_")) / "profile.txt"
        record(args.trials, args.set, raw)
    print(summarise(read_raw(raw), args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
