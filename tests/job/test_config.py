"""Configuration: flags > FHIR_LEUKO_<TABLE>_<KEY> environment variables > TOML file > defaults."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from fhir_leuko.errors import UsageError
from fhir_leuko.fhir.auth import Secret
from fhir_leuko.job.config import build_auth, load_job_config, parse_interval, resolve_state_path

TOML = """\
[fhir]
server = "https://file.example/fhir"
timeout = 5

[auth]
method = "client-credentials"
client_id = "from-file"

[run]
overlap = "2m"
patients_per_request = 10

[state]
path = "/tmp/file-state.sqlite3"

[service]   # the CDS Hooks service's table: ignored here
port = 9000
"""


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "job.toml"
    path.write_text(TOML)
    return path


def test_flags_beat_environment_beat_file(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FHIR_LEUKO_FHIR_TIMEOUT", "7")
    monkeypatch.setenv("FHIR_LEUKO_RUN_OVERLAP", "3m")
    monkeypatch.setenv("FHIR_LEUKO_SERVICE_PORT", "1234")  # another component's variable
    config = load_job_config({"run": {"overlap": "1m"}}, config_file)
    assert config.fhir.server == "https://file.example/fhir"  # file
    assert config.fhir.timeout == 7  # environment over file
    assert config.overlap() == timedelta(minutes=1)  # flag over environment
    assert config.run.patients_per_request == 10
    assert config.auth.client_id == "from-file"
    assert config.state.path == Path("/tmp/file-state.sqlite3")


def test_defaults_without_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FHIR_LEUKO_FHIR_SERVER", raising=False)
    config = load_job_config({"fhir": {"server": "http://127.0.0.1:8080/fhir/"}})
    assert config.fhir.server == "http://127.0.0.1:8080/fhir"
    assert config.auth.method == "none" and config.run.write_mode == "conditional"
    assert config.overlap() == timedelta(minutes=5) and config.fhir.verify is True


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[fhir]\nserver = 'ftp://x'\n", r"\[fhir\] server: .*http\(s\) URL"),
        ("[run]\noverlap = 'soon'\n", r"\[run\] overlap: .*duration"),
        ("[auth]\nmethod = 'kerberos'\n", r"\[auth\] method"),
        ("[fhir]\nsevrer = 'http://x'\n", r"\[fhir\] sevrer: Extra inputs"),
        ("[jobs]\nx = 1\n", "unknown table"),
        ("[fhir\n", "not valid TOML"),
    ],
)
def test_bad_configuration_names_table_and_key(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(UsageError, match=message):
        load_job_config({}, path)


def test_secrets_from_env_or_file_are_never_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FHIR_LEUKO_AUTH_CLIENT_SECRET", "super-secret-1")
    config = load_job_config(
        {"fhir": {"server": "https://x/fhir"}, "auth": {"method": "client-credentials", "client_id": "c"}}
    )
    assert "super-secret-1" not in repr(config) and "super-secret-1" not in str(config)
    auth = build_auth(config)
    assert "super-secret-1" not in repr(auth)
    secret_file = tmp_path / "secret"
    secret_file.write_text("from-file-2\n")
    secret = Secret(file=secret_file)
    assert secret.get() == "from-file-2" and "from-file-2" not in repr(secret)
    monkeypatch.delenv("FHIR_LEUKO_AUTH_CLIENT_SECRET")
    config = load_job_config(
        {"fhir": {"server": "https://x/fhir"}, "auth": {"method": "client-credentials", "client_id": "c"}}
    )
    with pytest.raises(UsageError, match="FHIR_LEUKO_AUTH_CLIENT_SECRET or give --client-secret-file"):
        build_auth(config)


def test_intervals() -> None:
    assert parse_interval("15m") == timedelta(minutes=15)
    assert parse_interval("1h30m") == timedelta(minutes=90)
    assert parse_interval("90") == timedelta(seconds=90)
    assert parse_interval("2d") == timedelta(days=2)
    for bad in ("", "m", "15 minutes", "1h x"):
        with pytest.raises(ValueError, match="not a duration"):
            parse_interval(bad)


def test_the_deployment_example_is_a_valid_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    from .conftest import EXAMPLES

    for name in ("FHIR_LEUKO_STATE_PATH", "FHIR_LEUKO_STATE_DIR", "FHIR_LEUKO_FHIR_SERVER"):
        monkeypatch.delenv(name, raising=False)
    config = load_job_config({}, EXAMPLES / "deploy" / "job.toml")
    assert config.auth.method == "smart-backend" and config.run.log_format == "json"
    assert resolve_state_path(config) == Path("/var/lib/fhir-leuko/state.sqlite3")
