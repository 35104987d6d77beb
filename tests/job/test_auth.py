"""Each authentication method against the real server, with real keys: sekmet checks basic
credentials, static tokens, client secrets, and verifies RS384 and ES384 client assertions."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from fhir_leuko.cli import main
from fhir_leuko.core.knowledge import Knowledge
from fhir_leuko.core.profiles import ProfileSet
from fhir_leuko.errors import AuthError
from fhir_leuko.fhir.auth import ClientCredentialsAuth, Secret, SmartBackendAuth
from fhir_leuko.fhir.client import FhirClient
from fhir_leuko.testing.seed import seed_resources
from fhir_leuko.testing.sekmet import SekmetServer

from .conftest import STRICT, anc, issues, patient, run_pass

SECRET = "s3cret-Value-never-logged"
PASSWORD = "wonderland-pass-42"
TOKEN = "static-token-5f2a9c"


def _pem(key: Any, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def _jwk(public_key: Any, kid: str, alg: str) -> dict[str, Any]:
    algorithm = jwt.algorithms.RSAAlgorithm if alg == "RS384" else jwt.algorithms.ECAlgorithm
    out: dict[str, Any] = json.loads(algorithm.to_jwk(public_key))
    out.update({"kid": kid, "alg": alg, "use": "sig"})
    return out


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("keys")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP384R1())
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return {
        "rsa": _pem(rsa_key, tmp / "rsa.pem"),
        "ec": _pem(ec_key, tmp / "ec.pem"),
        "stranger": _pem(stranger, tmp / "stranger.pem"),
        "rsa_jwk": _write(tmp / "rsa.jwk", _jwk(rsa_key.public_key(), "rsa-1", "RS384")),
        "ec_jwk": _write(tmp / "ec.jwk", _jwk(ec_key.public_key(), "ec-1", "ES384")),
    }


def _write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(json.dumps(data))
    return path


def _settings(keys: dict[str, Path], lifetime: int = 3600) -> dict[str, Any]:
    scopes = "system/*.*"
    return {
        "server_auth": {
            "types": ["basic", "bearer", "smart"],
            "users": {"alice": PASSWORD},
            "tokens": [TOKEN],
            "token_lifetime": lifetime,
            "enforce_scopes": True,
            "smart_clients": [
                {"client_id": "secret-client", "client_secret": SECRET, "scopes": scopes},
                # One key type per client (sekmet 0.1.1 fails ES384 when a JWKS mixes RSA and EC).
                {
                    "client_id": "rsa-client",
                    "jwks": {"keys": [json.loads(keys["rsa_jwk"].read_text())]},
                    "scopes": scopes,
                },
                {
                    "client_id": "ec-client",
                    "jwks": {"keys": [json.loads(keys["ec_jwk"].read_text())]},
                    "scopes": scopes,
                },
            ],
        }
    }


@pytest.fixture(scope="module")
def auth_server(
    tmp_path_factory: pytest.TempPathFactory, keys: dict[str, Path]
) -> Iterator[SekmetServer]:
    with SekmetServer(tmp_path_factory.mktemp("sekmet-auth"), settings=_settings(keys)) as s:
        yield s


@pytest.fixture
def secured(auth_server: SekmetServer) -> SekmetServer:
    """The auth server, emptied and seeded with one neutropenic patient (seeded with basic auth)."""
    auth_server.reset()
    session = requests.Session()
    session.auth = ("alice", PASSWORD)
    seed_resources(
        auth_server.base_url,
        [(patient("a-1"), None), (anc("a-1-anc", "a-1", 0.9, "2026-11-18T08:00:00Z"), None)],
        session=session,
    )
    return auth_server


def _run_args(server: SekmetServer, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "run", "--server", server.base_url, "--as-of", "2026-11-20T12:00:00Z",
        "--state", str(tmp_path / "state.sqlite3"), "--no-progress", *extra,
    ]


def test_no_credentials_is_refused(secured: SekmetServer, tmp_path: Path) -> None:
    assert main(_run_args(secured, tmp_path)) == 2


def test_basic_auth(
    secured: SekmetServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    password = tmp_path / "password"
    password.write_text(PASSWORD + "\n")
    args = _run_args(secured, tmp_path, "--auth", "basic", "--username", "alice")
    assert main([*args, "--password-file", str(password)]) == 0
    password.write_text("wrong")
    assert main([*args, "--password-file", str(password), "--full"]) == 2
    err = capsys.readouterr().err
    assert "HTTP 401" in err and PASSWORD not in err


def test_static_bearer_token_from_the_environment(
    secured: SekmetServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FHIR_LEUKO_AUTH_TOKEN", TOKEN)
    assert main(_run_args(secured, tmp_path, "--auth", "bearer")) == 0


@pytest.mark.parametrize("method", ["basic", "post"])
def test_client_credentials_token_is_reused(
    secured: SekmetServer,
    tmp_path: Path,
    knowledge: Knowledge,
    profiles: ProfileSet,
    method: str,
) -> None:
    auth = ClientCredentialsAuth(
        "secret-client",
        Secret(literal=SECRET),
        base_url=secured.base_url,  # token endpoint from .well-known/smart-configuration
        method=method,  # type: ignore[arg-type]
        scope="system/*.*",
    )
    client = FhirClient(secured.base_url, auth=auth, headers=STRICT)
    report = run_pass(
        secured.base_url, tmp_path / "s.sqlite3", knowledge, profiles, client=client,
        as_of=datetime(2026, 11, 20, 12, tzinfo=UTC),
    )
    assert report.ok and report.actions["create"] == 1
    assert auth.token_url == f"{secured.root_url}/auth/token"
    assert report.requests >= 10 and auth.tokens_fetched == 1


@pytest.mark.parametrize(("client_id", "key", "alg"), [("rsa-client", "rsa", "RS384"), ("ec-client", "ec", "ES384")])
def test_smart_backend_services_private_key_jwt(
    secured: SekmetServer,
    tmp_path: Path,
    keys: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    client_id: str,
    key: str,
    alg: str,
) -> None:
    code = main(
        [
            "-v",
            *_run_args(secured, tmp_path, "--auth", "smart-backend", "--client-id", client_id),
            "--private-key-file", str(keys[key]), "--key-id", f"{key}-1", "--scope", "system/*.*",
            "--log-format", "json",
        ]
    )
    err = capsys.readouterr().err
    assert code == 0, err
    assert len(issues(secured.base_url, auth=("alice", PASSWORD))) == 1
    assert "Bearer" not in err and "eyJ" not in err  # no token, no assertion in the logs
    # The assertion itself: signed with the key's algorithm, the claims SMART requires.
    auth = SmartBackendAuth(client_id, keys[key], key_id=f"{key}-1", token_url="https://t/token")
    assertion = auth.assertion("https://t/token")
    header = jwt.get_unverified_header(assertion)
    claims = jwt.decode(assertion, options={"verify_signature": False})
    assert header["alg"] == alg and header["kid"] == f"{key}-1"
    assert claims["iss"] == claims["sub"] == client_id and claims["aud"] == "https://t/token"
    assert 0 < claims["exp"] - claims["iat"] <= 300
    assert auth.assertion("https://t/token") != assertion  # a fresh jti each time


def test_smart_with_an_unregistered_key_is_a_configuration_error(
    secured: SekmetServer, tmp_path: Path, keys: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            *_run_args(secured, tmp_path, "--auth", "smart-backend", "--client-id", "rsa-client"),
            "--private-key-file", str(keys["stranger"]),
        ]
    )
    assert code == 2
    assert "invalid_client" in capsys.readouterr().err


def test_a_secret_is_never_printed(
    secured: SekmetServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("FHIR_LEUKO_AUTH_CLIENT_SECRET", SECRET)
    args = [
        "-v",
        *_run_args(secured, tmp_path, "--auth", "client-credentials", "--client-id", "secret-client"),
    ]
    assert main(args) == 0
    monkeypatch.setenv("FHIR_LEUKO_AUTH_CLIENT_SECRET", "wrong-" + SECRET)
    assert main([*args, "--full"]) == 2
    out = capsys.readouterr()
    assert SECRET not in out.err and SECRET not in out.out


def test_an_expired_token_is_refreshed_once_on_401(
    tmp_path_factory: pytest.TempPathFactory, keys: dict[str, Path], tmp_path: Path
) -> None:
    """The server's tokens live 2 s, but our clock says they are fresh (skew): the 401 makes the
    client fetch a new token once and repeat the request."""

    frozen = 1000.0
    with SekmetServer(
        tmp_path_factory.mktemp("sekmet-short"), settings=_settings(keys, lifetime=2)
    ) as server:
        auth = ClientCredentialsAuth(
            "secret-client", Secret(literal=SECRET), base_url=server.base_url,
            clock=lambda: frozen, refresh_margin=0, scope="system/*.*",
        )
        client = FhirClient(server.base_url, auth=auth)
        client.capabilities()
        assert list(client.search("Patient", {"_count": "1"}))
        assert auth.tokens_fetched == 1
        time.sleep(2.5)
        assert list(client.search("Patient", {"_count": "1"}))
        assert auth.tokens_fetched == 2
        auth.client_secret = Secret(literal="revoked")
        time.sleep(2.5)
        with pytest.raises(AuthError, match="invalid_client"):
            list(client.search("Patient", {"_count": "1"}))


def test_export_with_every_auth_method(
    secured: SekmetServer, tmp_path: Path, keys: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``fhir-leuko export`` (Bulk Data, issue 12) with each method ``run`` has: the kick-off, the
    status polls, the DELETE and the files (``requiresAccessToken: true`` here) all authenticated."""
    password = tmp_path / "password"
    password.write_text(PASSWORD)
    monkeypatch.setenv("FHIR_LEUKO_AUTH_TOKEN", TOKEN)
    monkeypatch.setenv("FHIR_LEUKO_AUTH_CLIENT_SECRET", SECRET)
    methods = {
        "basic": ["--username", "alice", "--password-file", str(password)],
        "bearer": [],
        "client-credentials": ["--client-id", "secret-client", "--scope", "system/*.*"],
        "smart-backend": [
            "--client-id", "ec-client", "--private-key-file", str(keys["ec"]), "--key-id", "ec-1",
            "--scope", "system/*.*",
        ],
    }
    base = ["export", "--server", secured.base_url, "--no-progress"]
    assert main([*base, "--output-dir", str(tmp_path / "none")]) == 2  # refused without
    for method, extra in methods.items():
        out = tmp_path / method
        code = main([*base, "--output-dir", str(out), "--auth", method, *extra])
        err = capsys.readouterr().err
        assert code == 0, (method, err)
        state = json.loads((out / ".fhir-leuko" / "export.json").read_text())
        assert state["manifest"]["requiresAccessToken"] is True and state["job_deleted"]
        assert "a-1-anc" in (out / "Observation.000.ndjson").read_text()
        assert SECRET not in err and PASSWORD not in err and TOKEN not in err
