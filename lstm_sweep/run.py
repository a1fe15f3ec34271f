"""The command line: ``python -m lstm_sweep.run SWEEP.yaml [--set key=value ...]``.

Parse, validate, then wire the pieces: data once, the tracker's parent run, the Optuna study and
its objective, then the report. Everything that can be wrong with the input is found before the
first run or trial exists, and reported as one line with exit status 2.
"""

from __future__ import annotations

import argparse
import signal
import sys
from dataclasses import dataclass

import torch
import yaml
from tqdm import tqdm

from lstm_sweep.config import Config, ConfigError, load_config
from lstm_sweep.data import ForecastData, load_forecast_data
from lstm_sweep.report import format_summary, output_dir, summarise, write_best_config
from lstm_sweep.study import (
    Objective,
    ProgressCallback,
    StopStudy,
    counted_trials,
    enqueue_retries,
    open_study,
    optimize,
    torch_threads_per_worker,
    trials_frame,
)
from lstm_sweep.tracking import Tracker
from lstm_sweep.train import naive_loss

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

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
  diagnostics  level (full|basic|off), eval_subsample, k_worst, saturation, dead_std, verdict

examples:
  python -m lstm_sweep.run sweeps/forecast.yaml
  python -m lstm_sweep.run sweeps/quick.yaml --set study.n_trials=5 --set train.max_epochs=3
  python -m lstm_sweep.report sweeps/forecast.yaml   # the summary of a finished study again

A rerun of the same command resumes the study: it completes only the trials that are missing.
"""


class GracefulStop:
    """First Ctrl-C: finish the current epoch, close the trial as failed (it is retried on the
    next run) and exit 130. A second Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.requested = False

    def __enter__(self) -> GracefulStop:
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self.previous)

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this epoch (Ctrl-C again to stop at once)", file=sys.stderr)

    def __call__(self) -> bool:
        return self.requested


@dataclass
class Sweep:
    """Everything validated and connected, before any run or trial exists."""

    cfg: Config
    data: ForecastData
    tracker: Tracker
    study: object  # optuna.Study; run.py stays free of optuna


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lstm_sweep.run",
        description="Search LSTM regularisation settings with Optuna; track every trial in MLflow.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("sweep", help="the sweep's YAML file")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, value typed as YAML (repeatable): --set study.n_trials=5",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def prepare(path: str, overrides: list[str]) -> Sweep:
    """Validate the config and the data and connect to both stores; ConfigError on any fault."""
    cfg = load_config(path, overrides)
    data = load_forecast_data(cfg.data)
    tracker = Tracker(cfg.tracking.uri, cfg.experiment, path)
    study = open_study(cfg, path)
    return Sweep(cfg, data, tracker, study)


def run_sweep(sweep: Sweep, progress: bool = True) -> str:
    """Run the missing trials and report; returns the summary text."""
    cfg, tracker, study = sweep.cfg, sweep.tracker, sweep.study
    torch.set_num_threads(torch_threads_per_worker(cfg.study.workers))
    parent_id = tracker.open_parent(cfg.study_name, cfg.model_dump(mode="json"))
    enqueue_retries(study)
    bar = tqdm(
        total=cfg.study.n_trials, initial=counted_trials(study), desc=cfg.study_name,
        unit="trial", disable=not progress, file=sys.stderr,
    )
    with GracefulStop() as stop:
        objective = Objective(cfg, sweep.data, tracker, parent_id, stop)
        callbacks = [ProgressCallback(bar), StopStudy(stop)]
        try:
            optimize(study, objective, cfg.study.n_trials, cfg.study.timeout, callbacks)
            if stop.requested:  # asked between two trials
                raise KeyboardInterrupt
        except KeyboardInterrupt:
            tracker.finish(parent_id, "FAIL", {"failure_reason": "interrupted by the user"})
            raise
        finally:
            bar.close()
    return finish_sweep(sweep, parent_id)


def finish_sweep(sweep: Sweep, parent_id: str) -> str:
    cfg, tracker = sweep.cfg, sweep.tracker
    summary = summarise(
        trials_frame(sweep.study), list(cfg.search), naive_loss(sweep.data), cfg.study.direction
    )
    folder = output_dir(cfg)
    (folder / "resolved_config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    summary.table.to_csv(folder / "trials.csv", index=False)
    if summary.best_number is not None:
        write_best_config(cfg, summary.best_values, folder / "best_config.yaml")
        tracker.log_summary(parent_id, {"best_val_loss": summary.best_value or 0.0})
        tracker.set_tags(parent_id, {"best_trial": summary.best_number})
    tracker.log_summary(parent_id, {"naive_val_loss": summary.naive_val_loss})
    tracker.log_artifacts(parent_id, folder, "report")
    tracker.finish(parent_id, "COMPLETE")
    text = format_summary(summary, tracker.ui_command())
    return text + f"\nReport files: {folder}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        sweep = prepare(args.sweep, args.set)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
