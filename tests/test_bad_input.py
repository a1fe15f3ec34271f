"""Every kind of bad input, through the real command line: one line naming the file, the key and
the value at fault, exit status 2, no traceback, and no Optuna trial or MLflow run created."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from lstm_sweep.run import main
from tests.conftest import QUICK, ROOT, write_series, write_sweep
from tests.test_scaleout import free_port

PASSWORD = "pw-in-uri"

# name -> (--set overrides on sweeps/quick.yaml, key, value as printed, rule fragment)
CONFIG_CASES = {
    "unknown key": (["model.dropuot=0.1"], "model.dropuot", "0.1", "did you mean 'model.dropout'"),
    "wrong type": (["model.hidden_size=lots"], "model.hidden_size", "'lots'", "valid integer"),
    "dropout outside [0, 1)": (["model.dropout=1.5"], "model.dropout", "1.5", "less than 1"),
    "non-positive learning rate": (
        ["train.learning_rate=0"],
        "train.learning_rate",
        "0",
        "greater than 0",
    ),
    "low above high": (
        ["search.model.dropout={type: float, low: 0.4, high: 0.1}"],
        "search.model.dropout",
        "{'type': 'float', 'low': 0.4, 'high': 0.1}",
        "`low <= high` must hold",
    ),
    "empty choices": (
        ["search.model.hidden_size={type: categorical, choices: []}"],
        "search.model.hidden_size",
        "{'type': 'categorical', 'choices': []}",
        "non-empty list",
    ),
    "split not adding up": (
        ["data.split=[0.5, 0.2, 0.2]"],
        "data.split",
        "[0.5, 0.2, 0.2]",
        "add up to 1",
    ),
    "missing data file": (
        ["data.path=/nonexistent/co2.csv"],
        "data.path",
        "'/nonexistent/co2.csv'",
        "no such data file",
    ),
    "missing column": (["data.target=nope"], "data.target", "'nope'", "no such column"),
    "unreachable storage": (
        [f"study.storage=postgresql://postgres:{PASSWORD}@127.0.0.1:1/x"],
        "study.storage",
        "'postgresql://postgres:***@127.0.0.1:1/x'",
        "unreachable",
    ),
}

Mutation = Callable[[pd.DataFrame], pd.DataFrame]
# name -> (change to a clean weekly CSV, data keys, key, value as printed, rule fragment)
DATA_CASES: dict[str, tuple[Mutation, dict, str, str, str]] = {
    "non-numeric column": (lambda f: f.assign(y="a"), {}, "data.target", "'y'", "not numeric"),
    "too few rows": (lambda f: f.head(25), {"window": 20}, "data.window", "20", "too few rows"),
    "time not sorted": (
        lambda f: f.iloc[::-1],
        {},
        "data.time_column",
        "'2001-11-18 00:00:00'",
        "not sorted",
    ),
    "duplicate time": (
        lambda f: f.assign(date=f.date.where(f.index != 5, f.date[4])),
        {},
        "data.time_column",
        "",
        "appears twice",
    ),
}


def assert_one_line_and_nothing_created(
    err: str, source: Path | str, key: str, value: str, rule: str, stores: Path
) -> None:
    line = err.strip()
    assert "\n" not in line and "Traceback" not in line, line
    where = f"{key} = {value}" if key else "(file)"  # a file that is not YAML has no key
    assert line.startswith(f"error: {source}: {where}"), line
    assert rule in line
    assert PASSWORD not in line
    assert not (stores / "optuna.db").exists()  # no study, so no trial
    client = MlflowClient(f"sqlite:///{stores / 'mlflow.db'}")
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


@pytest.mark.parametrize("case", CONFIG_CASES, ids=list(CONFIG_CASES))
def test_bad_config_is_one_line_exit_2_and_creates_nothing(
    case: str, stores: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    overrides, key, value, rule = CONFIG_CASES[case]
    assert main([str(QUICK), *(f"--set={o}" for o in overrides)]) == 2
    source = "/nonexistent/co2.csv" if key == "data.path" else QUICK
    if key == "data.target":
        source = ROOT / "sweeps" / "data" / "co2_weekly.csv"
    assert_one_line_and_nothing_created(capsys.readouterr().err, source, key, value, rule, stores)


@pytest.mark.parametrize("case", DATA_CASES, ids=list(DATA_CASES))
def test_bad_data_is_one_line_exit_2_and_creates_nothing(
    case: str, stores: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mutate, data, key, value, rule = DATA_CASES[case]
    csv = write_series(tmp_path / "series.csv", np.arange(1.0, 101.0))
    mutate(pd.read_csv(csv)).to_csv(csv, index=False)
    sweep = write_sweep(tmp_path / "sweep.yaml", csv, data=data)
    assert main([str(sweep)]) == 2
    assert_one_line_and_nothing_created(capsys.readouterr().err, csv, key, value, rule, stores)


def test_malformed_yaml_names_file_and_line(
    stores: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("experiment: x\ndata: [unclosed\n")
    assert main([str(sweep)]) == 2
    err = capsys.readouterr().err
    assert_one_line_and_nothing_created(err, sweep, "", "", "malformed YAML at line 3", stores)


def test_unreachable_tracking_server_is_one_line_exit_2_and_creates_nothing(
    stores: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = f"http://user:{PASSWORD}@127.0.0.1:{free_port()}"
    assert main([str(QUICK), f"--set=tracking.uri={uri}"]) == 2
    masked = f"'http://user:***@127.0.0.1:{uri.rsplit(':', 1)[1]}'"
    err = capsys.readouterr().err
    assert_one_line_and_nothing_created(err, QUICK, "tracking.uri", masked, "unreachable", stores)


def test_the_real_command_prints_one_line_and_no_traceback(stores: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lstm_sweep.run", str(QUICK), "--set=modle.dropout=0.1"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert result.returncode == 2
    assert_one_line_and_nothing_created(
        result.stderr, QUICK, "modle", "{'dropout': 0.1}", "did you mean 'model'", stores
    )
