"""Configuration: the [service] table, FHIR_LEUKO_SERVICE_* variables, and clear errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fhir_leuko.errors import UsageError
from fhir_leuko.service import create_app, load_settings

from .conftest import FILE_ISS, PUBLIC_BASE
from .harness import CdsClient, ClientKeys, MutableClock, ServiceServer, hook_request, prefetch


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "service.toml"
    path.write_text(text, encoding="utf-8")
    return path


CLIENT = f"""
[[service.clients]]
iss = "{FILE_ISS}"
jwks_file = "keys.json"
"""


def test_file_then_environment_then_arguments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, f'[service]\npublic_base_url = "{PUBLIC_BASE}/"\nport = 9000\n{CLIENT}')
    settings = load_settings(path)
    assert (settings.port, settings.public_base_url) == (9000, PUBLIC_BASE)  # trailing / dropped
    assert settings.clients[0].jwks_file == tmp_path / "keys.json"
    monkeypatch.setenv("FHIR_LEUKO_SERVICE_PORT", "9100")
    monkeypatch.setenv("FHIR_LEUKO_SERVICE_TESTING__ALLOW_HTTP", "true")
    settings = load_settings(path)
    assert settings.port == 9100 and settings.testing.allow_http
    assert load_settings(path, port=9200).port == 9200
    # The scheduled job's variables (FHIR_LEUKO_* without SERVICE) are not ours.
    monkeypatch.setenv("FHIR_LEUKO_PORT", "1")
    assert load_settings(path).port == 9100


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[fhir]\nbase_url = 'x'\n", "no [service] table"),
        ("[service\n", "not valid TOML"),
        (
            f'[service]\npublic_base_url = "{PUBLIC_BASE}"\nprot = 1\n{CLIENT}',
            "[service] prot: unknown setting",
        ),
        ("[service]\n" + CLIENT, "public_base_url is required"),
        (f'[service]\npublic_base_url = "{PUBLIC_BASE}"\n', "no [[service.clients]]"),
        (f'[service]\npublic_base_url = "http://cds.example.org"\n{CLIENT}', "must use https"),
        (
            f'[service]\npublic_base_url = "{PUBLIC_BASE}"\ncors_origins = ["*"]\n{CLIENT}',
            "allow_cors_wildcard",
        ),
        (
            f'[service]\npublic_base_url = "{PUBLIC_BASE}"\njwt_leeway_seconds = 300\n{CLIENT}',
            "jwt_leeway_seconds",
        ),
        (
            f'[service]\npublic_base_url = "{PUBLIC_BASE}"\n[[service.clients]]\niss = "x"\n',
            "give jwks_url, jwks_file or jku",
        ),
        (
            f'[service]\npublic_base_url = "{PUBLIC_BASE}"\n{CLIENT}{CLIENT}',
            "is configured twice",
        ),
    ],
    ids=[
        "no-table",
        "syntax",
        "unknown-key",
        "no-base-url",
        "no-clients",
        "http",
        "cors-wildcard",
        "leeway",
        "no-keys",
        "iss-twice",
    ],
)
def test_configuration_errors_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(UsageError) as caught:
        load_settings(write(tmp_path, text))
    assert message in str(caught.value)
    assert str(tmp_path / "service.toml") in str(caught.value)


def test_a_missing_key_file_fails_at_start(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f'[service]\npublic_base_url = "{PUBLIC_BASE}"\nfeedback_database = "f.sqlite3"\n{CLIENT}',
    )
    with pytest.raises(UsageError, match="cannot read the JWK Set"):
        create_app(load_settings(path))
    (tmp_path / "keys.json").write_text('{"keys": [{"kty": "oct", "kid": "k", "k": "c2VjcmV0"}]}')
    with pytest.raises(UsageError, match="no ES384"):
        create_app(load_settings(path))


def test_jwt_can_be_disabled_only_explicitly(tmp_path: Path, knowledge: Any, profiles: Any) -> None:
    settings = load_settings(
        write(tmp_path, "[service]\n[service.testing]\ndisable_jwt = true\n"),
        feedback_database=tmp_path / "f.sqlite3",
    )
    server = ServiceServer(
        create_app(settings, knowledge=knowledge, profiles=profiles, clock=MutableClock())
    )
    try:
        client = CdsClient(server.url, "", ClientKeys("unused"), "", MutableClock())
        body = hook_request("patient-view", "pt-cloz-severe", prefetch=prefetch("clozapine-severe"))
        assert (
            client.call("leuko-patient-view", body, token=None).cards[0]["indicator"] == "critical"
        )
    finally:
        server.stop()
