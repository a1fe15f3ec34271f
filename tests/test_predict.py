"""A logged ensemble round-trips, predicts the mean of its members, and predict turns a CSV into
the forecasts training saw."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from lstm_sweep import predict
from lstm_sweep.cli import EXIT_BAD_INPUT
from lstm_sweep.config import load_config
from lstm_sweep.model import Ensemble
from lstm_sweep.select import write_model_files
from lstm_sweep.tasks import TaskCache
from lstm_sweep.tracking import Tracker
from lstm_sweep.train import build_model, fit
from lstm_sweep.train import predict as model_predict
from tests.helpers import QUICK, TINY

pytestmark = pytest.mark.slow  # torch.export of an LSTM takes seconds


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory, mlflow_template: Path) -> SimpleNamespace:
    """An ensemble of two briefly trained seeds, logged and registered as the closing stage
    does it (shared: the tests only read it)."""
    root = tmp_path_factory.mktemp("predict")
    shutil.copy(mlflow_template, root / "mlflow.db")
    cfg = load_config(QUICK, [*TINY, "data.transform=diff", "train.max_epochs=2"])
    task = TaskCache().get(cfg)
    members = []
    for seed in (0, 1):
        seeded = cfg.with_values({"train.seed": seed})
        model = build_model(task, seeded)
        fit(model, task, seeded)
        members.append(model.cpu().eval())
    ensemble = Ensemble(members, classification=False).eval()
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    tracker = Tracker(tracking_uri, cfg.experiment)
    run_id = tracker.open_parent("predict-test", {})
    example = task.data.train.x[:5]
    uri = tracker.log_model(
        run_id,
        ensemble,
        example.numpy(),
        model_predict(ensemble, example).numpy(),
        write_model_files(cfg, task, root / "model_files"),
        "tiny-model",
    )
    return SimpleNamespace(
        cfg=cfg, task=task, members=members, model=ensemble, uri=uri, tracking_uri=tracking_uri
    )


def test_the_ensemble_round_trips_and_predicts_the_mean_of_its_members(logged) -> None:
    assert logged.uri == "models:/tiny-model/1"
    bundle = predict.load_bundle(logged.uri, logged.tracking_uri)
    x = logged.task.data.val.x  # another batch size than the example's: the axis is dynamic
    mean = torch.stack([model_predict(member, x) for member in logged.members]).mean(dim=0)
    with torch.no_grad():
        assert torch.allclose(bundle.model(x), mean, atol=1e-6)
    assert bundle.data == logged.cfg.data and bundle.inputs == logged.task.data.inputs
    assert bundle.task == "forecast"
    np.testing.assert_array_equal(bundle.scaler.center, logged.task.data.scaler.center)


def test_predict_rebuilds_the_training_windows_from_the_csv(logged) -> None:
    cfg, data = logged.cfg, logged.task.data
    table = predict.predict_file(logged.uri, cfg.data.path, logged.tracking_uri)
    val = data.val
    expected = data.to_original(model_predict(logged.model, val.x).numpy(), val)
    first_steps = table[table["step"] == 1].set_index("time")
    got = first_steps.loc[pd.Index(val.times[:, 0]), f"{cfg.data.target}_forecast"].to_numpy()
    np.testing.assert_allclose(got, expected[:, 0, 0], rtol=1e-5)
    last = table[table["origin"] == table["origin"].iloc[-1]]
    assert list(last["step"]) == list(range(1, cfg.data.horizon + 1))
    assert last["time"].isna().all()  # the future: no time stamp, no actual value yet


def test_predict_command_writes_a_csv_and_refuses_a_table_without_the_target(
    logged, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, store = logged.cfg, ["--tracking-uri", logged.tracking_uri]
    out = tmp_path / "forecasts.csv"
    assert predict.main([logged.uri, str(cfg.data.path), "-o", str(out), "--last", *store]) == 0
    assert len(pd.read_csv(out)) == cfg.data.horizon
    bad = tmp_path / "bad.csv"
    pd.read_csv(cfg.data.path).drop(columns=[cfg.data.target]).to_csv(bad, index=False)
    assert predict.main([logged.uri, str(bad), *store]) == EXIT_BAD_INPUT
    assert "no such column" in capsys.readouterr().err
