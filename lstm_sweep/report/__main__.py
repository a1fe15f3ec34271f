"""``python -m lstm_sweep.report SWEEP.yaml``: a finished study's report again, from its stores.
It trains nothing and leaves the sweep's parent run as it found it."""

from __future__ import annotations

import argparse
import sys

from lstm_sweep.cli import EXIT_BAD_INPUT, REFUSED, refuse
from lstm_sweep.config import load_config
from lstm_sweep.report import publish
from lstm_sweep.study import open_study
from lstm_sweep.tracking import Tracker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lstm_sweep.report",
        description="The report of a finished study again, from its stores.",
    )
    parser.add_argument("sweep", help="the sweep's YAML file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.sweep, args.set)
        tracker = Tracker(cfg.tracking.uri, cfg.experiment, args.sweep)
        study = open_study(cfg, args.sweep)
    except REFUSED as exc:  # bad input, or a full disk, say, when the stores were opened
        return refuse(exc)
    parent_id = tracker.find_parent(cfg.study_name)
    if parent_id is None:
        print(f"error: {args.sweep}: study {cfg.study_name!r} has no runs yet", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(publish(cfg, tracker, study, parent_id))
    return 0


if __name__ == "__main__":
    sys.exit(main())
