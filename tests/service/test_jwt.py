"""Client authentication: the JWT of CDS Hooks 2.0 §Trusting CDS Clients. Every failure is a 401
that says nothing about why (the same body each time)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fhir_leuko.service.security import JwksCache, keys_from_jwks

from .conftest import FILE_ISS, TENANT_ISS, ServiceEnv
from .harness import CdsClient, ClientKeys, LocalHttp, hook_request, prefetch

PATH = "/cds-services/leuko-patient-view"
_BODY: dict[str, Any] = {}


def call(client: CdsClient, **token_args: Any) -> int:
    if not _BODY:
        _BODY.update(hook_request("patient-view", "pt-normal", prefetch=prefetch("normal")))
    result = client.call("leuko-patient-view", _BODY, **token_args)
    if result.status == 401:
        assert result.body == {
            "resourceType": "OperationOutcome",
            "issue": [
                {
                    "severity": "error",
                    "code": "login",
                    "details": {"text": "Authentication required"},
                }
            ],
        }
        assert result.headers["WWW-Authenticate"] == "Bearer"
    return result.status


def test_valid_tokens_are_accepted(env: ServiceEnv, ehr: CdsClient) -> None:
    now = env.clock().timestamp()
    assert call(ehr) == 200  # ES384, keys from the client's jwks_url
    assert call(ehr, alg="RS384") == 200
    assert call(ehr, jku=env.jwks_http.url("/jwks.json")) == 200  # its registered jku
    assert call(ehr, aud=["https://other.example.org", f"https://cds.example.org{PATH}"]) == 200
    assert call(ehr, exp=now - 30) == 200  # within the 60 s leeway
    assert call(ehr, iat=now + 30) == 200
    assert call(env.client(env.file_keys, FILE_ISS)) == 200  # keys from a JWKS file
    tenant = env.client(env.tenant_keys, TENANT_ISS)
    assert call(tenant, claims={"tenant": "tenant-a"}) == 200


@pytest.mark.parametrize(
    "spoil",
    [
        pytest.param({"alg": "none"}, id="alg-none"),
        pytest.param({"alg": "HS256"}, id="alg-HS256"),
        pytest.param(
            {"aud": "https://cds.example.org/cds-services/leuko-order-sign"}, id="wrong-aud"
        ),
        pytest.param({"aud": "HOST"}, id="aud-from-host-header"),
        pytest.param({"aud": None}, id="no-aud"),
        pytest.param({"exp": "PAST"}, id="expired"),
        pytest.param({"exp": None}, id="no-exp"),
        pytest.param({"iat": "FUTURE"}, id="iat-in-future"),
        pytest.param({"iat": None}, id="no-iat"),
        pytest.param({"exp": "LONG"}, id="lifetime-over-1h"),
        pytest.param({"jti": None}, id="no-jti"),
        pytest.param({"kid": "no-such-kid"}, id="unknown-kid"),
        pytest.param({"kid": None}, id="no-kid"),
        pytest.param({"typ": "at+jwt"}, id="typ-not-JWT"),
        pytest.param({"typ": None}, id="no-typ"),
        pytest.param({"jku": "UNREGISTERED"}, id="unregistered-jku"),
        pytest.param({"iss": "https://unknown.example.org"}, id="unknown-iss"),
        pytest.param({"iss": None}, id="no-iss"),
        pytest.param({"keys": "OTHER"}, id="signed-by-another-key"),
        pytest.param({"alg": "RS384", "kid": "ehr-es384"}, id="alg-does-not-match-key"),
    ],
)
def test_bad_tokens_are_401(env: ServiceEnv, ehr: CdsClient, spoil: dict[str, Any]) -> None:
    now = env.clock().timestamp()
    values = {
        "HOST": f"{env.server.url}{PATH}",
        "PAST": now - 61,
        "FUTURE": now + 90,
        "LONG": now + 3700,
        "UNREGISTERED": env.jwks_http.url("/unregistered-jwks.json"),
        "OTHER": ClientKeys("ehr"),  # same kid names, different keys
    }
    args = {k: values.get(v, v) if isinstance(v, str) else v for k, v in spoil.items()}
    assert call(ehr, **args) == 401
    assert env.jwks_http.hits == [] or all(
        "unregistered" not in hit.path for hit in env.jwks_http.hits
    ), "an unregistered jku is never fetched"


def test_replayed_jti_is_401(ehr: CdsClient) -> None:
    token = ehr.token(PATH)
    assert call(ehr, token=token) == 200
    assert call(ehr, token=token) == 401


def test_missing_or_malformed_authorization_is_401(ehr: CdsClient) -> None:
    assert call(ehr, token=None) == 401
    assert call(ehr, token="not.a.jwt") == 401
    result = ehr.call(
        "leuko-patient-view", _BODY, token=None, headers={"Authorization": "Basic dTpw"}
    )
    assert result.status == 401


def test_tenant_must_be_allowed(env: ServiceEnv) -> None:
    tenant = env.client(env.tenant_keys, TENANT_ISS)
    assert call(tenant) == 401
    assert call(tenant, claims={"tenant": "tenant-b"}) == 401


def test_each_endpoint_checks_its_own_audience(ehr: CdsClient) -> None:
    feedback_token = ehr.token(f"{PATH}/feedback")
    assert call(ehr, token=feedback_token) == 401
    discovery_token = ehr.token("/cds-services")
    assert call(ehr, token=discovery_token) == 401


def test_rotated_keys_are_fetched_again(env: ServiceEnv, ehr: CdsClient) -> None:
    rotated = ClientKeys("ehr-2026")
    old = env.keys.jwks()
    env.jwks_http.serve_json("/jwks.json", {"keys": old["keys"] + rotated.jwks()["keys"]})
    try:
        assert call(ehr, keys=rotated) == 200
        assert call(ehr, keys=rotated, alg="RS384") == 200
    finally:
        env.jwks_http.serve_json("/jwks.json", old)


def test_jwks_refetch_is_rate_limited() -> None:
    keys = ClientKeys("k")
    http = LocalHttp()
    http.serve_json("/jwks.json", keys.jwks())
    now = [1000.0]
    cache = JwksCache(cache_seconds=300, refetch_seconds=30, monotonic=lambda: now[0])
    try:
        url = http.url("/jwks.json")
        assert cache.key(url, "k-es384") is not None
        assert cache.key(url, "unknown") is None
        assert cache.key(url, "unknown") is None
        assert len(http.hits) == 1  # unknown kids within 30 s do not refetch
        now[0] += 31
        assert cache.key(url, "unknown") is None
        assert len(http.hits) == 2
        http.serve_json("/jwks.json", {"keys": []}, status=500)
        now[0] += 400  # stale, and the endpoint fails: the old keys are kept
        assert cache.key(url, "k-es384") is not None
        assert len(http.hits) == 3
    finally:
        http.stop()


def test_symmetric_and_weak_keys_in_a_jwks_are_ignored(tmp_path: Any) -> None:
    keys = ClientKeys("x")
    jwks = keys.jwks()
    jwks["keys"].append({"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"})
    jwks["keys"].append({**jwks["keys"][0], "kid": "enc", "use": "enc"})
    found = keys_from_jwks(json.loads(json.dumps(jwks)))
    assert set(found) == {"x-es384", "x-rs384"}
    assert {k.alg for k in found.values()} == {"ES384", "RS384"}
