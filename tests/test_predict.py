"""The logged model round-trips, and predict turns a CSV into the forecasts training saw."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from lstm_sweep import predict, select
from lstm_sweep.config import load_config
from lstm_sweep.data import load_forecast_data
from lstm_sweep.tracking import Tracker
from lstm_sweep.train import build_model, fit
from lstm_sweep.train import predict as model_predict
from tests.conftest import QUICK, TINY


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory, mlflow_template: Path) -> SimpleNamespace:
    """A briefly trained model, logged and registered as the report does it (shared: the
    tests only read it)."""
    root = tmp_path_factory.mktemp("predict")
    shutil.copy(mlflow_template, root / "mlflow.db")
    cfg = load_config(QUICK, [*TINY, "data.transform=diff", "train.max_epochs=2"])
    data = load_forecast_data(cfg.data)
    model = build_model(data, cfg)
    fit(model, data, cfg)
    model = model.cpu().eval()
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    tracker = Tracker(tracking_uri, cfg.experiment)
    run_id = tracker.open_parent("predict-test", {})
    uri = tracker.log_model(
        run_id,
        model,
        data.train.x[:5].numpy(),
        model_predict(model, data.train.x[:5]).numpy(),
        select.write_model_files(cfg, data, root / "model_files"),
        "tiny-model",
    )
    return SimpleNamespace(cfg=cfg, data=data, model=model, uri=uri, tracking_uri=tracking_uri)


def test_the_logged_model_round_trips_to_identical_predictions(logged) -> None:
    cfg, data, model = logged.cfg, logged.data, logged.model
    assert logged.uri == "models:/tiny-model/1"
    loaded, data_cfg, scaler, inputs = predict.load_bundle(logged.uri, logged.tracking_uri)
    with torch.no_grad():  # another batch size than the example's: the batch axis is dynamic
        assert torch.equal(loaded(data.val.x), model_predict(model, data.val.x))
    assert data_cfg == cfg.data and inputs == data.inputs
    np.testing.assert_array_equal(scaler.center, data.scaler.center)


def test_predict_rebuilds_the_training_windows_from_the_csv(logged) -> None:
    cfg, data, model = logged.cfg, logged.data, logged.model
    table = predict.predict_csv(logged.uri, cfg.data.path, logged.tracking_uri)
    val = data.val
    expected = data.to_original(model_predict(model, val.x).numpy(), val)  # (n, horizon, 1)
    first_steps = table[table["step"] == 1].set_index("time")
    got = first_steps.loc[pd.Index(val.times[:, 0]), f"{cfg.data.target}_forecast"].to_numpy()
    np.testing.assert_allclose(got, expected[:, 0, 0], rtol=1e-6)
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
    assert predict.main([logged.uri, str(bad), *store]) == predict.EXIT_BAD_INPUT
    assert "no such column" in capsys.readouterr().err
