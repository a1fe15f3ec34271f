"""Read a finished study back into one table and say what it found, with evidence.

Usable on its own (``python -m lstm_sweep.report SWEEP.yaml``) and called at the end of every
sweep. The table joins Optuna's trials with their MLflow runs; importances and Optuna's plots
say what mattered; the top settings are retrained with several seeds and compared with three
baselines; the recommendation is retrained, tested once and registered; and all of it lands in
one Markdown report with its pictures, beside the run's files and on the sweep's parent run.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from lstm_sweep import artifacts, baselines, select, surface
from lstm_sweep import diagnostics as dg
from lstm_sweep.config import Config, ConfigError
from lstm_sweep.data import ClassificationData, ForecastData
from lstm_sweep.study import param_importances, trials_frame, write_study_plots
from lstm_sweep.sweep import Sweep, prepare
from lstm_sweep.tracking import STORE_ROOT, Tracker
from lstm_sweep.train import TrainingData, naive_loss

SUMMARY_COLUMNS = [
    "number",
    "state",
    "value",
    "verdict",
    f"best_{dg.GAP}",
    dg.BEST_EPOCH,
    dg.EPOCHS_TRAINED,
    "wall_seconds",
]
RUN_METRICS = (  # per trial, read back from its MLflow run
    dg.BEST_VAL_LOSS,
    f"best_{dg.GAP}",
    f"best_{dg.TRAIN_EVAL_LOSS}",
    dg.OVERFIT_ONSET,
)
EDGE_TOP = 3  # the best completed trials whose position in each range is checked
SKILL = {ForecastData: "skill_mse", ClassificationData: "accuracy_gain"}
NAIVE_NAMES = {"forecast": "naive last-value forecast", "classification": "majority-class prior"}
BASELINE_NOTES = {
    "forecast": "Errors in the target's own units. MASE divides the MAE by the naive forecast's"
    " MAE on the training windows; `skill_mse` is 1 - MSE(LSTM) / MSE(baseline): above 0 the"
    " LSTM is better.",
    "classification": "`accuracy_gain` is the LSTM's test accuracy minus the baseline's: above 0"
    " the LSTM is better.",
}
WORST_SAMPLES = f"diagnostics/{artifacts.WORST_SAMPLES}"  # logged by every trial at level full


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
    monitor: str = "val_loss"  # what a trial's value is (train.monitor)
    naive_name: str = "naive last-value forecast"


def output_dir(cfg: Config, root: Path = STORE_ROOT) -> Path:
    """Where a sweep's report files go: next to the local stores, one folder per study."""
    folder = root / "reports" / cfg.study_name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def summarise(
    frame: pd.DataFrame,
    search_keys: list[str],
    naive_val_loss: float,
    direction: str,
    monitor: str = "val_loss",
    naive_name: str = "naive last-value forecast",
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
        best_values={k: select.plain(best[k]) for k in search_keys} if best is not None else {},
        naive_val_loss=naive_val_loss,
        table=ranked[columns].reset_index(drop=True),
        monitor=monitor,
        naive_name=naive_name,
    )


def comparison_table(trials: pd.DataFrame, runs: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """One row per Optuna trial joined with its MLflow run: searched values, state, value,
    best validation loss, gap and train-eval loss at the best epoch, overfitting onset, verdict,
    epochs, wall time. ``trials`` as study.trials_frame gives it, ``runs`` as
    Tracker.child_runs does."""
    view = pd.DataFrame({"run_id": runs.get("run_id", pd.Series(dtype=str))})
    for metric in RUN_METRICS:
        view[metric] = runs.get(f"metrics.{metric}", math.nan)
    if len(runs):
        view["wall_seconds"] = (runs["end_time"] - runs["start_time"]).dt.total_seconds()
    else:
        view["wall_seconds"] = pd.Series(dtype=float)
    if "mlflow_run_id" not in trials:  # no trial has started yet
        trials = trials.assign(mlflow_run_id=pd.Series(dtype=str))
    table = trials.merge(view, how="left", left_on="mlflow_run_id", right_on="run_id")
    columns = [
        "number",
        "state",
        *keys,
        "value",
        *RUN_METRICS,
        "verdict",
        dg.BEST_EPOCH,
        dg.EPOCHS_TRAINED,
        "wall_seconds",
        "run_id",
    ]
    return table[[c for c in columns if c in table]].sort_values("number", ignore_index=True)


def best_config(cfg: Config, values: dict[str, Any], label: str = "best") -> dict[str, Any]:
    """The sweep file that trains the given settings once: no search, one trial, own study."""
    raw = cfg.with_values(values).model_dump(mode="json")
    raw["search"] = {}
    raw["study"] |= {"name": f"{cfg.study_name}-{label}", "n_trials": 1}
    return raw


def write_best_config(cfg: Config, values: dict[str, Any], path: Path, label: str = "best") -> Path:
    header = (
        f"# {label.capitalize()} settings of study {cfg.study_name!r};"
        f" run: python -m lstm_sweep.run {path}\n"
    )
    path.write_text(header + yaml.safe_dump(best_config(cfg, values, label), sort_keys=False))
    return path


def format_summary(summary: SweepSummary, ui_command: str, top: int = 5) -> str:
    lines = [
        f"Trials: {summary.finished} finished, {summary.pruned} pruned, {summary.failed} failed.",
    ]
    if summary.best_number is None:
        lines.append("No trial finished: nothing to recommend yet.")
    else:
        ratio = (
            f", {summary.best_value / summary.naive_val_loss:.0%} of it"
            if summary.monitor == "val_loss" and summary.best_value is not None
            else ""
        )
        lines += [
            f"Best trial #{summary.best_number}: {summary.monitor} {summary.best_value:.4g}"
            f" ({summary.naive_name}: val loss {summary.naive_val_loss:.4g}{ratio})",
            f"Best settings: {_settings_text(summary.best_values)}",
            "",
            f"Top {min(top, len(summary.table))}:",
            summary.table.head(top).to_string(index=False, float_format=lambda v: f"{v:.4g}"),
        ]
    lines += ["", f"Open the runs in the MLflow UI: {ui_command}"]
    return "\n".join(lines)


@dataclass
class Evidence:
    """Everything behind a recommendation, for the report and the parent run."""

    importances: dict[str, float]
    settings: list[select.Setting]
    reevaluation: select.Reevaluation
    recommendation: select.Recommendation
    baselines: pd.DataFrame  # one row per method, the LSTM first when a final model exists
    final: select.FinalModel | None
    edges: list[str]  # searched keys at whose range edge the recommendation sits
    near: tuple[int, int]  # trials near the recommendation, and how many of them are good
    hard: pd.DataFrame  # validation windows every setting gets wrong
    hard_source: str
    images: dict[str, Path]  # what each picture shows -> file in the report folder
    plots: list[Path]  # Optuna's HTML views


def gather_evidence(
    cfg: Config,
    data: TrainingData,
    tracker: Tracker,
    parent_id: str,
    table: pd.DataFrame,
    study: Any,
    folder: Path,
) -> Evidence:
    """Importances, seed re-evaluation, baselines, the final model and the response surface."""
    keys, report = list(cfg.search), cfg.report
    importances = param_importances(study, cfg.train.seed)
    plots = write_study_plots(
        study, folder / "plots", [k for k in surface.PAIRS[0] if k in cfg.search], cfg.train.seed
    )
    settings = select.top_settings(table, keys, report.top_k, cfg.direction)
    reevaluation = select.reevaluate(cfg, data, tracker, parent_id, settings, report.seeds)
    recommendation = select.recommend(settings, reevaluation.runs, cfg.direction, cfg.train.monitor)
    final = None
    if report.final_model:
        final = select.train_final(
            cfg, data, tracker, parent_id, recommendation, folder / "model_files"
        )
    compared = baselines.compare(data, "test", refit_on_val=final is not None)
    if final is not None:
        lstm = pd.DataFrame(
            [{**final.errors, "note": f"final model, {final.epochs} epochs"}], index=["lstm"]
        )
        compared = pd.concat([lstm, compared])
        compared[SKILL[type(data)]] = baselines.skill(compared)

    images: dict[str, Path] = {}
    winner = recommendation.setting
    history = reevaluation.histories[(winner.number, cfg.train.seed)]
    verdict = reevaluation.verdicts[(winner.number, cfg.train.seed)]
    caption = (
        f"Loss curves of the recommendation, re-evaluated with seed {cfg.train.seed}:"
        f" {verdict.verdict}"
    )
    images[caption] = artifacts.loss_curves(
        history.rows, history.best_epoch, verdict.onset_epoch, folder / "winner_loss_curves.png"
    )
    if importances:
        images["Parameter importances (fANOVA)"] = surface.importance_chart(
            importances, folder / "importances.png"
        )
    for path in surface.heatmaps(table, cfg.search, winner.values, folder):
        images[f"Response surface: {path.stem.removeprefix('surface_')}"] = path

    worst = [
        tracker.read_csv_artifact(run_id, WORST_SAMPLES)
        for run_id in table.loc[table["state"] == "COMPLETE", "run_id"].dropna()
    ]
    from_trials = [w for w in worst if w is not None]
    hard_source = (
        f"{len(from_trials)} completed trials"
        if from_trials
        else f"{len(reevaluation.worst)} re-evaluation runs"
    )
    return Evidence(
        importances=importances,
        settings=settings,
        reevaluation=reevaluation,
        recommendation=recommendation,
        baselines=compared,
        final=final,
        edges=dg.edge_warnings([winner.values], cfg.search, report.edge_fraction),
        near=surface.neighbourhood(
            table, cfg.search, winner.values, report.near_best, cfg.direction
        ),
        hard=surface.hard_windows(from_trials or reevaluation.worst),
        hard_source=hard_source,
        images=images,
        plots=plots,
    )


def parent_metrics(evidence: Evidence) -> dict[str, float]:
    """The evidence's numbers as single-value metrics of the sweep's parent run."""
    metrics = {}
    for method, row in evidence.baselines.iterrows():
        for metric in (*baselines.METRICS, *baselines.CLASSIFICATION_METRICS):
            if metric in row and math.isfinite(row[metric]):
                metrics[f"{method}_test_{metric}"] = float(row[metric])
    if evidence.final is not None:
        metrics |= select.optimism(evidence.final, evidence.recommendation)
        metrics["final_test_loss"] = evidence.final.test_loss
    winner = evidence.recommendation.spread.iloc[0]
    metrics |= {
        "recommended_val_mean": float(winner["val_mean"]),
        "recommended_val_std": float(winner["val_std"]),
    }
    return {k: v for k, v in metrics.items() if math.isfinite(v)}


def markdown_table(frame: pd.DataFrame, index: bool = False) -> str:
    """A DataFrame as a GitHub-flavoured Markdown table, numbers to 4 significant digits."""
    if index:
        frame = frame.reset_index(names="")

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "" if math.isnan(value) else f"{value:.4g}"
        return str(value).replace("|", "\\|")

    head = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def _settings_text(values: dict[str, Any]) -> str:
    return (
        ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        or "(nothing searched)"
    )


def write_report(
    cfg: Config, summary: SweepSummary, table: pd.DataFrame, evidence: Evidence, folder: Path
) -> Path:
    """The one readable report: recommendation first, then the evidence behind it."""
    rec, final = evidence.recommendation, evidence.final
    winner = rec.spread.iloc[0]
    n_near, n_good = evidence.near
    noise = (
        f"Within noise of it (mean difference below the two seed standard deviations added):"
        f" trial(s) {', '.join(f'#{n}' for n in rec.within_noise)}. The data cannot tell these"
        f" apart; prefer the simpler or cheaper one if it matters."
        if rec.within_noise
        else "No other re-evaluated setting is within noise of it."
        if cfg.report.seeds > 1
        else "With one seed per setting there is no spread: rerun with report.seeds >= 2"
        " to judge noise."
    )
    verdicts = [
        f"{v.verdict} ({v.reason})"
        for (number, _), v in evidence.reevaluation.verdicts.items()
        if number == rec.setting.number
    ]
    spread = 0.0 if math.isnan(winner["val_std"]) else float(winner["val_std"])
    lines = [
        f"# Regularisation report: {cfg.study_name}",
        "",
        "## Recommendation",
        "",
        f"**{_settings_text(rec.setting.values)}** (found by trial #{rec.setting.number}).",
        "",
        f"- Mean best {cfg.train.monitor} over {cfg.report.seeds} seed(s):"
        f" {winner['val_mean']:.4g} ± {spread:.2g} (the trial itself: {rec.setting.value:.4g};"
        f" the naive predictor's val loss: {summary.naive_val_loss:.4g}).",
        f"- Verdicts of its seeds: {'; '.join(verdicts)}.",
        f"- {noise}",
        f"- Neighbourhood: {n_near} completed trial(s), its own included, lie within"
        f" {surface.NEIGHBOURHOOD:.0%} of every searched range around it; {n_good} of them came"
        f" within {cfg.report.near_best:.0%} of the best value"
        + (
            " — a robust region, not a lucky point."
            if n_good >= 3
            else " — too few good neighbours to call it a robust region."
        ),
        "- Range: "
        + (
            "; ".join(evidence.edges)
            if evidence.edges
            else "inside every searched range, not at an edge."
        ),
    ]
    if final is not None:
        opt = select.optimism(final, rec)
        lstm = evidence.baselines.loc["lstm"]
        scores = ", ".join(f"{k} {lstm[k]:.4g}" for k in final.errors)
        lines += [
            f"- Final model: trained on training + validation samples for {final.epochs} epochs"
            f" (median best epoch + 1 over the seeds), tested once: test loss"
            f" {final.test_loss:.4g}, {scores}.",
            f"- Honest estimate: optimism (test minus best validation {cfg.train.monitor}) is"
            f" {opt['optimism_vs_trial']:+.4g} against the trial and"
            f" {opt['optimism_vs_seed_mean']:+.4g} against the seed mean.",
            f"- Registered model: `{final.model_uri}`"
            + (
                f"; forecasts from a CSV:"
                f" `python -m lstm_sweep.predict {final.model_uri} data.csv`."
                if cfg.task == "forecast"
                else "."
            ),
        ]
    lines += [
        "- Ready-to-train file: `recommended_config.yaml`"
        f" (`python -m lstm_sweep.run {folder / 'recommended_config.yaml'}`).",
        "",
        "## Against the baselines (test part)",
        "",
        BASELINE_NOTES[cfg.task],
        "",
        markdown_table(evidence.baselines, index=True),
        "",
        "## Seed re-evaluation of the top settings",
        "",
        "Chosen on the validation mean only; test columns are shown, never used to choose.",
        "",
        markdown_table(_spread_with_values(rec.spread, evidence.settings)),
        "",
        "## What mattered",
        "",
    ]
    if evidence.importances:
        lines += [
            markdown_table(
                pd.DataFrame(
                    {
                        "key": list(evidence.importances),
                        "importance": list(evidence.importances.values()),
                    }
                )
            ),
            "",
        ]
    else:
        lines += ["Too few completed trials for importances.", ""]
    lines += [f"- [{p.stem.replace('_', ' ')}](plots/{p.name})" for p in evidence.plots]
    lines += ["", "## Pictures", ""]
    for caption, path in evidence.images.items():
        lines += [f"### {caption}", "", f"![{caption}]({path.name})", ""]
    lines += [
        "## Validation windows every setting gets wrong",
        "",
        f"Windows in the worst {cfg.diagnostics.k_worst} of at least"
        f" {surface.HARD_SHARE:.0%} of {evidence.hard_source}: a data or regime problem, not a"
        " regularisation one.",
        "",
        markdown_table(evidence.hard) if len(evidence.hard) else "None.",
        "",
        f"## All trials ({summary.finished} finished, {summary.pruned} pruned,"
        f" {summary.failed} failed)",
        "",
        markdown_table(table.drop(columns=["run_id"], errors="ignore")),
        "",
    ]
    path = folder / "report.md"
    path.write_text("\n".join(lines))
    return path


def _spread_with_values(spread: pd.DataFrame, settings: list[select.Setting]) -> pd.DataFrame:
    values = pd.DataFrame(
        [{"number": s.number, **s.values, "trial_value": s.value} for s in settings]
    )
    return values.merge(spread, on="number")


def finish(sweep: Sweep, parent_id: str) -> str:
    """Build the sweep's report from the stores, attach it to the parent run and close it."""
    cfg, tracker, data = sweep.cfg, sweep.tracker, sweep.data
    keys = list(cfg.search)
    runs = tracker.child_runs(parent_id, "trial")
    table = comparison_table(trials_frame(sweep.study), runs, keys)
    summary = summarise(
        table, keys, naive_loss(data), cfg.direction, cfg.train.monitor, NAIVE_NAMES[cfg.task]
    )
    folder = output_dir(cfg)
    (folder / "resolved_config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    table.to_csv(folder / "trials.csv", index=False)
    lines = [format_summary(summary, tracker.ui_command())]
    edges = dg.edge_warnings(summary.table.head(EDGE_TOP).to_dict("records"), cfg.search)
    if edges:  # once per sweep, on screen and as a tag: the range should be widened
        lines += [f"warning: {warning}" for warning in edges]
        tracker.set_tags(parent_id, {"range_warnings": " | ".join(edges)})
    if summary.best_number is not None and summary.best_value is not None:
        write_best_config(cfg, summary.best_values, folder / "best_config.yaml")
        tracker.log_summary(parent_id, {f"best_{cfg.train.monitor}": summary.best_value})
        tracker.set_tags(parent_id, {"best_trial": summary.best_number})
        evidence = gather_evidence(cfg, data, tracker, parent_id, table, sweep.study, folder)
        rec = evidence.recommendation
        write_best_config(
            cfg, rec.setting.values, folder / "recommended_config.yaml", "recommended"
        )
        report = write_report(cfg, summary, table, evidence, folder)
        tracker.log_summary(parent_id, parent_metrics(evidence))
        tags: dict[str, Any] = {"recommended_trial": rec.setting.number}
        if evidence.final is not None:
            tags["model_uri"] = evidence.final.model_uri
        tracker.set_tags(parent_id, tags)
        lines += [
            "",
            f"Recommended (best mean of {cfg.report.seeds} seed(s) over the top"
            f" {len(evidence.settings)}): trial #{rec.setting.number},"
            f" {_settings_text(rec.setting.values)}",
            "Test part (see the report for units and notes):",
            evidence.baselines.to_string(float_format=lambda v: f"{v:.4g}"),
            f"Report: {report}",
        ]
    tracker.log_summary(parent_id, {"naive_val_loss": summary.naive_val_loss})
    tracker.log_artifacts(parent_id, folder, "report")
    tracker.finish(parent_id, "COMPLETE")
    return "\n".join(lines) + f"\nReport files: {folder}"


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
