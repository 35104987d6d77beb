"""Probes for load balancers and Kubernetes (issue 11 §1): GET /healthz and GET /readyz answer
without a JWT and say nothing about the configuration; readiness fails when the store cannot be
written or a client's JWK Set cannot be had, and recovers."""

from __future__ import annotations

import json
from typing import Any

import requests

from .conftest import PUBLIC_BASE, ServiceEnv
from .harness import LocalHttp


def _get(base: str, path: str) -> requests.Response:
    return requests.get(f"{base}{path}", timeout=10)


def test_probes_need_no_jwt_and_tell_nothing(env: ServiceEnv) -> None:
    live = _get(env.server.url, "/healthz")
    assert (live.status_code, live.json()) == (200, {"status": "ok"})
    ready = _get(env.server.url, "/readyz")
    assert (ready.status_code, ready.json()) == (200, {"status": "ready"})
    for answer in (live, ready):
        text = answer.text
        assert answer.headers["cache-control"] == "no-store"
        for secret in (PUBLIC_BASE, env.sekmet.base_url, "jwks", "sqlite", "https://ehr"):
            assert secret not in text
    # The CDS endpoints still refuse a call without a JWT.
    assert _get(env.server.url, "/cds-services").status_code == 401


def test_not_ready_without_a_client_key_set(make_service: Any, caplog: Any) -> None:
    jwks = LocalHttp()  # answers 404 to everything until it is given the key set
    try:
        server, _, keys = make_service(
            clients=[{"iss": "https://late.example.org", "jwks_url": jwks.url("/jwks.json")}],
            jwks_refetch_seconds=0,
            testing={"allow_http": True},
        )
        answer = _get(server.url, "/readyz")
        assert (answer.status_code, answer.json()) == (503, {"status": "not ready"})
        assert jwks.url("/jwks.json") not in answer.text
        assert any("no usable key in the JWK Set" in r.getMessage() for r in caplog.records)
        jwks.serve_json("/jwks.json", keys.jwks())
        assert _get(server.url, "/readyz").status_code == 200
        assert _get(server.url, "/healthz").status_code == 200  # liveness never depended on it
    finally:
        jwks.stop()


def test_not_ready_when_the_store_cannot_be_written(make_service: Any) -> None:
    server, settings, _ = make_service()
    assert _get(server.url, "/readyz").status_code == 200
    # The volume wiped under the running service: writes would go to a file nobody reads.
    database = settings.feedback_database
    for suffix in ("", "-wal", "-shm"):
        database.with_name(database.name + suffix).unlink(missing_ok=True)
    answer = _get(server.url, "/readyz")
    assert (answer.status_code, answer.json()) == (503, {"status": "not ready"})
    assert json.dumps(str(database)).strip('"') not in answer.text
    assert _get(server.url, "/healthz").status_code == 200


def test_probes_are_in_the_openapi_document(env: ServiceEnv) -> None:
    paths = _get(env.server.url, "/openapi.json").json()["paths"]
    assert {"/healthz", "/readyz"} <= set(paths)
