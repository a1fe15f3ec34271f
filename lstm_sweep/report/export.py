"""The sweep files the report leaves beside itself: the best and the recommended settings,
each ready to train once, with no password in them."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from lstm_sweep.config import Config, without_password


def best_config(cfg: Config, values: Mapping[str, Any], label: str) -> dict[str, Any]:
    """The sweep file that trains the given settings once: no search, one trial, its own
    study; store URIs without their passwords (PGPASSWORD or ~/.pgpass supply them)."""
    raw = cfg.with_values(dict(values)).model_dump(mode="json")
    raw["search"] = {}
    raw["study"] |= {"name": f"{cfg.study_name}-{label}", "n_trials": 1}
    return mask_stores(raw)


def mask_stores(raw: dict[str, Any]) -> dict[str, Any]:
    """A dumped config with the password taken out of both store URIs."""
    for section, key in (("study", "storage"), ("tracking", "uri")):
        if raw[section].get(key):
            raw[section][key] = without_password(raw[section][key])
    return raw


def write_best_config(cfg: Config, values: Mapping[str, Any], path: Path, label: str) -> Path:
    header = (
        f"# {label.capitalize()} settings of study {cfg.study_name!r};"
        f" run: python -m lstm_sweep.run {path}\n"
    )
    path.write_text(header + yaml.safe_dump(best_config(cfg, values, label), sort_keys=False))
    return path
