"""Read a study back from its stores and say what it found, with evidence. Trains nothing.

Usable on its own (``python -m lstm_sweep.report SWEEP.yaml``) and called at the end of every
sweep. The table joins Optuna's trials with their MLflow runs; importances and Optuna's plots
say what mattered; the closing stage's ``selection.json`` (seed re-evaluation, baselines, the
registered model) supplies the recommendation; the response surface shows whether it sits in a
good region. All of it lands in one Markdown report with its pictures, beside the run's files
and on the sweep's parent run, whose description in the MLflow UI carries the answer.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import yaml

from lstm_sweep import diagnostics as dg
from lstm_sweep import metrics as m
from lstm_sweep import plots
from lstm_sweep.config import Config
from lstm_sweep.evidence import EVIDENCE
from lstm_sweep.report.export import mask_stores, write_best_config
from lstm_sweep.report.ranges import (
    EDGE_TOP,
    PAIRS,
    draw_surfaces,
    more_regularised,
    neighbourhood,
)
from lstm_sweep.report.render import Report, description, format_summary, write_report
from lstm_sweep.report.table import comparison_table, hard_windows, summarise
from lstm_sweep.selection import Selection
from lstm_sweep.study import (
    Study,
    param_importances,
    stopping_point,
    study_figures,
    trials_frame,
)
from lstm_sweep.tracking import STORE_ROOT, Tracker


def output_dir(cfg: Config, root: Path = STORE_ROOT) -> Path:
    """Where a sweep's report files go: next to the local stores, one folder per study."""
    folder = root / "reports" / cfg.study_name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def gather(cfg: Config, tracker: Tracker, study: Study, parent_id: str, folder: Path) -> Report:
    """Read the study, its runs and the closing stage's findings; draw the pictures."""
    keys = list(cfg.search)
    runs = tracker.child_runs(parent_id, m.ROLE_TRIAL)
    table = comparison_table(trials_frame(study), runs, keys)
    naive = (
        float(runs[f"metrics.{m.NAIVE_VAL_LOSS}"].dropna().iloc[0])
        if f"metrics.{m.NAIVE_VAL_LOSS}" in runs
        and runs[f"metrics.{m.NAIVE_VAL_LOSS}"].notna().any()
        else math.nan
    )
    summary = summarise(table, keys, cfg.direction, cfg.train.monitor, naive, cfg.data.folds)
    stopped = stopping_point(study.get_trials(deepcopy=False), cfg)
    summary = replace(summary, stopped=str(stopped) if stopped else "")
    raw = tracker.read_json_artifact(parent_id, m.SELECTION_FILE)
    selection = Selection.from_dict(raw) if raw else None
    importances = param_importances(study, cfg.train.seed)
    contour = [k for k in PAIRS[0] if k in cfg.search]
    pages = plots.study_pages(study_figures(study, contour, cfg.train.seed), folder / "plots")
    images: dict[str, Path] = {}
    edges: list[str] = []
    near = (0, 0)
    onset = None
    on_folds: list[float] = []
    regularised: tuple[int, float | None] = (0, None)
    recommended = selection.winner.values if selection else summary.best_values
    if selection is not None:
        seed_run = next(s for s in selection.seeds if s.number == selection.recommended)
        rows = tracker.metric_history(
            seed_run.run_id, [m.TRAIN_LOSS, m.TRAIN_EVAL_LOSS, m.VAL_LOSS]
        )
        seed_metrics = tracker.run_metrics(seed_run.run_id)
        onset = seed_metrics.get(m.OVERFIT_ONSET)
        on_folds = fold_values(seed_metrics, cfg.data.folds, cfg.train.monitor)
        caption = f"Loss curves of the recommendation, seed {seed_run.seed}: {seed_run.verdict}"
        images[caption] = plots.loss_curves(
            rows,
            seed_run.best_epoch,
            None if onset is None else int(onset),
            folder / "winner_loss_curves.png",
        )
        edges = dg.edge_warnings([recommended], cfg.search, cfg.report.edge_fraction)
        stronger = more_regularised(table, cfg.search, recommended)["value"]
        if len(stronger):
            best = stronger.min() if cfg.direction == "minimize" else stronger.max()
            regularised = (len(stronger), float(best))
        near = neighbourhood(table, cfg.search, recommended, cfg.report.near_best, cfg.direction)
    if importances:
        images["Parameter importances (fANOVA)"] = plots.importance_chart(
            importances, folder / "importances.png"
        )
    if recommended:
        for path in draw_surfaces(table, cfg.search, recommended, folder):
            images[f"Response surface: {path.stem.removeprefix('surface_')}"] = path
    completed = table.loc[table["state"] == m.COMPLETE, "run_id"].dropna()
    worst = [
        tracker.read_csv_artifact(run_id, f"{m.DIAGNOSTICS_DIR}/{m.WORST_SAMPLES}")
        for run_id in completed
    ]
    found = [w for w in worst if w is not None]
    evidence = EVIDENCE[cfg.task]
    return Report(
        cfg=cfg,
        summary=summary,
        table=table,
        selection=selection,
        importances=importances,
        images=images,
        pages=pages,
        hard=hard_windows(found, evidence.sample_keys, evidence.sample_score),
        hard_source=f"{len(found)} completed trials",
        edges=edges,
        near=near,
        task_name=cfg.task,
        onset=None if onset is None else int(onset),
        stronger=regularised,
        fold_values=on_folds,
        budget=dg.budget_warning(summary.table.head(EDGE_TOP).to_dict("records"), cfg.train),
    )


def fold_values(metrics: dict[str, float], folds: int, monitor: str) -> list[float]:
    """A run's best monitored value on each validation fold, in fold order (the last is the
    split's own); empty with one fold, or where a fold was cut before it ended."""
    keys = [m.fold(k, m.best(monitor)) for k in range(folds - 1)] + [m.best(monitor)]
    if folds < 2 or any(key not in metrics for key in keys):
        return []
    return [metrics[key] for key in keys]


def publish(cfg: Config, tracker: Tracker, study: Study, parent_id: str) -> str:
    """Write the report from the stores, attach it to the parent run and set the run's
    description; returns what the command prints."""
    folder = output_dir(cfg)
    report = gather(cfg, tracker, study, parent_id, folder)
    resolved = mask_stores(cfg.model_dump(mode="json"))
    (folder / "resolved_config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    report.table.to_csv(folder / "trials.csv", index=False)
    summary = report.summary
    advice = dg.edge_warnings(summary.table.head(EDGE_TOP).to_dict("records"), cfg.search)
    advice += [report.budget] if report.budget else []
    if advice:  # once per sweep, on screen and as a tag: a range or the epochs should grow
        tracker.set_tags(parent_id, {m.RANGE_TAG: " | ".join(advice)})
    if summary.best_number is not None:
        write_best_config(cfg, summary.best_values, folder / "best_config.yaml", "best")
        tracker.set_tags(parent_id, {m.BEST_TRIAL_TAG: summary.best_number})
    if report.selection is not None:
        write_best_config(
            cfg, report.selection.winner.values, folder / "recommended_config.yaml", "recommended"
        )
    path = write_report(report, folder)
    tracker.log_artifacts(parent_id, folder, m.REPORT_DIR)
    tracker.describe(parent_id, description(report, parent_id))
    text = format_summary(
        summary, report.selection, report.task_name, tracker.ui_command(parent_id)
    )
    warnings = [f"warning: {w}" for w in advice]
    return "\n".join([text, *warnings, f"Report: {path}"])
