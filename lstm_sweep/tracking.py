"""MLflow, and the only module that imports it: the sweep's parent run, the one lifecycle every
nested run goes through (:meth:`Tracker.child_run`), batched logging, artifacts and models.

Everything goes through ``MlflowClient`` with explicit run ids, never the fluent active-run
stack, so runs in several threads or processes cannot log into each other's runs.

Run status mapping (Optuna trial state -> MLflow run status, plus tag ``optuna.state``):
COMPLETE -> FINISHED, PRUNED -> KILLED, FAIL -> FAILED. A pruned run is therefore neither an
ordinary success nor a crash; ``tags.optuna.state = 'PRUNED'`` filters them in the UI.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import sqlite3
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import Any, TypeVar

import filelock
import mlflow
import numpy as np
import pandas as pd
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import (
    MLFLOW_DATASET_CONTEXT,
    MLFLOW_PARENT_RUN_ID,
    MLFLOW_RUN_NAME,
)
from sqlalchemy import event
from sqlalchemy.engine import Engine
from torch import nn

from lstm_sweep import metrics as m
from lstm_sweep.config import mask_secrets, without_password
from lstm_sweep.data import DataDescription
from lstm_sweep.faults import (
    WHAT,
    DropStoreFaults,
    check_local_store,
    classify,
    first_line,
    refused_at_start,
)
from lstm_sweep.train import Callback, History

# downloads here are small files read by a program, not a person: no progress bars in the log
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# the sweep prints the one link that matters (the parent run's page), not one per run closed
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
# MLflow's INFO lines (store migrations, "registered model ...") would interleave with the
# sweep's own output, and put two lines before a one-line error; warnings still show
logging.getLogger("mlflow").setLevel(logging.WARNING)
for _handler in logging.getLogger("mlflow").handlers:  # its own, which it does not propagate
    _handler.addFilter(DropStoreFaults())

STORE_ROOT = Path("mlruns")  # local stores, relative to the working directory
RETRY_ATTEMPTS = 6  # a failed tracking call is tried this often in all ...
RETRY_FIRST_WAIT = 1.0  # ... waiting 1, 2, 4, 8, 16 s between: a 30 s outage loses nothing
HEALTH_TIMEOUT = 5.0  # seconds for a tracking server to answer GET /health at start-up
# MLflow's own HTTP retries would wait ~4 minutes per call against a closed port; with_retries
# does the backoff here instead, so an outage is noticed, retried and reported in one place.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
REASON_LENGTH = 500  # characters of a failure reason kept in its tag
SQLITE_BUSY_MS = 60_000  # how long a local store's writer waits for another before failing
T = TypeVar("T")


def default_tracking_uri(root: Path = STORE_ROOT) -> str:
    """MLflow's recommended local default: a SQLite store under mlruns/, artifacts beside it
    (the folder is made when the store is first opened)."""
    return f"sqlite:///{(root / 'mlflow.db').resolve()}"


def run_name(kind: str, number: int, values: Mapping[str, Any]) -> str:
    """Reads well in the UI's run list: ``trial 007 dropout=0.21 weight_decay=3.1e-04``."""
    parts = [f"{key.rsplit('.', 1)[-1]}={_short(value)}" for key, value in values.items()]
    return " ".join([f"{kind} {number:03d}", *parts])


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2e}" if value != 0 and abs(value) < 1e-2 else f"{value:.3g}"
    return str(value)


def failure_reason(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return m.INTERRUPTED_REASON
    fault = classify(exc)
    if fault is not None:
        return f"a store failed: {WHAT[fault.kind]} ({fault.cause})"[:REASON_LENGTH]
    return mask_secrets(f"{type(exc).__name__}: {exc}")[:REASON_LENGTH]


class TrackingUnavailable(RuntimeError):
    """The tracking store kept failing through every retry; the sweep stops, Optuna's record
    of each trial stays, and the same command resumes once the store is back."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason  # the last failure, masked, one line


def with_retries(
    call: Callable[[], T],
    attempts: int | None = None,
    first_wait: float | None = None,
    retry_on: tuple[type[BaseException], ...] = (MlflowException, OSError),
    waiting_for: str | None = "the tracking store",
) -> T:
    """Retry a call with exponential backoff: a server that blinks loses nothing; one that
    stays down raises :class:`TrackingUnavailable`. While it waits, one line says for what
    (unless ``waiting_for`` is None). A fault no wait cures (a full disk, a damaged or
    read-only file, a database another program held locked through SQLite's own wait:
    faults.classify) is raised at once, as it came."""
    attempts = attempts or RETRY_ATTEMPTS
    first_wait = RETRY_FIRST_WAIT if first_wait is None else first_wait
    waited = first_wait * (2 ** (attempts - 1) - 1)
    for attempt in range(attempts):
        try:
            return call()
        except retry_on as exc:
            if classify(exc) is not None:
                raise
            reason = mask_secrets(first_line(exc))
            if attempt == attempts - 1:
                raise TrackingUnavailable(
                    f"tracking failed {attempts} times over {waited:g} s: {reason}", reason
                ) from None
            if attempt == 0 and waiting_for is not None:
                print(
                    f"waiting for {waiting_for} ({reason}): retrying for up to {waited:g} s",
                    file=sys.stderr,
                )
            time.sleep(first_wait * 2**attempt)
    raise AssertionError("unreachable")


def call_once(call: Callable[[], T]) -> T:
    """A local store's call: made once (its failures are not the kind a wait mends)."""
    return call()


def calls_for(uri: str) -> Callable[[Callable[[], T]], T]:
    """How a tracking store's calls are made: once on a local SQLite file, retried with
    backoff on a server or a database across the network, which may blink."""
    return call_once if uri.startswith("sqlite") else with_retries


def check_server(uri: str, timeout: float = HEALTH_TIMEOUT) -> None:
    """Fail fast (OSError) when nothing answers at an http(s) tracking URI: MLflow's client
    would retry for minutes first. Any HTTP answer, even an error, means a server is there.
    Credentials in the URI go into a basic-auth header, as MLflow's client sends them."""
    parts = urllib.parse.urlsplit(uri)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    url = urllib.parse.urlunsplit(
        (parts.scheme, netloc, f"{parts.path.rstrip('/')}/health", "", "")
    )
    request = urllib.request.Request(url)
    if parts.username or parts.password:
        token = base64.b64encode(f"{parts.username or ''}:{parts.password or ''}".encode())
        request.add_header("Authorization", f"Basic {token.decode()}")
    with suppress(urllib.error.HTTPError):
        urllib.request.urlopen(request, timeout=timeout).close()


def _fast_sqlite_commits(connection: Any, _record: Any) -> None:
    if isinstance(connection, sqlite3.Connection):
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")  # kept in the file: once for every process
        cursor.execute("PRAGMA synchronous=NORMAL")  # per connection
        # a writer waits this long for another (MLflow sets 20 s on each of its sessions);
        # beyond it the file is held by another program, which no retry of ours cures
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_MS}")
        cursor.close()


def fast_sqlite_commits() -> None:
    """Every SQLite connection this process opens writes ahead to a log and syncs it at
    checkpoints, not at each commit: a small series' epoch reports to Optuna and its trial
    opens a run in a few commits each, and the default rollback journal syncs the disk two or
    three times per commit (benchmarks/README.md). A crashed process loses nothing committed;
    only a crash of the machine itself can lose the last commits, never the file. A writer
    waits up to SQLITE_BUSY_MS for another to commit."""
    if not event.contains(Engine, "connect", _fast_sqlite_commits):
        event.listen(Engine, "connect", _fast_sqlite_commits)


@contextmanager
def creating(uri: str) -> Iterator[None]:
    """Hold a file lock beside a local SQLite store while a client opens it: the first client
    creates the store and runs its migrations, and two processes starting together would race
    on them."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    path = Path(uri.removeprefix("sqlite:///"))
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(f"{path}.create.lock"):
        yield


def file_lock(path: str) -> filelock.FileLock:
    """An OS lock on ``path`` held by one open file at a time, two in one process included;
    the file stays, so a waiter never locks a file that was just replaced."""
    return filelock.FileLock(path, thread_local=False, preserve_lock_file=True)


class Tracker:
    """One MLflow experiment and the runs of one sweep in it."""

    def __init__(self, uri: str | None, experiment: str, source: str = "tracking.uri") -> None:
        self.uri = uri or default_tracking_uri()
        self.experiment = experiment
        self._call = calls_for(self.uri)
        check_local_store(self.uri, source, "tracking.uri")
        try:
            if self.uri.startswith(("http://", "https://")):
                for name, value in HTTP_DEFAULTS.items():
                    os.environ.setdefault(name, value)  # the user's own setting wins
                check_server(self.uri)
            fast_sqlite_commits()
            with creating(self.uri):
                self.client = MlflowClient(self.uri, registry_uri=self.uri)
                found = self.client.get_experiment_by_name(experiment)
        except Exception as exc:  # a store fault is named; any other means "unreachable"
            raise refused_at_start(exc, source, "tracking.uri", self.uri) from None
        self._experiment_id = found.experiment_id if found else None

    @property
    def experiment_id(self) -> str:
        """The experiment, created on first use and marked as model training, so the UI opens
        it in the runs view rather than the GenAI one."""
        if self._experiment_id is None:
            location = None
            if self.uri.startswith("sqlite:///"):  # keep artifacts beside the local store
                folder = Path(self.uri.removeprefix("sqlite:///")).parent / "artifacts"
                location = folder.as_uri()
            self._experiment_id = self._call(
                lambda: self.client.create_experiment(
                    self.experiment,
                    artifact_location=location,
                    tags={m.EXPERIMENT_KIND_TAG: m.EXPERIMENT_KIND},
                )
            )
        return self._experiment_id

    def ui_command(self, run_id: str | None = None) -> str:
        """How to see the runs (with ``run_id``, that run's page) in the MLflow UI.

        The page link asks for the model-training view: MLflow 3.17's UI opens every
        experiment in its GenAI view, whatever the experiment's kind tag says.
        """
        server = "http://127.0.0.1:5000"
        start = f"mlflow ui --backend-store-uri {mask_secrets(self.uri)}, then open "
        if self.uri.startswith(("http://", "https://")):
            server, start = without_password(self.uri).rstrip("/"), "open "
        page = f"/#/experiments/{self.experiment_id}"
        if run_id is not None:
            page += f"/runs/{run_id}"
        return f"{start}{server}{page}?workflowType=machine_learning"

    def find_parent(self, study_name: str) -> str | None:
        """The run id of this study's parent run, if it has one."""
        query = f"tags.`{m.ROLE_TAG}` = '{m.ROLE_SWEEP}'"
        runs = self._call(lambda: self.client.search_runs([self.experiment_id], query))
        # the study name is compared here, not in the filter: a name may hold any quote
        ids = [r.info.run_id for r in runs if r.data.tags.get(m.STUDY_TAG) == study_name]
        return ids[0] if ids else None

    def open_parent(
        self, study_name: str, params: Mapping[str, Any], dataset: DataDescription | None = None
    ) -> str:
        """The sweep's parent run: resumed if this study already has one, created otherwise
        (with its params and its dataset)."""
        kind = self.client.get_experiment(self.experiment_id).tags.get(m.EXPERIMENT_KIND_TAG)
        if kind != m.EXPERIMENT_KIND:  # an experiment made by an older version, or by hand
            self.client.set_experiment_tag(
                self.experiment_id, m.EXPERIMENT_KIND_TAG, m.EXPERIMENT_KIND
            )
        run_id = self.find_parent(study_name)
        if run_id is not None:  # resumed: how the last attempt ended no longer holds
            self._delete_tags(run_id, [m.FAILURE_REASON_TAG, m.STATE_TAG])
            self._call(lambda: self.client.update_run(run_id, status="RUNNING"))
            return run_id
        run = self._call(
            lambda: self.client.create_run(
                self.experiment_id,
                run_name=study_name,
                tags={m.ROLE_TAG: m.ROLE_SWEEP, m.STUDY_TAG: study_name},
            )
        )
        self.log_params(run.info.run_id, params)
        if dataset is not None:  # a resumed study has the same data: its fingerprint says so
            self.log_dataset(run.info.run_id, dataset, m.DATASET_CONTEXT_SWEEP)
        return run.info.run_id

    def log_dataset(self, run_id: str, data: DataDescription, context: str) -> None:
        """The run's dataset, for MLflow's Dataset column: the file by its content hash, its
        input columns as the schema, the samples of each part as the profile."""
        dataset = Dataset(
            name=data.name,
            digest=data.digest,
            source_type="local",
            source=json.dumps({"uri": data.source}),
            schema=json.dumps(
                {"mlflow_colspec": [{"name": c, "type": "double"} for c in data.columns]}
            ),
            profile=json.dumps({f"{part}_samples": n for part, n in data.samples.items()}),
        )
        used = DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, context)])
        self._call(lambda: self.client.log_inputs(run_id, [used]))

    def finish_parent(self, run_id: str, state: str, reason: str | None = None) -> None:
        tags = {m.FAILURE_REASON_TAG: reason} if reason else {}
        self._close(run_id, state, tags)

    def stop_parent(self, run_id: str, reason: str) -> None:
        """End the sweep's run as KILLED: it stopped on its budget, short of n_trials (neither
        a failure nor a finished study); ``reason`` says so."""
        self.set_tags(run_id, {m.FAILURE_REASON_TAG: reason})
        self._call(lambda: self.client.set_terminated(run_id, "KILLED"))

    @contextmanager
    def child_run(
        self,
        parent_id: str,
        name: str,
        tags: Mapping[str, Any],
        params: Mapping[str, Any],
        flush_seconds: float,
        dataset: DataDescription | None = None,
        system_seconds: float = 0.0,
    ) -> Iterator[RunRecorder]:
        """The one lifecycle of a nested run (trial, re-evaluation, final model): open it with
        its tags, params and the dataset it trains on, sample system metrics every
        ``system_seconds`` while it runs, hand the body a :class:`RunRecorder`, and on every
        way out flush the buffered metrics and close it: as the body's ``end_as`` state
        (FINISHED, or KILLED when pruned) on a normal exit, FAILED with the reason on an
        exception, Ctrl-C or SIGTERM. A tracking store that stays down leaves the run open;
        the next start of the sweep closes it."""
        all_tags = {MLFLOW_PARENT_RUN_ID: parent_id, MLFLOW_RUN_NAME: name, **tags}
        run = self._call(
            lambda: self.client.create_run(
                self.experiment_id, run_name=name, tags={k: str(v) for k, v in all_tags.items()}
            )
        )
        recorder = RunRecorder(self, run.info.run_id, flush_seconds)
        try:
            self.log_params(recorder.run_id, params)
            if dataset is not None:
                self.log_dataset(recorder.run_id, dataset, m.DATASET_CONTEXT_TRAINING)
            with recorder.system_metrics(system_seconds):
                yield recorder
            recorder.flush()
        except TrackingUnavailable:
            raise
        except BaseException as exc:
            with suppress(TrackingUnavailable):
                recorder.flush()  # the curves up to the failure are evidence too
            self._close(recorder.run_id, m.FAIL, {m.FAILURE_REASON_TAG: failure_reason(exc)})
            raise
        self._close(recorder.run_id, recorder.state, recorder.end_tags)

    def close_as(self, run_id: str, state: str, reason: str | None) -> None:
        """End a run as ``state`` whatever it was: with ``reason`` as its failure reason, or
        without any failure reason."""
        if reason is None:
            self._delete_tags(run_id, [m.FAILURE_REASON_TAG])
        self._close(run_id, state, {m.FAILURE_REASON_TAG: reason} if reason else {})

    def close_running(self, parent_id: str, roles: tuple[str, ...], reason: str) -> int:
        """Close as FAILED the parent's nested runs of ``roles`` still RUNNING; how many."""
        closed = 0
        for role in roles:
            runs = self.child_runs(parent_id, role)
            for run_id in runs["run_id"][runs["status"] == "RUNNING"] if len(runs) else []:
                self._close(run_id, m.FAIL, {m.FAILURE_REASON_TAG: reason})
                closed += 1
        return closed

    def _delete_tags(self, run_id: str, keys: list[str]) -> None:
        tags = self._call(lambda: self.client.get_run(run_id)).data.tags
        for key in keys:
            if key in tags:
                self._call(partial(self.client.delete_tag, run_id, key))

    def close_if_running(self, run_id: str, reason: str) -> bool:
        """Close as FAILED a run left RUNNING (its worker was killed, or the store went away
        before the run could be closed); True if it was."""
        if self._call(lambda: self.client.get_run(run_id)).info.status != "RUNNING":
            return False
        self._close(run_id, m.FAIL, {m.FAILURE_REASON_TAG: reason})
        return True

    def _close(self, run_id: str, state: str, tags: Mapping[str, Any]) -> None:
        """Tag a run with its Optuna state and end it with the matching MLflow status."""
        self.set_tags(run_id, {m.STATE_TAG: state, **tags})
        self._call(lambda: self.client.set_terminated(run_id, m.RUN_STATUS[state]))

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        items = [Param(k, mask_secrets(str(v))) for k, v in params.items()]
        self._call(lambda: self.client.log_batch(run_id, params=items))  # it chunks itself

    def log_metrics(self, run_id: str, metrics: list[Metric]) -> None:
        self._call(lambda: self.client.log_batch(run_id, metrics=metrics))

    def log_summary(self, run_id: str, values: Mapping[str, float], step: int = 0) -> None:
        """Single values (e.g. best_val_loss), or values of one step."""
        now = int(time.time() * 1000)
        self.log_metrics(run_id, [Metric(k, float(v), now, step) for k, v in values.items()])

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        items = [RunTag(k, mask_secrets(str(v))) for k, v in tags.items()]
        self._call(lambda: self.client.log_batch(run_id, tags=items))

    def describe(self, run_id: str, markdown: str) -> None:
        """The run's description on its page in the MLflow UI."""
        self.set_tags(run_id, {m.NOTE_TAG: markdown})

    def log_artifacts(self, run_id: str, folder: Path, artifact_path: str | None = None) -> None:
        self._call(lambda: self.client.log_artifacts(run_id, str(folder), artifact_path))

    def child_runs(self, parent_id: str, role: str) -> pd.DataFrame:
        """The parent's nested runs of one role as ``mlflow.search_runs`` returns them: one row
        per run, columns ``run_id``, ``status``, ``start_time``, ``end_time``, ``metrics.*``,
        ``params.*``, ``tags.*``."""
        query = f"tags.mlflow.parentRunId = '{parent_id}' and tags.`{m.ROLE_TAG}` = '{role}'"
        with fluent_uri(self.uri):
            return self._call(lambda: mlflow.search_runs([self.experiment_id], filter_string=query))

    def run_metrics(self, run_id: str) -> dict[str, float]:
        """A run's metrics, each at its latest value."""
        return dict(self._call(lambda: self.client.get_run(run_id)).data.metrics)

    def metric_history(self, run_id: str, keys: list[str]) -> list[dict[str, float]]:
        """A run's per-epoch metrics back as rows, one per step (what ``fit`` logged)."""
        rows: dict[int, dict[str, float]] = {}
        for key in keys:
            history = self._call(partial(self.client.get_metric_history, run_id, key))
            for metric in history:
                rows.setdefault(metric.step, {})[key] = metric.value
        return [rows[step] for step in sorted(rows)]

    @contextmanager
    def downloaded(self, run_id: str, path: str) -> Iterator[Path | None]:
        """A run's artifact as a local path for a block, or None if the run has none there."""
        with tempfile.TemporaryDirectory(prefix="lstm_sweep_") as tmp:
            try:
                local = mlflow.artifacts.download_artifacts(
                    run_id=run_id, artifact_path=path, dst_path=tmp, tracking_uri=self.uri
                )
            except (MlflowException, OSError):
                yield None
                return
            yield Path(local)

    def read_csv_artifact(self, run_id: str, path: str) -> pd.DataFrame | None:
        with self.downloaded(run_id, path) as local:
            return pd.read_csv(local) if local is not None else None

    def read_json_artifact(self, run_id: str, path: str) -> Any:
        with self.downloaded(run_id, path) as local:
            return json.loads(local.read_text()) if local is not None else None

    def log_model(
        self,
        run_id: str,
        model: nn.Module,
        input_example: np.ndarray,
        output_example: np.ndarray,
        extra_files: list[Path],
        registered_name: str | None,
    ) -> str:
        """Log a torch module on a run with ``mlflow.pytorch.log_model`` and register it.

        MLflow 3 saves it as a ``torch.export`` program ("pt2"), loaded again without
        unpickling code. ``extra_files`` (the scaler, the data config) travel with it under
        ``extra_files/``. Returns the registered version's URI (``models:/name/version``), or
        the logged model's URI when ``registered_name`` is None.
        """
        import mlflow.pytorch  # the flavour pulls in torch.export; only the final model needs it
        from mlflow.models import infer_signature

        signature = infer_signature(input_example, output_example)
        requirements = [f"torch=={version('torch').split('+')[0]}", f"mlflow=={mlflow.__version__}"]
        with fluent_uri(self.uri), mlflow.start_run(run_id=run_id), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch.export on LSTM flat weights
            info = mlflow.pytorch.log_model(
                model,
                name="model",
                signature=signature,
                input_example=input_example,
                extra_files=[str(p) for p in extra_files],
                pip_requirements=requirements,  # stated: inferring them loads the model again
                registered_model_name=registered_name,
            )
        if registered_name is None:
            return info.model_uri
        return f"models:/{registered_name}/{info.registered_model_version}"

    def champion(self, name: str) -> str | None:
        """The version of registered model ``name`` that carries the champion alias, if any."""

        def lookup() -> str | None:
            try:
                return str(self.client.get_model_version_by_alias(name, m.CHAMPION).version)
            except MlflowException as exc:  # no such model, or no such alias: an answer
                if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                    return None
                raise

        return self._call(lookup)

    def crown(self, name: str, version: str) -> None:
        """Move the champion alias of registered model ``name`` to ``version``."""
        self._call(lambda: self.client.set_registered_model_alias(name, m.CHAMPION, version))


SYSTEM_PREFIX = "system/"  # MLflow's own, which its UI reads for the System metrics tab


class RunRecorder(Callback):
    """One open nested run, as :meth:`Tracker.child_run` hands it to its body; also a training
    callback that buffers each epoch's row and writes rows in few batched calls."""

    def __init__(self, tracker: Tracker, run_id: str, flush_seconds: float) -> None:
        self.tracker, self.run_id, self.flush_seconds = tracker, run_id, flush_seconds
        self.state = m.COMPLETE
        self.end_tags: dict[str, Any] = {}
        self.pending: list[Metric] = []
        self.last_flush = time.monotonic()

    def end_as(self, state: str, tags: Mapping[str, Any]) -> None:
        """How the run is to be closed when its block ends normally."""
        self.state, self.end_tags = state, dict(tags)

    @contextmanager
    def system_metrics(self, seconds: float) -> Iterator[None]:
        """MLflow's own system metrics (``system/*``: CPU, memory, disk, network; GPUs where
        pynvml is installed) sampled every ``seconds`` on a thread while the block runs, in
        the run's System metrics tab; nothing when ``seconds`` is 0."""
        if not seconds:
            yield
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        uri = self.tracker.uri
        monitor = SystemMetricsMonitor(self.run_id, sampling_interval=seconds, tracking_uri=uri)
        started = time.monotonic()
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()
            # The monitor drops the samples of its last, unfinished interval (a run shorter
            # than one interval would show none): they join this run's own last batch, at the
            # step the monitor would have given them (one per interval).
            step = int((time.monotonic() - started) // seconds)
            leftover = monitor.aggregate_metrics()
            self.log_step(step, {f"{SYSTEM_PREFIX}{k}": v for k, v in leftover.items()})

    def on_epoch_end(self, epoch: int, row: dict[str, float], history: History) -> None:
        self.log_step(epoch, row)
        if time.monotonic() - self.last_flush >= self.flush_seconds:
            self.flush()

    def log_step(self, step: int, values: Mapping[str, float]) -> None:
        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step) for k, v in values.items()]

    def flush(self) -> None:
        if self.pending:
            self.tracker.log_metrics(self.run_id, self.pending)
        self.pending, self.last_flush = [], time.monotonic()

    def log_summary(self, values: Mapping[str, float]) -> None:
        self.tracker.log_summary(self.run_id, values)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.tracker.set_tags(self.run_id, tags)

    def log_artifacts(self, folder: Path, artifact_path: str | None = None) -> None:
        self.tracker.log_artifacts(self.run_id, folder, artifact_path)


@contextmanager
def fluent_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (search_runs, log_model, the registry) at ``uri`` for a block;
    everything else here names its store explicitly through the client."""
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])


def load_logged_model(model_uri: str, tracking_uri: str | None = None) -> tuple[Any, Path]:
    """A model logged by :meth:`Tracker.log_model` (``models:/name/1``, ``runs:/id/model`` or a
    folder), and the local folder holding its ``extra_files/``."""
    import mlflow.pytorch

    with fluent_uri(tracking_uri or default_tracking_uri()):
        folder = Path(mlflow.artifacts.download_artifacts(model_uri))
        model = mlflow.pytorch.load_model(str(folder))
    return model, folder
