"""docker-compose.yml agrees with the code: no Docker engine runs here, so the file is parsed and
every name, variable, port and command in it is checked against the CLI, MLflow and .env.example.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from mlflow.cli import server as mlflow_server

from lstm_sweep.config import load_config
from lstm_sweep.run import parse_args
from tests.helpers import ROOT

VARIABLE = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")
EXAMPLE_ENV = dict(
    line.split("#")[0].strip().split("=", 1)
    for line in (ROOT / ".env.example").read_text().splitlines()
    if line.strip() and not line.startswith("#")
)


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's own substitution: ${VAR}, ${VAR:-default}, ${VAR:?error}, and $$ for $."""

    def value(match: re.Match[str]) -> str:
        name, kind, default = match.groups()
        if name in env:
            return env[name]
        if kind and kind.endswith("?"):
            raise KeyError(f"{name} is required: {default}")
        return default or ""

    return VARIABLE.sub(value, text.replace("$$", "\0")).replace("\0", "$")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The compose file as `docker compose config` would see it with .env.example as .env."""
    return yaml.safe_load(interpolate((ROOT / "docker-compose.yml").read_text(), EXAMPLE_ENV))


def environment(service: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in service.get("environment", {}).items()}


def test_services_are_postgres_an_mlflow_server_and_workers(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"postgres", "mlflow", "worker"}
    assert compose["services"]["worker"]["build"] == "."
    assert compose["services"]["mlflow"]["image"] == compose["services"]["worker"]["image"]


def test_every_variable_is_documented_in_env_example_and_none_is_unused() -> None:
    text = (ROOT / "docker-compose.yml").read_text().replace("$$", "")
    used = {m.group(1) for m in VARIABLE.finditer(text)}
    assert used == set(EXAMPLE_ENV)


def test_credentials_come_only_from_the_environment() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    assert "${POSTGRES_PASSWORD:?" in text  # compose refuses to start without one
    assert EXAMPLE_ENV["POSTGRES_PASSWORD"] not in text
    for path in [*ROOT.joinpath("lstm_sweep").glob("*.py"), ROOT / "Dockerfile"]:
        assert EXAMPLE_ENV["POSTGRES_PASSWORD"] not in path.read_text(), path
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD"):
        interpolate(text, {k: v for k, v in EXAMPLE_ENV.items() if k != "POSTGRES_PASSWORD"})


def test_every_published_port_is_bound_to_loopback(compose: dict[str, Any]) -> None:
    published = [p for s in compose["services"].values() for p in s.get("ports", [])]
    assert len(published) == 2
    assert all(str(p).startswith("127.0.0.1:") for p in published)


def test_postgres_has_a_health_check_a_volume_and_both_databases(compose: dict[str, Any]) -> None:
    postgres = compose["services"]["postgres"]
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    volume = postgres["volumes"][0].split(":")
    assert volume[0] in compose["volumes"] and volume[1] == "/var/lib/postgresql/data"
    assert environment(postgres)["POSTGRES_DB"] == EXAMPLE_ENV["MLFLOW_DB"]
    init = compose["configs"][postgres["configs"][0]["source"]]["content"]
    assert f'CREATE DATABASE "{EXAMPLE_ENV["OPTUNA_DB"]}"' in init
    assert postgres["configs"][0]["target"].startswith("/docker-entrypoint-initdb.d/")


def test_mlflow_server_is_backed_by_postgres_and_serves_artifacts_from_a_volume(
    compose: dict[str, Any],
) -> None:
    mlflow = compose["services"]["mlflow"]
    assert mlflow["entrypoint"] == ["mlflow", "server"]
    flags = {opt for p in mlflow_server.params for opt in p.opts}
    assert {a for a in mlflow["command"] if a.startswith("-")} <= flags
    assert "--serve-artifacts" in mlflow["command"]
    env = environment(mlflow)
    read_by_server = {p.envvar for p in mlflow_server.params} | {"PGPASSWORD"}  # + libpq's
    assert set(env) <= read_by_server
    backend = urlsplit(env["MLFLOW_BACKEND_STORE_URI"])
    assert backend.scheme == "postgresql+psycopg2"
    assert (backend.hostname, backend.path) == ("postgres", f"/{EXAMPLE_ENV['MLFLOW_DB']}")
    assert backend.password is None and env["PGPASSWORD"] == EXAMPLE_ENV["POSTGRES_PASSWORD"]
    volume, destination = mlflow["volumes"][0].split(":")
    assert volume in compose["volumes"] and destination == env["MLFLOW_ARTIFACTS_DESTINATION"]
    assert "/health" in " ".join(mlflow["healthcheck"]["test"])
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_worker_command_is_a_valid_sweep_on_the_compose_services(compose: dict[str, Any]) -> None:
    worker, mlflow = compose["services"]["worker"], compose["services"]["mlflow"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["python", "-m", "lstm_sweep.run"]' in dockerfile
    assert "WORKDIR /app" in dockerfile and "COPY sweeps ./sweeps" in dockerfile

    args = parse_args(worker["command"])  # the image's entrypoint is the CLI
    cfg = load_config(ROOT / args.sweep, args.set)  # /app in the image is the repo root here
    storage = urlsplit(cfg.study.storage)
    assert storage.scheme == "postgresql"
    assert (storage.hostname, storage.port, storage.path) == (
        "postgres",
        5432,
        f"/{EXAMPLE_ENV['OPTUNA_DB']}",
    )
    assert (storage.username, storage.password) == (EXAMPLE_ENV["POSTGRES_USER"], None)
    assert environment(worker)["PGPASSWORD"] == EXAMPLE_ENV["POSTGRES_PASSWORD"]
    assert not any(EXAMPLE_ENV["POSTGRES_PASSWORD"] in arg for arg in worker["command"])
    assert worker["stop_grace_period"]  # time for SIGTERM to end the epoch and close the trial
    tracking = urlsplit(cfg.tracking.uri)
    assert tracking.hostname == "mlflow"
    assert str(tracking.port) == mlflow["command"][mlflow["command"].index("--port") + 1]
    assert tracking.netloc in environment(mlflow)["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert args.workers == 1  # compose scales containers, one worker each
    assert {name: dep["condition"] for name, dep in worker["depends_on"].items()} == {
        "postgres": "service_healthy",
        "mlflow": "service_healthy",
    }
