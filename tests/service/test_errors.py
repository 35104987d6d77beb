"""Errors: one status per error class, always an OperationOutcome, never an empty card list."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pydantic
import pytest
import requests

from fhir_leuko.errors import UsageError
from fhir_leuko.service import load_settings

from .conftest import FILE_ISS, PUBLIC_BASE, ServiceEnv
from .harness import (
    Answer,
    CdsClient,
    LocalHttp,
    MutableClock,
    hook_request,
    prefetch,
)
from .invariants import check_response

VIEW = "leuko-patient-view"


def client_for(server: Any, keys: Any) -> CdsClient:
    return CdsClient(server.url, PUBLIC_BASE, keys, FILE_ISS, MutableClock())


def test_unknown_service_is_404(ehr: CdsClient) -> None:
    result = ehr.call("no-such-service", hook_request("patient-view", "pt-normal"))
    assert result.status == 404
    assert result.body["issue"][0]["code"] == "not-found"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hook": None}, "missing required field `hook`"),
        ({"hookInstance": None}, "missing required field `hookInstance`"),
        ({"context": None}, "missing required field `context`"),
        ({"hook": "order-sign"}, "does not match service"),
        ({"hookInstance": ""}, "must not be empty"),
        ({"context": "Patient/1"}, "invalid context"),
        ({"context": {"userId": "Practitioner/1"}}, "context.patientId is required"),
        ({"context": {"patientId": "../../admin"}}, "not a FHIR id"),
        ({"context": {"patientId": 12}}, "invalid context"),
        ({"prefetch": ["not", "an", "object"]}, "invalid CDS Hooks request"),
        ({"fhirAuthorization": {"token_type": "Bearer"}}, "access_token"),
    ],
)
def test_malformed_requests_are_400(ehr: CdsClient, change: dict[str, Any], message: str) -> None:
    body = hook_request("patient-view", "pt-normal", prefetch=prefetch("normal"))
    for key, value in change.items():
        if value is None:
            del body[key]
        else:
            body[key] = value
    result = ehr.call(VIEW, body)
    assert result.status == 400
    assert message in result.body["issue"][0]["details"]["text"]


def test_body_that_is_not_json_is_400(ehr: CdsClient) -> None:
    result = ehr.call(VIEW, None, data=b'{"hook": "patient-view",')
    assert result.status == 400
    assert "not valid JSON" in result.body["issue"][0]["details"]["text"]


def test_unknown_members_and_extensions_are_ignored(ehr: CdsClient) -> None:
    body = hook_request("patient-view", "pt-cloz-severe", prefetch=prefetch("clozapine-severe"))
    body["extension"] = {"com.example.flag": True}
    body["context"]["extension"] = {"com.example.setting": "x"}
    body["prefetch"]["somethingElse"] = {"resourceType": "Basic", "code": {"text": "x"}}
    assert ehr.call(VIEW, body).cards[0]["indicator"] == "critical"


def test_body_over_the_limit_is_413(env: ServiceEnv, ehr: CdsClient) -> None:
    body = hook_request(
        "patient-view", "pt-normal", padding="x" * (env.settings.max_body_bytes + 1)
    )
    assert ehr.call(VIEW, body).status == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while streaming
        yield b'{"hook": "patient-view", "padding": "'
        for _ in range(40):
            yield b"y" * 100_000
        yield b'"}'

    response = requests.post(
        f"{env.server.url}/cds-services/{VIEW}",
        data=chunks(),
        headers={"Authorization": f"Bearer {ehr.token(f'/cds-services/{VIEW}')}"},
        timeout=30,
    )
    assert response.status_code == 413
    check_response(f"/cds-services/{VIEW}", 413, response.json())


def test_method_not_allowed_is_an_operation_outcome(ehr: CdsClient) -> None:
    result = ehr.request("GET", f"/cds-services/{VIEW}")
    assert result.status == 405
    assert result.body["issue"][0]["code"] == "not-supported"


def test_cors_preflight_for_a_configured_origin(env: ServiceEnv, ehr: CdsClient) -> None:
    headers = {
        "Origin": "https://ehr.example.org",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    allowed = ehr.request("OPTIONS", f"/cds-services/{VIEW}", token=None, headers=headers)
    assert allowed.status == 200
    assert allowed.headers["access-control-allow-origin"] == "https://ehr.example.org"
    assert {"authorization", "content-type"} <= {
        h.strip().lower() for h in allowed.headers["access-control-allow-headers"].split(",")
    }
    other = ehr.request(
        "OPTIONS",
        f"/cds-services/{VIEW}",
        token=None,
        headers={**headers, "Origin": "https://evil.example"},
    )
    assert other.status == 400 and "access-control-allow-origin" not in other.headers
    answered = ehr.discovery(headers={"Origin": "https://ehr.example.org"})
    assert answered.headers["access-control-allow-origin"] == "https://ehr.example.org"


class ExplodingFetcher:
    """A FHIR fetcher with a bug: the service must answer 500, not an empty card list."""

    def read(self, base: str, path: str, *, token: str) -> bytes | None:
        raise RuntimeError("bug in the fetcher")

    def pages(self, base: str, url: str, *, token: str) -> Iterator[bytes]:
        raise RuntimeError("bug in the fetcher")


def test_internal_error_is_500_never_empty_cards(make_service: Any) -> None:
    fhir = "http://127.0.0.1:9/fhir"  # never reached: the fetcher fails first
    server, _, keys = make_service(
        fetcher=ExplodingFetcher(), fhir_servers=[fhir], testing={"allow_http": True}
    )
    body = hook_request("patient-view", "pt-normal", fhir_server=fhir, token="t")
    result = client_for(server, keys).call(VIEW, body)
    assert result.status == 500
    assert result.body["issue"][0]["severity"] == "fatal"
    assert "bug in the fetcher" not in json.dumps(result.body)  # no internals leak


@pytest.fixture
def slow_fhir() -> Iterator[LocalHttp]:
    """A FHIR server that takes 1.5 s to answer anything."""
    server = LocalHttp()
    server.answers["/fhir/Patient/pt-normal"] = Answer(body=b"{}", delay=1.5)
    server.answers["/fhir/Observation"] = Answer(body=b"{}", delay=1.5)
    yield server
    server.stop()


def test_a_slow_fhir_server_is_412_after_the_fetch_timeout(
    make_service: Any, slow_fhir: LocalHttp
) -> None:
    fhir = slow_fhir.url("/fhir")
    server, _, keys = make_service(
        fhir_servers=[fhir], fetch_timeout_seconds=0.3, testing={"allow_http": True}
    )
    started = time.monotonic()
    result = client_for(server, keys).call(
        VIEW, hook_request("patient-view", "pt-normal", fhir_server=fhir, token="t")
    )
    assert result.status == 412
    assert "did not answer in time" in json.dumps(result.body)
    assert time.monotonic() - started < 1.4


def test_a_request_past_its_deadline_is_503(make_service: Any, slow_fhir: LocalHttp) -> None:
    fhir = slow_fhir.url("/fhir")
    server, _, keys = make_service(
        fhir_servers=[fhir], request_timeout_seconds=0.5, testing={"allow_http": True}
    )
    started = time.monotonic()
    result = client_for(server, keys).call(
        VIEW, hook_request("patient-view", "pt-normal", fhir_server=fhir, token="t")
    )
    assert result.status == 503
    assert result.body["issue"][0]["code"] == "timeout"
    assert time.monotonic() - started < 1.4


def test_https_is_required_unless_the_test_flag_is_set(make_service: Any, tmp_path: Any) -> None:
    plain = "http://127.0.0.1:9/fhir"
    with pytest.raises(pydantic.ValidationError, match="must use https"):
        make_service(fhir_servers=[plain])
    toml = tmp_path / "service.toml"
    toml.write_text(
        f'''[service]
public_base_url = "{PUBLIC_BASE}"
[[service.clients]]
iss = "{FILE_ISS}"
jwks_url = "http://127.0.0.1:9/jwks.json"
''',
        encoding="utf-8",
    )
    with pytest.raises(UsageError, match=r"clients\[0\]\.jwks_url: .* must use https"):
        load_settings(toml)
    # At run time an http fhirServer is never configured, so never contacted.
    recorder = LocalHttp()
    try:
        server, _, keys = make_service(fhir_servers=["https://fhir.example.org/r4"])
        body = hook_request(
            "patient-view", "pt-normal", fhir_server=recorder.url("/fhir"), token="t"
        )
        assert client_for(server, keys).call(VIEW, body).status == 412
        assert recorder.hits == []
    finally:
        recorder.stop()
