"""Sweep files: the shipped ones load; every kind of bad input is one clear ConfigError."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from lstm_sweep.config import (
    ConfigError,
    changed_keys,
    load_config,
    mask_secrets,
    parse_override,
    sanity_warnings,
    study_fingerprint,
    without_password,
)
from tests.helpers import CLASSIFY, FORECAST, MASK, QUICK, ROOT, url_with_password


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


BASE = """
data:
  path: {data}
  time_column: date
  target: co2
"""


@pytest.mark.parametrize("sweep", [FORECAST, QUICK, CLASSIFY])
def test_shipped_sweep_files_load_and_resolve_data_path_against_their_folder(sweep: Path) -> None:
    cfg = load_config(sweep)
    assert cfg.data.path.parent == ROOT / "sweeps" / "data"
    assert cfg.data.path.is_file()
    assert {"model.dropout", "train.weight_decay", "train.learning_rate"} <= set(cfg.search)


def test_overrides_are_typed_as_yaml() -> None:
    cfg = load_config(QUICK, ["study.n_trials=5", "train.learning_rate=3e-3", "data.target=[co2]"])
    assert cfg.study.n_trials == 5
    assert cfg.train.learning_rate == pytest.approx(3e-3)
    assert cfg.data.targets == ["co2"]


def test_with_values_puts_sampled_values_in_and_validates_again() -> None:
    cfg = load_config(QUICK)
    trial = cfg.with_values({"model.dropout": 0.3, "model.hidden_size": 16})
    assert (trial.model.dropout, trial.model.hidden_size) == (0.3, 16)
    assert cfg.model.dropout == 0.0  # the base config is untouched


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ("data: [unclosed", "", "malformed YAML at line 1"),
        ("- just\n- a list", "", "must be a mapping"),
        (BASE + "modle:\n  dropout: 0.1\n", "modle", "did you mean 'model'"),
        (
            BASE + "model:\n  hiden_size: 8\n",
            "model.hiden_size",
            "did you mean 'model.hidden_size'",
        ),
        (BASE + "model:\n  hidden_size: lots\n", "model.hidden_size", "valid integer"),
        (BASE + "model:\n  dropout: 1.5\n", "model.dropout", "less than 1"),
        (BASE + "train:\n  learning_rate: 0\n", "train.learning_rate", "greater than 0"),
        (BASE + "  split: [0.5, 0.2, 0.2]\n", "data.split", "add up to 1"),
        (
            BASE + "search:\n  model.dropout: {type: float, low: 0.4, high: 0.1}\n",
            "search.model.dropout",
            "`low <= high` must hold",
        ),
        (
            BASE + "search:\n  model.hidden_size: {type: categorical, choices: []}\n",
            "search.model.hidden_size",
            "non-empty list",
        ),
        (
            BASE + "search:\n  model.dropout: {type: float, low: 0.0, high: 1.5}\n",
            "search.model.dropout",
            "out of range",
        ),
        (
            BASE + "search:\n  model.dropuot: {type: float, low: 0.0, high: 0.5}\n",
            "search.model.dropuot",
            "did you mean 'model.dropout'",
        ),
        (
            BASE + "search:\n  study.n_trials: {type: int, low: 1, high: 5}\n",
            "search.study.n_trials",
            "cannot be searched",
        ),
        (
            BASE + "search:\n  train.weight_decay: {type: float, low: 0.0, high: 0.1, log: true}\n",
            "search.train.weight_decay",
            "`low > 0` must hold",
        ),
        ("experiment: x\n", "data", "required key is missing"),
        (
            BASE + "search:\n  model.hidden_size: {type: int, low: 8, high: 64, step: 0.5}\n",
            "search.model.hidden_size",
            "`step` must be a whole number",
        ),
        (BASE + "study:\n  n_trials: 0\n", "study.n_trials", "greater than or equal to 1"),
        (BASE + "train:\n  batch_size: 0\n", "train.batch_size", "greater than or equal to 1"),
        (
            BASE + "search:\n  data.transform: {type: categorical, choices: [none, diff]}\n",
            "search.data.transform",
            "set train.monitor: val_nmse",
        ),
        (BASE + "train:\n  monitor: val_accuracy\n", "train.monitor", "forecast monitors"),
        (
            BASE + "search:\n  train.seed: {type: int, low: 0, high: 3}\n",
            "search.train.seed",
            "cannot be searched",
        ),
    ],
)
def test_bad_sweep_files_name_file_key_and_rule(
    tmp_path: Path, text: str, key: str, fragment: str
) -> None:
    path = write(tmp_path, text.replace("{data}", str(ROOT / "sweeps" / "data" / "co2_weekly.csv")))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert caught.value.key == key
    assert message.startswith(str(path))
    assert fragment in message
    assert "\n" not in message


def test_missing_sweep_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such sweep file"):
        load_config(tmp_path / "nope.yaml")


def test_override_without_equals_sign_is_rejected() -> None:
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("study.n_trials")


def test_unknown_override_key_is_caught_with_a_suggestion() -> None:
    with pytest.raises(ConfigError, match="did you mean 'train.max_epochs'"):
        load_config(QUICK, ["train.max_epoch=3"])


def test_malformed_yaml_in_an_override_is_a_config_error_naming_the_key() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(QUICK, ["model.dropout=[0.1"])
    assert caught.value.key == "model.dropout" and "malformed YAML" in str(caught.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_asking_for_cuda_without_it_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="train.device = 'cuda': no CUDA device"):
        load_config(QUICK, ["train.device=cuda"])


PASSWORD = "pw-secret-123"
DRIVER_URL = "postgresql+psycopg2://a@x/y"  # as a driver's error message quotes it


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        (
            url_with_password("postgresql://u@h:5432/db", PASSWORD),
            url_with_password("postgresql://u@h:5432/db", MASK),
        ),
        (
            url_with_password("postgresql://@h/db", PASSWORD),
            url_with_password("postgresql://@h/db", MASK),
        ),
        (
            f"postgresql://u@h/db?password={PASSWORD}&sslmode=require",
            "postgresql://u@h/db?password=***&sslmode=require",
        ),
        (
            url_with_password("http://user@mlflow:5000", PASSWORD),
            url_with_password("http://user@mlflow:5000", MASK),
        ),
        (
            f"could not connect to '{url_with_password(DRIVER_URL, PASSWORD)}': refused",
            f"could not connect to '{url_with_password(DRIVER_URL, MASK)}': refused",
        ),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
    ],
)
def test_mask_secrets_hides_every_kind_of_password(text: str, shown: str) -> None:
    assert mask_secrets(text) == shown


def test_without_password_leaves_a_uri_that_libpq_completes_from_the_environment() -> None:
    assert (
        without_password(url_with_password("postgresql://u@h/db", PASSWORD))
        == "postgresql://u@h/db"
    )
    assert without_password(f"postgresql://u@h/db?password={PASSWORD}") == "postgresql://u@h/db"


def test_a_typo_next_to_a_secret_does_not_echo_it() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(QUICK, [f"study.storag={url_with_password('postgresql://u@h/db', PASSWORD)}"])
    assert PASSWORD not in str(caught.value) and "did you mean 'study.storage'" in str(caught.value)


def test_the_fingerprint_holds_what_trial_values_depend_on_and_names_what_changed() -> None:
    base = study_fingerprint(load_config(QUICK))
    assert base["data.path"].startswith("sha256:") and "train.max_epochs" in base
    for neutral in (
        "study.n_trials=3",
        "diagnostics.level=off",
        "closing.top_k=1",
        "study.workers=2",
        "study.stop.patience=5",  # a budget, as n_trials is
    ):
        assert study_fingerprint(load_config(QUICK, [neutral])) == base, neutral
    changed = study_fingerprint(
        load_config(
            QUICK, ["train.max_epochs=7", "search.model.dropout={type: float, low: 0.1, high: 0.2}"]
        )
    )
    assert changed_keys(base, changed) == [
        "search.model.dropout.high",
        "search.model.dropout.low",
        "train.max_epochs",
    ]


def test_sanity_warnings_name_settings_that_do_nothing() -> None:
    cfg = load_config(
        QUICK, ["model.num_layers=1", "train.optimizer=adam", "train.weight_decay=0.01"]
    )
    warnings = sanity_warnings(cfg)
    assert any("num_layers = 1" in w for w in warnings)
    assert any("couples weight_decay" in w for w in warnings)
    assert sanity_warnings(load_config(QUICK)) == []


def test_an_old_sweep_file_with_the_closing_keys_under_report_still_works_and_says_so(
    tmp_path: Path,
) -> None:
    old = yaml.safe_load(QUICK.read_text())
    old["report"] = {**old.pop("closing"), "near_best": 0.2}
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(old))
    data = (QUICK.parent / old["data"]["path"]).resolve()
    cfg = load_config(path, [f"data.path={data}", "report.final_model=false"])
    assert (cfg.closing.top_k, cfg.closing.seeds, cfg.closing.final_model) == (2, 2, False)
    assert cfg.report.near_best == 0.2
    (note,) = [w for w in sanity_warnings(cfg) if "closing" in w]
    assert note.startswith(f"{path}: report.top_k, report.seeds, report.final_model belong")
    assert "closing.top_k, closing.seeds, closing.final_model" in note
    assert load_config(QUICK).notes == []  # a current file says nothing
    with pytest.raises(ConfigError) as caught:
        load_config(path, [f"data.path={data}", "closing.seeds=3"])
    assert caught.value.key == "report.seeds" and "keep closing.seeds only" in str(caught.value)


@pytest.mark.parametrize(
    ("sweep", "value"),
    [(QUICK, "[ridge_ar, prophet]"), (CLASSIFY, "[ridge_ar]")],
    ids=["unknown name", "classification"],
)
def test_chosen_baselines_are_forecastings_own_or_refused_in_one_line(
    sweep: Path, value: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        load_config(sweep, [f"closing.baselines={value}"])
    assert refused.value.key == "closing.baselines"
    assert "chosen from naive, seasonal_naive, ridge_ar, ridge_levels, mlp, arima" in str(
        refused.value
    )
