"""Where a real sweep spends its time: py-spy samples ``python -m lstm_sweep.run`` and this
script sorts the main thread's samples into what is training and what is not.

    pip install -e '.[bench]'                                 # py-spy
    python benchmarks/where_time_goes.py                      # sweeps/sunspots.yaml as shipped
    python benchmarks/where_time_goes.py --sweep sweeps/forecast.yaml --trials 12
    python benchmarks/where_time_goes.py --set diagnostics.level=off
    python benchmarks/where_time_goes.py --raw profile.txt    # sort an existing py-spy raw file

The sweep runs with ``--workers 1``: py-spy samples one process, and with one worker that
process runs every trial, the closing stage and the report. Samples include idle time
(``--idle``): a wait on SQLite or a sleep costs wall time too.
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
SWEEP = ROOT / "sweeps" / "sunspots.yaml"  # the small series: where fixed costs show
RATE = 50  # samples per second

# (category, a frame that puts a sample in it), first match wins; frames read
# "qualified.function (file)". The closing stage and the report come first: they call fit and
# predict too, and belong to the stage, not to the trials.
CATEGORIES = [
    ("imports", "_find_and_load ("),
    ("closing stage (re-evaluation, final model)", "(lstm_sweep/select.py)"),
    ("report (reads the stores, renders)", "(lstm_sweep/report/"),
    ("start-up (config, data, stores, parent run)", "prepare (lstm_sweep/sweep.py)"),
    ("start-up (config, data, stores, parent run)", "start (lstm_sweep/sweep.py)"),
    ("MLflow calls inside fit (run recorder)", "RunRecorder.on_epoch_end"),
    ("Optuna report/prune inside fit", "Pruning.on_epoch_end"),
    ("per-epoch eval passes (val, train subsample)", "predict (lstm_sweep/train.py)"),
    ("per-epoch eval passes (val, train subsample)", "predict_with_states (lstm_sweep/train.py)"),
    ("diagnostics (grad groups, weights, hidden, verdict)", "(lstm_sweep/diagnostics.py)"),
    ("training steps (forward, backward, clip, step)", "fit (lstm_sweep/train.py)"),
    ("trial files (weights, snapshots, upload)", "write_files (lstm_sweep/record.py)"),
    ("trial files (weights, snapshots, upload)", "save_weights (lstm_sweep/record.py)"),
    ("trial files (weights, snapshots, upload)", "log_artifacts (lstm_sweep/tracking.py)"),
    ("MLflow store (runs, params, metrics, tags)", "mlflow/"),
    ("Optuna storage, sampler, lock", "optuna/"),
    ("Optuna storage, sampler, lock", "StudyLock."),
    ("config and data loading", "load_config ("),
    ("config and data loading", "(lstm_sweep/data.py)"),
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


def record(sweep_file: Path, trials: int | None, overrides: list[str], raw: Path) -> None:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        sys.exit("py-spy not found: pip install py-spy")
    sweep = [
        sys.executable,
        "-m",
        "lstm_sweep.run",
        str(sweep_file.resolve()),
        "--no-progress",
        "--workers",
        "1",
        *([f"--set=study.n_trials={trials}"] if trials else []),
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
    parser.add_argument("--sweep", type=Path, default=SWEEP, help="the sweep file to profile")
    parser.add_argument("--trials", type=int, help="trials of the sweep (default: its own)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--raw", type=Path, help="sort this py-spy raw file instead of recording")
    parser.add_argument("--keep", type=Path, help="keep the recorded raw file here")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    raw = args.raw
    if raw is None:
        raw = args.keep or Path(tempfile.mkdtemp(prefix="lstm_sweep_profile_")) / "profile.txt"
        record(args.sweep, args.trials, args.set, raw)
    print(summarise(read_raw(raw), args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
