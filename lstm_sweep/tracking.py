"""MLflow, and the only module that imports it: the sweep's parent run, one nested run per trial,
batched metric logging and artifacts.

Everything goes through ``MlflowClient`` with explicit run ids, never the fluent active-run
stack, so trials in several threads or processes cannot log into each other's runs.

Run status mapping (Optuna trial state -> MLflow run status, plus tag ``optuna.state``):
COMPLETE -> FINISHED, PRUNED -> KILLED, FAIL -> FAILED. A pruned run is therefore neither an
ordinary success nor a crash; ``tags.optuna.state = 'PRUNED'`` filters them in the UI.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import Any, TypeVar

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from lstm_sweep.config import ConfigError

# downloads here are small files read by a program, not a person: no progress bars in the log
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

STORE_ROOT = Path("mlruns")  # local stores, relative to the working directory
ROLE_TAG = "lstm_sweep.role"  # sweep | trial | reevaluation | final
STUDY_TAG = "optuna.study"
TRIAL_TAG = "optuna.trial_number"
STATE_TAG = "optuna.state"
RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
BATCH_LIMIT = 1000  # MLflow's cap on entities per log_batch
RETRY_ATTEMPTS = 6  # a failed tracking call is tried this often in all ...
RETRY_FIRST_WAIT = 1.0  # ... waiting 1, 2, 4, 8, 16 s between: a 30 s outage loses nothing
HEALTH_TIMEOUT = 5.0  # seconds for a tracking server to answer GET /health at start-up
# MLflow's own HTTP retries would wait ~4 minutes per call against a closed port; with_retries
# does the backoff here instead, so an outage is noticed, retried and reported in one place.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
T = TypeVar("T")


def default_tracking_uri(root: Path = STORE_ROOT) -> str:
    """MLflow's recommended local default: a SQLite store under mlruns/, artifacts beside it."""
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(root / 'mlflow.db').resolve()}"


def mask_uri(uri: str) -> str:
    """Hide a password inside a URI before it is printed or logged."""
    return re.sub(r"(://[^:/@]+:)[^@]+@", r"\1***@", uri)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"dropout": 0.1}}`` -> ``{"model.dropout": 0.1}``."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = value
    return flat


def trial_run_name(number: int, values: Mapping[str, Any]) -> str:
    """Reads well in the UI's run list: ``trial 007 dropout=0.21 weight_decay=3.1e-04``."""
    parts = [f"{key.rsplit('.', 1)[-1]}={_short(value)}" for key, value in values.items()]
    return " ".join([f"trial {number:03d}", *parts])


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2e}" if value != 0 and abs(value) < 1e-2 else f"{value:.3g}"
    return str(value)


def _chunks(items: list[T], size: int = BATCH_LIMIT) -> Iterable[list[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class TrackingUnavailable(RuntimeError):
    """The tracking store kept failing through every retry; the sweep stops, Optuna's record
    of each trial stays, and the same command resumes once the store is back."""


def with_retries(
    call: Callable[[], T], attempts: int | None = None, first_wait: float | None = None
) -> T:
    """Retry a tracking call with exponential backoff: a server that blinks loses nothing;
    one that stays down raises :class:`TrackingUnavailable`."""
    attempts = attempts or RETRY_ATTEMPTS
    first_wait = RETRY_FIRST_WAIT if first_wait is None else first_wait
    for attempt in range(attempts):
        try:
            return call()
        except (MlflowException, OSError) as exc:
            if attempt == attempts - 1:
                reason = mask_uri(str(exc).splitlines()[0][:200])
                waited = first_wait * (2 ** (attempts - 1) - 1)
                raise TrackingUnavailable(
                    f"tracking failed {attempts} times over {waited:g} s: {reason}"
                ) from exc
            time.sleep(first_wait * 2**attempt)
    raise AssertionError("unreachable")


def check_server(uri: str, timeout: float = HEALTH_TIMEOUT) -> None:
    """Fail fast (OSError) when nothing answers at an http(s) tracking URI: MLflow's client
    would retry for minutes first. Any HTTP answer, even an error, means a server is there."""
    with suppress(urllib.error.HTTPError):
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()


class Tracker:
    """One MLflow experiment and the runs of one sweep in it."""

    def __init__(self, uri: str | None, experiment: str, source: str = "tracking.uri") -> None:
        self.uri = uri or default_tracking_uri()
        self.client = MlflowClient(self.uri, registry_uri=self.uri)
        try:
            if self.uri.startswith(("http://", "https://")):
                for name, value in HTTP_DEFAULTS.items():
                    os.environ.setdefault(name, value)  # the user's own setting wins
                check_server(self.uri)
            self.experiment_id = self._experiment(experiment)
        except Exception as exc:  # any driver or HTTP error means the same to the user
            reason = str(exc).splitlines()[0][:200]
            raise ConfigError(
                source, "tracking.uri", mask_uri(self.uri), f"unreachable: {reason}"
            ) from None

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = None
        if self.uri.startswith("sqlite:///"):  # keep artifacts beside the local store
            location = (Path(self.uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
        return self.client.create_experiment(name, artifact_location=location)

    def ui_command(self) -> str:
        if self.uri.startswith(("http://", "https://")):
            return f"open {mask_uri(self.uri)} (the tracking server's UI)"
        return f"mlflow ui --backend-store-uri {mask_uri(self.uri)}"

    def open_parent(self, study_name: str, config: Mapping[str, Any]) -> str:
        """The sweep's parent run: resumed if this study already has one, created otherwise."""
        existing = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{ROLE_TAG}` = 'sweep' and tags.`{STUDY_TAG}` = '{study_name}'",
            max_results=1,
        )
        if existing:
            run_id = existing[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        run = self.client.create_run(
            self.experiment_id,
            run_name=study_name,
            tags={ROLE_TAG: "sweep", STUDY_TAG: study_name},
        )
        self.log_params(run.info.run_id, flatten(config))
        return run.info.run_id

    def start_child(
        self, parent_id: str, name: str, tags: Mapping[str, str], params: Mapping[str, Any]
    ) -> str:
        run = with_retries(
            lambda: self.client.create_run(
                self.experiment_id,
                run_name=name,
                tags={MLFLOW_PARENT_RUN_ID: parent_id, MLFLOW_RUN_NAME: name, **tags},
            )
        )
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        items = [Param(k, mask_uri(str(v))) for k, v in params.items()]
        for chunk in _chunks(items, 100):
            with_retries(partial(self.client.log_batch, run_id, params=chunk))

    def log_metrics(self, run_id: str, metrics: list[Metric]) -> None:
        for chunk in _chunks(metrics):
            with_retries(partial(self.client.log_batch, run_id, metrics=chunk))

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        items = [RunTag(k, str(v)) for k, v in tags.items()]
        with_retries(lambda: self.client.log_batch(run_id, tags=items))

    def log_summary(self, run_id: str, values: Mapping[str, float]) -> None:
        """Single-value metrics (no step), e.g. best_val_loss."""
        now = int(time.time() * 1000)
        self.log_metrics(run_id, [Metric(k, float(v), now, 0) for k, v in values.items()])

    def log_artifacts(self, run_id: str, folder: Path, artifact_path: str | None = None) -> None:
        with_retries(lambda: self.client.log_artifacts(run_id, str(folder), artifact_path))

    def finish(self, run_id: str, state: str, tags: Mapping[str, Any] | None = None) -> None:
        """Close a run; ``state`` is an Optuna state name, mapped by :data:`RUN_STATUS`."""
        self.set_tags(run_id, {STATE_TAG: state, **(tags or {})})
        with_retries(lambda: self.client.set_terminated(run_id, RUN_STATUS[state]))

    def finish_if_running(self, run_id: str, state: str, tags: Mapping[str, Any]) -> bool:
        """Close a run left RUNNING (its worker was killed, or the server went away before the
        run could be closed); True if it was."""
        if with_retries(lambda: self.client.get_run(run_id)).info.status != "RUNNING":
            return False
        self.finish(run_id, state, tags)
        return True

    def artifact_dir(self) -> tempfile.TemporaryDirectory[str]:
        return tempfile.TemporaryDirectory(prefix="lstm_sweep_")

    def child_runs(self, parent_id: str, role: str) -> pd.DataFrame:
        """The parent's nested runs of one role as ``mlflow.search_runs`` returns them: one row
        per run, columns ``run_id``, ``status``, ``start_time``, ``end_time``, ``metrics.*``,
        ``params.*``, ``tags.*``."""
        query = f"tags.mlflow.parentRunId = '{parent_id}' and tags.`{ROLE_TAG}` = '{role}'"
        with fluent_uri(self.uri):
            return with_retries(
                lambda: mlflow.search_runs([self.experiment_id], filter_string=query)
            )

    def read_csv_artifact(self, run_id: str, path: str) -> pd.DataFrame | None:
        """A CSV a run logged, or None if it has none at ``path``."""
        with tempfile.TemporaryDirectory(prefix="lstm_sweep_") as tmp:
            try:
                local = mlflow.artifacts.download_artifacts(
                    run_id=run_id, artifact_path=path, dst_path=tmp, tracking_uri=self.uri
                )
            except (MlflowException, OSError):
                return None
            return pd.read_csv(local)

    def log_model(
        self,
        run_id: str,
        model: Any,
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
            warnings.simplefilter("ignore", UserWarning)  # torch.export on nn.LSTM's flat weights
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


class EpochLogger:
    """Training callback: buffers each epoch's row and writes it in few batched calls."""

    def __init__(self, tracker: Tracker, run_id: str, flush_seconds: float) -> None:
        self.tracker, self.run_id, self.flush_seconds = tracker, run_id, flush_seconds
        self.pending: list[Metric] = []
        self.last_flush = time.monotonic()

    def on_epoch_end(self, epoch: int, row: Mapping[str, float]) -> None:
        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, epoch) for k, v in row.items()]
        if time.monotonic() - self.last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.tracker.log_metrics(self.run_id, self.pending)
        self.pending, self.last_flush = [], time.monotonic()


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
