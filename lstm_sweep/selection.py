"""What the closing stage found, as plain data: the searched settings it compared, each seed's
result, the final model and where the champion alias went, all of it kept as ``selection.json``
on the sweep's parent run. The closing stage (``select``) makes it; the report reads it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Setting:
    """One searched setting, as the trial that found it left it."""

    number: int  # the trial's number
    values: dict[str, Any]  # dotted config key -> value
    value: float  # the trial's value: its monitored metric (train.monitor) at its best epoch
    best_epoch: int
    run_id: str  # the trial's MLflow run


@dataclass(frozen=True)
class SeedResult:
    """One setting trained with one seed, scored on validation and (read by nobody who
    chooses) on test."""

    number: int
    seed: int
    run_id: str
    value: float  # the monitored metric at the best epoch
    best_epoch: int
    verdict: str
    val: dict[str, float]  # the task's errors on the validation part (Task.errors)
    test: dict[str, float]  # the same on the test part
    test_value: float  # the monitored metric on the test part
    reused: bool  # the trial's own training, not a new one


@dataclass(frozen=True)
class RaceRound:
    """One round of the closing stage's race: the seeds it gave the settings still in it, and
    the settings that left after it, with why."""

    seeds: list[int]
    settings: list[int]  # trial numbers
    left: dict[int, str] = field(default_factory=dict)  # trial number -> why it left


@dataclass(frozen=True)
class Champion:
    """The champion alias after a final model was registered: it moves to the new version only
    when that scores better than the previous champion on the new study's test part, both
    read through predict's data path (each model with its own scaler, window and transform)."""

    metric: str  # the task's headline error
    version: str  # the new version
    score: float  # the new version's headline error there
    previous: str | None  # the version that held the alias before, if any
    previous_score: float | None  # its headline error on the same test part
    crowned: bool  # the alias is on the new version now
    note: str = ""  # why the previous champion could not be scored, if it could not


@dataclass(frozen=True)
class FinalModel:
    run_id: str
    model_uri: str  # models:/name/version
    kind: str  # retrained (on train + val) or ensemble (of the seed models)
    epochs: int
    test: dict[str, float]  # the task's test errors, comparable with the baselines' rows
    test_value: float  # the monitored metric on the test part, comparable to trial values
    single_seed_test: dict[str, float]  # an ensemble's first member alone, for comparison
    champion: Champion | None = None  # whether this version took the champion alias
    collapsed: str = ""  # why a retrained model was not registered (the seed mean was)


@dataclass
class Selection:
    """What the closing stage found; saved as selection.json on the parent run."""

    settings: list[Setting]
    seeds: list[SeedResult]
    spread: list[dict[str, Any]]  # per setting: number, val/test mean and std, epochs, within
    recommended: int  # the winner's trial number
    within_noise: list[int]
    epochs: int  # for a retrained final model: median over seeds of best epoch + 1
    baselines_val: dict[str, dict[str, Any]]  # method -> errors and note, validation part
    baselines_test: dict[str, dict[str, Any]]  # the same on the test part
    lstm_val: dict[str, float]  # the recommendation's validation errors (seed mean or ensemble)
    beaten_by: dict[str, Any] | None  # the best baseline, when it beats the LSTM on validation
    final: FinalModel | None
    trainings: int  # models this stage trained, here or elsewhere (not the trials it reused)
    seconds: float
    headline: str  # the error that decides "better" (Task.headline)
    sizes: dict[int, int] = field(default_factory=dict)  # trial number -> model parameters
    # the best baseline, when it beats the registered model on the test part
    beaten_on_test: dict[str, Any] | None = None
    race: list[RaceRound] = field(default_factory=list)
    spared: int = 0  # models the race did not train that the full grid of seeds would have

    @property
    def winner(self) -> Setting:
        return next(s for s in self.settings if s.number == self.recommended)

    @property
    def winner_spread(self) -> dict[str, Any]:
        return next(r for r in self.spread if r["number"] == self.recommended)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Selection:
        """The inverse of ``json.loads(selection.to_json())``."""
        raw = dict(raw)
        raw["settings"] = [Setting(**s) for s in raw["settings"]]
        raw["seeds"] = [SeedResult(**s) for s in raw["seeds"]]
        raw["final"] = final_from_dict(raw["final"]) if raw["final"] else None
        raw["sizes"] = {int(k): v for k, v in raw.get("sizes", {}).items()}  # JSON keys: str
        raw["race"] = [
            RaceRound(r["seeds"], r["settings"], {int(k): v for k, v in r["left"].items()})
            for r in raw.get("race", [])
        ]
        return cls(**raw)


def final_from_dict(raw: dict[str, Any]) -> FinalModel:
    """The inverse of ``asdict(final)``."""
    champion = raw.get("champion")
    return FinalModel(**{**raw, "champion": Champion(**champion) if champion else None})


def optimism(final: FinalModel, selection: Selection) -> dict[str, float]:
    """How much worse the test part is than what selection saw: test minus validation."""
    return {
        "optimism_vs_trial": final.test_value - selection.winner.value,
        "optimism_vs_seed_mean": final.test_value - float(selection.winner_spread["val_mean"]),
    }
