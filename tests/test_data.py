"""Loading, splitting, scaling and windowing: chronological, leak-free, exact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.preprocessing import StandardScaler

from lstm_sweep.config import Config, ConfigError, load_config
from lstm_sweep.data import (
    cut_windows,
    describe,
    fit_scaler,
    fold_bounds,
    load_data,
    load_forecast_data,
    split_bounds,
)
from lstm_sweep.tasks import Task
from tests.helpers import CLASSIFY, CO2, write_series, write_sweep


def load(tmp_path: Path, values: np.ndarray, **data: object):
    csv = write_series(tmp_path / "series.csv", values)
    cfg = load_config(write_sweep(tmp_path / "sweep.yaml", csv, data=data))
    return load_forecast_data(cfg.data)


def test_scaler_is_fit_on_train_only(tmp_path: Path) -> None:
    values = np.arange(200, dtype=float) ** 1.5  # a trend: train and later parts differ
    data = load(tmp_path, values, split=[0.6, 0.2, 0.2])
    val_start, _ = split_bounds(200, [0.6, 0.2, 0.2])
    expected = StandardScaler().fit(values[:val_start, None])
    assert data.scaler.center[0] == pytest.approx(expected.mean_[0])
    assert data.scaler.scale[0] == pytest.approx(expected.scale_[0])


def test_windows_never_look_forward_across_parts(tmp_path: Path) -> None:
    values = np.sin(np.arange(300) / 5.0)
    data = load(tmp_path, values, window=10, horizon=3)
    last_train_target = data.train.times.max()
    first_val_target = data.val.times.min()
    assert last_train_target < first_val_target
    assert data.val.times.max() < data.test.times.min()
    # the first validation window reads the last 10 training rows: history, not the future
    val_start, _ = split_bounds(300, [0.7, 0.15, 0.15])
    tail = data.scaler.transform(values[val_start - 10 : val_start, None])[:, 0]
    assert np.allclose(data.val.x[0, :, 0].numpy(), tail, atol=1e-6)


def test_cut_windows_pairs_inputs_with_the_following_steps() -> None:
    values = np.arange(20, dtype=float)[:, None] * np.array([[1.0, 10.0]])  # target, feature
    x, y, first = cut_windows(values, targets=1, window=3, horizon=2, start=10, stop=15)
    assert first.tolist() == [10, 11, 12, 13]
    assert x[0, :, 0].tolist() == [7.0, 8.0, 9.0]  # the three rows before the first target
    assert x[0, :, 1].tolist() == [70.0, 80.0, 90.0]
    assert y[0, :, 0].tolist() == [10.0, 11.0]
    assert y[-1, :, 0].tolist() == [13.0, 14.0]  # the last window ends inside the part


@pytest.mark.parametrize("transform", ["none", "log", "diff"])
def test_targets_round_trip_to_original_units(tmp_path: Path, transform: str) -> None:
    rng = np.random.default_rng(0)
    values = 50 + np.cumsum(rng.normal(0.1, 1.0, 300))
    data = load(tmp_path, values, window=6, horizon=3, transform=transform, scaler="minmax")
    for part in ("train", "val", "test"):
        windows = data.part(part)
        original = data.to_original(windows.y.numpy().astype(float), windows)
        frame = pd.Series(values, index=pd.date_range("2000-01-01", periods=300, freq="W"))
        expected = frame.loc[windows.times.ravel()].to_numpy().reshape(windows.times.shape)
        assert np.allclose(original[:, :, 0], expected, atol=1e-3)


@pytest.mark.parametrize("transform", ["none", "diff"])
def test_naive_forecast_repeats_the_last_observed_value(tmp_path: Path, transform: str) -> None:
    values = np.cos(np.arange(200) / 3.0) * 5 + 20
    data = load(tmp_path, values, window=5, horizon=2, transform=transform)
    windows = data.val
    naive = data.to_original(data.naive_forecast(windows).numpy().astype(float), windows)
    last_seen = windows.last_level[:, 0]
    assert np.allclose(naive[:, 0, 0], last_seen, atol=1e-4)
    assert np.allclose(naive[:, 1, 0], last_seen, atol=1e-4)


def test_fit_scaler_kinds_invert_exactly() -> None:
    train = np.random.default_rng(1).normal(3, 2, (50, 2))
    for kind in ("standard", "minmax", "robust", "none"):
        scaler = fit_scaler(kind, train)
        assert np.allclose(scaler.inverse(scaler.transform(train), [0, 1]), train)
    assert np.allclose(fit_scaler("minmax", train).transform(train).min(axis=0), 0.0)


def test_missing_values_are_interpolated_when_asked(tmp_path: Path) -> None:
    values = np.arange(100, dtype=float)
    values[40] = np.nan
    data = load(tmp_path, values, missing="interpolate", scaler="none")
    assert not np.isnan(data.train.x.numpy()).any()
    assert 40.0 in data.train.y.numpy()


@pytest.mark.parametrize(
    ("mutate", "data", "key", "fragment"),
    [
        (lambda f: f.drop(columns="y"), {}, "data.target", "no such column"),
        (lambda f: f.assign(y="a"), {}, "data.target", "not numeric"),
        (lambda f: f.assign(y=f.y.where(f.index != 3)), {}, "data.missing", "missing values"),
        (lambda f: f.iloc[::-1], {}, "data.time_column", "not sorted"),
        (
            lambda f: f.assign(date=f.date.where(f.index != 5, f.date[4])),
            {},
            "data.time_column",
            "appears twice",
        ),
        (lambda f: f.head(25), {"window": 20}, "data.window", "too few rows"),
        (lambda f: f, {"features": ["nope"]}, "data.features", "no such column"),
        (lambda f: f.assign(y=-f.y), {"transform": "log"}, "data.transform", "must be > 0"),
        (
            lambda f: f.assign(date=f.date.where(f.index != 7)),
            {},
            "data.time_column",
            "no time stamp at row 8",
        ),
        (
            lambda f: f.assign(date=f.date.where(f.index != 7, "soon")),
            {},
            "data.time_column",
            "not a date",
        ),
        (
            lambda f: f.assign(y=f.y.where(f.index != 9, np.inf)),
            {},
            "data.target",
            "infinite value at row 10",
        ),
        (lambda f: f.head(0), {}, "data.path", "the table has no rows"),
        (lambda f: f.assign(y=np.nan), {"missing": "drop"}, "data.missing", "no rows are left"),
        (lambda f: f.assign(y=3.0), {}, "data.target", "constant over the training part"),
    ],
)
def test_bad_data_names_file_key_and_value(
    tmp_path: Path, mutate, data: dict, key: str, fragment: str
) -> None:
    csv = write_series(tmp_path / "series.csv", np.arange(1.0, 101.0))
    mutate(pd.read_csv(csv)).to_csv(csv, index=False)
    cfg = load_config(write_sweep(tmp_path / "sweep.yaml", csv, data=data))
    with pytest.raises(ConfigError) as caught:
        load_forecast_data(cfg.data)
    assert caught.value.key == key
    assert str(csv) in str(caught.value)
    assert fragment in str(caught.value)


def test_missing_data_file_is_a_config_error(tmp_path: Path) -> None:
    cfg = load_config(write_sweep(tmp_path / "sweep.yaml", tmp_path / "absent.csv"))
    with pytest.raises(ConfigError, match="no such data file"):
        load_forecast_data(cfg.data)


def test_an_empty_file_a_folder_and_latin_1_bytes_are_named_not_tracebacks(tmp_path: Path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    latin = tmp_path / "latin.csv"
    latin.write_bytes("date,y\n2000-01-02,1\n2000-01-09,caf\xe9\n".encode("latin-1"))
    for path, fragment in ((empty, "no rows"), (tmp_path, "is a directory"), (latin, "not UTF-8")):
        cfg = load_config(write_sweep(tmp_path / "sweep.yaml", path))
        with pytest.raises(ConfigError, match=fragment) as caught:
            load_forecast_data(cfg.data)
        assert caught.value.key == "data.path"


def test_a_searched_window_and_transform_get_their_own_windows(tmp_path: Path) -> None:
    """Different values give different training data, each built once; the scaler of every
    variant is fit on the training rows only, whatever the window or transform."""
    from lstm_sweep.tasks import TaskCache

    values = 10 + np.cumsum(np.random.default_rng(3).normal(0.2, 1.0, 300))
    csv = write_series(tmp_path / "series.csv", values)
    sweep = write_sweep(
        tmp_path / "sweep.yaml",
        csv,
        train={"monitor": "val_nmse"},
        search={
            "data.window": {"type": "categorical", "choices": [4, 12]},
            "data.transform": {"type": "categorical", "choices": ["none", "diff"]},
        },
    )
    cfg = load_config(sweep)
    cache = TaskCache()
    short = cache.get(cfg.with_values({"data.window": 4}))
    long = cache.get(cfg.with_values({"data.window": 12}))
    diff = cache.get(cfg.with_values({"data.window": 12, "data.transform": "diff"}))
    assert short.data.train.x.shape[1:] == (4, 1) and long.data.train.x.shape[1:] == (12, 1)
    assert cache.get(cfg.with_values({"data.window": 4})) is short  # built once
    assert len(cache) == 3
    val_start, _ = split_bounds(300, cfg.data.split)
    assert long.data.scaler.center[0] == pytest.approx(values[:val_start].mean())
    changes = np.diff(values)[: val_start - 1]  # diff drops the first row
    assert diff.data.scaler.center[0] == pytest.approx(changes.mean())
    assert not np.allclose(diff.data.train.y.numpy()[:5], long.data.train.y.numpy()[:5])


def test_a_data_setting_is_described_by_its_file_content_columns_and_samples_per_part(
    tiny_cfg: Config, tiny_task: Task
) -> None:
    import hashlib

    described = describe(tiny_cfg.data.path, tiny_task.data)
    assert (described.name, described.source) == ("co2_weekly", str(CO2))
    assert described.digest == hashlib.sha256(CO2.read_bytes()).hexdigest()[:16]
    assert described.columns == ["co2"]
    data = tiny_task.data
    assert described.samples == {
        "train": len(data.train),
        "val": len(data.val),
        "test": len(data.test),
    }


def test_folds_roll_the_origin_back_in_stretches_of_the_validation_parts_length() -> None:
    # validation rows 70-85, test from 85: three folds validate on 40-55, 55-70, 70-85
    assert fold_bounds(70, 85, 3) == [(40, 55), (55, 70), (70, 85)]
    assert fold_bounds(70, 85, 1) == [(70, 85)]


def test_no_fold_sees_a_test_row_and_the_last_fold_is_the_split_itself(tmp_path: Path) -> None:
    values = np.arange(200, dtype=float) + np.sin(np.arange(200))
    csv = write_series(tmp_path / "series.csv", values)
    cfg = load_config(write_sweep(tmp_path / "s.yaml", csv, data={"folds": 3, "window": 8}))
    split = load_forecast_data(cfg.data)
    test_start = split.test.times.min()
    folds = [load_forecast_data(cfg.data, fold) for fold in range(3)]
    for fold in folds:
        assert fold.train.times.max() < fold.val.times.min()  # training before validation
        assert fold.val.times.max() < test_start  # and neither reaches the test part
        assert len(fold.val) == len(split.val)  # one stretch length for every fold
        np.testing.assert_array_equal(fold.test.times, split.test.times)
    assert [len(f.train) for f in folds] == sorted(len(f.train) for f in folds)  # expanding
    np.testing.assert_array_equal(folds[2].val.times, split.val.times)
    np.testing.assert_array_equal(folds[2].train.x, split.train.x)
    # each fold's scaler learnt from its own training rows only: the first fold's differs
    assert folds[0].scaler.to_dict() != split.scaler.to_dict()


def test_classification_folds_are_stratified_chunks_of_training_and_never_see_a_test_sequence() -> (
    None
):
    cfg = load_config(CLASSIFY, ["data.folds=3"])
    split = load_data(load_config(CLASSIFY))
    folds = [load_data(cfg, fold) for fold in range(3)]
    pool = set(split.train.ids) | set(split.val.ids)
    for fold in folds:
        train, val = set(fold.train.ids), set(fold.val.ids)
        assert not train & val and train | val == pool  # training + validation, re-cut
        np.testing.assert_array_equal(fold.test.ids, split.test.ids)  # the test part untouched
        shares = np.bincount(fold.val.y.numpy(), minlength=10) / len(fold.val)
        split_shares = np.bincount(split.val.y.numpy(), minlength=10) / len(split.val)
        assert np.abs(shares - split_shares).max() < 0.01  # stratified
        assert abs(len(fold.val) - len(split.val)) < 0.1 * len(split.val)  # about its size
    np.testing.assert_array_equal(folds[2].val.ids, split.val.ids)  # the last is the split
    np.testing.assert_array_equal(folds[2].train.x, split.train.x)
    earlier = [set(f.val.ids) for f in folds[:2]]
    assert not earlier[0] & earlier[1] and earlier[0] <= set(split.train.ids)  # disjoint chunks
    assert folds[0].scaler.to_dict() != split.scaler.to_dict()  # each fold's own scaler


def test_too_many_classification_folds_are_refused_in_one_line_naming_the_key() -> None:
    with pytest.raises(ConfigError) as refused:
        load_data(load_config(CLASSIFY, ["data.folds=7"]))  # 1257 training, 270 validation
    assert refused.value.key == "data.folds" and "too few sequences" in str(refused.value)
    assert len(load_data(load_config(CLASSIFY, ["data.folds=6"]), 4).val) > 200  # 5 chunks
