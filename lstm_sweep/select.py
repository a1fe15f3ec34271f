"""From a finished study to one recommended setting and one registered model. This stage
trains; the report only reads what it leaves behind.

The luckiest trial is not the answer: the top-k settings are trained again with several seeds
(nested MLflow runs tagged ``reevaluation``; a trial that kept its weights counts as its own
first seed), the one with the best *mean* monitored metric is recommended, and the settings
within noise of it are named. The recommendation then becomes the final model (retrained on
training plus validation windows for the epochs selection found, or the mean of its seed
models), which is scored once on the test part, logged and registered, next to the baselines on
the validation and the test part. Selection never reads a test number. Everything it finds is
kept as ``selection.json`` on the sweep's parent run, and whatever it already finished (a
re-evaluation, the registered model) is reused when it runs again after an interruption.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from tqdm import tqdm

from lstm_sweep import metrics as m
from lstm_sweep.config import Config, plain
from lstm_sweep.data import TrainingData
from lstm_sweep.evidence import evidence_for
from lstm_sweep.faults import classify
from lstm_sweep.model import Ensemble
from lstm_sweep.progress import Ticker, step
from lstm_sweep.record import draw_recorded, load_weights, setting_run, train_in_run
from lstm_sweep.selection import (
    Champion,
    FinalModel,
    RaceRound,
    SeedResult,
    Selection,
    Setting,
    final_from_dict,
)
from lstm_sweep.sweep import JobContext
from lstm_sweep.tasks import Task, make_task
from lstm_sweep.tracking import Tracker, TrackingUnavailable
from lstm_sweep.train import (
    Callback,
    Interrupted,
    Stop,
    StopWhen,
    build_model,
    fit,
    predict,
    scores,
)


def top_settings(table: pd.DataFrame, keys: list[str], k: int, direction: str) -> list[Setting]:
    """The k best distinct settings among completed trials of a comparison table."""
    done = table[table["state"] == m.COMPLETE].sort_values(
        "value", ascending=direction == "minimize"
    )
    settings: list[Setting] = []
    seen: set[tuple[Any, ...]] = set()
    for _, row in done.iterrows():
        values = {key: plain(row[key]) for key in keys}
        signature = tuple(values.values())
        if signature in seen:  # a retried trial repeats its settings
            continue
        seen.add(signature)
        number, value, epoch = int(row["number"]), float(row["value"]), int(row[m.BEST_EPOCH])
        settings.append(Setting(number, values, value, epoch, str(row["run_id"])))
        if len(settings) == k:
            break
    return settings


def expected_seconds(table: pd.DataFrame) -> dict[int, float]:
    """Trial number -> its wall time: what training its setting again is expected to take."""
    if "wall_seconds" not in table:
        return {}
    return dict(zip(table["number"], table["wall_seconds"].fillna(0.0), strict=True))


def longest_first(
    jobs: list[tuple[Setting, int]], seconds: dict[int, float]
) -> list[tuple[Setting, int]]:
    """(setting, seed) jobs in the order processes that each take the next job as they finish
    should get them: longest expected first, so they finish close together; ties (a
    setting's seeds) in the order given."""
    return sorted(jobs, key=lambda job: -seconds.get(job[0].number, 0.0))


def spread_table(
    seeds: list[SeedResult], direction: str, headline: str, finalists: set[int] | None = None
) -> tuple[pd.DataFrame, int, list[int]]:
    """Per setting the mean and spread of its seeds' values (and, for the record, of their test
    headline error), best mean first; the winner (the best mean among ``finalists``, by
    default all); and the settings within noise of it: their mean differs from the winner's by
    less than the two standard deviations added (one seed has no spread, so then nothing is
    within noise)."""
    frame = pd.DataFrame(
        {
            "number": [s.number for s in seeds],
            "value": [s.value for s in seeds],
            "epochs": [s.best_epoch + 1 for s in seeds],
            "test": [s.test.get(headline, np.nan) for s in seeds],
        }
    )
    grouped = frame.groupby("number")
    spread = pd.DataFrame(
        {
            "val_mean": grouped["value"].mean(),
            "val_std": grouped["value"].std(),
            f"test_{headline}_mean": grouped["test"].mean(),
            f"test_{headline}_std": grouped["test"].std(),
            "epochs": grouped["epochs"].median().round().astype(int),
        }
    ).sort_values("val_mean", ascending=direction == "minimize")
    winner = next(int(n) for n in spread.index if finalists is None or n in finalists)
    noise = spread["val_std"].fillna(0.0)
    distance = (spread["val_mean"] - spread.loc[winner, "val_mean"]).abs()
    spread["within_noise"] = (distance < noise + noise.loc[winner]) & (spread.index != winner)
    within = [int(n) for n in spread.index[spread["within_noise"]]]
    return spread.reset_index(), winner, within


def rounds_of(seeds: list[int], race: bool) -> list[list[int]]:
    """The seeds each round of the race gives the settings still in it: the first two together
    (one seed has no spread to judge by), then one at a time; without the race, all at once."""
    if not race:
        return [seeds]
    return [seeds[:2], *([seed] for seed in seeds[2:])]


def leaving(seeds: list[SeedResult], direction: str, headline: str) -> dict[int, str]:
    """After a round of the race (``seeds``: its settings' results so far): the settings whose
    mean trails the leader's by more than their two seed spreads added, with why. Nothing
    leaves while a setting has one seed: there is no spread to judge by."""
    if pd.Series([s.number for s in seeds]).value_counts().min() < 2:
        return {}
    spread, leader, within = spread_table(seeds, direction, headline)
    spread = spread.set_index("number")
    lead = spread.loc[leader]
    return {
        int(number): (
            f"its mean {row['val_mean']:.4g} trails #{leader}'s {lead['val_mean']:.4g} by"
            f" {abs(row['val_mean'] - lead['val_mean']):.2g}, more than their seed spreads"
            f" added ({row['val_std'] + lead['val_std']:.2g})"
        )
        for number, row in spread.iterrows()
        if number != leader and number not in within
    }


def in_race(results: list[SeedResult], racing: list[Setting], last_seed: int) -> list[SeedResult]:
    """The results of the settings still racing, up to seed ``last_seed``."""
    numbers = {s.number for s in racing}
    return [r for r in results if r.number in numbers and r.seed <= last_seed]


def with_validation_in_training(data: TrainingData) -> TrainingData:
    """Training samples extended by the validation samples; the test part is untouched."""

    def join(first: Any, second: Any) -> Any:
        if isinstance(first, torch.Tensor):
            return torch.cat([first, second])
        return np.concatenate([first, second])

    train, val = data.train, data.val
    joined = {f.name: join(getattr(train, f.name), getattr(val, f.name)) for f in fields(train)}
    return replace(data, train=replace(train, **joined))  # type: ignore[arg-type]


def write_model_files(cfg: Config, task: Task, folder: Path) -> list[Path]:
    """What predict needs besides the weights: the scaler fitted on the training rows with the
    input names (and class names), and the data section of the config (columns, window,
    transform)."""
    folder.mkdir(parents=True, exist_ok=True)
    scaler = folder / "scaler.json"
    scaler.write_text(json.dumps(task.preprocessing()))
    data_config = folder / "data_config.yaml"
    data_config.write_text(yaml.safe_dump(cfg.data.model_dump(mode="json"), sort_keys=False))
    return [scaler, data_config]


def score(task: Task, model: torch.nn.Module, monitor: str) -> tuple[dict, dict, float]:
    """A trained model's errors on the validation and the test part, and its monitored
    metric's value on the test part."""
    evidence = evidence_for(task)
    val = evidence.errors(predict(model, task.data.val.x).cpu().numpy(), "val")
    output = predict(model, task.data.test.x).cpu()
    test = evidence.errors(output.numpy(), "test")
    test_value = scores(task, "test", output, task.data.test.y)[m.on_part(monitor, "test")]
    return val, test, test_value


@dataclass(frozen=True)
class RecordedRun:
    """What a run that trained one seed of a setting recorded about its best epoch."""

    run_id: str
    value: float  # the monitored metric at the best epoch
    best_epoch: int
    verdict: str
    reused: bool = False  # the trial's own run, not a re-evaluation


def trial_run(setting: Setting, verdicts: Mapping[int, Any]) -> RecordedRun:
    """A top trial as the first seed of its setting."""
    verdict = str(verdicts.get(setting.number, ""))
    return RecordedRun(setting.run_id, setting.value, setting.best_epoch, verdict, reused=True)


def reevaluation_run(run: pd.Series, monitor: str) -> RecordedRun:
    """A finished re-evaluation run, as ``Tracker.child_runs`` gives it; its value is the
    mean over its folds where it trained several (``data.folds``), as a trial's is."""
    folds_mean = run.get(f"metrics.{m.FOLDS_MEAN}")
    value = run[f"metrics.{m.best(monitor)}"] if pd.isna(folds_mean) else folds_mean
    return RecordedRun(
        str(run["run_id"]),
        float(value),
        int(run[f"metrics.{m.BEST_EPOCH}"]),
        str(run.get(f"tags.{m.VERDICT_TAG}", "")),
    )


def scored(
    setting: Setting, seed: int, run: RecordedRun, task: Task, model: torch.nn.Module, monitor: str
) -> SeedResult:
    """The one way a seed result is made, whichever run trained its model."""
    val, test, test_value = score(task, model, monitor)
    return SeedResult(
        number=setting.number,
        seed=seed,
        run_id=run.run_id,
        value=run.value,
        best_epoch=run.best_epoch,
        verdict=run.verdict,
        val=val,
        test=test,
        test_value=test_value,
        reused=run.reused,
    )


def collapse(task: Task, final: float, seeds: list[float], naive: float, naive_name: str) -> str:
    """Why a retrained final model, which nothing validated, is not to be registered; "" when
    it holds up. It collapsed when it scores worse on the test part (its task's headline
    error ``final``) than its own seed models by more than their spread and than the worst
    of them, or no better than the naive predictor there."""
    mean = float(np.mean(seeds))
    spread = float(np.std(seeds, ddof=1)) if len(seeds) > 1 else 0.0
    sign = -1.0 if task.higher_is_better else 1.0  # toward worse
    worst = max(seeds) if sign > 0 else min(seeds)
    if task.better(mean + sign * spread, final) and task.better(worst, final):
        return (
            f"{task.headline} {final:.4g} on the test part against its {len(seeds)} seed"
            f" models' {mean:.4g} ± {spread:.2g}"
        )
    if not task.better(final, naive):
        return (
            f"{task.headline} {final:.4g} on the test part, no better than the {naive_name}'s"
            f" {naive:.4g}"
        )
    return ""


def beaten_by(
    task: Task, lstm_val: dict[str, float], baselines_val: pd.DataFrame
) -> dict[str, Any] | None:
    """The best baseline on a part (validation, or test), if it beats the LSTM there."""
    scored = baselines_val[task.headline].dropna()
    if scored.empty:
        return None
    best = str(scored.idxmax() if task.higher_is_better else scored.idxmin())
    if not task.better(float(scored[best]), lstm_val[task.headline]):
        return None
    return {
        "method": best,
        "metric": task.headline,
        "baseline": float(scored[best]),
        "lstm": lstm_val[task.headline],
    }


@dataclass
class Selector:
    """The closing stage of one study, in the process that drives it or, for single
    re-evaluations, in one an engine started; ``say`` prints what it is doing."""

    context: JobContext
    say: Callable[[str], None] = print
    progress: bool = True  # a bar over the re-evaluations, a line for the final model
    # trains (setting, seed) pairs elsewhere into finished re-evaluation runs while its block
    # runs and until they are done, calling its second argument as it waits (the engine's job
    # runner, given reevaluation_job)
    elsewhere: (
        Callable[[list[tuple[Setting, int]], Callable[[], None]], AbstractContextManager[None]]
        | None
    ) = None
    start_seconds: float = 0.0  # what handing a job elsewhere costs before it trains
    trainings: int = 0
    models: dict[tuple[int, int], torch.nn.Module] = field(default_factory=dict)
    # (part, refit_on_val) -> the winner's baselines there: the only task they are asked for
    baseline_tables: dict[tuple[str, bool], pd.DataFrame] = field(default_factory=dict)

    @property
    def cfg(self) -> Config:
        return self.context.cfg

    @property
    def tracker(self) -> Tracker:
        return self.context.tracker

    def setting_config(self, setting: Setting, seed: int) -> Config:
        return self.cfg.with_values({**setting.values, "train.seed": seed})

    def task(self, setting: Setting, seed: int) -> Task:
        return self.context.tasks.get(self.setting_config(setting, seed))

    def run(self, table: pd.DataFrame) -> Selection:
        cfg = self.cfg
        started = time.perf_counter()
        settings = top_settings(table, list(cfg.search), cfg.closing.top_k, cfg.direction)
        headline = self.task(settings[0], cfg.train.seed).headline
        seeds, race = self.reevaluate(settings, table, headline)
        finalists = set(race[-1].settings) - set(race[-1].left)
        spread, winner, within = spread_table(seeds, cfg.direction, headline, finalists)
        setting = next(s for s in settings if s.number == winner)
        winner_cfg = self.setting_config(setting, cfg.train.seed)
        task = self.context.tasks.get(winner_cfg)
        mine = [s for s in seeds if s.number == winner and (s.number, s.seed) in self.models]
        epochs = max(1, int(spread.loc[spread["number"] == winner, "epochs"].iloc[0]))
        final = self.final_model(setting, task, mine, epochs) if cfg.closing.final_model else None
        if cfg.closing.ensemble:
            output = predict(self.ensemble(task, mine), task.data.val.x).cpu().numpy()
            lstm_val = evidence_for(task).errors(output, "val")
        else:
            lstm_val = {k: float(np.mean([s.val[k] for s in mine])) for k in mine[0].val}
        baselines_val = self.baselines(winner_cfg, "val", refit_on_val=False)
        retrained = final is not None and final.kind == "retrained"
        baselines_test = self.baselines(winner_cfg, "test", refit_on_val=retrained)
        return Selection(
            settings=settings,
            seeds=seeds,
            spread=spread.to_dict("records"),
            recommended=winner,
            within_noise=within,
            epochs=epochs,
            baselines_val=baselines_val.to_dict("index"),
            baselines_test=baselines_test.to_dict("index"),
            lstm_val=lstm_val,
            beaten_by=beaten_by(task, lstm_val, baselines_val),
            final=final,
            trainings=self.trainings,
            seconds=time.perf_counter() - started,
            headline=headline,
            sizes={s.number: self.size(s) for s in settings},
            beaten_on_test=beaten_by(task, final.test, baselines_test) if final else None,
            race=race,
            spared=self.spared(settings, seeds),
        )

    def spared(self, settings: list[Setting], seeds: list[SeedResult]) -> int:
        """The models the full grid of seeds would have trained and the race did not."""
        first = self.cfg.train.seed
        raced = {(s.number, s.seed) for s in seeds}
        return sum(
            self.models_per_seed(setting, seed)
            for setting in settings
            for seed in range(first, first + self.cfg.closing.seeds)
            if (setting.number, seed) not in raced
        )

    def size(self, setting: Setting) -> int:
        """A setting's model parameters: how big "the smallest of the indistinguishable" is."""
        run_cfg = self.setting_config(setting, self.cfg.train.seed)
        return sum(
            p.numel() for p in build_model(self.context.tasks.get(run_cfg), run_cfg).parameters()
        )

    def reevaluate(
        self, settings: list[Setting], table: pd.DataFrame, headline: str
    ) -> tuple[list[SeedResult], list[RaceRound]]:
        """The settings raced over seeds train.seed, train.seed + 1, ... (:func:`rounds_of`):
        after each round the settings that trail the leader beyond the noise leave
        (:func:`leaving`) and get no more seeds. The leader gets all of its own: they are the
        final model's recipe (its members, or the epochs of its retrain), so the race spares
        trainings without changing the final model of the winner it finds. The trial itself
        counts as seed train.seed when it kept its weights; a re-evaluation a previous attempt
        finished is read back (so a resumed race takes the same turns); the rest are trained,
        each in a nested run, elsewhere when that pays (this process meanwhile takes up the
        trials' own models)."""
        cfg = self.cfg
        seeds = list(range(cfg.train.seed, cfg.train.seed + cfg.closing.seeds))
        reused = {(s.number, cfg.train.seed) for s in settings if self.has_weights(s.run_id)}
        done = self.finished_reevaluations().keys() | reused
        grid = [(s, seed) for s in settings for seed in seeds if (s.number, seed) not in done]
        todo = len(grid)
        if todo:
            how = ", raced seed by seed" if cfg.closing.race and len(settings) > 1 else ""
            self.say(
                f"closing stage: {'up to ' if how else ''}{todo} re-evaluation(s) of the top"
                f" {len(settings)} setting(s){how} ({len(settings) * len(seeds) - todo}"
                " reused from the trials or an earlier run)"
            )
        verdicts = (
            dict(zip(table["number"], table["verdict"], strict=True)) if "verdict" in table else {}
        )
        seconds = expected_seconds(table)
        bar = tqdm(
            total=todo, desc="re-evaluating", unit="model", disable=not (todo and self.progress)
        )
        # spread out, a round ends with a process idle while the last job trains: the leader's
        # next seed fills it, needed unless the leader itself leaves the race
        ahead = (
            cfg.closing.race and self.elsewhere is not None and self.worth_spreading(grid, seconds)
        )
        racing, rounds = list(settings), []
        results: list[SeedResult] = []
        judged: list[SeedResult] = []  # what the last round judged the race by
        planned = rounds_of(seeds, cfg.closing.race)
        with Ticker(bar):
            for index, round_seeds in enumerate(planned):
                have = {(r.number, r.seed) for r in results}
                jobs = [(s, seed) for s in racing for seed in round_seeds]
                if ahead and index + 1 < len(planned):
                    leader = self.leader(racing, judged, headline)
                    jobs += [(leader, seed) for seed in planned[index + 1]]
                jobs = [(s, seed) for s, seed in jobs if (s.number, seed) not in have]
                results += self.train_round(jobs, reused, verdicts, seconds, bar)
                # judged on this round's seeds alone, so the race takes the same turns
                # whether a leader's next seed started early or not
                judged = in_race(results, racing, round_seeds[-1])
                left = leaving(judged, cfg.direction, headline) if cfg.closing.race else {}
                rounds.append(RaceRound(round_seeds, [s.number for s in racing], left))
                if left:
                    self.say(
                        "closing stage: "
                        + "; ".join(f"#{n} leaves the race ({why})" for n, why in left.items())
                    )
                    results = [
                        r for r in results if r.number not in left or r.seed <= round_seeds[-1]
                    ]
                racing = [s for s in racing if s.number not in left]
            bar.total = bar.n  # "up to" is now known
        bar.close()
        return results, rounds

    def leader(self, racing: list[Setting], judged: list[SeedResult], headline: str) -> Setting:
        """The leader of the last round's judgement (a leader never leaves the race); before
        any, the best trial."""
        if not judged:
            return racing[0]
        best = spread_table(judged, self.cfg.direction, headline)[1]
        return next(s for s in racing if s.number == best)

    def train_round(
        self,
        jobs: list[tuple[Setting, int]],
        reused: set[tuple[int, int]],
        verdicts: Mapping[int, Any],
        seconds: dict[int, float],
        bar: tqdm,
    ) -> list[SeedResult]:
        """One round's (setting, seed) results, in the order of ``jobs``: the trials' own
        models loaded, a previous attempt's re-evaluations read back, the rest trained."""
        done = self.finished_reevaluations()
        todo = [(s, seed) for s, seed in jobs if (s.number, seed) not in done.keys() | reused]
        elsewhere: AbstractContextManager[None] = nullcontext()
        if self.elsewhere is not None and self.worth_spreading(todo, seconds):
            keys, before = {(s.number, seed) for s, seed in todo}, bar.n

            def count() -> None:
                bar.n = before + len(keys & self.finished_reevaluations().keys())

            elsewhere = self.elsewhere(longest_first(todo, seconds), count)
        with elsewhere:
            trials = {
                (s.number, seed): self.seed_result(s, seed, trial_run(s, verdicts))
                for s, seed in jobs
                if (s.number, seed) in reused
            }
        done = self.finished_reevaluations()  # what failed elsewhere is trained below
        # what was to do and is done now was trained elsewhere, by this stage
        self.trainings += sum(
            self.models_per_seed(s, seed) for s, seed in todo if (s.number, seed) in done
        )
        results = []
        for setting, seed in jobs:
            key = (setting.number, seed)
            if key in trials:
                results.append(trials[key])
            elif key in done:
                run = reevaluation_run(done[key], self.cfg.train.monitor)
                results.append(self.seed_result(setting, seed, run))
            else:
                bar.set_postfix_str(f"trial #{setting.number} seed {seed}")
                results.append(self.train_seed(setting, seed))
                bar.update(1)
        return results

    def seed_result(self, setting: Setting, seed: int, run: RecordedRun) -> SeedResult:
        """One seed of a setting from the run that trained it (the trial itself, or a
        re-evaluation): its best weights loaded and scored; a trial's pictures, which it left
        undrawn, drawn now (diagnostics level full)."""
        task = self.task(setting, seed)
        model = self.load_model(run.run_id, task, self.setting_config(setting, seed))
        self.models[(setting.number, seed)] = model
        if run.reused and self.cfg.diagnostics.level == "full":
            draw_recorded(self.tracker, run.run_id, task, model)
        return scored(setting, seed, run, task, model, self.cfg.train.monitor)

    def models_per_seed(self, setting: Setting, seed: int) -> int:
        """What one seed of a setting trains: a model per validation fold."""
        return self.setting_config(setting, seed).data.folds

    def worth_spreading(self, todo: list[tuple[Setting, int]], seconds: dict[int, float]) -> bool:
        """Spread the re-evaluations out when they would take longer in turn than twice a
        job's start-up elsewhere (estimated from their trials' wall times)."""
        if len(todo) < 2:
            return False
        return sum(seconds.get(s.number, 0.0) for s, _ in todo) > 2 * self.start_seconds

    def has_weights(self, run_id: str) -> bool:
        with self.tracker.downloaded(run_id, m.WEIGHTS_FILE) as local:
            return local is not None

    def load_model(self, run_id: str, task: Task, run_cfg: Config) -> torch.nn.Module:
        with self.tracker.downloaded(run_id, m.WEIGHTS_FILE) as local:
            if local is None:
                raise FileNotFoundError(f"run {run_id} kept no {m.WEIGHTS_FILE}")
            return load_weights(build_model(task, run_cfg), local)

    def finished_reevaluations(self) -> dict[tuple[int, int], pd.Series]:
        """(trial number, seed) -> the run of a re-evaluation a previous attempt finished."""
        runs = self.tracker.child_runs(self.context.parent_id, m.ROLE_REEVALUATION)
        if runs.empty:
            return {}
        closed = runs[runs["status"] == "FINISHED"]
        return {
            (int(r[f"tags.{m.TRIAL_TAG}"]), int(r[f"tags.{m.SEED_TAG}"])): r
            for _, r in closed.iterrows()
        }

    def train_seed(self, setting: Setting, seed: int) -> SeedResult:
        """A setting trained again with ``seed`` in a re-evaluation run of its own, scored."""
        run_cfg = self.setting_config(setting, seed)
        task = self.context.tasks.get(run_cfg)
        with setting_run(
            self.tracker,
            self.context.parent_id,
            m.ROLE_REEVALUATION,
            run_cfg,
            task,
            setting.number,
            setting.values,
            {m.SEED_TAG: seed},
            f" seed={seed}",
        ) as run:
            stop = [StopWhen(self.context.stop_requested)]
            folds = self.context.tasks.folds(run_cfg)
            outcome = train_in_run(run_cfg, task, run, stop, draw=True, folds=folds)
            self.trainings += self.models_per_seed(setting, seed)
            history = outcome.history
            recorded = RecordedRun(
                run.run_id, outcome.value, history.best_epoch, outcome.verdict.verdict
            )
            result = scored(setting, seed, recorded, task, outcome.model, self.cfg.train.monitor)
            run.log_summary({m.error("test", k): v for k, v in result.test.items()})
        if outcome.state == m.COMPLETE:
            self.models[(setting.number, seed)] = outcome.model
        return result

    def ensemble(self, task: Task, mine: list[SeedResult]) -> Ensemble:
        members = [self.models[(s.number, s.seed)].cpu() for s in mine]
        return Ensemble(members, classification=task.averages_probabilities).eval()

    def final_model(
        self, setting: Setting, task: Task, mine: list[SeedResult], epochs: int
    ) -> FinalModel:
        """The registered model: found again if a previous attempt registered it; otherwise the
        mean of the seed models (closing.ensemble) or the recommendation retrained on train +
        validation for ``epochs`` epochs. Scored once on the test part, logged, registered."""
        kind = "ensemble" if self.cfg.closing.ensemble else "retrained"
        name = self.cfg.closing.model_name or self.cfg.study_name
        recipe = final_recipe(kind, name, setting.number, epochs, [s.seed for s in mine])
        registered = self.registered_final(recipe)
        if registered is not None:
            return registered
        run_cfg = self.cfg.with_values(
            {**setting.values, "train.max_epochs": epochs, "train.patience": epochs}
        )
        tags = {m.FINAL_KIND_TAG: kind, m.FINAL_RECIPE_TAG: recipe}
        if kind == "ensemble":
            self.say(f"final model: the mean of trial #{setting.number}'s {len(mine)} seed models")
        else:
            tags["val_loss_note"] = "validation windows are part of this run's training data"
            self.say(
                f"final model: trial #{setting.number} retrained on train + validation"
                f" for {epochs} epochs"
            )
        parent_id, number, values = self.context.parent_id, setting.number, setting.values
        with (
            step("final model", self.progress),
            setting_run(
                self.tracker, parent_id, m.ROLE_FINAL, run_cfg, task, number, values, tags
            ) as run,
        ):
            single: dict[str, float] = {}
            collapsed = ""
            if kind == "retrained":
                model: torch.nn.Module = self.retrain(run_cfg, task, run)
                _, test, test_value = score(task, model, self.cfg.train.monitor)
                run.log_summary({m.error("test", k): v for k, v in test.items()})
                collapsed = self.collapsed(run_cfg, task, test, mine)
            if collapsed:
                self.say(
                    f"final model: the retrain collapsed ({collapsed}); registering the"
                    f" mean of its {len(mine)} seed models instead"
                )
                kind = "ensemble"
            if kind == "ensemble":
                model = self.ensemble(task, mine)
                single = mine[0].test
                _, test, test_value = score(task, model, self.cfg.train.monitor)
                run.log_summary({m.error("test", k): v for k, v in test.items()})
            with tempfile.TemporaryDirectory(prefix="lstm_sweep_") as tmp:
                example = task.data.train.x[:5]
                model_uri = self.tracker.log_model(
                    run.run_id,
                    model,
                    example.numpy(),
                    predict(model, example).cpu().numpy(),
                    write_model_files(self.cfg, task, Path(tmp)),
                    self.cfg.closing.model_name or self.cfg.study_name,
                )
            champion = self.crown(task, model_uri, test[task.headline])
            final = FinalModel(
                run.run_id, model_uri, kind, epochs, test, test_value, single, champion, collapsed
            )
            run.end_as(
                m.COMPLETE, {m.MODEL_URI_TAG: model_uri, m.FINAL_TAG: json.dumps(asdict(final))}
            )
        return final

    def collapsed(
        self, run_cfg: Config, task: Task, test: dict[str, float], mine: list[SeedResult]
    ) -> str:
        """:func:`collapse` for a retrained model (of ``run_cfg``) against its seeds and the
        naive predictor."""
        evidence = evidence_for(task)
        naive = self.baselines(run_cfg, "test", refit_on_val=True).loc[evidence.naive_row]
        return collapse(
            task,
            test[task.headline],
            [s.test[task.headline] for s in mine],
            float(naive[task.headline]),
            evidence.naive_row.replace("_", " "),
        )

    def baselines(self, run_cfg: Config, part: str, refit_on_val: bool) -> pd.DataFrame:
        """The baselines of ``run_cfg``'s data (the winner's) on a part, asked for once here:
        the collapse check and the comparison both ask for the test part's."""
        key = (part, refit_on_val)
        if key not in self.baseline_tables:
            self.baseline_tables[key] = self.kept_baselines(run_cfg, part, refit_on_val)
        return self.baseline_tables[key]

    def kept_baselines(self, run_cfg: Config, part: str, refit_on_val: bool) -> pd.DataFrame:
        """The baselines fitted once per sweep: read from the parent run, where a job beside
        the search (or an earlier attempt of this stage) fitted them on the same data; else
        fitted here and kept there."""
        path = f"{m.BASELINES_FOLDER}/{part}{'-refit' if refit_on_val else ''}.json"
        data = baselines_fingerprint(run_cfg)
        try:
            kept = self.tracker.read_json_artifact(self.context.parent_id, path)
        except ValueError:  # cut short by a kill while it was written: fitted again
            kept = None
        if kept is not None and kept["data"] == data:
            return pd.DataFrame.from_dict(kept["table"], orient="index")
        self.say(f"baselines: fitting and scoring them on the {part} part")
        task = self.context.tasks.get(run_cfg)
        table = evidence_for(task).baselines(part, refit_on_val, self.cfg.closing.baselines)
        with tempfile.TemporaryDirectory(prefix="lstm_sweep_") as tmp:
            file = Path(tmp) / Path(path).name
            file.write_text(json.dumps({"data": data, "table": table.to_dict("index")}))
            self.tracker.log_artifacts(self.context.parent_id, Path(tmp), m.BASELINES_FOLDER)
        return table

    def crown(self, task: Task, model_uri: str, score: float) -> Champion:
        """Give the new version (``model_uri``, whose test headline error is ``score``) the
        champion alias if the model has none yet, or if it beats the version that has it on
        this study's test part; otherwise the alias stays where it is."""
        name, _, version = model_uri.removeprefix("models:/").rpartition("/")
        previous = self.tracker.champion(name)
        if previous is None:
            self.tracker.crown(name, version)
            return Champion(task.headline, version, score, None, None, crowned=True)
        evidence, uri, path = evidence_for(task), self.tracker.uri, self.cfg.data.path
        try:
            # the new version read back the same way as the old one, so both score alike
            score = evidence.registered_score(model_uri, uri, path)
            before = evidence.registered_score(f"models:/{name}/{previous}", uri, path)
        except Exception as exc:  # other columns, a horizon this part does not fill, another
            # task or torch: the alias stays, and the registered version with it
            if isinstance(exc, TrackingUnavailable) or classify(exc) is not None:
                raise  # a store fault stops the sweep as anywhere else
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            note = f"version {previous} cannot be compared on this test part ({reason})"
            return Champion(task.headline, version, score, previous, None, False, note)
        crowned = task.better(score, before)
        if crowned:
            self.tracker.crown(name, version)
        return Champion(task.headline, version, score, previous, before, crowned)

    def retrain(self, run_cfg: Config, task: Task, run: Callback) -> torch.nn.Module:
        final_task = make_task(with_validation_in_training(task.data))
        model = build_model(final_task, run_cfg)
        callbacks = [run, StopWhen(self.context.stop_requested)]
        history = fit(model, final_task, run_cfg, callbacks, restore_best=False)
        if history.stop is Stop.INTERRUPTED:
            raise Interrupted
        self.trainings += 1
        return model.cpu().eval()

    def registered_final(self, recipe: str) -> FinalModel | None:
        """The final model of this recipe that a previous attempt of this stage registered, if
        any: a study extended since may recommend another setting, another ``closing.seeds``
        gives the same setting other seed models and retrain epochs. One registered before the
        recipe was recorded is not matched: the stage makes and registers its model again."""
        runs = self.tracker.child_runs(self.context.parent_id, m.ROLE_FINAL)
        found, recipes = f"tags.{m.FINAL_TAG}", f"tags.{m.FINAL_RECIPE_TAG}"
        if runs.empty or found not in runs or recipes not in runs:
            return None
        done = runs[
            (runs["status"] == "FINISHED") & runs[found].notna() & (runs[recipes] == recipe)
        ]
        return final_from_dict(json.loads(done.iloc[0][found])) if len(done) else None


def final_recipe(kind: str, name: str, number: int, epochs: int, seeds: list[int]) -> str:
    """What a final model is made of and where it is registered: its kind, the registry name,
    the setting, the retrain's epochs and the seed models (the ensemble's members, the collapse
    check's yardstick)."""
    recipe = {"kind": kind, "name": name, "trial": number, "epochs": epochs, "seeds": sorted(seeds)}
    return json.dumps(recipe)


def baselines_fingerprint(cfg: Config) -> str:
    """What a sweep's baselines depend on: the task, its data section, the seed of its split
    and the methods chosen (a trial's model and training keys change none of them)."""
    return json.dumps(
        [cfg.task, cfg.data.model_dump(mode="json"), cfg.train.seed, cfg.closing.baselines],
        sort_keys=True,
    )


def baselines_ahead(cfg: Config) -> list[tuple[str, bool]]:
    """The baseline tables the closing stage will ask for, (part, refit on validation), where
    they do not hang on the search's winner (no data key is searched): jobs for a worker the
    search leaves idle. The test part's is fitted as the default final model needs it."""
    if any(key.startswith("data.") for key in cfg.search):
        return []
    return [("val", False), ("test", cfg.closing.final_model and not cfg.closing.ensemble)]


def baselines_job(context: JobContext, job: tuple[str, bool]) -> None:
    """One baseline table fitted beside the search and kept on the sweep's parent run, where
    the closing stage finds it."""
    if context.stop_requested():
        raise Interrupted
    part, refit_on_val = job
    Selector(context, say=lambda _: None, progress=False).baselines(context.cfg, part, refit_on_val)


def reevaluation_job(context: JobContext, job: tuple[Setting, int]) -> None:
    """One (setting, seed) re-evaluation as a job an engine runs in another process; the
    closing stage reads its run back."""
    setting, seed = job
    Selector(context, progress=False).train_seed(setting, seed)
