"""Read a study back from its stores and say what it found, with evidence. Trains nothing.

Usable on its own (``python -m lstm_sweep.report SWEEP.yaml``) and called at the end of every
sweep. The table joins Optuna's trials with their MLflow runs; importances and Optuna's plots
say what mattered; the closing stage's ``selection.json`` (seed re-evaluation, baselines, the
registered model) supplies the recommendation; the response surface shows whether it sits in a
good region. All of it lands in one Markdown report with its pictures, beside the run's files
and on the sweep's parent run, whose description in the MLflow UI carries the answer.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from lstm_sweep import diagnostics as dg
from lstm_sweep import metrics as m
from lstm_sweep import plots
from lstm_sweep.config import Config, ConfigError, SearchParam, load_config, without_password
from lstm_sweep.faults import EXIT_STORE, StoreFailed
from lstm_sweep.select import Selection, optimism, plain
from lstm_sweep.study import Study, open_study, param_importances, study_figures, trials_frame
from lstm_sweep.tracking import STORE_ROOT, Tracker

RUN_METRICS = (  # per trial, read back from its MLflow run
    m.BEST_VAL_LOSS,
    m.best(m.GAP),
    m.best(m.TRAIN_EVAL_LOSS),
    m.OVERFIT_ONSET,
)
SUMMARY_COLUMNS = [
    "number",
    "state",
    "value",
    "verdict",
    m.best(m.GAP),
    m.BEST_EPOCH,
    m.EPOCHS_TRAINED,
    "wall_seconds",
]
EDGE_TOP = 3  # the best completed trials whose position in each range is checked
PAIRS = (("model.dropout", "train.weight_decay"), ("model.hidden_size", "train.learning_rate"))
SURFACE_METRICS = (m.BEST_VAL_LOSS, m.best(m.GAP), m.OVERFIT_ONSET)
BINS = 5  # cells per numeric axis of the response surface
NEIGHBOURHOOD = 0.2  # a trial is "near" when every searched key is this close, in range units
HARD_SHARE = 0.8  # a window in this share of the runs' worst-k lists is hard for every setting
WHAT_TO_TRY = {
    "forecast": "a longer window (data.window), more data, or the linear path (model.skip: linear)",
    "classification": "more data, a larger model or the linear path (model.skip: linear)",
}


def output_dir(cfg: Config, root: Path = STORE_ROOT) -> Path:
    """Where a sweep's report files go: next to the local stores, one folder per study."""
    folder = root / "reports" / cfg.study_name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


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
    if m.RUN_ID_ATTR not in trials:  # no trial has started yet
        trials = trials.assign(**{m.RUN_ID_ATTR: pd.Series(dtype=str)})
    table = trials.merge(view, how="left", left_on=m.RUN_ID_ATTR, right_on="run_id")
    columns = [
        "number",
        "state",
        *keys,
        "value",
        *RUN_METRICS,
        m.VERDICT_ATTR,
        m.BEST_EPOCH,
        m.EPOCHS_TRAINED,
        "wall_seconds",
        "run_id",
    ]
    return table[[c for c in columns if c in table]].sort_values("number", ignore_index=True)


@dataclass(frozen=True)
class SweepSummary:
    finished: int
    pruned: int
    failed: int
    unstable: int  # of the pruned: the loss blew up
    best_number: int | None
    best_value: float | None
    best_values: dict[str, Any]
    naive_val_loss: float
    table: pd.DataFrame  # completed trials, best first
    monitor: str


def summarise(
    table: pd.DataFrame, keys: list[str], direction: str, monitor: str, naive_val_loss: float
) -> SweepSummary:
    """Counts, best trial and a ranked table from a comparison table."""
    states = table["state"].value_counts() if len(table) else pd.Series(dtype=int)
    done = table[table["state"] == m.COMPLETE].sort_values(
        "value", ascending=direction == "minimize"
    )
    columns = [c for c in [*SUMMARY_COLUMNS[:3], *keys, *SUMMARY_COLUMNS[3:]] if c in table]
    best = done.iloc[0] if len(done) else None
    return SweepSummary(
        finished=int(states.get(m.COMPLETE, 0)),
        pruned=int(states.get(m.PRUNED, 0)),
        failed=int(states.get(m.FAIL, 0)),
        unstable=int((table["verdict"] == "unstable").sum()) if "verdict" in table else 0,
        best_number=int(best["number"]) if best is not None else None,
        best_value=float(best["value"]) if best is not None else None,
        best_values={k: plain(best[k]) for k in keys} if best is not None else {},
        naive_val_loss=naive_val_loss,
        table=done[columns].reset_index(drop=True),
        monitor=monitor,
    )


def nothing_finished(summary: SweepSummary) -> str:
    """Why no trial finished, and what to change."""
    why = []
    if summary.unstable:
        why.append(
            f"{summary.unstable} unstable (the loss blew up: search lower learning rates, or"
            " set train.grad_clip)"
        )
    if summary.pruned > summary.unstable:
        why.append(
            f"{summary.pruned - summary.unstable} pruned early (let trials train longer before"
            " the pruner judges: study.pruner.n_warmup_steps)"
        )
    if summary.failed:
        why.append(f"{summary.failed} failed (each trial run's failure_reason says why)")
    return (
        f"No trial finished, so there is nothing to recommend: {'; '.join(why) or 'none ran'}."
        " Change the sweep file and run it as a new study (--set study.name=...)."
    )


def settings_text(values: Mapping[str, Any]) -> str:
    return (
        ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        or "(nothing searched)"
    )


def best_config(cfg: Config, values: Mapping[str, Any], label: str) -> dict[str, Any]:
    """The sweep file that trains the given settings once: no search, one trial, its own
    study; store URIs without their passwords (PGPASSWORD or ~/.pgpass supply them)."""
    raw = cfg.with_values(dict(values)).model_dump(mode="json")
    raw["search"] = {}
    raw["study"] |= {"name": f"{cfg.study_name}-{label}", "n_trials": 1}
    return mask_stores(raw)


def mask_stores(raw: dict[str, Any]) -> dict[str, Any]:
    """A dumped config with the password taken out of both store URIs."""
    for section, key in (("study", "storage"), ("tracking", "uri")):
        if raw[section].get(key):
            raw[section][key] = without_password(raw[section][key])
    return raw


def write_best_config(cfg: Config, values: Mapping[str, Any], path: Path, label: str) -> Path:
    header = (
        f"# {label.capitalize()} settings of study {cfg.study_name!r};"
        f" run: python -m lstm_sweep.run {path}\n"
    )
    path.write_text(header + yaml.safe_dump(best_config(cfg, values, label), sort_keys=False))
    return path


def ratio_text(value: float, reference: float) -> str:
    """``value`` as a share of ``reference``, or nothing when the reference is zero."""
    return f", {value / reference:.0%} of it" if reference > 0 else ""


def honesty_lines(selection: Selection, task_name: str) -> list[str]:
    """The first lines of every summary: whether the LSTM is the answer at all."""
    beaten = selection.beaten_by
    if beaten is None:
        return [
            "The LSTM beats every baseline on the validation part"
            f" ({selection.headline} {selection.lstm_val[selection.headline]:.4g})."
        ]
    return [
        f"The LSTM does NOT beat the {beaten['method']} baseline on the validation part:"
        f" {beaten['metric']} {beaten['lstm']:.4g} for the LSTM against {beaten['baseline']:.4g}.",
        f"Use the baseline, or try {WHAT_TO_TRY[task_name]}, before trusting the LSTM.",
    ]


def naive_comparison(monitor: str, value: float, naive_val_loss: float) -> str:
    """The naive predictor beside the best value, in the monitored measure's own terms."""
    if monitor == m.VAL_LOSS:
        ratio = ratio_text(value, naive_val_loss)
        return f" (naive predictor's val loss: {naive_val_loss:.4g}{ratio})"
    if monitor == m.VAL_NMSE:  # the naive forecast's MSE is its unit
        return " (the naive forecast scores 1: below 1 beats it)"
    return ""


def format_summary(
    summary: SweepSummary, selection: Selection | None, task_name: str, ui_command: str
) -> str:
    """What the command prints at the end, the answer first."""
    lines = honesty_lines(selection, task_name) if selection else []
    lines.append(
        f"Trials: {summary.finished} finished, {summary.pruned} pruned, {summary.failed} failed."
    )
    if summary.best_number is None or summary.best_value is None:
        lines.append(nothing_finished(summary))
    else:
        lines += [
            f"Best trial #{summary.best_number}: {summary.monitor} {summary.best_value:.4g}"
            + naive_comparison(summary.monitor, summary.best_value, summary.naive_val_loss),
            f"Best settings: {settings_text(summary.best_values)}",
            "",
            f"Top {min(5, len(summary.table))}:",
            summary.table.head(5).to_string(index=False, float_format=lambda v: f"{v:.4g}"),
        ]
    if selection is not None:
        winner = selection.winner
        lines += [
            "",
            f"Recommended (best mean of {len({s.seed for s in selection.seeds})} seed(s) over"
            f" the top {len(selection.settings)}): trial #{winner.number},"
            f" {settings_text(winner.values)}",
            "Test part (see the report for units and notes):",
            comparison_frame(selection).to_string(float_format=lambda v: f"{v:.4g}"),
        ]
    lines += ["", f"The answer in the MLflow UI: {ui_command}"]
    return "\n".join(lines)


def comparison_frame(selection: Selection) -> pd.DataFrame:
    """The LSTM beside every baseline, on the validation and the test part."""

    def on(part: str, errors: dict[str, Any]) -> dict[str, Any]:
        return {m.error(part, k): v for k, v in errors.items() if k != "note"}

    rows: dict[str, dict[str, Any]] = {}
    final = selection.final
    if final is not None:
        rows["lstm"] = on("test", final.test) | {"note": f"final model ({final.kind})"}
        if final.single_seed_test:
            note = "the ensemble's first member alone"
            rows["lstm (one seed)"] = on("test", final.single_seed_test) | {"note": note}
    rows.setdefault("lstm", {"note": "no final model"})
    rows["lstm"] |= on("val", selection.lstm_val)
    for method, errors in selection.baselines_test.items():
        rows[method] = on("test", errors) | on("val", selection.baselines_val[method])
        rows[method]["note"] = errors.get("note", "")
    frame = pd.DataFrame.from_dict(rows, orient="index")
    ordered = sorted((c for c in frame if c != "note"), key=lambda c: (not c.startswith("val"), c))
    return frame[[*ordered, "note"]]


def parent_metrics(selection: Selection) -> dict[str, float]:
    """The closing stage's numbers as single-value metrics of the sweep's parent run."""
    values: dict[str, float] = {}
    for method, row in comparison_frame(selection).iterrows():
        for column, value in row.items():
            if column != "note" and isinstance(value, float) and math.isfinite(value):
                name = str(method).replace(" (one seed)", "_single_seed")
                part, metric = str(column).split("_", 1)
                values[m.baseline(name, part, metric)] = value
    winner = selection.winner_spread
    values["recommended_val_mean"] = float(winner["val_mean"])
    if selection.final is not None:
        values |= optimism(selection.final, selection)
        values["final_test_value"] = selection.final.test_value
    return {k: v for k, v in values.items() if math.isfinite(v)}


def position(value: Any, param: SearchParam) -> float:
    """Where a value sits in its searched range: 0 at the low end, 1 at the high end (in log
    space for log ranges, by index for categorical choices)."""
    if param.type == "categorical":
        choices = list(param.choices or [])
        return choices.index(value) / max(1, len(choices) - 1) if value in choices else math.nan
    scale = math.log if param.log else float
    low, high = (scale(float(v)) for v in param.span)
    return (scale(float(value)) - low) / (high - low) if high > low else 0.5


def cells(values: pd.Series, param: SearchParam) -> pd.Series:
    """Each value's cell along one axis of the response surface, as a categorical label."""
    if param.type == "categorical":
        labels = [str(c) for c in param.choices or []]
        categorical = pd.Categorical(values.astype(str), categories=labels)
        return pd.Series(categorical, index=values.index)
    low, high = param.span
    edges = (np.geomspace if param.log else np.linspace)(low, high, BINS + 1)
    labels = [f"{edges[i]:.2g}-{edges[i + 1]:.2g}" for i in range(BINS)]
    return pd.cut(values.astype(float), edges, labels=labels, include_lowest=True)


def surface(
    table: pd.DataFrame, x_key: str, y_key: str, metric: str, search: Mapping[str, SearchParam]
) -> pd.DataFrame:
    """Median of ``metric`` over completed trials per (y cell, x cell); NaN where none fell."""
    done = table[(table["state"] == m.COMPLETE) & table[metric].notna()]
    frame = pd.DataFrame(
        {
            "x": cells(done[x_key], search[x_key]),
            "y": cells(done[y_key], search[y_key]),
            "v": done[metric].astype(float),
        }
    )
    grid = frame.pivot_table(index="y", columns="x", values="v", aggfunc="median", observed=False)
    # every cell keeps its place, trials or not, so two pictures of one study line up
    return grid.reindex(index=frame["y"].cat.categories, columns=frame["x"].cat.categories)


def draw_surfaces(
    table: pd.DataFrame,
    search: Mapping[str, SearchParam],
    recommended: Mapping[str, Any],
    folder: Path,
) -> list[Path]:
    """One PNG per searched pair of :data:`PAIRS`, the recommendation starred."""
    written = []
    metrics = [k for k in SURFACE_METRICS if k in table and table[k].notna().any()]
    for x_key, y_key in PAIRS:
        if x_key not in search or y_key not in search or not metrics:
            continue
        grids = {k: surface(table, x_key, y_key, k, search) for k in metrics}
        star_x = cells(pd.Series([recommended[x_key]]), search[x_key]).iloc[0]
        star_y = cells(pd.Series([recommended[y_key]]), search[y_key]).iloc[0]
        name = f"surface_{x_key.split('.')[-1]}_{y_key.split('.')[-1]}.png"
        written.append(plots.heatmaps(grids, x_key, y_key, (star_x, star_y), folder / name))
    return written


def neighbourhood(
    table: pd.DataFrame,
    search: Mapping[str, SearchParam],
    recommended: Mapping[str, Any],
    near_best: float,
    direction: str,
) -> tuple[int, int]:
    """Completed trials near the recommendation (every searched key within
    :data:`NEIGHBOURHOOD` of its range), and how many of them came within ``near_best`` of the
    study's best value: many good neighbours mean a robust region, none an isolated point."""
    done = table[table["state"] == m.COMPLETE]
    if done.empty:
        return 0, 0
    near = np.ones(len(done), dtype=bool)
    for key, param in search.items():
        here = position(recommended[key], param)
        where = done[key].map(lambda v, p=param: position(v, p)).to_numpy(dtype=float)
        near &= np.abs(where - here) <= NEIGHBOURHOOD
    values = done["value"].to_numpy(dtype=float)
    if direction == "minimize":
        good = values <= values.min() * (1 + near_best)
    else:
        good = values >= values.max() * (1 - near_best)
    return int(near.sum()), int((near & good).sum())


def hard_windows(worst: list[pd.DataFrame], share: float = HARD_SHARE) -> pd.DataFrame:
    """Validation samples among the worst-k of at least ``share`` of the runs: the sample's
    identity (window and start, or id and true class), runs (how many lists hold it), share,
    and its score averaged over those runs (mae, or the confidence of the wrong answer)."""
    lists = [w for w in worst if w is not None and not w.empty]
    keys, score = (
        (["id", "true"], "confidence")
        if lists and "id" in lists[0]
        else (["window", "start"], "mae")
    )
    if not lists:
        return pd.DataFrame(columns=[*keys, "runs", "share", score])
    stacked = pd.concat(lists)
    counted = stacked.groupby(keys, as_index=False).agg(
        runs=(score, "size"), **{score: (score, "mean")}
    )
    counted["share"] = counted["runs"] / len(lists)
    hard = counted[counted["share"] >= share].sort_values(["share", score], ascending=False)
    return hard[[*keys, "runs", "share", score]].reset_index(drop=True)


def markdown(frame: pd.DataFrame, index: bool = False) -> str:
    """A DataFrame as a GitHub-flavoured Markdown table, numbers to 4 significant digits."""
    return frame.to_markdown(index=index, floatfmt=".4g", missingval="")


@dataclass
class Report:
    """Everything the report shows, gathered from the stores."""

    cfg: Config
    summary: SweepSummary
    table: pd.DataFrame
    selection: Selection | None
    importances: dict[str, float]
    images: dict[str, Path]  # caption -> picture in the report folder
    pages: list[Path]  # Optuna's HTML views
    hard: pd.DataFrame
    hard_source: str
    edges: list[str]
    near: tuple[int, int]
    task_name: str


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
    summary = summarise(table, keys, cfg.direction, cfg.train.monitor, naive)
    raw = tracker.read_json_artifact(parent_id, m.SELECTION_FILE)
    selection = Selection.from_dict(raw) if raw else None
    importances = param_importances(study, cfg.train.seed)
    contour = [k for k in PAIRS[0] if k in cfg.search]
    pages = plots.study_pages(study_figures(study, contour, cfg.train.seed), folder / "plots")
    images: dict[str, Path] = {}
    edges: list[str] = []
    near = (0, 0)
    recommended = selection.winner.values if selection else summary.best_values
    if selection is not None:
        seed_run = next(s for s in selection.seeds if s.number == selection.recommended)
        rows = tracker.metric_history(
            seed_run.run_id, [m.TRAIN_LOSS, m.TRAIN_EVAL_LOSS, m.VAL_LOSS]
        )
        onset = tracker.run_metrics(seed_run.run_id).get(m.OVERFIT_ONSET)
        caption = f"Loss curves of the recommendation, seed {seed_run.seed}: {seed_run.verdict}"
        images[caption] = plots.loss_curves(
            rows,
            seed_run.best_epoch,
            None if onset is None else int(onset),
            folder / "winner_loss_curves.png",
        )
        edges = dg.edge_warnings([recommended], cfg.search, cfg.report.edge_fraction)
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
    return Report(
        cfg=cfg,
        summary=summary,
        table=table,
        selection=selection,
        importances=importances,
        images=images,
        pages=pages,
        hard=hard_windows(found),
        hard_source=f"{len(found)} completed trials",
        edges=edges,
        near=near,
        task_name=cfg.task,
    )


def recommendation_lines(report: Report) -> list[str]:
    """The recommendation and its evidence, in a few Markdown lines."""
    selection, cfg = report.selection, report.cfg
    if selection is None:
        return ["The closing stage has not run yet: run the sweep's command to finish it."]
    winner, spread = selection.winner, selection.winner_spread
    std = 0.0 if pd.isna(spread["val_std"]) else float(spread["val_std"])
    seeds = [s for s in selection.seeds if s.number == winner.number]
    lines = [
        f"**{settings_text(winner.values)}** (found by trial #{winner.number}).",
        "",
        *[f"**{line}**" for line in honesty_lines(selection, report.task_name)],
        "",
        f"- Mean best {cfg.train.monitor} over {len(seeds)} seed(s): {spread['val_mean']:.4g}"
        f" ± {std:.2g} (the trial itself: {winner.value:.4g}).",
        f"- Verdicts of its seeds: {', '.join(s.verdict or '?' for s in seeds)}.",
    ]
    if selection.within_noise:
        numbers = ", ".join(f"#{n}" for n in selection.within_noise)
        lines.append(
            f"- Within noise of it (mean difference below the two seed standard deviations"
            f" added): trial(s) {numbers}. Prefer the simpler or cheaper one if it matters."
        )
    elif len(seeds) > 1:
        lines.append("- No other re-evaluated setting is within noise of it.")
    else:
        lines.append(
            "- One seed per setting gives no spread: set report.seeds >= 2 to judge noise."
        )
    final = selection.final
    if final is not None:
        opt = optimism(final, selection)
        scores = ", ".join(f"{k} {v:.4g}" for k, v in final.test.items())
        how = (
            f"the mean of its {len(seeds)} seed models"
            if final.kind == "ensemble"
            else f"retrained on training + validation samples for {final.epochs} epochs"
        )
        lines += [
            f"- Final model: {how}; tested once: {scores}.",
            f"- Honest estimate: optimism (test minus validation {cfg.train.monitor}) is"
            f" {opt['optimism_vs_trial']:+.4g} against the trial and"
            f" {opt['optimism_vs_seed_mean']:+.4g} against the seed mean.",
            f"- Registered model: `{final.model_uri}`; predictions from a table:"
            f" `python -m lstm_sweep.predict {final.model_uri} data.csv`.",
        ]
    lines.append(
        f"- The closing stage trained {selection.trainings} model(s) in {selection.seconds:.0f} s."
    )
    return lines


def write_report(report: Report, folder: Path) -> Path:
    """The one readable report: the answer first, then the evidence behind it."""
    cfg, summary, selection = report.cfg, report.summary, report.selection
    n_near, n_good = report.near
    lines = [f"# Regularisation report: {cfg.study_name}", "", "## Recommendation", ""]
    lines += recommendation_lines(report)
    if selection is not None:
        lines += [
            f"- Neighbourhood: {n_near} completed trial(s), its own included, lie within"
            f" {NEIGHBOURHOOD:.0%} of every searched range around it; {n_good} came within"
            f" {cfg.report.near_best:.0%} of the best value"
            + (
                " — a robust region, not a lucky point."
                if n_good >= 3
                else " — too few good neighbours to call it a robust region."
            ),
            "- Range: "
            + (
                "; ".join(report.edges)
                if report.edges
                else "inside every searched range, not at an edge."
            ),
            "- Ready-to-train file: `recommended_config.yaml`"
            f" (`python -m lstm_sweep.run {folder / 'recommended_config.yaml'}`).",
            "",
            "## Against the baselines",
            "",
            BASELINE_NOTES[report.task_name],
            "",
            markdown(comparison_frame(selection), index=True),
            "",
            "## Seed re-evaluation of the top settings",
            "",
            "Chosen on the validation mean only; test columns are shown, never used to choose.",
            "",
            markdown(spread_with_values(selection)),
            "",
        ]
    lines += ["## What mattered", ""]
    if report.importances:
        frame = pd.DataFrame(
            {"key": list(report.importances), "importance": list(report.importances.values())}
        )
        lines += [markdown(frame), ""]
    else:
        lines += ["Too few completed trials for importances.", ""]
    lines += [f"- [{p.stem.replace('_', ' ')}](plots/{p.name})" for p in report.pages]
    lines += ["", "## Pictures", ""]
    for caption, path in report.images.items():
        lines += [f"### {caption}", "", f"![{caption}]({path.name})", ""]
    lines += [
        "## Validation windows every setting gets wrong",
        "",
        f"Samples in the worst {cfg.diagnostics.k_worst} of at least {HARD_SHARE:.0%} of"
        f" {report.hard_source}: a data or regime problem, not a regularisation one.",
        "",
        markdown(report.hard) if len(report.hard) else "None.",
        "",
        f"## All trials ({summary.finished} finished, {summary.pruned} pruned,"
        f" {summary.failed} failed)",
        "",
        markdown(report.table.drop(columns=["run_id"], errors="ignore")),
        "",
    ]
    path = folder / "report.md"
    path.write_text("\n".join(lines))
    return path


BASELINE_NOTES = {
    "forecast": "Errors in the target's own units. MASE divides the MAE by the naive forecast's"
    " MAE on the training windows. The ridge baseline is a linear autoregression on the LSTM's"
    " own input windows, its penalty chosen on validation.",
    "classification": "Accuracy, balanced accuracy and macro F1; the logistic regression reads"
    " the flattened sequences.",
}


def spread_with_values(selection: Selection) -> pd.DataFrame:
    values = pd.DataFrame(
        [{"number": s.number, **s.values, "trial_value": s.value} for s in selection.settings]
    )
    return values.merge(pd.DataFrame(selection.spread), on="number")


def description(report: Report, run_id: str) -> str:
    """The parent run's description in the MLflow UI: the answer, its evidence in a few lines,
    the baseline comparison and the report's pictures (the UI serves them from the run's
    artifacts), so nobody needs to download anything to read it."""
    cfg, selection = report.cfg, report.selection
    lines = [f"## {cfg.study_name}: recommended settings", ""]
    lines += recommendation_lines(report)
    if selection is not None:
        lines += [
            "",
            "### Against the baselines",
            "",
            markdown(comparison_frame(selection), index=True),
        ]
    summary = report.summary
    lines += [
        "",
        f"Trials: {summary.finished} finished, {summary.pruned} pruned, {summary.failed} failed."
        f" The full report is `{m.REPORT_DIR}/report.md` under the artifacts.",
        "",
    ]
    for caption, path in report.images.items():
        link = f"get-artifact?path={m.REPORT_DIR}/{path.name}&run_uuid={run_id}"
        lines += [f"**{caption}**", "", f"![{caption}]({link})", ""]
    return "\n".join(lines)


def render(cfg: Config, tracker: Tracker, study: Study, parent_id: str, close: bool = True) -> str:
    """Write the report from the stores, attach it to the parent run, set the run's
    description and (with ``close``) close the run; returns what the command prints."""
    folder = output_dir(cfg)
    report = gather(cfg, tracker, study, parent_id, folder)
    resolved = mask_stores(cfg.model_dump(mode="json"))
    (folder / "resolved_config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    report.table.to_csv(folder / "trials.csv", index=False)
    summary = report.summary
    edges = dg.edge_warnings(summary.table.head(EDGE_TOP).to_dict("records"), cfg.search)
    if edges:  # once per sweep, on screen and as a tag: the range should be widened
        tracker.set_tags(parent_id, {m.RANGE_TAG: " | ".join(edges)})
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
    if close:
        tracker.finish_parent(parent_id, m.COMPLETE)
    text = format_summary(
        summary, report.selection, report.task_name, tracker.ui_command(parent_id)
    )
    warnings = [f"warning: {w}" for w in edges]
    return "\n".join([text, *warnings, f"Report: {path}"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lstm_sweep.report", description=__doc__)
    parser.add_argument("sweep", help="the sweep's YAML file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.sweep, args.set)
        tracker = Tracker(cfg.tracking.uri, cfg.experiment, args.sweep)
        study = open_study(cfg, args.sweep)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except StoreFailed as exc:  # a full disk, say, when the stores were opened
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_STORE
    parent_id = tracker.find_parent(cfg.study_name)
    if parent_id is None:
        print(f"error: {args.sweep}: study {cfg.study_name!r} has no runs yet", file=sys.stderr)
        return 2
    print(render(cfg, tracker, study, parent_id, close=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
