"""Read a finished study back into one table and say what it found.

Usable on its own (``python -m lstm_sweep.report SWEEP.yaml``) and called at the end of every
sweep. The table joins Optuna's trials with their MLflow runs; the best settings are written
as a ready-to-train sweep file.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from lstm_sweep import diagnostics as dg
from lstm_sweep.config import Config, ConfigError
from lstm_sweep.study import trials_frame
from lstm_sweep.sweep import Sweep, prepare
from lstm_sweep.tracking import STORE_ROOT
from lstm_sweep.train import naive_loss

SUMMARY_COLUMNS = [
    "number", "state", "value", "verdict", dg.BEST_EPOCH, dg.EPOCHS_TRAINED,
]


@dataclass(frozen=True)
class SweepSummary:
    finished: int
    pruned: int
    failed: int
    best_number: int | None
    best_value: float | None
    best_values: dict[str, Any]
    naive_val_loss: float
    table: pd.DataFrame  # one row per trial, best first


def output_dir(cfg: Config, root: Path = STORE_ROOT) -> Path:
    """Where a sweep's report files go: next to the local stores, one folder per study."""
    folder = root / "reports" / cfg.study_name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def summarise(
    frame: pd.DataFrame, search_keys: list[str], naive_val_loss: float, direction: str
) -> SweepSummary:
    """Counts, best trial and a ranked table from a trials DataFrame (see study.trials_frame)."""
    states = frame["state"].value_counts() if len(frame) else pd.Series(dtype=int)
    done = frame[frame["state"] == "COMPLETE"]
    ranked = done.sort_values("value", ascending=direction == "minimize")
    columns = [c for c in [*SUMMARY_COLUMNS[:3], *search_keys, *SUMMARY_COLUMNS[3:]] if c in frame]
    best = ranked.iloc[0] if len(ranked) else None
    return SweepSummary(
        finished=int(states.get("COMPLETE", 0)),
        pruned=int(states.get("PRUNED", 0)),
        failed=int(states.get("FAIL", 0)),
        best_number=int(best["number"]) if best is not None else None,
        best_value=float(best["value"]) if best is not None else None,
        best_values={k: _plain(best[k]) for k in search_keys} if best is not None else {},
        naive_val_loss=naive_val_loss,
        table=ranked[columns].reset_index(drop=True),
    )


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def best_config(cfg: Config, values: dict[str, Any]) -> dict[str, Any]:
    """The sweep file that trains the best settings once: no search, one trial, own study."""
    raw = cfg.with_values(values).model_dump(mode="json")
    raw["search"] = {}
    raw["study"] |= {"name": f"{cfg.study_name}-best", "n_trials": 1}
    return raw


def write_best_config(cfg: Config, values: dict[str, Any], path: Path) -> Path:
    header = f"# Best settings of study {cfg.study_name!r}; run: python -m lstm_sweep.run {path}\n"
    path.write_text(header + yaml.safe_dump(best_config(cfg, values), sort_keys=False))
    return path


def format_summary(summary: SweepSummary, ui_command: str, top: int = 5) -> str:
    lines = [
        f"Trials: {summary.finished} finished, {summary.pruned} pruned, {summary.failed} failed.",
    ]
    if summary.best_number is None:
        lines.append("No trial finished: nothing to recommend yet.")
    else:
        settings = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                             for k, v in summary.best_values.items())
        lines += [
            f"Best trial #{summary.best_number}: val loss {summary.best_value:.4g}"
            f" (naive last-value forecast: {summary.naive_val_loss:.4g},"
            f" {summary.best_value / summary.naive_val_loss:.0%} of it)",
            f"Best settings: {settings or '(nothing searched)'}",
            "",
            f"Top {min(top, len(summary.table))}:",
            summary.table.head(top).to_string(index=False, float_format=lambda v: f"{v:.4g}"),
        ]
    lines += ["", f"Open the runs in the MLflow UI: {ui_command}"]
    return "\n".join(lines)


def finish(sweep: Sweep, parent_id: str) -> str:
    """Build the sweep's report from the stores, attach it to the parent run and close it."""
    cfg, tracker = sweep.cfg, sweep.tracker
    summary = summarise(
        trials_frame(sweep.study), list(cfg.search), naive_loss(sweep.data), cfg.study.direction
    )
    folder = output_dir(cfg)
    (folder / "resolved_config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    summary.table.to_csv(folder / "trials.csv", index=False)
    if summary.best_number is not None and summary.best_value is not None:
        write_best_config(cfg, summary.best_values, folder / "best_config.yaml")
        tracker.log_summary(parent_id, {"best_val_loss": summary.best_value})
        tracker.set_tags(parent_id, {"best_trial": summary.best_number})
    tracker.log_summary(parent_id, {"naive_val_loss": summary.naive_val_loss})
    tracker.log_artifacts(parent_id, folder, "report")
    tracker.finish(parent_id, "COMPLETE")
    return format_summary(summary, tracker.ui_command()) + f"\nReport files: {folder}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lstm_sweep.report", description=__doc__)
    parser.add_argument("sweep", help="the sweep's YAML file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        sweep = prepare(args.sweep, args.set)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    parent_id = sweep.tracker.open_parent(sweep.cfg.study_name, sweep.cfg.model_dump(mode="json"))
    print(finish(sweep, parent_id))
    return 0


if __name__ == "__main__":
    sys.exit(main())
