"""Shared fixtures: the real sweep files shrunk to seconds, and real stores under tmp_path.

Creating an MLflow SQLite store runs its migrations (seconds), so one is made per session and
copied into each test's own mlruns/.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from lstm_sweep.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "sweeps" / "quick.yaml"
FORECAST = ROOT / "sweeps" / "forecast.yaml"

# The quick sweep, shrunk: tiny model, few epochs, few trials. Still the real CO2 data.
TINY = [
    "data.window=8",
    "data.horizon=2",
    "model.num_layers=1",
    "model.hidden_size=8",
    "train.max_epochs=4",
    "train.batch_size=256",
    "study.n_trials=4",
    "study.n_startup_trials=2",
    "diagnostics.eval_subsample=256",
]


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()  # runs the migrations once
    return path


@pytest.fixture
def stores(tmp_path: Path, mlflow_template: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh mlruns/ in the test's working directory, where the default URIs point."""
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "mlruns"
    root.mkdir()
    shutil.copy(mlflow_template, root / "mlflow.db")
    return root


@pytest.fixture
def tiny_cfg(stores: Path) -> Config:
    return load_config(QUICK, TINY)


def write_series(path: Path, values: np.ndarray, **extra: np.ndarray) -> Path:
    """A weekly series as a CSV with a `date` column and a `y` target."""
    frame = pd.DataFrame(
        {"date": pd.date_range("2000-01-01", periods=len(values), freq="W"), "y": values, **extra}
    )
    frame.to_csv(path, index=False)
    return path


def write_sweep(path: Path, data_path: Path, **sections: dict) -> Path:
    """A minimal sweep file on a given CSV; sections override the defaults."""
    import yaml

    raw: dict = {
        "experiment": "test",
        "data": {"path": str(data_path), "time_column": "date", "target": "y", "window": 8},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(raw))
    return path


IN_CI = os.environ.get("CI") == "true"
