"""What the report says, as text: the summary the command prints, the Markdown report and the
parent run's description in the MLflow UI. Pure functions of what ``gather`` read."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lstm_sweep import metrics as m
from lstm_sweep.config import Config
from lstm_sweep.evidence import EVIDENCE
from lstm_sweep.report.ranges import NEIGHBOURHOOD
from lstm_sweep.report.table import HARD_SHARE, SweepSummary
from lstm_sweep.selection import Champion, Selection, optimism


def settings_text(values: Mapping[str, Any]) -> str:
    return (
        ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        or "(nothing searched)"
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


def ratio_text(value: float, reference: float) -> str:
    """``value`` as a share of ``reference``, or nothing when the reference is zero."""
    return f", {value / reference:.0%} of it" if reference > 0 else ""


def honesty_lines(selection: Selection, task_name: str) -> list[str]:
    """The first lines of every summary: whether the LSTM is the answer at all, on the part
    that chose it and on the test part; first of all, a retrained final model that
    collapsed."""
    final = selection.final
    lines = []
    if final is not None and final.collapsed:
        lines.append(
            f"The retrained final model COLLAPSED ({final.collapsed}): it was not registered;"
            " the registered model is the mean of its seed models."
        )
    beaten, on_test = selection.beaten_by, selection.beaten_on_test
    if beaten is None:
        lines.append(
            "The LSTM beats every baseline on the validation part"
            f" ({selection.headline} {selection.lstm_val[selection.headline]:.4g})"
            + (f"; on the test part it does NOT: {lost(on_test)}." if on_test else ".")
        )
    else:
        lines.append(
            f"The LSTM does NOT beat the {beaten['method']} baseline on the validation part:"
            f" {lost(beaten)}" + (f"; on the test part: {lost(on_test)}." if on_test else ".")
        )
    if beaten or on_test:
        lines.append(
            f"Use the baseline, or try {EVIDENCE[task_name].what_to_try}, before trusting the LSTM."
        )
    return lines


def lost(beaten: dict[str, Any]) -> str:
    """A baseline that beats the LSTM, in numbers."""
    return (
        f"{beaten['method']} {beaten['metric']} {beaten['baseline']:.4g} against the LSTM's"
        f" {beaten['lstm']:.4g}"
    )


def naive_comparison(monitor: str, value: float, naive_val_loss: float) -> str:
    """The naive predictor beside the best value, in the monitored measure's own terms."""
    if monitor == m.VAL_LOSS:
        ratio = ratio_text(value, naive_val_loss)
        return f" (naive predictor's val loss: {naive_val_loss:.4g}{ratio})"
    if monitor == m.VAL_NMSE:  # the naive forecast's MSE is its unit
        return " (the naive forecast scores 1: below 1 beats it)"
    return ""


def trials_line(summary: SweepSummary) -> str:
    """How many trials ran and how they ended, and why the study ended where it stopped
    itself."""
    counts = (
        f"Trials: {summary.finished} finished, {summary.pruned} pruned, {summary.failed} failed"
    )
    return f"{counts}; {summary.stopped}." if summary.stopped else f"{counts}."


def format_summary(
    summary: SweepSummary, selection: Selection | None, task_name: str, ui_command: str
) -> str:
    """What the command prints at the end, the answer first."""
    lines = honesty_lines(selection, task_name) if selection else []
    lines.append(trials_line(summary))
    if summary.best_number is None or summary.best_value is None:
        lines.append(nothing_finished(summary))
    else:
        # with folds the value is a mean over validation stretches the naive figure is not of
        beside = (
            f" (the mean over {summary.folds} validation folds)"
            if summary.folds > 1
            else naive_comparison(summary.monitor, summary.best_value, summary.naive_val_loss)
        )
        lines += [
            f"Best trial #{summary.best_number}: {summary.monitor} {summary.best_value:.4g}"
            + beside,
            f"Best settings: {settings_text(summary.best_values)}",
            "",
            f"Top {min(5, len(summary.table))}:",
            summary.table.head(5).to_string(index=False, float_format=lambda v: f"{v:.4g}"),
        ]
    if selection is not None:
        winner = selection.winner
        lines += [
            "",
            f"Recommended (the best mean of its {winner_seeds(selection)} seed(s) among the"
            f" top {len(selection.settings)}): trial #{winner.number},"
            f" {settings_text(winner.values)}",
            "Test part (see the report for units and notes):",
            comparison_frame(selection).to_string(float_format=lambda v: f"{v:.4g}"),
        ]
        final = selection.final
        if final is not None and final.champion is not None:
            lines.append(champion_line(final.champion, final.model_uri).replace("`", ""))
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


def champion_line(champion: Champion, model_uri: str) -> str:
    """Where the champion alias is after this study, and on what evidence."""
    name = model_uri.removeprefix("models:/").rpartition("/")[0]
    alias = f"`models:/{name}@{m.CHAMPION}`"
    here = f"{champion.metric} {champion.score:.4g} on this study's test part"
    if champion.previous is None:
        return f"{alias} is this version, the first of its name ({here})."
    if champion.previous_score is None:
        return f"{alias} stays on version {champion.previous}: {champion.note}."
    there = f"version {champion.previous}'s {champion.previous_score:.4g}"
    if champion.crowned:
        return f"{alias} moved to this version: {here} against {there}."
    return f"{alias} stays on version {champion.previous}: this version's {here} against {there}."


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
    # what the evidence cost, comparable across sweeps in the UI
    values["closing_trainings"] = float(selection.trainings)
    values["closing_spared"] = float(selection.spared)
    values["closing_seconds"] = selection.seconds
    if selection.final is not None:
        values |= optimism(selection.final, selection)
        values["final_test_value"] = selection.final.test_value
    return {k: v for k, v in values.items() if math.isfinite(v)}


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
    onset: int | None = None  # the epoch the recommendation's first seed began to overfit
    # completed trials regularised more than the recommendation, and the best value among them
    stronger: tuple[int, float | None] = (0, None)
    fold_values: list[float] = field(default_factory=list)  # its first seed's, fold by fold
    budget: str | None = None  # the best trials ran out of epochs, not patience


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
    if report.fold_values:
        values = ", ".join(f"{v:.4g}" for v in report.fold_values)
        lines.append(
            f"- Over its {len(report.fold_values)} validation folds (seed {seeds[0].seed}, the"
            f" split's own last): {values}; spread ± {np.std(report.fold_values, ddof=1):.2g}."
        )
    if selection.within_noise:
        lines.append(f"- {indistinguishable(selection)}")
    elif len(seeds) > 1:
        lines.append("- No other re-evaluated setting is within noise of it.")
    else:
        lines.append(
            "- One seed per setting gives no spread: set closing.seeds >= 2 to judge noise."
        )
    if any(s.verdict == "overfitting" for s in seeds):
        lines.append(f"- {overfitting_line(report, winner.value, seeds[0].best_epoch)}")
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
        if final.champion is not None:
            lines.append(f"- {champion_line(final.champion, final.model_uri)}")
    if cfg.closing.race and len(selection.settings) > 1:
        lines.append(f"- {race_line(selection)}")
    lines.append(
        f"- The closing stage trained {selection.trainings} model(s) in {selection.seconds:.0f} s."
    )
    return lines


def winner_seeds(selection: Selection) -> int:
    return sum(s.number == selection.recommended for s in selection.seeds)


def race_line(selection: Selection) -> str:
    """How the closing stage's race over seeds went: which settings left after which seed and
    why, and the trainings that spared."""
    left = [
        f"#{number} left after seed {round_.seeds[-1]}: {why}"
        for round_ in selection.race
        for number, why in round_.left.items()
    ]
    if not left:
        return "The race over seeds: every setting stayed within noise of the leader to the end."
    return (
        f"The race over seeds: {'; '.join(left)}. It spared {selection.spared} training(s)"
        " of the full grid of seeds."
    )


def indistinguishable(selection: Selection) -> str:
    """The settings within noise of the winner, said plainly, the smallest named."""
    tied = [selection.recommended, *selection.within_noise]
    numbers = ", ".join(f"#{n}" for n in tied)
    line = (
        f"Indistinguishable from it (mean difference below the two seed standard deviations"
        f" added): any of trials {numbers} will do"
    )
    sizes = {n: selection.sizes[n] for n in tied if n in selection.sizes}
    if not sizes:
        return f"{line}; prefer the simpler or cheaper one."
    smallest = min(sizes, key=lambda n: (sizes[n], n))
    values = next(s.values for s in selection.settings if s.number == smallest)
    return (
        f"{line}; the smallest is #{smallest} ({sizes[smallest]:,} parameters:"
        f" {settings_text(values)})."
    )


def overfitting_line(report: Report, winner: float, best_epoch: int) -> str:
    """What an overfitting verdict means for the recommendation (whose trial scored
    ``winner``): when it starts, that early stopping kept the weights from before it, and what
    more regularisation scored."""
    cfg, (count, best) = report.cfg, report.stronger
    when = f" from epoch {report.onset}" if report.onset is not None else ""
    line = (
        f"Overfitting: its validation loss rises{when} while the training loss falls; early"
        f" stopping kept the weights of epoch {best_epoch}, before that."
    )
    if count == 0 or best is None:
        return (
            f"{line} No completed trial regularised it more within the searched ranges:"
            " widen dropout or weight decay upward to see whether more helps."
        )
    minimize = cfg.direction == "minimize"
    better = best < winner if minimize else best > winner
    return (
        f"{line} {count} completed trial(s) regularised it more in the searched ranges and"
        f" scored {'better' if better else 'worse'} at best ({cfg.train.monitor} {best:.4g}"
        f" against its {winner:.4g})."
    )


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
            *([f"- Epoch budget: {report.budget}."] if report.budget else []),
            "- Ready-to-train file: `recommended_config.yaml`"
            f" (`python -m lstm_sweep.run {folder / 'recommended_config.yaml'}`).",
            "",
            "## Against the baselines",
            "",
            EVIDENCE[report.task_name].baseline_note,
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
    lines += ["## The search", "", trials_line(summary), "", "## What mattered", ""]
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
        f"{trials_line(summary)} The full report is `{m.REPORT_DIR}/report.md` under the"
        " artifacts.",
        "",
    ]
    for caption, path in report.images.items():
        link = f"get-artifact?path={m.REPORT_DIR}/{path.name}&run_uuid={run_id}"
        lines += [f"**{caption}**", "", f"![{caption}]({link})", ""]
    return "\n".join(lines)
