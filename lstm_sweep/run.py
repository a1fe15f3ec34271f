"""The command line: ``python -m lstm_sweep.run SWEEP.yaml [--set key=value ...]``.

Parse, validate, then wire the pieces: data once, the tracker's parent run, the Optuna study and
its workers, then the report. Everything that can be wrong with the input is found before the
first run or trial exists, and reported as one line with exit status 2.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time

from tqdm import tqdm

from lstm_sweep.config import ConfigError
from lstm_sweep.report import finish
from lstm_sweep.study import ProgressCallback, counted_trials
from lstm_sweep.sweep import GracefulStop, Sweep, prepare, start, work, worker_process
from lstm_sweep.tracking import TrackingUnavailable

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
RESUME_HINT = "every finished trial is kept: run the same command again to resume"

EPILOG = """\
sweep file sections (see sweeps/forecast.yaml for every key with a comment):
  experiment   MLflow experiment name (and default study name)
  data         path, time_column, target, features, window, horizon, split, scaler,
               missing, transform, season
  model        num_layers, hidden_size, dropout, head_dropout
  train        max_epochs, batch_size, learning_rate, weight_decay, optimizer, patience,
               min_delta, grad_clip, seed, device
  search       dotted key -> {type: float|int|categorical, low, high, log, step, choices}
  study        name, n_trials, timeout, sampler, n_startup_trials, pruner, storage,
               direction, workers
  tracking     uri, flush_seconds
  diagnostics  level (full|basic|off), eval_subsample, hidden_subsample, k_worst,
               saturation, dead_std, verdict

examples:
  python -m lstm_sweep.run sweeps/forecast.yaml
  python -m lstm_sweep.run sweeps/quick.yaml --set study.n_trials=5 --set train.max_epochs=3
  python -m lstm_sweep.run sweeps/forecast.yaml --workers 2
  python -m lstm_sweep.report sweeps/forecast.yaml   # the report of a finished study again

A rerun of the same command resumes the study: it completes only the trials that are missing.
The same command on several hosts, with study.storage and tracking.uri on shared servers,
cooperates on one study.
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lstm_sweep.run",
        description="Search LSTM regularisation settings with Optuna; track every trial in MLflow.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("sweep", help="the sweep's YAML file")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, value typed as YAML (repeatable): --set study.n_trials=5",
    )
    parser.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="worker processes on this machine (overrides study.workers)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def run_workers(sweep: Sweep, parent_id: str, bar: tqdm) -> None:
    """Spawn study.workers processes on the study and follow their progress."""
    context = multiprocessing.get_context("spawn")  # a clean interpreter: no forked torch state
    processes = [
        context.Process(target=worker_process, args=(sweep.path, sweep.overrides, parent_id))
        for _ in range(sweep.cfg.study.workers)
    ]
    for process in processes:
        process.start()
    with GracefulStop(quiet=True) as stop:  # the workers get the same Ctrl-C and stop cleanly
        while any(p.is_alive() for p in processes):
            bar.update(counted_trials(sweep.study) - bar.n)
            time.sleep(1.0)
        for process in processes:
            process.join()
    bar.update(counted_trials(sweep.study) - bar.n)
    if stop.requested or any(p.exitcode == EXIT_INTERRUPTED for p in processes):
        raise KeyboardInterrupt
    lost = [p.exitcode for p in processes if p.exitcode]
    counted, wanted = counted_trials(sweep.study), sweep.cfg.study.n_trials
    if lost and counted < wanted:
        raise SweepIncomplete(
            f"{len(lost)} of {len(processes)} workers exited with codes {lost} and the study"
            f" holds {counted} of {wanted} trials"
        )
    if lost:  # e.g. a killed worker: the others retried its trial, the sweep is whole
        print(
            f"warning: {len(lost)} worker(s) lost (exit codes {lost});"
            " their trials were retried by the others",
            file=sys.stderr,
        )


class SweepIncomplete(RuntimeError):
    """Workers stopped before the study held n_trials (all of them crashed or were killed)."""


def run_sweep(sweep: Sweep, progress: bool = True) -> str:
    """Run the missing trials on study.workers workers, then report; returns the summary."""
    cfg, study = sweep.cfg, sweep.study
    parent_id = start(sweep)
    bar = tqdm(
        total=cfg.study.n_trials,
        initial=counted_trials(study),
        desc=cfg.study_name,
        unit="trial",
        disable=not progress,
        file=sys.stderr,
    )
    try:
        if cfg.study.workers == 1:
            with GracefulStop() as stop:
                work(sweep, parent_id, stop, [ProgressCallback(bar)])
        else:
            run_workers(sweep, parent_id, bar)
    except KeyboardInterrupt:
        sweep.tracker.finish(parent_id, "FAIL", {"failure_reason": "interrupted by the user"})
        raise
    except SweepIncomplete as exc:
        sweep.tracker.finish(parent_id, "FAIL", {"failure_reason": str(exc)})
        raise
    finally:
        bar.close()
    return finish(sweep, parent_id)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = args.set + ([f"study.workers={args.workers}"] if args.workers else [])
    try:
        sweep = prepare(args.sweep, overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        print(run_sweep(sweep, progress=not args.no_progress))
    except KeyboardInterrupt:
        print(
            "\ninterrupted: the current trial was closed as failed and will be retried;"
            " run the same command again to resume.",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except (SweepIncomplete, TrackingUnavailable) as exc:
        print(f"error: {exc}; {RESUME_HINT}", file=sys.stderr)
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
