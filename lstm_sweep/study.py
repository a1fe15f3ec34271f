"""Optuna, and the only module that imports it: sampler, pruner, storage, the search space, the
study's record of its own settings, and the thin objective that turns one trial into one
trained, tracked model."""

from __future__ import annotations

import json
import math
import os
import socket
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import sqlalchemy
from optuna.trial import FrozenTrial, TrialState

from lstm_sweep import metrics as m
from lstm_sweep.config import (
    Config,
    ConfigError,
    SearchParam,
    changed_keys,
    mask_secrets,
    study_fingerprint,
)
from lstm_sweep.faults import check_local_store, classify, refused_at_start
from lstm_sweep.record import setting_run, train_in_run
from lstm_sweep.tasks import TaskCache
from lstm_sweep.tracking import (
    STORE_ROOT,
    Tracker,
    TrackingUnavailable,
    fast_sqlite_commits,
    with_retries,
)
from lstm_sweep.train import Callback, History, Stop, StopWhen

RDB_SCHEMES = ("sqlite", "postgresql", "mysql")
MAX_RETRY = 2  # a trial's settings are retried at most this often, so a crash cannot loop
# opening the storage: two processes creating it together race, the loser wins on a retry
OPEN_ATTEMPTS, OPEN_FIRST_WAIT = 3, 0.5
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)  # what n_trials counts

optuna.logging.set_verbosity(optuna.logging.ERROR)  # we report trials ourselves
# heartbeats and retry callbacks are marked experimental; we rely on them knowingly
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

Study = optuna.Study


def default_storage(root: Path = STORE_ROOT) -> str:
    """A SQLite file under mlruns/, beside MLflow's (the folder is made when it is opened)."""
    return f"sqlite:///{(root / 'optuna.db').resolve()}"


def storage_url(cfg: Config) -> str:
    return cfg.study.storage or default_storage()


def trial_seed(seed: int, number: int) -> int:
    """A sampler seed for one proposal, from the study's seed and the proposal's index only."""
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


RETRY_HISTORY = "retry_history"  # Optuna's retry callback: the trials a retry repeats, in order


def proposer(trial: FrozenTrial) -> int:
    """The number of the trial that proposed ``trial``'s setting: its own, or for a retry the
    first of the trials it repeats."""
    return int(trial.system_attrs.get(RETRY_HISTORY, [trial.number])[0])


def proposals(trials: Sequence[FrozenTrial]) -> list[list[FrozenTrial]]:
    """The settings the sampler proposed, in the order it proposed them, each as the trials
    that ran it: the trial that proposed it, then its retries (each names that first trial at
    the head of its retry history). Retries take trial numbers but propose nothing, so a
    setting's index is the same whether or not a worker was lost before it."""
    chains: dict[int, list[FrozenTrial]] = {}
    for trial in sorted(trials, key=lambda t: t.number):
        chains.setdefault(proposer(trial), []).append(trial)
    return [chains[first] for first in sorted(chains)]


def settled(chain: Sequence[FrozenTrial]) -> bool:
    """Whether a setting's trials have all ended (a lost trial's retry still to run is not)."""
    return all(t.state.is_finished() for t in chain)


def outcome(chain: Sequence[FrozenTrial]) -> FrozenTrial | None:
    """The trial of a setting that completed or was pruned; None while none has."""
    return next((t for t in chain if t.state in COUNTED), None)


def may_propose(trials: Sequence[FrozenTrial], batch: int, blind: int = 0) -> bool:
    """Whether a worker may ask for a trial now: a queued retry (its settings fixed) always;
    one of the first ``blind`` settings (:func:`blind_settings`) always; any other new setting
    once every batch before its own has settled, since the sampler proposing it must see
    exactly those trials, whoever finished first."""
    if any(t.state == TrialState.WAITING for t in trials):
        return True
    chains = proposals(trials)
    if len(chains) < blind:
        return True
    start = len(chains) - len(chains) % batch
    return all(settled(chain) for chain in chains[:start])


def decided(chain: Sequence[FrozenTrial], max_retry: int = MAX_RETRY) -> bool:
    """Whether a setting's outcome is final: it completed or was pruned, or it failed as
    often as it may be retried (a failure still to be retried, even by a later start, is
    not)."""
    if outcome(chain) is not None:
        return True
    return settled(chain) and len(chain) > max_retry


def batch_boundary(settings: int, batch: int) -> int:
    """The first batch boundary at or after ``settings`` settings."""
    return math.ceil(settings / batch) * batch


@dataclass(frozen=True)
class Stopped:
    """Where a study ended itself (``study.stop``): after its first ``settings`` settings
    (``trials`` counted trials), its best value ``best`` against ``before``, the best
    ``patience`` settings earlier."""

    settings: int
    trials: int
    best: float
    before: float
    patience: int
    min_gain: float

    def __str__(self) -> str:
        return (
            f"the study stopped itself after {self.trials} trials: its best value"
            f" ({self.best:.4g}) gained at most {100 * self.min_gain:.3g} % over its last"
            f" {self.patience} settings (from {self.before:.4g})"
        )


def first_stop(cfg: Config) -> int:
    """The first setting count at which the study may stop itself: ``patience`` settings
    after the sampler's random start-up ones, at a batch boundary."""
    patience = cfg.study.stop.patience or 0
    return batch_boundary(cfg.study.n_startup_trials + patience, cfg.study.batch)


def stopping_point(trials: Sequence[FrozenTrial], cfg: Config) -> Stopped | None:
    """Where the study stops itself, if it has: the first batch boundary from
    :func:`first_stop` on, short of ``n_trials``, where the best value of the settings before
    it gained at most ``min_gain`` (relative) over the last ``patience`` of them. Only whole
    batches before a boundary decide, every setting in them decided (:func:`decided`), as
    they decide the sampler's proposals: the same trials give the same point, whoever ran
    them, and no setting after it is ever proposed (:func:`blind_settings` stops short of
    the first boundary)."""
    stop, batch = cfg.study.stop, cfg.study.batch
    if stop.patience is None:
        return None
    chains = proposals(trials)
    ended = next((i for i, chain in enumerate(chains) if not decided(chain)), len(chains))
    sign = 1.0 if cfg.direction == "minimize" else -1.0  # toward better
    bests: list[float | None] = [None]  # the best complete value among the first i settings
    counts = [0]  # the counted trials among the first i settings
    for chain in chains[:ended]:
        done = outcome(chain)
        value = done.value if done is not None and done.state == TrialState.COMPLETE else None
        best = bests[-1]
        if value is not None and (best is None or sign * (best - value) > 0):
            best = value
        bests.append(best)
        counts.append(counts[-1] + (done is not None))
    for k in range(first_stop(cfg), ended + 1, batch):
        if counts[k] >= cfg.study.n_trials:
            break  # the budget ran out first: the study did not stop itself
        before, now = bests[k - stop.patience], bests[k]
        if (
            before is not None
            and now is not None
            and sign * (before - now) <= stop.min_gain * abs(before)
        ):
            return Stopped(k, counts[k], now, before, stop.patience, stop.min_gain)
    return None


def target_trials(trials: Sequence[FrozenTrial], cfg: Config) -> int:
    """The counted trials the study is to hold: ``n_trials``, or fewer where it stopped
    itself."""
    stopped = stopping_point(trials, cfg)
    return stopped.trials if stopped is not None else cfg.study.n_trials


def blind_settings(cfg: Config) -> int:
    """How many first settings nothing decides by other trials: TPE and the GP sampler draw
    their start-up settings at random, and the median pruner prunes nothing until it sees
    its start-up count of complete trials, more than the batches before such a setting hold.
    They need not wait for those batches: the study is the same whenever they start. Never
    past the first point where the study may stop itself, which whole batches decide."""
    study = cfg.study
    samplers = {"tpe": study.n_startup_trials, "gp": study.n_startup_trials, "random": math.inf}
    # the median pruner's view of a setting holds the whole batches before it
    median = batch_boundary(study.pruner.n_startup_trials, study.batch)
    pruners = {"median": median, "none": math.inf}
    blind = min(samplers.get(study.sampler, 0), pruners.get(study.pruner.type, 0))
    if study.stop.patience is not None:
        blind = min(blind, first_stop(cfg))
    return int(min(blind, study.n_trials))


@dataclass(frozen=True)
class Seen:
    """What the sampler and the pruner see for one trial: the index of its setting, a study
    in memory holding the outcomes of the batches before its own, in order, and that study's
    stand-in for the trial (samplers record their proposals on it)."""

    index: int
    study: Study
    trial: FrozenTrial


class Batches:
    """Trials proposed in batches of ``size``: a trial's sampler and pruner see only the
    settings of earlier batches, in the order they were proposed, so the study is the same
    with any number of workers on any storage (Optuna's parallel samplers see whatever
    happened to finish first). :func:`may_propose` holds a worker back until those batches
    have settled, but for the first settings, which nothing decides by the trials they see
    (:func:`blind_settings`). One trial's view is kept: a process trains one trial at a
    time."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._last: tuple[tuple[str, int], Seen] | None = None

    def seen(self, study: Study, trial: FrozenTrial) -> Seen:
        key = (study.study_name, trial.number)
        if self._last is None or self._last[0] != key:
            self._last = (key, self._build(study, trial))
        return self._last[1]

    def _build(self, study: Study, trial: FrozenTrial) -> Seen:
        others = [t for t in study.get_trials(deepcopy=False) if t.number != trial.number]
        chains = proposals(others)
        index = sum(chain[0].number < proposer(trial) for chain in chains)
        start = index - index % self.size
        view = optuna.create_study(directions=study.directions)
        view.add_trials([t for t in map(outcome, chains[:start]) if t is not None])
        view.add_trial(optuna.trial.create_trial(state=TrialState.RUNNING))
        return Seen(index, view, view.trials[-1])


class SeedPerSetting(optuna.samplers.BaseSampler):
    """Delegates to a sampler made afresh for each trial, seeded from the study's seed and
    the index of the setting it proposes: setting 7 is proposed alike in any process and on
    any storage, and workers sharing a study explore instead of repeating each other. The
    study is shown as it is (:class:`BatchSampler` shows the earlier batches only)."""

    def __init__(
        self, make: Callable[[int], optuna.samplers.BaseSampler], seed: int, batches: Batches
    ) -> None:
        self._make, self._seed, self._batches = make, seed, batches
        self._asked: dict[int, optuna.samplers.BaseSampler] = {}  # by trial number, until told

    def _shown(self, study: Study, trial: FrozenTrial) -> tuple[Study, FrozenTrial]:
        return study, trial

    def _base(self, study: Study, trial: FrozenTrial) -> optuna.samplers.BaseSampler:
        if trial.number not in self._asked:
            index = self._batches.seen(study, trial).index
            self._asked[trial.number] = self._make(trial_seed(self._seed, index))
        return self._asked[trial.number]

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self._base(study, trial).before_trial(*self._shown(study, trial))

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, Any]:
        return self._base(study, trial).infer_relative_search_space(*self._shown(study, trial))

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, Any]
    ) -> dict[str, Any]:
        shown = self._shown(study, trial)
        return self._base(study, trial).sample_relative(*shown, search_space)

    def sample_independent(
        self, study: Study, trial: FrozenTrial, param_name: str, param_distribution: Any
    ) -> Any:
        shown = self._shown(study, trial)
        return self._base(study, trial).sample_independent(*shown, param_name, param_distribution)

    def after_trial(
        self,
        study: Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self._base(study, trial).after_trial(*self._shown(study, trial), state, values)
        self._asked.pop(trial.number, None)

    def reseed_rng(self) -> None:
        """Nothing to do: every proposal is seeded by its index already."""


class BatchSampler(SeedPerSetting):
    """A :class:`SeedPerSetting` that shows its sampler the earlier batches only
    (:class:`Batches`), in a study of their own with a stand-in for the trial."""

    def _shown(self, study: Study, trial: FrozenTrial) -> tuple[Study, FrozenTrial]:
        seen = self._batches.seen(study, trial)
        return seen.study, seen.trial


class BatchPruner(optuna.pruners.BasePruner):
    """A pruner that compares a trial with the earlier batches only (:class:`Batches`), so
    whether it is pruned does not hang on which trials of its own batch finished first."""

    def __init__(self, base: optuna.pruners.BasePruner, batches: Batches) -> None:
        self._base, self._batches = base, batches

    def prune(self, study: Study, trial: FrozenTrial) -> bool:
        return self._base.prune(self._batches.seen(study, trial).study, trial)


def make_sampler(cfg: Config, batches: Batches) -> optuna.samplers.BaseSampler:
    """The configured sampler, seeded per proposal from train.seed and shown the earlier
    batches only (QMC walks one seeded sequence indexed by a counter in the study, and CMA-ES
    keeps its state in the study's trials: both see the study as it is)."""
    startup = cfg.study.n_startup_trials
    makers: dict[str, Callable[[int], optuna.samplers.BaseSampler]] = {
        "tpe": lambda seed: optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup),
        "random": lambda seed: optuna.samplers.RandomSampler(seed=seed),
        "cmaes": lambda seed: optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=startup),
        "gp": lambda seed: optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup),
    }
    if cfg.study.sampler == "qmc":
        return optuna.samplers.QMCSampler(seed=cfg.train.seed)
    kind = SeedPerSetting if cfg.study.sampler == "cmaes" else BatchSampler
    return kind(makers[cfg.study.sampler], cfg.train.seed, batches)


def make_pruner(cfg: Config, batches: Batches) -> optuna.pruners.BasePruner:
    """The configured pruner; the median pruner sees the earlier batches only (hyperband and
    successive halving record rungs on the trials themselves: they see the study as it is)."""
    p = cfg.study.pruner
    match p.type:
        case "median":
            median = optuna.pruners.MedianPruner(p.n_startup_trials, p.n_warmup_steps)
            return BatchPruner(median, batches)
        case "hyperband":
            return optuna.pruners.HyperbandPruner(
                p.min_resource, cfg.train.max_epochs, p.reduction_factor
            )
        case "successive_halving":
            return optuna.pruners.SuccessiveHalvingPruner(p.min_resource, p.reduction_factor)
    return optuna.pruners.NopPruner()


def make_storage(
    url: str,
    on_stale: Callable[[Study, FrozenTrial], None] | None,
    heartbeat_seconds: int,
    grace_seconds: int,
) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats, so a killed worker's trial is failed and retried."""
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        fast_sqlite_commits()  # write-ahead, and a writer waits for another (SQLITE_BUSY_MS)
    elif url.startswith("postgresql"):
        engine_kwargs = {"connect_args": {"connect_timeout": 10}}  # a dead host fails fast
    storage = optuna.storages.RDBStorage(
        url,
        engine_kwargs=engine_kwargs,
        heartbeat_interval=heartbeat_seconds,
        grace_period=grace_seconds,
        heartbeat_stale_trial_callback=on_stale,
    )
    if isinstance(on_stale, StaleTrialHandler):
        on_stale.storage = storage  # the study wraps it in a cache and keeps it private
    return storage


def open_study(
    cfg: Config,
    source: str,
    on_stale: Callable[[Study, FrozenTrial], None] | None = None,
) -> Study:
    """Create the study, or load it to resume it. ConfigError when the storage is unreachable
    or when the stored study was run with other settings (its trials would answer another
    question): the message names the changed keys and how to start a new study."""
    url = storage_url(cfg)
    if not url.startswith(RDB_SCHEMES):
        schemes = ", ".join(f"{s}://" for s in RDB_SCHEMES)
        raise ConfigError(source, "study.storage", url, f"must be a database URL ({schemes})")
    check_local_store(url, source, "study.storage")
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    fingerprint = study_fingerprint(cfg)

    batches = Batches(cfg.study.batch)

    def create() -> Study:
        heartbeat, grace = cfg.study.heartbeat_seconds, cfg.study.grace_seconds
        return optuna.create_study(
            study_name=cfg.study_name,
            storage=make_storage(url, on_stale, heartbeat, grace),
            sampler=make_sampler(cfg, batches),
            pruner=make_pruner(cfg, batches),
            direction=cfg.direction,
            load_if_exists=True,
        )

    try:
        # two processes creating a new storage together race on its tables (and its study
        # row); the loser finds both made on its second try
        study = with_retries(
            create, OPEN_ATTEMPTS, OPEN_FIRST_WAIT, retry_on=(Exception,), waiting_for=None
        )
        stored = study.user_attrs.get(m.CONFIG_ATTR)
    except TrackingUnavailable as exc:  # the storage stayed out of reach through the retries
        raise ConfigError(source, "study.storage", url, f"unreachable: {exc.reason}") from None
    except Exception as exc:  # a fault no retry cures: the disk is full, the file damaged
        raise refused_at_start(exc, source, "study.storage", url) from None
    if stored is None:
        if study.get_trials(deepcopy=False):
            raise ConfigError(
                source,
                "study.name",
                cfg.study_name,
                "this study holds trials but no record of the settings they were run with"
                " (an older lstm_sweep made it); set study.name to start a new study",
            )
        study.set_user_attr(m.CONFIG_ATTR, json.dumps(fingerprint))
        return study
    changed = changed_keys(json.loads(stored), fingerprint)
    if changed:
        old = json.loads(stored)
        first = changed[0]
        others = f" (and {len(changed) - 1} more: {', '.join(changed[1:4])})" if changed[1:] else ""
        raise ConfigError(
            source,
            first,
            fingerprint.get(first),
            f"study {cfg.study_name!r} in {mask_secrets(url)} was run with {old.get(first)!r}"
            f"{others}; its trials answer another question. Start a new study with"
            f" --set study.name={cfg.study_name}-2 (or delete the old one)",
        )
    return study


def suggest_params(trial: optuna.Trial, search: Mapping[str, SearchParam]) -> dict[str, Any]:
    """The search space, in one place: dotted config key -> sampled value."""
    values: dict[str, Any] = {}
    for key, p in search.items():
        if p.type == "categorical":
            values[key] = trial.suggest_categorical(key, p.bounds())
            continue
        low, high = p.span
        if p.type == "int":
            step = int(p.step or 1)
            values[key] = trial.suggest_int(key, int(low), int(high), step=step, log=p.log)
        else:
            values[key] = trial.suggest_float(key, low, high, step=p.step, log=p.log)
    return values


def state_counts(study: Study) -> Counter[str]:
    """How many trials are in each state, by name (COMPLETE, PRUNED, FAIL, RUNNING, ...)."""
    return Counter(t.state.name for t in study.get_trials(deepcopy=False))


def counted_trials(study: Study) -> int:
    """The trials ``n_trials`` counts: completed and pruned ones."""
    return len(study.get_trials(deepcopy=False, states=COUNTED))


class StaleTrialHandler:
    """Storage callback for a trial whose worker stopped beating: close its MLflow run as
    failed, then queue it again with the same settings."""

    def __init__(self, tracker: Tracker, max_retry: int = MAX_RETRY) -> None:
        self.tracker = tracker
        self.retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
        self.handled: list[int] = []  # the numbers of the trials it failed, in order
        self.storage: optuna.storages.RDBStorage | None = None  # the one it was given to

    def __call__(self, study: Study, trial: FrozenTrial) -> None:
        run_id = trial.user_attrs.get(m.RUN_ID_ATTR)
        if run_id:
            self.tracker.close_if_running(run_id, m.WORKER_LOST_REASON)
        self.retry(study, trial)
        self.handled.append(trial.number)


def fail_stale_trials(study: Study, grace_seconds: int, on_stale: StaleTrialHandler) -> list[int]:
    """Fail the trials of workers that are gone, and queue their settings again.

    Optuna's own check covers trials whose heartbeat stopped; a trial whose worker died before
    its first heartbeat (while the sampler ran) has none, so it is judged by its start time.
    On a local SQLite storage a trial whose process is known gone (this host, this process
    namespace, no such pid) is failed at once, without waiting out the grace period. Returns
    the numbers of the trials failed here.
    """
    before = len(on_stale.handled)
    optuna.storages.fail_stale_trials(study)  # calls on_stale for each trial it fails
    storage = on_stale.storage
    if storage is None:
        raise ValueError("the handler must be the study storage's (open_study(..., on_stale))")
    cutoff = datetime.now() - timedelta(seconds=grace_seconds)
    on_this_machine = storage.url.startswith("sqlite")
    study_id = None  # looked up once, for the first trial that is not young
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        started = trial.datetime_start
        gone = on_this_machine and process_gone(
            trial.user_attrs.get(m.WORKER_ATTR), trial.user_attrs.get(m.PID_NAMESPACE_ATTR)
        )
        young = started is None or started > cutoff
        if not gone and young:
            continue
        study_id = study_id or storage.get_study_id_from_name(study.study_name)
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        if not gone and has_heartbeat(storage, trial_id):
            continue
        try:
            storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker failed it first
        on_stale(study, study.get_trials(deepcopy=False)[trial.number])
    return sorted(on_stale.handled[before:])


def process_gone(worker: str | None, namespace: str | None) -> bool:
    """Whether ``worker`` (host:pid, as metrics.this_process names it) was a process of this
    host and of this process namespace (two containers may share a host name and a SQLite
    volume, not their pids) that no longer exists. A reused pid reads as alive: the heartbeat
    decides then."""
    host, _, pid = (worker or "").rpartition(":")
    same_namespace = namespace is not None and namespace == m.process_namespace()
    if host != socket.gethostname() or not same_namespace or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def has_heartbeat(storage: optuna.storages.RDBStorage, trial_id: int) -> bool:
    """Whether a trial's worker ever recorded a heartbeat. Optuna's public heartbeat API
    records beats and fails trials whose last beat is old (``fail_stale_trials``); it has no
    reader for "never beat", which is what a worker that died in the sampler leaves, so its
    table is read here."""
    from optuna.storages._rdb.models import TrialHeartbeatModel

    query = sqlalchemy.text(
        f"SELECT COUNT(*) FROM {TrialHeartbeatModel.__tablename__} WHERE trial_id = :id"
    )
    with storage.engine.connect() as connection:
        return bool(connection.execute(query, {"id": trial_id}).scalar())


def retry_failed(study: Study, max_retry: int = MAX_RETRY) -> int:
    """Queue the settings of every failed trial (a crash, Ctrl-C, a lost worker) not yet
    retried, so a resumed sweep finishes exactly what was lost; Optuna's own retry callback
    records which trial each retry replaces."""
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get(RETRY_HISTORY, [])}
    lost = [t for t in trials if t.state == TrialState.FAIL and t.number not in retried]
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
    for trial in lost:
        retry(study, trial)
    return len(lost)


def reconcile_runs(study: Study, tracker: Tracker, parent_id: str) -> list[int]:
    """Make each trial's MLflow run end as Optuna recorded the trial: a run left RUNNING, or
    closed otherwise than its trial ended (the disk filled between the two stores' writes), is
    closed with the trial's state. Optuna is the one truth: its FAIL trials are retried, so
    their runs must not read as finished. Runs are paired with trials by the run id each trial
    recorded; a RUNNING run no trial recorded (the store failed before it could be) is closed
    as failed once its trial has ended. Trials still RUNNING are left to their workers.
    Returns the numbers of the trials whose runs were changed."""
    trials = study.get_trials(deepcopy=False)
    by_run = {t.user_attrs[m.RUN_ID_ATTR]: t for t in trials if m.RUN_ID_ATTR in t.user_attrs}
    by_number = {t.number: t for t in trials}
    runs = tracker.child_runs(parent_id, m.ROLE_TRIAL)
    changed = []
    for _, run in runs.iterrows():
        trial = by_run.get(run["run_id"])
        if trial is None:  # a run no trial recorded
            number = int(run[f"tags.{m.TRIAL_TAG}"])
            same = by_number.get(number)
            if run["status"] == "RUNNING" and (same is None or same.state.is_finished()):
                tracker.close_as(run["run_id"], m.FAIL, m.UNCLOSED_REASON)
                changed.append(number)
            continue
        state = trial.state
        if not state.is_finished():
            continue
        tagged = run.get(f"tags.{m.STATE_TAG}")
        if run["status"] == m.RUN_STATUS[state.name] and tagged == state.name:
            continue
        reason = None
        if state == TrialState.FAIL:
            finished = run["status"] == m.RUN_STATUS[m.COMPLETE]
            reason = m.UNRECORDED_REASON if finished else m.UNCLOSED_REASON
        tracker.close_as(run["run_id"], state.name, reason)
        changed.append(trial.number)
    return sorted(changed)


def first_prunable_epoch(cfg: Config) -> float:
    """The first epoch at which the configured pruner can answer "prune" (Optuna's rule for
    each: the median pruner's warm-up, the first rung of successive halving and hyperband)."""
    p = cfg.study.pruner
    match p.type:
        case "median":
            return p.n_warmup_steps
        case "hyperband" | "successive_halving":
            return p.min_resource
    return math.inf


class Pruning(Callback):
    """Report the monitored metric to Optuna each epoch; stop when the pruner says so. Before
    ``first_epoch`` the pruner is not asked: it would answer no, after a storage round trip
    that costs a small series' epoch a tenth of its time (6-16 ms, benchmarks/README.md)."""

    def __init__(self, trial: optuna.Trial, monitor: str, first_epoch: float = 0) -> None:
        self.trial, self.monitor, self.first_epoch = trial, monitor, first_epoch

    def on_epoch_end(self, epoch: int, row: dict[str, float], history: History) -> Stop | None:
        value = row[self.monitor]
        if not math.isfinite(value):
            return None  # the loop's own instability check ends the trial
        self.trial.report(value, epoch)
        if epoch < self.first_epoch:
            return None
        return Stop.PRUNED if self.trial.should_prune() else None


class Objective:
    """One trial: sample, then train and record that setting in the trial's nested run."""

    def __init__(
        self,
        cfg: Config,
        tasks: TaskCache,
        tracker: Tracker,
        parent_id: str,
        stop_requested: Callable[[], bool] = lambda: False,
    ) -> None:
        self.cfg, self.tasks, self.tracker, self.parent_id = cfg, tasks, tracker, parent_id
        self.stop_requested = stop_requested

    def __call__(self, trial: optuna.Trial) -> float:
        values = suggest_params(trial, self.cfg.search)
        cfg = self.cfg.with_values(values)
        task = self.tasks.get(cfg)
        trial.set_user_attr(m.WORKER_ATTR, m.this_process())
        trial.set_user_attr(m.PID_NAMESPACE_ATTR, m.process_namespace())
        run_in = setting_run(
            self.tracker, self.parent_id, m.ROLE_TRIAL, cfg, task, trial.number, values
        )
        with run_in as run:
            trial.set_user_attr(m.RUN_ID_ATTR, run.run_id)
            callbacks = [
                Pruning(trial, cfg.train.monitor, first_prunable_epoch(cfg)),
                StopWhen(self.stop_requested),
            ]
            outcome = train_in_run(cfg, task, run, callbacks, folds=self.tasks.folds(cfg))
        history = outcome.history
        trial.set_user_attr(m.BEST_EPOCH, history.best_epoch)
        trial.set_user_attr(m.EPOCHS_TRAINED, history.epochs_trained)
        trial.set_user_attr(m.VERDICT_ATTR, outcome.verdict.verdict)
        trial.set_user_attr(m.VERDICT_REASON_ATTR, outcome.verdict.reason)
        if outcome.state == m.PRUNED:
            unstable = history.stop is Stop.UNSTABLE
            raise optuna.TrialPruned(outcome.verdict.reason if unstable else None)
        return outcome.value


def run_one_trial(
    study: Study,
    objective: Callable[[optuna.Trial], float],
    callbacks: list[Callable[[Study, FrozenTrial], None]],
) -> None:
    """One trial through Optuna's own loop (heartbeats, state, callbacks); its exceptions,
    Ctrl-C included, propagate after Optuna has recorded the trial as failed. When a store
    failed inside the trial and Optuna then failed to record it, the first failure is the one
    that propagates: Optuna's own ("Should not reach") would hide the cause."""
    raised: list[BaseException] = []

    def watched(trial: optuna.Trial) -> float:
        try:
            return objective(trial)
        except BaseException as exc:
            raised.append(exc)
            raise

    try:
        study.optimize(watched, n_trials=1, callbacks=callbacks, catch=())
    except Exception as exc:
        first = raised[0] if raised else exc
        if first is not exc and classify(first) is not None:
            # chained as the cause, which faults.classify reads first; ``first`` stays intact
            raise RuntimeError("a store failed in the trial; Optuna could not record it") from first
        raise


def trials_frame(study: Study) -> pd.DataFrame:
    """The study's trials as a DataFrame, searched values under their dotted config keys."""
    frame = study.trials_dataframe(attrs=("number", "state", "value", "params", "user_attrs"))
    frame.columns = [c.removeprefix("params_").removeprefix("user_attrs_") for c in frame.columns]
    return frame


def best_value(study: Study) -> float | None:
    try:
        return study.best_value
    except ValueError:  # no completed trial yet
        return None


def param_importances(study: Study, seed: int = 0) -> dict[str, float]:
    """fANOVA importance of each searched key for the objective, summing to 1, largest first;
    empty when fewer than two trials completed or nothing varied."""
    if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) < 2:
        return {}
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
    try:
        return optuna.importance.get_param_importances(study, evaluator=evaluator)
    except (RuntimeError, ValueError):  # e.g. a single distinct value per parameter
        return {}


def study_figures(study: Study, contour: list[str], seed: int = 0) -> dict[str, Any]:
    """Optuna's own views of the study as plotly figures: history, importances, slices, the
    ``contour`` pair, parallel coordinates; a view with too few completed trials is left out."""
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
    views: dict[str, Callable[[], Any]] = {
        "optimization_history": lambda: optuna.visualization.plot_optimization_history(study),
        "param_importances": lambda: optuna.visualization.plot_param_importances(
            study, evaluator=evaluator
        ),
        "slice": lambda: optuna.visualization.plot_slice(study),
        "parallel_coordinate": lambda: optuna.visualization.plot_parallel_coordinate(study),
    }
    if len(contour) == 2:
        views["contour"] = lambda: optuna.visualization.plot_contour(study, params=contour)
    figures = {}
    for name, view in views.items():
        try:
            figures[name] = view()
        except (RuntimeError, ValueError):  # too few completed trials for this view
            continue
    return figures


def selection_recorded(study: Study) -> dict[str, Any] | None:
    """What the closing stage recorded on the study (its model, its run), or None."""
    raw = study.user_attrs.get(m.SELECTION_ATTR)
    return json.loads(raw) if raw else None


def record_selection(study: Study, summary: Mapping[str, Any]) -> None:
    study.set_user_attr(m.SELECTION_ATTR, json.dumps(dict(summary)))
