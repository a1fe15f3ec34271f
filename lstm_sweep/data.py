"""From a table on disk to training tensors, once per distinct data setting, with no look-ahead.

Load the table, check its time order, fill or refuse gaps, apply the optional target transform,
split chronologically, fit the scaler on the training part only, and cut every part into
(window -> horizon) samples as tensors. Validation and test windows may look back into the
previous part's tail (that is history a forecaster would have), never forward. Classification
sequences are split with stratification instead. What is learnt from the tensors lives in
``tasks``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from numpy.lib.stride_tricks import sliding_window_view
from sklearn.model_selection import StratifiedKFold, train_test_split
from sklearn.preprocessing import MinMaxScaler, RobustScaler, StandardScaler

from lstm_sweep.config import Config, ConfigError, DataConfig, file_digest

PARTS = ("train", "val", "test")


@dataclass(frozen=True)
class Scaler:
    """Per-column affine scaling ``z = (x - center) / scale``, fitted on the training rows."""

    center: np.ndarray  # (columns,)
    scale: np.ndarray  # (columns,)

    def transform(self, values: np.ndarray) -> np.ndarray:
        return (values - self.center) / self.scale

    def inverse(self, values: np.ndarray, columns: list[int]) -> np.ndarray:
        return values * self.scale[columns] + self.center[columns]

    def to_dict(self) -> dict[str, list[float]]:
        return {"center": self.center.tolist(), "scale": self.scale.tolist()}

    @classmethod
    def from_dict(cls, raw: dict[str, list[float]]) -> Scaler:
        return cls(np.asarray(raw["center"]), np.asarray(raw["scale"]))


def fit_scaler(kind: str, train_values: np.ndarray) -> Scaler:
    """Fit scikit-learn's scaler of that kind on the training rows and keep its affine map."""
    columns = train_values.shape[1]
    if kind == "none":
        return Scaler(np.zeros(columns), np.ones(columns))
    if kind == "minmax":
        fitted = MinMaxScaler().fit(train_values)  # z = x * scale_ + min_
        return Scaler(-fitted.min_ / fitted.scale_, 1.0 / fitted.scale_)
    fitted = {"standard": StandardScaler, "robust": RobustScaler}[kind]().fit(train_values)
    center = fitted.mean_ if kind == "standard" else fitted.center_
    scale = np.where(fitted.scale_ == 0, 1.0, fitted.scale_)  # a constant column stays put
    return Scaler(np.asarray(center, dtype=float), np.asarray(scale, dtype=float))


@dataclass(frozen=True)
class Windows:
    """One chronological part cut into samples."""

    x: torch.Tensor  # (n, window, inputs): scaled inputs
    y: torch.Tensor  # (n, horizon, targets): scaled, transformed targets
    times: np.ndarray  # (n, horizon): time stamp of every target step
    last_level: np.ndarray  # (n, targets): original-unit target at the last input step

    def __len__(self) -> int:
        return len(self.x)


@dataclass(frozen=True)
class ForecastData:
    """The windows of one data setting, shared by every trial that uses that setting."""

    train: Windows
    val: Windows
    test: Windows
    inputs: list[str]  # input column names; the targets come first
    targets: list[str]
    scaler: Scaler
    transform: str
    season: int | None

    @property
    def n_inputs(self) -> int:
        return len(self.inputs)

    @property
    def horizon(self) -> int:
        return self.train.y.shape[1]

    @property
    def output_shape(self) -> tuple[int, ...]:
        return (self.horizon, len(self.targets))  # one prediction per step and target

    def part(self, name: str) -> Windows:
        return {"train": self.train, "val": self.val, "test": self.test}[name]

    def to_original(self, y_scaled: np.ndarray, windows: Windows) -> np.ndarray:
        """Undo scaling and the target transform: (n, horizon, targets) in the target's units."""
        columns = list(range(len(self.targets)))
        values = self.scaler.inverse(y_scaled, columns)
        if self.transform == "log":
            return np.exp(values)
        if self.transform == "diff":
            return windows.last_level[:, None, :] + np.cumsum(values, axis=1)
        return values

    def naive_forecast(self, windows: Windows) -> torch.Tensor:
        """The last observed value carried forward, in model space (scaled, transformed)."""
        n, horizon, targets = windows.y.shape
        if self.transform == "diff":  # "no change" is a zero difference
            zero = self.scaler.transform(np.zeros((1, self.n_inputs)))[0, :targets]
            last = torch.as_tensor(zero, dtype=windows.y.dtype).expand(n, targets)
        else:
            last = windows.x[:, -1, :targets]
        return last[:, None, :].expand(n, horizon, targets).clone()

    def truth(self, part: str) -> np.ndarray:
        """The targets of a part in original units: (n, horizon, targets)."""
        windows = self.part(part)
        return self.to_original(windows.y.numpy(), windows)

    def naive(self, part: str) -> np.ndarray:
        """The last observed value carried forward over the horizon, in original units."""
        windows = self.part(part)
        return self.to_original(self.naive_forecast(windows).numpy(), windows)


def check_data_file(path: Path) -> None:
    """ConfigError unless ``path`` is a file this project can read."""
    if path.is_dir():
        raise ConfigError(str(path), "data.path", str(path), "is a directory, not a data file")
    if not path.is_file():
        raise ConfigError(str(path), "data.path", str(path), "no such data file")


def read_table(path: Path) -> pd.DataFrame:
    """The table at ``path`` (CSV as UTF-8, or Parquet), with at least one row."""
    check_data_file(path)
    source, suffix = str(path), path.suffix.lower()
    try:
        if suffix == ".csv":
            frame = pd.read_csv(path, encoding="utf-8")
        elif suffix in {".parquet", ".pq"}:
            frame = pd.read_parquet(path)
        else:
            raise ConfigError(source, "data.path", source, "must be a .csv or .parquet file")
    except UnicodeDecodeError as exc:
        rule = f"not UTF-8 text: byte {exc.object[exc.start]:#04x} at offset {exc.start}"
        raise ConfigError(source, "data.path", source, rule) from None
    except pd.errors.EmptyDataError:
        frame = pd.DataFrame()
    except (pd.errors.ParserError, ValueError, OSError) as exc:
        reason = str(exc).splitlines()[0][:200]
        raise ConfigError(source, "data.path", source, f"cannot be read: {reason}") from None
    if frame.empty:
        raise ConfigError(source, "data.path", source, "the table has no rows")
    return frame


def _check_columns(frame: pd.DataFrame, cfg: DataConfig, source: str) -> None:
    if cfg.time_column not in frame.columns:
        raise ConfigError(
            source, "data.time_column", cfg.time_column, f"no such column in {list(frame.columns)}"
        )
    for key, names in (("data.target", cfg.targets), ("data.features", cfg.features)):
        for name in names:
            if name not in frame.columns:
                raise ConfigError(source, key, name, f"no such column in {list(frame.columns)}")
            if not pd.api.types.is_numeric_dtype(frame[name]):
                raise ConfigError(source, key, name, "column is not numeric")


def _check_finite(frame: pd.DataFrame, columns: dict[str, list[str]], source: str) -> None:
    """``columns`` maps a config key (data.target, data.features) to the columns it names."""
    for key, names in columns.items():
        for name in names:
            infinite = np.isinf(frame[name].to_numpy(dtype=float))
            if infinite.any():
                row = int(np.flatnonzero(infinite)[0])
                raise ConfigError(source, key, name, f"infinite value at row {row + 1}")


def _parse_time(frame: pd.DataFrame, cfg: DataConfig, source: str) -> pd.Series:
    column = frame[cfg.time_column]
    if column.isna().any():
        row = int(np.flatnonzero(column.isna().to_numpy())[0])
        raise ConfigError(
            source, "data.time_column", cfg.time_column, f"no time stamp at row {row + 1}"
        )
    if pd.api.types.is_numeric_dtype(column):
        times = column
    else:
        times = pd.to_datetime(column, errors="coerce")
        if times.isna().any():
            bad = column[times.isna()].iloc[0]
            raise ConfigError(source, "data.time_column", str(bad), "not a date or time")
    if times.duplicated().any():
        first = times[times.duplicated()].iloc[0]
        raise ConfigError(source, "data.time_column", str(first), "time stamp appears twice")
    if not times.is_monotonic_increasing:
        stamps = times.to_numpy()
        first = int(np.flatnonzero(stamps[1:] < stamps[:-1])[0]) + 1
        raise ConfigError(
            source, "data.time_column", str(times.iloc[first]), "time column is not sorted"
        )
    return times


def _fill_missing(frame: pd.DataFrame, columns: list[str], how: str, source: str) -> pd.DataFrame:
    gaps = frame[columns].isna().sum()
    if not gaps.any():
        return frame
    if how == "error":
        column = gaps.idxmax()
        raise ConfigError(
            source,
            "data.missing",
            how,
            f"{int(gaps.sum())} missing values (first in {column!r});"
            " set data.missing to drop, ffill or interpolate",
        )
    if how == "drop":
        filled = frame.dropna(subset=columns).reset_index(drop=True)
    else:
        filled = frame.copy()
        filled[columns] = frame[columns].ffill() if how == "ffill" else frame[columns].interpolate()
        filled = filled.dropna(subset=columns).reset_index(drop=True)  # a leading gap stays
    if filled.empty:
        raise ConfigError(source, "data.missing", how, "no rows are left once the gaps are removed")
    return filled


def split_bounds(n_rows: int, fractions: list[float]) -> tuple[int, int]:
    """Row indices where validation and test start."""
    val_start = int(round(n_rows * fractions[0]))
    test_start = int(round(n_rows * (fractions[0] + fractions[1])))
    return val_start, test_start


def fold_bounds(val_start: int, test_start: int, folds: int) -> list[tuple[int, int]]:
    """The rows [start, stop) each fold validates on, oldest first: stretches of the validation
    part's length ending where the next begins, the last the validation part itself; each fold
    trains on every row before its stretch (scikit-learn's TimeSeriesSplit with a fixed
    test_size, inside training + validation: the test part is never touched)."""
    length = test_start - val_start
    return [
        (val_start - back * length, test_start - back * length) for back in reversed(range(folds))
    ]


def cut_windows(
    values: np.ndarray, targets: int, window: int, horizon: int, start: int, stop: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Samples whose *targets* lie in rows [start, stop); inputs are the `window` rows before.

    Returns inputs (n, window, columns), targets (n, horizon, targets) and the row of each
    sample's first target step (n,).
    """
    first = np.arange(max(start, window), stop - horizon + 1)
    if len(first) == 0:
        return (
            np.empty((0, window, values.shape[1])),
            np.empty((0, horizon, targets)),
            first,
        )
    x_all = sliding_window_view(values, window, axis=0).transpose(0, 2, 1)  # (rows-w+1, w, c)
    y_all = sliding_window_view(values[:, :targets], horizon, axis=0).transpose(0, 2, 1)
    return x_all[first - window], y_all[first], first


@dataclass(frozen=True)
class Table:
    """A forecasting table after checks, gap filling and the target transform, row-aligned."""

    times: np.ndarray  # (rows,): time stamps
    levels: np.ndarray  # (rows, targets): the targets in their own units
    values: np.ndarray  # (rows, inputs): transformed targets first, then the extra features
    inputs: list[str]


def prepare_table(frame: pd.DataFrame, cfg: DataConfig, source: str) -> Table:
    """Check columns and time order, fill gaps and apply ``data.transform``: the steps that
    training and prediction share, so a CSV given to predict is read exactly as in training."""
    _check_columns(frame, cfg, source)
    columns = cfg.targets + [f for f in cfg.features if f not in cfg.targets]
    frame = _fill_missing(frame, columns, cfg.missing, source)
    _check_finite(frame, {"data.target": cfg.targets, "data.features": cfg.features}, source)
    times = _parse_time(frame, cfg, source).to_numpy()
    levels = frame[cfg.targets].to_numpy(dtype=float)  # original units, row-aligned
    values = frame[columns].to_numpy(dtype=float, copy=True)
    if cfg.transform == "log":
        if (levels <= 0).any():
            raise ConfigError(source, "data.transform", "log", "targets must be > 0 for a log")
        values[:, : len(cfg.targets)] = np.log(levels)
    elif cfg.transform == "diff":
        values = np.concatenate([np.diff(levels, axis=0), values[1:, len(cfg.targets) :]], axis=1)
        levels, times = levels[1:], times[1:]  # row i now holds the change into time i
    return Table(times, levels, values, columns)


def load_forecast_data(cfg: DataConfig, fold: int | None = None) -> ForecastData:
    """Read ``cfg.path`` and build the train/val/test windows; ConfigError on any data fault.
    With ``fold`` (of ``data.folds``), its training and validation parts instead: rows before
    its stretch and the stretch (:func:`fold_bounds`); the test part stays the split's."""
    source = str(cfg.path)
    table = prepare_table(read_table(cfg.path), cfg, source)
    times, levels, values, columns = table.times, table.levels, table.values, table.inputs
    n_rows = len(values)
    split_val, test_start = split_bounds(n_rows, cfg.split)
    stretches = fold_bounds(split_val, test_start, cfg.folds)
    first_fold = stretches[0][0]
    if cfg.folds > 1 and first_fold - cfg.window - cfg.horizon < test_start - split_val:
        raise ConfigError(
            source,
            "data.folds",
            cfg.folds,
            f"too few rows: the first fold trains on {max(first_fold, 0)} rows, fewer than window"
            f" {cfg.window} + horizon {cfg.horizon} + one validation stretch"
            f" ({test_start - split_val} rows)",
        )
    val_start, val_stop = stretches[cfg.folds - 1 if fold is None else fold]
    for t, name in enumerate(cfg.targets):
        if np.ptp(levels[:val_start, t]) == 0:
            rule = "constant over the training part: there is nothing to learn"
            raise ConfigError(source, "data.target", name, rule)
    scaler = fit_scaler(cfg.scaler, values[:val_start])
    scaled = scaler.transform(values).astype(np.float32)

    bounds = {"train": (0, val_start), "val": (val_start, val_stop), "test": (test_start, n_rows)}
    parts: dict[str, Windows] = {}
    for name, (start, stop) in bounds.items():
        x, y, first = cut_windows(scaled, len(cfg.targets), cfg.window, cfg.horizon, start, stop)
        if len(first) == 0:
            raise ConfigError(
                source,
                "data.window",
                cfg.window,
                f"too few rows: {n_rows} rows give the {name} part {stop - start} rows, not enough"
                f" for window {cfg.window} + horizon {cfg.horizon}",
            )
        step_rows = first[:, None] + np.arange(cfg.horizon)[None, :]
        parts[name] = Windows(
            x=torch.from_numpy(np.ascontiguousarray(x)),
            y=torch.from_numpy(np.ascontiguousarray(y)),
            times=times[step_rows],
            last_level=levels[first - 1],
        )
    return ForecastData(
        **parts,
        inputs=columns,
        targets=cfg.targets,
        scaler=scaler,
        transform=cfg.transform,
        season=cfg.season,
    )


@dataclass(frozen=True)
class Sequences:
    """One part of a classification set."""

    x: torch.Tensor  # (n, steps, features): scaled
    y: torch.Tensor  # (n,): class index
    ids: np.ndarray  # (n,): the sequence ids, for reading results back

    def __len__(self) -> int:
        return len(self.x)


@dataclass(frozen=True)
class ClassificationData:
    """Labelled sequences, split with stratification and scaled on train only."""

    train: Sequences
    val: Sequences
    test: Sequences
    inputs: list[str]
    classes: list[str]  # class names, by index
    scaler: Scaler

    @property
    def n_inputs(self) -> int:
        return len(self.inputs)

    @property
    def output_shape(self) -> tuple[int, ...]:
        return (len(self.classes),)  # one logit per class

    def part(self, name: str) -> Sequences:
        return {"train": self.train, "val": self.val, "test": self.test}[name]


@dataclass(frozen=True)
class RawSequences:
    """Sequences as read from a file, before any split or scaling."""

    x: np.ndarray  # (n, steps, features)
    labels: np.ndarray | None  # (n,), None when the file carries none (predict's input)
    ids: np.ndarray  # (n,)
    inputs: list[str]  # feature names


def read_sequences(cfg: DataConfig, path: Path, labelled: bool = True) -> RawSequences:
    """Sequences from a .npz (arrays ``x`` (n, steps, features) and ``y`` (n,)) or from a long
    table (one row per step: id, order, features, label). Without ``labelled`` the labels may
    be absent."""
    source = str(path)
    if path.suffix.lower() == ".npz":
        check_data_file(path)
        return _sequences_from_npz(path, source, labelled)
    return _sequences_from_table(read_table(path), cfg, source, labelled)


def _sequences_from_table(
    frame: pd.DataFrame, cfg: DataConfig, source: str, labelled: bool
) -> RawSequences:
    keys = ("id_column", "order_column", "label_column")
    for key in keys if labelled else keys[:2]:
        column = getattr(cfg, key)
        if column not in frame.columns:
            raise ConfigError(
                source, f"data.{key}", column, f"no such column in {list(frame.columns)}"
            )
    for name in cfg.features:
        if name not in frame.columns:
            raise ConfigError(
                source, "data.features", name, f"no such column in {list(frame.columns)}"
            )
        if not pd.api.types.is_numeric_dtype(frame[name]):
            raise ConfigError(source, "data.features", name, "column is not numeric")
    if not cfg.features:
        raise ConfigError(source, "data.features", [], "needs at least one feature column")
    frame = _fill_missing(frame, cfg.features, cfg.missing, source)
    _check_finite(frame, {"data.features": cfg.features}, source)
    frame = frame.sort_values([cfg.id_column, cfg.order_column], kind="stable")
    groups = frame.groupby(cfg.id_column, sort=False)
    lengths = groups.size()
    if lengths.nunique() != 1:
        odd = lengths[lengths != lengths.mode()[0]].index[0]
        raise ConfigError(
            source,
            "data.id_column",
            str(odd),
            f"sequence has {lengths[odd]} steps, others {lengths.mode()[0]}: lengths must agree",
        )
    labels = None
    if cfg.label_column in frame.columns:
        distinct = groups[cfg.label_column].nunique()
        if (distinct > 1).any():
            raise ConfigError(
                source,
                "data.label_column",
                str(distinct[distinct > 1].index[0]),
                "a sequence carries more than one label",
            )
        labels = groups[cfg.label_column].first().to_numpy()
    steps = int(lengths.iloc[0])
    x = frame[cfg.features].to_numpy(dtype=float).reshape(len(lengths), steps, len(cfg.features))
    return RawSequences(x, labels, lengths.index.to_numpy(), list(cfg.features))


def _sequences_from_npz(path: Path, source: str, labelled: bool) -> RawSequences:
    with np.load(path, allow_pickle=False) as arrays:
        for key in ("x", "y") if labelled else ("x",):
            if key not in arrays:
                raise ConfigError(
                    source, "data.path", str(path), f"the .npz needs an array {key!r}"
                )
        x = arrays["x"].astype(float)
        y = arrays.get("y")
    if x.ndim != 3 or (y is not None and len(x) != len(y)):
        shapes = f"{x.shape} and {None if y is None else y.shape}"
        rule = f"x must be (n, steps, features) and y (n,), got {shapes}"
        raise ConfigError(source, "data.path", str(path), rule)
    if not np.isfinite(x).all():
        raise ConfigError(source, "data.path", str(path), "x holds NaN or infinite values")
    return RawSequences(x, y, np.arange(len(x)), [f"f{i}" for i in range(x.shape[2])])


def stratified_folds(
    y: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray, folds: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (training, validation) sequences of each of ``folds`` folds, the last the split's
    own: each earlier fold validates on a stratified chunk of the training part about the
    validation part's size (the chunks disjoint) and trains on every other training and
    validation sequence. ValueError when the training part holds fewer such chunks."""
    if folds == 1:
        return [(train_idx, val_idx)]
    chunks = max(2, round(len(train_idx) / len(val_idx)))
    if folds - 1 > chunks:
        raise ValueError(
            f"too few sequences: the training part ({len(train_idx)}) holds {chunks} chunks"
            f" of the validation part's size ({len(val_idx)}), fewer than the {folds - 1}"
            " earlier folds"
        )
    splitter = StratifiedKFold(n_splits=chunks, shuffle=True, random_state=seed)
    pool = np.sort(np.concatenate([train_idx, val_idx]))
    held = [train_idx[chunk] for _, chunk in splitter.split(train_idx, y[train_idx])]
    earlier = [(np.setdiff1d(pool, chunk), np.sort(chunk)) for chunk in held[: folds - 1]]
    return [*earlier, (train_idx, val_idx)]


def load_classification_data(cfg: DataConfig, fold: int | None = None) -> ClassificationData:
    """Read labelled sequences; stratified, seeded train/val/test split; scaler fit on train.
    With ``fold`` (of ``data.folds``), its training and validation sequences instead
    (:func:`stratified_folds`); the test part stays the split's."""
    source = str(cfg.path)
    raw = read_sequences(cfg, cfg.path)
    if raw.labels is None:
        raise ConfigError(source, "data.label_column", cfg.label_column, "no labels to learn from")
    x, ids, inputs = raw.x, raw.ids, raw.inputs
    classes, y = np.unique(raw.labels, return_inverse=True)
    if len(classes) < 2:
        raise ConfigError(
            source, "data.label_column", cfg.label_column, "needs two classes or more"
        )
    index = np.arange(len(y))
    train_frac, val_frac, test_frac = cfg.split
    try:
        train_idx, rest = train_test_split(
            index, train_size=train_frac, stratify=y, random_state=cfg.split_seed
        )
        val_idx, test_idx = train_test_split(
            rest,
            test_size=test_frac / (val_frac + test_frac),
            stratify=y[rest],
            random_state=cfg.split_seed,
        )
    except ValueError as exc:
        raise ConfigError(source, "data.split", cfg.split, f"cannot stratify: {exc}") from None
    try:
        folds = stratified_folds(y, train_idx, val_idx, cfg.folds, cfg.split_seed)
    except ValueError as exc:
        raise ConfigError(source, "data.folds", cfg.folds, str(exc)) from None
    train_idx, val_idx = folds[cfg.folds - 1 if fold is None else fold]
    steps, features = x.shape[1], x.shape[2]
    scaler = fit_scaler(cfg.scaler, x[train_idx].reshape(-1, features))
    scaled = scaler.transform(x.reshape(-1, features)).reshape(-1, steps, features)

    def part(idx: np.ndarray) -> Sequences:
        return Sequences(
            torch.from_numpy(scaled[idx].astype(np.float32)), torch.from_numpy(y[idx]), ids[idx]
        )

    return ClassificationData(
        part(train_idx), part(val_idx), part(test_idx), inputs, [str(c) for c in classes], scaler
    )


TrainingData = ForecastData | ClassificationData


def load_data(cfg: Config, fold: int | None = None) -> TrainingData:
    """The task's data for one data setting, or for one of its folds."""
    if cfg.task == "classification":
        return load_classification_data(cfg.data, fold)
    return load_forecast_data(cfg.data, fold)


@dataclass(frozen=True)
class DataDescription:
    """A data setting as MLflow's Dataset column shows it: the file, its content hash (the one
    the study's fingerprint records), its input columns and the samples of each part."""

    name: str
    source: str
    digest: str
    columns: list[str]
    samples: dict[str, int]  # part -> samples (windows or sequences)


def describe(path: Path, data: ForecastData | ClassificationData) -> DataDescription:
    return DataDescription(
        name=path.stem,
        source=str(path),
        digest=file_digest(path),
        columns=list(data.inputs),
        samples={part: len(data.part(part)) for part in PARTS},
    )
