"""Typed sweep configuration: a YAML file plus ``--set`` overrides, validated into one object.

Every mistake a user can make in a sweep file ends here as one :class:`ConfigError` naming the
file, the dotted key, the value received and the rule it broke, before any trial or run exists.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import os
import re
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from lstm_sweep import metrics as m

SEARCHABLE_SECTIONS = ("model", "train")
SEARCHABLE_DATA = ("data.window", "data.transform", "data.scaler")  # each value: its own windows
SCALE_CHANGING = ("data.transform", "data.scaler")  # val_loss differs in units between values
NOT_SEARCHABLE = ("train.seed", "train.device", "train.monitor")

# A credential inside a URI (a password between the user name, possibly empty, and the
# host) or a query parameter. A regex rather than sqlalchemy's make_url: it must also clean
# free text (a driver's error message quoting the URL) and http(s) URIs, which make_url does
# not parse.
_URI_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][\w+.-]*://[^:/@\s'\"]*):(?P<secret>[^@\s'\"]*)@")
_QUERY_SECRET = re.compile(
    r"(?P<head>[?&;]\s*(?:password|passwd|pwd|token|secret|api_key)=)(?P<secret>[^&\s'\"]+)",
    re.IGNORECASE,
)


def mask_secrets(text: str) -> str:
    """Every password or token in ``text`` (URIs, query parameters) replaced by ``***``."""
    text = _URI_PASSWORD.sub(lambda m: f"{m['head']}:***@", text)
    return _QUERY_SECRET.sub(lambda m: f"{m['head']}***", text)


def without_password(uri: str) -> str:
    """A URI without its password (the user name and host kept): the form written into files
    people rerun; the password then comes from PGPASSWORD or ~/.pgpass (libpq) or
    MLFLOW_TRACKING_PASSWORD, never from a file."""
    uri = _URI_PASSWORD.sub(lambda m: f"{m['head']}@", uri)
    return re.sub(r"[?&]$", "", _QUERY_SECRET.sub("", uri))


def plain(value: Any) -> Any:
    """A NumPy scalar from a DataFrame cell as the Python value YAML and configs expect."""
    return value.item() if hasattr(value, "item") else value


class ConfigError(ValueError):
    """A sweep file (or override) that cannot be run: says where, what and why in one line.

    The message never carries a secret: values and rules are masked before they are shown.
    """

    def __init__(self, source: str, key: str, value: Any, rule: str) -> None:
        self.source, self.key, self.value, self.rule = source, key, value, rule
        where = f"{key} = {value!r}" if key else "(file)"
        message = f"{source}: {where}: {rule}"
        super().__init__(" ".join(mask_secrets(message).split()))  # one line, always


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    path: Path  # CSV, Parquet (or .npz for classification); relative to the YAML file's folder
    time_column: str | None = None  # forecast: the time stamps, sorted, no duplicates
    target: str | list[str] | None = None  # forecast: one column, or several predicted jointly
    features: list[str] = []  # extra input columns (the targets are always inputs too)
    id_column: str | None = None  # classification table: which sequence a row belongs to
    order_column: str | None = None  # classification table: step order within a sequence
    label_column: str | None = None  # classification table: the sequence's class
    window: int = Field(52, ge=1)  # input steps per sample
    horizon: int = Field(1, ge=1)  # steps ahead, predicted jointly
    split: list[float] = [0.7, 0.15, 0.15]  # train/val/test: chronological for forecasting
    split_seed: int = 0  # classification's stratified split: fixed, so every seed sees one split
    # score every setting on this many validation parts, the last the split's own: forecasting
    # stretches of the validation part's length, each after all rows before it (rolling
    # origin); classification stratified chunks of the training part
    folds: int = Field(1, ge=1)
    scaler: Literal["standard", "minmax", "robust", "none"] = "standard"  # fit on train only
    missing: Literal["error", "drop", "ffill", "interpolate"] = "error"  # what to do with gaps
    transform: Literal["none", "log", "diff"] = "none"  # undone before metrics in original units
    season: int | None = Field(None, ge=1)  # steps per season, for the seasonal naive baseline

    @property
    def targets(self) -> list[str]:
        if self.target is None:
            return []
        return [self.target] if isinstance(self.target, str) else list(self.target)

    @field_validator("target")
    @classmethod
    def _target_not_empty(cls, value: str | list[str] | None) -> str | list[str] | None:
        if value is not None and not value:
            raise ValueError("needs at least one target column")
        return value

    @field_validator("split")
    @classmethod
    def _split_is_three_fractions(cls, value: list[float]) -> list[float]:
        if len(value) != 3 or any(not 0 < f < 1 for f in value):
            raise ValueError("must be three fractions in (0, 1): train, validation, test")
        if not math.isclose(sum(value), 1.0, abs_tol=1e-6):
            raise ValueError(f"fractions must add up to 1, but add up to {sum(value):g}")
        return value


class ModelConfig(_Section):
    num_layers: int = Field(1, ge=1)  # stacked LSTM layers
    hidden_size: int = Field(32, ge=1)  # units per layer
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # between LSTM layers: none with 1 layer
    head_dropout: float = Field(0.0, ge=0.0, lt=1.0)  # on the last hidden state, before the head
    skip: Literal["none", "linear"] = "none"  # linear: a linear map of the window added to the head


class TrainConfig(_Section):
    max_epochs: int = Field(100, ge=1)  # upper bound; patience and pruning usually stop earlier
    batch_size: int = Field(64, ge=1)
    learning_rate: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)  # on weight matrices only, never biases
    optimizer: Literal["adamw", "adam"] = "adamw"  # adam's weight_decay is coupled L2
    patience: int = Field(10, ge=1)  # epochs without a better val loss before stopping
    min_delta: float = Field(0.0, ge=0.0)  # an improvement smaller than this does not count
    grad_clip: float = Field(1.0, ge=0.0)  # clip the global grad norm at this value; 0 disables
    seed: int = 0  # seeds the split, subsampling, initialisation, batching and the sampler
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available
    # what early stopping, pruning and the trial value follow: val_loss (model space),
    # val_nmse (forecast: MSE in the target's units over the naive forecast's; comparable
    # across transforms and scalers) or val_accuracy (classification)
    monitor: Literal["val_loss", "val_nmse", "val_accuracy"] = "val_loss"


class SearchParam(_Section):
    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False  # sample on a log scale (low must be > 0)
    step: float | None = Field(None, gt=0)
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _distribution_is_well_formed(self) -> SearchParam:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("`choices` must be a non-empty list for a categorical parameter")
            return self
        if self.low is None or self.high is None:
            raise ValueError(f"`low` and `high` are required for a {self.type} parameter")
        if self.low > self.high:
            raise ValueError(f"`low <= high` must hold, but got (low={self.low}, high={self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"`low > 0` must hold on a log scale, but got low={self.low}")
        if self.log and self.step is not None:
            raise ValueError("`step` and `log` cannot be combined")
        if self.type == "int":
            for name, number in (("low", self.low), ("high", self.high), ("step", self.step)):
                if number is not None and number != int(number):
                    raise ValueError(
                        f"`{name}` must be a whole number for an int parameter, but got"
                        f" {name}={number:g}"
                    )
        return self

    def bounds(self) -> list[Any]:
        """The values at the edges of the range: each must make a valid config."""
        return list(self.choices or []) if self.type == "categorical" else list(self.span)

    def position(self, value: Any) -> float:
        """Where a value sits in this range: 0 at the low end, 1 at the high end (in log space
        for a log range, by index among categorical choices; NaN for a value not among them;
        0.5 in a range of one point)."""
        if self.type == "categorical":
            choices = list(self.choices or [])
            return choices.index(value) / max(1, len(choices) - 1) if value in choices else math.nan
        scale = math.log if self.log else float
        low, high = (scale(float(v)) for v in self.span)
        return (scale(float(value)) - low) / (high - low) if high > low else 0.5

    @property
    def span(self) -> tuple[float, float]:
        """(low, high) of a numeric parameter; validation has made sure both are set."""
        if self.low is None or self.high is None:
            raise ValueError(f"a {self.type} parameter needs `low` and `high`")
        return self.low, self.high


class PrunerConfig(_Section):
    type: Literal["median", "hyperband", "successive_halving", "none"] = "median"
    n_startup_trials: int = Field(5, ge=0)  # median: trials that are never pruned
    n_warmup_steps: int = Field(5, ge=0)  # median: epochs before a trial can be pruned
    min_resource: int = Field(3, ge=1)  # hyperband / successive halving: epochs in the first rung
    reduction_factor: int = Field(3, ge=2)  # hyperband / successive halving


class StopConfig(_Section):
    """When the study ends itself before n_trials: its best value has not improved by more than
    ``min_gain`` (relative) over its last ``patience`` settings, counted after the sampler's
    random start-up ones."""

    patience: int | None = Field(None, ge=1)  # settings without a gain; None: run n_trials
    min_gain: float = Field(0.01, ge=0)  # an improvement smaller than this share is no gain


class RayConfig(_Section):
    """Resources of each worker when a Ray cluster runs them (``--ray ADDRESS``)."""

    num_cpus: float = Field(1.0, gt=0)  # CPUs reserved per worker; torch uses as many threads
    num_gpus: float = Field(0.0, ge=0)  # a fraction lets several workers share one GPU
    max_restarts: int = Field(3, ge=0)  # Ray restarts a dead worker this often
    runtime_env: dict[str, Any] | None = None  # Ray runtime_env, e.g. {pip: [...]}


class StudyConfig(_Section):
    name: str | None = None  # default: the experiment name
    n_trials: int = Field(20, ge=1)  # the study's total; a rerun completes only what is missing
    timeout: float | None = Field(None, gt=0)  # seconds for this invocation
    sampler: Literal["tpe", "random", "cmaes", "qmc", "gp"] = "tpe"
    n_startup_trials: int = Field(5, ge=0)  # random trials before a model-based sampler kicks in
    pruner: PrunerConfig = PrunerConfig()
    stop: StopConfig = StopConfig()  # the study ends itself once its best stops improving
    storage: str | None = None  # Optuna storage URL; default: sqlite under mlruns/
    direction: Literal["minimize", "maximize"] | None = None  # default: follows train.monitor
    # worker processes on this machine, one torch thread each; default: one per core (a tiny
    # LSTM keeps one core busy, a second thread in the same process mostly waits on the first)
    workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    # trials proposed together: each sees only the trials of earlier batches, so the study is
    # the same with any number of workers, and at most this many train at once. 1 (each trial
    # sees every one before it) gave the best answers on sunspots (benchmarks/README.md)
    batch: int = Field(1, ge=1)
    # on GPUs: local workers per visible device (each pinned to one), at most `workers` in all;
    # the default spreads one per device, more pack several small models on each
    workers_per_device: int = Field(1, ge=1)
    heartbeat_seconds: int = Field(5, ge=1)  # a running trial's worker beats this often
    grace_seconds: int = Field(20, ge=1)  # no beat for this long: the worker is lost, retry
    lock_timeout: float = Field(300.0, gt=0)  # seconds to wait for the study lock, then stop
    ray: RayConfig = RayConfig()

    @property
    def trainers(self) -> int:
        """Workers that can train at once: a batch's trials are all there is to run."""
        return min(self.workers, self.batch)

    @model_validator(mode="after")
    def _grace_outlasts_heartbeats(self) -> StudyConfig:
        if self.grace_seconds <= self.heartbeat_seconds:
            raise ValueError(
                "`grace_seconds > heartbeat_seconds` must hold, but got "
                f"(grace_seconds={self.grace_seconds}, heartbeat_seconds={self.heartbeat_seconds})"
            )
        return self


class TrackingConfig(_Section):
    uri: str | None = None  # MLflow tracking URI; default: sqlite under mlruns/, artifacts beside
    flush_seconds: float = Field(10.0, ge=0)  # buffer per-epoch metrics at most this long
    # every trained run samples CPU, memory, disk, network (and GPUs, with pynvml) this often
    # into MLflow's System metrics tab; 0 disables
    system_metrics_seconds: float = Field(1.0, ge=0)


class VerdictRules(_Section):
    """Thresholds that turn a trial's curves into a verdict; README documents each rule."""

    overfit_rise: float = Field(0.05, ge=0)  # val ends this fraction above its best: overfitting
    overfit_gap_ratio: float = Field(1.5, ge=1)  # or val/train_eval at the end is above this
    overfit_accuracy_gap: float = Field(0.1, ge=0)  # or train - val accuracy ends above this
    underfit_naive_ratio: float = Field(0.9, gt=0)  # best val above this x naive: underfitting
    explode_grad_norm: float = Field(1e4, gt=0)  # a pre-clip gradient norm above this: unstable


class DiagnosticsConfig(_Section):
    level: Literal["full", "basic", "off"] = "full"  # detail traded against speed
    # training samples scored in eval mode each epoch, at most as many as validation holds
    eval_subsample: int = Field(128, ge=1)
    hidden_subsample: int = Field(128, ge=1)  # validation samples whose hidden states are read
    k_worst: int = Field(10, ge=1)  # worst validation windows saved at the best epoch
    saturation: float = Field(0.95, gt=0, lt=1)  # |h| above this counts as saturated
    dead_std: float = Field(1e-3, ge=0)  # a unit whose output std is below this never moves
    verdict: VerdictRules = VerdictRules()

    @field_validator("level", mode="before")
    @classmethod
    def _yaml_off_is_false(cls, value: Any) -> Any:
        return "off" if value is False else value  # YAML 1.1 reads a bare `off` as false


class ClosingConfig(_Section):
    """The closing stage, once the study holds n_trials: re-evaluate, choose, test, register."""

    top_k: int = Field(3, ge=1)  # best settings retrained with several seeds
    seeds: int = Field(3, ge=1)  # seeds per setting (train.seed, +1, ...); 1 gives no spread
    # seed by seed, a setting whose mean trails the leader's beyond their seeds' spread
    # leaves the race and gets no more seeds (the leader gets all: its final model's recipe);
    # off by default: it spares trainings, but on two cores it cost as much wall as it saved
    race: bool = False
    final_model: bool = True  # retrain the recommendation on train+val, test it, register it
    ensemble: bool = False  # final model = the mean of the recommendation's seed models
    # forecasting: the baselines fitted and compared (default: all; the naive forecast always)
    baselines: list[str] | None = None
    model_name: str | None = None  # MLflow Model Registry name; default: the study name

    @field_validator("model_name")
    @classmethod
    def _model_name_not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must be a non-empty name, or left out for the study name")
        return value


class ReportConfig(_Section):
    """How the report reads the searched ranges around the answer."""

    edge_fraction: float = Field(0.1, ge=0, lt=0.5)  # this close to a bound is "at the edge"
    near_best: float = Field(0.1, ge=0)  # trials within this fraction of the best are "good"


# keys the closing stage's own section took over from `report:`; an old sweep file still works
MOVED_TO_CLOSING = tuple(ClosingConfig.model_fields)


def natural_direction(monitor: str) -> Literal["minimize", "maximize"]:
    """Losses are minimised, accuracies maximised."""
    return "maximize" if monitor == "val_accuracy" else "minimize"


class Config(_Section):
    experiment: str = "lstm_sweep"  # MLflow experiment, and the default study name
    task: Literal["forecast", "classification"] = "forecast"
    data: DataConfig
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    search: dict[str, SearchParam] = {}
    study: StudyConfig = StudyConfig()
    tracking: TrackingConfig = TrackingConfig()
    diagnostics: DiagnosticsConfig = DiagnosticsConfig()
    closing: ClosingConfig = ClosingConfig()
    report: ReportConfig = ReportConfig()
    # what loading said about the file itself (old key names read under their new ones)
    _notes: list[str] = PrivateAttr(default_factory=list)

    @property
    def notes(self) -> list[str]:
        return self._notes

    @property
    def study_name(self) -> str:
        return self.study.name or self.experiment

    @property
    def direction(self) -> Literal["minimize", "maximize"]:
        """The study's direction: stated, or the one the monitored metric needs."""
        return self.study.direction or natural_direction(self.train.monitor)

    def with_values(self, values: dict[str, Any]) -> Config:
        """A copy with dotted keys set (a trial's sampled values), validated again."""
        raw = self.model_dump()
        for key, value in values.items():
            _set_dotted(raw, key, value)
        return Config.model_validate(raw)


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    section, _, rest = key.partition(".")
    # a search entry's name is itself a dotted key: `search.model.dropout={type: ...}`
    *parents, leaf = [section, rest] if section == "search" and rest else key.split(".")
    node = raw
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[leaf] = value


def _get_dotted(raw: dict[str, Any], key: str) -> Any:
    node: Any = raw
    for part in key.split("."):
        node = node[part]
    return node


def parse_override(text: str) -> tuple[str, Any]:
    """``"study.n_trials=5"`` -> ``("study.n_trials", 5)``; the value is typed as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError("--set", text, text, "must look like section.key=value")
    try:
        return key.strip(), yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError("--set", key.strip(), value, f"malformed YAML value: {problem}") from None


def _known_keys(loc: tuple[Any, ...]) -> list[str]:
    """Field names valid under ``loc`` in :class:`Config` (for did-you-mean)."""
    model: type[BaseModel] = Config
    parts = iter(loc)
    for part in parts:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if get_origin(annotation) is dict:  # search: skip the dotted key, land on SearchParam
            annotation = get_args(annotation)[1]
            next(parts, None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _error_from_validation(source: str, raw: dict[str, Any], exc: ValidationError) -> ConfigError:
    error = exc.errors()[0]
    loc = tuple(p for p in error["loc"] if not isinstance(p, int) or error["type"] != "union")
    key = ".".join(str(p) for p in loc)
    if error["type"] == "extra_forbidden":
        parent, leaf = loc[:-1], str(loc[-1])
        close = difflib.get_close_matches(leaf, _known_keys(parent), n=1)
        hint = f" (did you mean {'.'.join([*map(str, parent), close[0]])!r}?)" if close else ""
        return ConfigError(source, key, error["input"], f"unknown key{hint}")
    if error["type"] == "missing":
        return ConfigError(source, key, None, "required key is missing")
    message = error["msg"].removeprefix("Value error, ")
    try:
        value = _get_dotted(raw, key) if key else error["input"]
    except (KeyError, TypeError):
        value = error["input"]
    return ConfigError(source, key, value, message)


def _check_search_space(source: str, cfg: Config) -> None:
    base = cfg.model_dump()
    for key, param in cfg.search.items():
        section = key.split(".")[0]
        searchable = section in SEARCHABLE_SECTIONS or key in SEARCHABLE_DATA
        if not searchable or key in NOT_SEARCHABLE:
            rule = (
                f"only keys under {', '.join(SEARCHABLE_SECTIONS)} or {', '.join(SEARCHABLE_DATA)}"
            )
            raise ConfigError(source, f"search.{key}", key, f"cannot be searched: {rule}")
        try:
            _get_dotted(base, key)
        except (KeyError, TypeError):
            known = [f"{s}.{f}" for s in SEARCHABLE_SECTIONS for f in base[s]]
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(source, f"search.{key}", key, f"no such config key{hint}") from None
        for value in param.bounds():
            try:
                cfg.with_values({key: value})
            except ValidationError as exc:
                rule = exc.errors()[0]["msg"].removeprefix("Value error, ")
                raise ConfigError(source, f"search.{key}", value, f"out of range: {rule}") from None
        if key in SCALE_CHANGING and cfg.train.monitor == "val_loss":
            raise ConfigError(
                source,
                f"search.{key}",
                param.model_dump(exclude_defaults=True),
                "val_loss is measured in the scaled, transformed space, so its values cannot be"
                " compared across this key's values; set train.monitor: val_nmse",
            )


TASK_KEYS = {
    "forecast": ("time_column", "target"),
    "classification": ("label_column", "id_column", "order_column"),
}
TASK_MONITORS = {
    "forecast": ("val_loss", "val_nmse"),
    "classification": ("val_loss", "val_accuracy"),
}


def _check_task(source: str, cfg: Config) -> None:
    """Keys each task needs, and a monitor and direction that agree."""
    is_npz = cfg.data.path.suffix.lower() == ".npz"
    if cfg.task == "forecast" or not is_npz:
        for key in TASK_KEYS[cfg.task]:
            if getattr(cfg.data, key) is None:
                raise ConfigError(source, f"data.{key}", None, f"required for task {cfg.task}")
    if cfg.task == "forecast" and is_npz:
        raise ConfigError(source, "data.path", str(cfg.data.path), "forecast reads CSV or Parquet")
    chosen = cfg.closing.baselines
    if chosen is not None and (cfg.task != "forecast" or set(chosen) - set(m.FORECAST_BASELINES)):
        known = ", ".join(m.FORECAST_BASELINES)
        raise ConfigError(
            source, "closing.baselines", chosen, f"forecasting's baselines are chosen from {known}"
        )
    if cfg.train.monitor not in TASK_MONITORS[cfg.task]:
        allowed = " or ".join(TASK_MONITORS[cfg.task])
        raise ConfigError(
            source, "train.monitor", cfg.train.monitor, f"{cfg.task} monitors {allowed}"
        )
    natural = natural_direction(cfg.train.monitor)
    if cfg.study.direction not in (None, natural):
        raise ConfigError(
            source,
            "study.direction",
            cfg.study.direction,
            f"train.monitor = {cfg.train.monitor} is to {natural}",
        )


def _check_device(source: str, cfg: Config) -> None:
    if cfg.train.device != "cuda":
        return
    import torch  # only here and only for cuda: a sweep file is checked in well under a second

    if not torch.cuda.is_available():
        raise ConfigError(source, "train.device", "cuda", "no CUDA device is available here")


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read, override and validate a sweep file; raise :class:`ConfigError` on any fault."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise ConfigError(source, "", str(path), "no such sweep file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(source, "", "", f"malformed YAML at {where}{problem}") from None
    if not isinstance(raw, dict):
        raise ConfigError(source, "", raw, "a sweep file must be a mapping of sections")
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(raw, key, value)
    moved = move_closing_keys(raw, source)
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        raise _error_from_validation(source, raw, exc) from None
    if not cfg.data.path.is_absolute():
        cfg.data.path = (path.parent / cfg.data.path).resolve()
    _check_task(source, cfg)
    _check_device(source, cfg)
    _check_search_space(source, cfg)
    if moved:
        cfg.notes.append(
            f"{source}: {', '.join(f'report.{k}' for k in moved)} belong(s) to the closing"
            f" section now ({', '.join(f'closing.{k}' for k in moved)}); read as such"
        )
    return cfg


def move_closing_keys(raw: dict[str, Any], source: str) -> list[str]:
    """Move the closing stage's keys an older sweep file (or --set) gave under `report:` to
    `closing:`; their names. ConfigError when both sections give one key."""
    report = raw.get("report")
    if not isinstance(report, dict):
        return []
    moved = [key for key in MOVED_TO_CLOSING if key in report]
    if not moved:
        return []
    closing = raw.setdefault("closing", {})
    if not isinstance(closing, dict):
        return []  # validation names the section
    for key in moved:
        if key in closing:
            rule = f"given twice: keep closing.{key} only (report.{key} is its old name)"
            raise ConfigError(source, f"report.{key}", report[key], rule)
        closing[key] = report.pop(key)
    return moved


# What a study's trial values depend on. A study stores these when it is created and a rerun
# with other values is refused (the trials would answer another question). Left out: names,
# budgets (n_trials, timeout, stop, workers), where things are stored, how much
# is logged (diagnostics.level changes no value), and the closing report's settings.
FINGERPRINT_SECTIONS = ("task", "data", "model", "train", "search")
FINGERPRINT_STUDY_KEYS = ("sampler", "n_startup_trials", "pruner", "batch")
FINGERPRINT_IGNORED = ("train.device",)  # results move by rounding only; a GPU may join later


def study_fingerprint(cfg: Config) -> dict[str, Any]:
    """The study-defining settings as flat dotted keys, the data file by its content hash."""
    raw = cfg.model_dump(mode="json")
    chosen = {section: raw[section] for section in FINGERPRINT_SECTIONS}
    chosen["study"] = {key: raw["study"][key] for key in FINGERPRINT_STUDY_KEYS}
    chosen["study"]["direction"] = cfg.direction
    flat = flatten(chosen)
    flat["data.path"] = f"sha256:{file_digest(cfg.data.path)}"
    for key in FINGERPRINT_IGNORED:
        flat.pop(key, None)
    return flat


@cache
def file_digest(path: Path) -> str:
    """A data file's content hash (read once per process)."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()[:16]


def changed_keys(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Keys whose values differ between two fingerprints, in a stable order."""
    return sorted(k for k in stored.keys() | current.keys() if stored.get(k) != current.get(k))


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"dropout": 0.1}}`` -> ``{"model.dropout": 0.1}``; ``search`` entries keep
    their dotted key whole: ``search.model.dropout.high``."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = value
    return flat


def sanity_warnings(cfg: Config) -> list[str]:
    """Settings that cannot do what the user probably thinks they do, and what loading the
    file noted (old key names)."""
    warnings = list(cfg.notes)
    layers = cfg.search.get("model.num_layers")
    can_stack = cfg.model.num_layers > 1 or (layers is not None and max(layers.bounds()) > 1)
    if not can_stack and (cfg.model.dropout > 0 or "model.dropout" in cfg.search):
        warnings.append(
            "model.dropout acts between LSTM layers: with num_layers = 1 it does nothing;"
            " use model.head_dropout or more layers"
        )
    optimizers = cfg.search.get("train.optimizer")
    uses_adam = cfg.train.optimizer == "adam" or (
        optimizers is not None and "adam" in optimizers.bounds()
    )
    decays = cfg.train.weight_decay > 0 or "train.weight_decay" in cfg.search
    if uses_adam and decays:
        warnings.append(
            "train.optimizer = adam couples weight_decay into the gradient (L2, scaled by Adam's"
            " step size), unlike adamw's decoupled decay: the same value means less there"
        )
    return warnings
