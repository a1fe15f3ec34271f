"""The command line: ``python -m lstm_sweep.run SWEEP.yaml [--set key=value ...]``.

Parse, validate, then call the stages (``lstm_sweep.stages``) and print the summary. Everything
that can be wrong with the input is found before the first run or trial exists and reported as
one line with exit status 2; a sweep file that does not validate is refused before torch,
MLflow and Optuna load (seconds).
"""

from __future__ import annotations

import argparse
import gc
import sys
import traceback

from lstm_sweep import engines
from lstm_sweep import metrics as m
from lstm_sweep.cli import REFUSED, refuse
from lstm_sweep.config import load_config, mask_secrets
from lstm_sweep.faults import StoreFailed
from lstm_sweep.progress import step

RESUME_HINT = "every finished trial is kept: run the same command again to resume"
# the last line after Ctrl-C or SIGTERM, by the stage it stopped
INTERRUPTED = {
    m.STAGE_START: "interrupted while starting: no trial was run; run the same command again",
    m.STAGE_TRIALS: "interrupted: the trials in flight were closed as failed and will be"
    f" retried; {RESUME_HINT}",
    m.STAGE_CLOSING: "interrupted in the closing stage: the study's trials are complete and"
    " every re-evaluation that finished is kept; run the same command again to finish the"
    " closing stage (it trains only what is missing)",
    m.STAGE_REPORT: "interrupted while writing the report: the trials and the registered model"
    " are kept; run the same command again to write it",
}
EPILOG = """\
sweep file sections (see sweeps/forecast.yaml for every key with a comment):
  experiment   MLflow experiment name (and default study name)
  data         path, time_column, target, features, window, horizon, split, scaler,
               missing, transform, season
  model        num_layers, hidden_size, dropout, head_dropout, skip
  train        max_epochs, batch_size, learning_rate, weight_decay, optimizer, patience,
               min_delta, grad_clip, seed, device, monitor
  search       dotted key -> {type: float|int|categorical, low, high, log, step, choices}
  study        name, n_trials, timeout, sampler, n_startup_trials, pruner, storage,
               direction, workers, lock_timeout, ray
  tracking     uri, flush_seconds
  diagnostics  level (full|basic|off), eval_subsample, hidden_subsample, k_worst,
               saturation, dead_std, verdict
  closing      top_k, seeds, final_model, ensemble, model_name
  report       edge_fraction, near_best

examples:
  python -m lstm_sweep.run sweeps/forecast.yaml
  python -m lstm_sweep.run sweeps/quick.yaml --set study.n_trials=5 --set train.max_epochs=3
  python -m lstm_sweep.run sweeps/forecast.yaml --workers 2
  python -m lstm_sweep.report sweeps/forecast.yaml   # the report of a finished study again

A rerun of the same command resumes the study: it completes only the trials that are missing.
The same command on several hosts, with study.storage and tracking.uri on shared servers,
cooperates on one study. A changed sweep file is refused for an existing study: give it a new
study.name.
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
    parser.add_argument(
        "--engine",
        choices=list(engines.ENGINES),
        default="local",
        help="who runs the workers (default: processes of this machine)",
    )
    parser.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="--engine ray, on the cluster at ADDRESS: auto, ray://host:10001 or host:6379;"
        " without ADDRESS a local Ray instance (pip install -e '.[ray]')",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = args.set + ([f"study.workers={args.workers}"] if args.workers else [])
    progress = not args.no_progress
    engine_name, address = ("ray", args.ray) if args.ray else (args.engine, None)
    try:
        cfg = load_config(args.sweep, overrides)
        engines.warm_up(engine_name, cfg)  # beside this process's own imports
        with step("loading torch, MLflow and Optuna", progress):
            # here, not at the top: a bad sweep file is refused without waiting for them
            from lstm_sweep.stages import run_sweep
            from lstm_sweep.sweep import GracefulStop, LockTimeout, SweepIncomplete, prepare
            from lstm_sweep.tracking import TrackingUnavailable

            engine = engines.create(engine_name, address)
        with step("checking the data and opening the stores", progress):
            engine.check(args.sweep, overrides)  # a setup it cannot run leaves no store behind
            sweep = prepare(args.sweep, overrides)
    except REFUSED as exc:  # bad input, or a full disk, say, when the stores were opened
        return refuse(exc)
    except KeyboardInterrupt:
        print(f"\n{INTERRUPTED[m.STAGE_START]}", file=sys.stderr)
        return m.EXIT_INTERRUPTED
    with GracefulStop() as stop:
        try:
            print(run_sweep(sweep, stop, engine, progress))
        except KeyboardInterrupt as exc:
            print(f"\n{INTERRUPTED[getattr(exc, 'stage', m.STAGE_TRIALS)]}", file=sys.stderr)
            return m.EXIT_INTERRUPTED
        except StoreFailed as exc:  # a store failed under the sweep
            return refuse(exc)
        except TrackingUnavailable as exc:
            print(
                f"error: {mask_secrets(str(exc))}; {RESUME_HINT} once the tracking server"
                " answers again",
                file=sys.stderr,
            )
            return m.EXIT_FAILED
        except (SweepIncomplete, LockTimeout) as exc:
            print(f"error: {mask_secrets(str(exc))}; {RESUME_HINT}", file=sys.stderr)
            return m.EXIT_FAILED
        except Exception as exc:  # a bug: its traceback, then what it means for the study
            print(mask_secrets(traceback.format_exc()), end="", file=sys.stderr)
            what = f"{type(exc).__name__}: {str(exc).strip()}".splitlines()[0][:200]
            print(
                f"error: lstm_sweep failed ({mask_secrets(what)}): what it was training was"
                f" closed as failed and {RESUME_HINT}; the traceback above is worth reporting",
                file=sys.stderr,
            )
            return m.EXIT_FAILED
    return 0


if __name__ == "__main__":
    code = main()
    # the interpreter's last collection walks every object torch, MLflow and pandas made:
    # seconds at exit (measured 8 s under load), for memory the process is giving back anyway
    gc.freeze()
    sys.exit(code)
