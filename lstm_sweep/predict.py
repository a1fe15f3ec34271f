"""Predictions from a registered model: ``python -m lstm_sweep.predict MODEL_URI DATA``.

The model travels with the scaler fitted on its training rows and the data section of its
config, so a table with the training data's columns becomes inputs exactly as in training.

- Forecasting: one forecast per origin, every row with a full window of history before it,
  the last row included (its forecast is the future), in the target's own units.
- Classification: the same input formats as training (a .npz with ``x``, or a long table with
  id, order and feature columns; labels optional), one row per sequence with the predicted label
  and every class's probability.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from numpy.lib.stride_tricks import sliding_window_view

from lstm_sweep.cli import REFUSED, refuse
from lstm_sweep.config import ConfigError, DataConfig
from lstm_sweep.data import ForecastData, Scaler, Windows, prepare_table, read_sequences, read_table
from lstm_sweep.tracking import load_logged_model


@dataclass(frozen=True)
class Bundle:
    """A logged model and what it needs to read a table as in training."""

    model: Any  # a torch.export program: call it, it is already in eval mode
    data: DataConfig
    scaler: Scaler
    inputs: list[str]
    task: str  # forecast or classification
    classes: list[str]


def load_bundle(model_uri: str, tracking_uri: str | None = None) -> Bundle:
    """The model with the files :func:`select.write_model_files` logged beside it."""
    model, folder = load_logged_model(model_uri, tracking_uri)
    extra = folder / "extra_files"
    data_cfg = DataConfig.model_validate(yaml.safe_load((extra / "data_config.yaml").read_text()))
    raw = json.loads((extra / "scaler.json").read_text())
    return Bundle(
        model,
        data_cfg,
        Scaler.from_dict(raw),
        list(raw["inputs"]),
        raw.get("task", "forecast"),
        list(raw.get("classes", [])),
    )


def origin_windows(
    frame: pd.DataFrame, cfg: DataConfig, scaler: Scaler, source: str
) -> tuple[ForecastData, pd.Series, pd.DataFrame]:
    """Every forecast origin of a table as windows, scaled with the training scaler; and the
    table's time stamps and target levels, row-aligned (``diff`` drops the first row)."""
    table = prepare_table(frame, cfg, source)
    levels, values, columns = table.levels, table.values, table.inputs
    times = pd.Series(table.times)
    if len(values) < cfg.window:
        raise ConfigError(
            source,
            "data.window",
            cfg.window,
            f"needs at least {cfg.window} usable rows, the table has {len(values)}",
        )
    scaled = scaler.transform(values).astype(np.float32)
    x = sliding_window_view(scaled, cfg.window, axis=0).transpose(0, 2, 1)  # (origins, w, c)
    origins = np.arange(cfg.window - 1, len(values))  # row of each window's last input
    n, horizon, targets = len(origins), cfg.horizon, len(cfg.targets)
    windows = Windows(
        x=torch.from_numpy(np.ascontiguousarray(x)),
        y=torch.zeros(n, horizon, targets),  # unknown: only the shape is used
        times=times.to_numpy()[origins],
        last_level=levels[origins],
    )
    data = ForecastData(
        windows,
        windows,
        windows,
        inputs=columns,
        targets=cfg.targets,
        scaler=scaler,
        transform=cfg.transform,
        season=cfg.season,
    )
    return data, times, pd.DataFrame(levels, columns=cfg.targets)


@torch.no_grad()
def forecast(model: Any, data: ForecastData) -> np.ndarray:
    """Forecasts for every origin in original units: (origins, horizon, targets)."""
    windows = data.train
    return data.to_original(model(windows.x).numpy(), windows)


def forecast_table(
    prediction: np.ndarray, data: ForecastData, times: pd.Series, levels: pd.DataFrame
) -> pd.DataFrame:
    """One row per (origin, step): origin time, step, the step's time and actual value where
    the table has them, and the forecast of each target."""
    windows = data.train
    n, horizon, _ = prediction.shape
    position = {t: i for i, t in enumerate(times)}
    rows = []
    for i in range(n):
        origin = position[windows.times[i]]
        for step in range(horizon):
            target_row = origin + step + 1
            known = target_row < len(times)
            row = {
                "origin": windows.times[i],
                "step": step + 1,
                "time": times.iloc[target_row] if known else None,
            }
            for t, name in enumerate(data.targets):
                row[f"{name}_forecast"] = float(prediction[i, step, t])
                row[f"{name}_actual"] = float(levels.iloc[target_row, t]) if known else np.nan
            rows.append(row)
    return pd.DataFrame(rows)


def predict_forecast(bundle: Bundle, path: Path, last_only: bool) -> pd.DataFrame:
    frame = read_table(path)
    data, times, levels = origin_windows(frame, bundle.data, bundle.scaler, str(path))
    if data.inputs != bundle.inputs:
        raise ConfigError(
            str(path), "data.features", data.inputs, f"the model reads {bundle.inputs}"
        )
    table = forecast_table(forecast(bundle.model, data), data, times, levels)
    return table[table["origin"] == table["origin"].iloc[-1]] if last_only else table


@torch.no_grad()
def predict_classes(bundle: Bundle, path: Path) -> pd.DataFrame:
    """One row per sequence: its id, the predicted label, each class's probability, and the
    true label when the input carries one."""
    raw = read_sequences(bundle.data, path, labelled=False)
    n, steps, features = raw.x.shape
    if features != len(bundle.inputs):
        raise ConfigError(
            str(path), "data.features", raw.inputs, f"the model reads {bundle.inputs}"
        )
    scaled = bundle.scaler.transform(raw.x.reshape(-1, features)).reshape(n, steps, features)
    logits = bundle.model(torch.from_numpy(scaled.astype(np.float32)))
    probabilities = torch.softmax(logits, dim=1).numpy()
    table = pd.DataFrame({"id": raw.ids})
    table["predicted"] = [bundle.classes[i] for i in probabilities.argmax(axis=1)]
    for k, name in enumerate(bundle.classes):
        table[f"p_{name}"] = probabilities[:, k]
    if raw.labels is not None:
        table["true"] = [str(label) for label in raw.labels]
    return table


def predict_file(
    model_uri: str, path: Path, tracking_uri: str | None = None, last_only: bool = False
) -> pd.DataFrame:
    bundle = load_bundle(model_uri, tracking_uri)
    if bundle.task == "classification":
        return predict_classes(bundle, path)
    return predict_forecast(bundle, path, last_only)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lstm_sweep.predict",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model_uri", help="models:/NAME/VERSION, runs:/RUN_ID/model or a folder")
    parser.add_argument("data", type=Path, help="a table (or .npz) shaped like the training data")
    parser.add_argument("-o", "--output", type=Path, default=Path("predictions.csv"))
    parser.add_argument("--tracking-uri", help="MLflow store; default: sqlite under mlruns/")
    parser.add_argument("--last", action="store_true", help="forecast: only from the last row")
    args = parser.parse_args(argv)
    try:
        table = predict_file(args.model_uri, args.data, args.tracking_uri, args.last)
    except REFUSED as exc:
        return refuse(exc)
    table.to_csv(args.output, index=False)
    print(f"{len(table)} predictions written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
