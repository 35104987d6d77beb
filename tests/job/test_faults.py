"""Fault injection with ``responses``: what real servers do that the test server does not
(429 with Retry-After, 503 storms, timeouts, broken or repeating next links, 401 and token refresh,
4xx with an OperationOutcome). Time is injected: no test sleeps."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests
import responses

from fhir_leuko.core.fhirtime import parse_fhir_datetime
from fhir_leuko.core.knowledge import Knowledge
from fhir_leuko.core.profiles import ProfileSet
from fhir_leuko.errors import AuthError, FhirFatalError, FhirTemporaryError
from fhir_leuko.fhir.auth import BearerTokenAuth, ClientCredentialsAuth, Secret
from fhir_leuko.fhir.client import FhirClient, RetryPolicy
from fhir_leuko.job.state import State
from fhir_leuko.testing.sekmet import SekmetServer

from .conftest import STRICT, anc, at, patient, run_pass, seed

BASE = "https://fhir.test/fhir"


class FakeTime:
    """An injected clock that advances only when the client sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now


@pytest.fixture
def fake() -> FakeTime:
    return FakeTime()


@pytest.fixture
def mock() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock() as rsps:
        yield rsps


def _client(fake: FakeTime, **kwargs: Any) -> FhirClient:
    return FhirClient(
        BASE, sleep=fake.sleep, clock=fake.clock, rng=lambda: 0.0, **kwargs
    )


def _bundle(ids: list[str], next_url: str | None = None, total: int | None = None) -> bytes:
    links = [{"relation": "self", "url": f"{BASE}/Patient"}]
    if next_url:
        links.append({"relation": "next", "url": next_url})
    data: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "link": links,
        "entry": [
            {"fullUrl": f"{BASE}/Patient/{i}", "resource": {"resourceType": "Patient", "id": i}}
            for i in ids
        ],
    }
    if total is not None:
        data["total"] = total
    return orjson.dumps(data)


def _outcome(text: str) -> bytes:
    return orjson.dumps(
        {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": "invalid", "diagnostics": text}],
        }
    )


def test_429_retry_after_seconds_is_honoured(mock: responses.RequestsMock, fake: FakeTime) -> None:
    mock.get(f"{BASE}/Patient", status=429, headers={"Retry-After": "7"})
    mock.get(f"{BASE}/Patient", body=_bundle(["a"]))
    pages = list(_client(fake).search("Patient", {"_id": "a"}))
    assert len(pages) == 1 and fake.sleeps == [7.0]


def test_429_retry_after_http_date_is_measured_on_the_servers_clock(
    mock: responses.RequestsMock, fake: FakeTime
) -> None:
    mock.get(
        f"{BASE}/Patient",
        status=429,
        headers={
            "Date": "Sun, 22 Nov 2026 04:00:00 GMT",
            "Retry-After": "Sun, 22 Nov 2026 04:00:12 GMT",
        },
    )
    mock.get(f"{BASE}/Patient", body=_bundle(["a"]))
    client = _client(fake, wall_clock=lambda: 0.0)  # a wildly wrong local clock does not matter
    assert len(list(client.search("Patient", {}))) == 1
    assert fake.sleeps == [12.0]


def test_a_503_storm_gives_up_after_the_attempts_with_growing_waits(
    mock: responses.RequestsMock, fake: FakeTime
) -> None:
    for _ in range(6):
        mock.get(f"{BASE}/Patient", status=503, body=_outcome("maintenance"))
    with pytest.raises(FhirTemporaryError, match=r"HTTP 503.*maintenance.*gave up after 6 attempts"):
        list(_client(fake).search("Patient", {"name": "x"}))
    assert fake.sleeps == [0.25, 0.5, 1.0, 2.0, 4.0]  # equal jitter at rng=0: half of 2**n * base


def test_the_total_retry_time_is_bounded(mock: responses.RequestsMock, fake: FakeTime) -> None:
    mock.get(f"{BASE}/Patient", status=503, headers={"Retry-After": "600"})
    client = _client(fake, retry=RetryPolicy(max_total=60))
    with pytest.raises(FhirTemporaryError, match="retry budget"):
        list(client.search("Patient", {}))
    assert fake.sleeps == []


def test_502_and_504_are_retried(mock: responses.RequestsMock, fake: FakeTime) -> None:
    mock.get(f"{BASE}/Patient", status=502)
    mock.get(f"{BASE}/Patient", status=504)
    mock.get(f"{BASE}/Patient", body=_bundle(["a"]))
    assert len(list(_client(fake).search("Patient", {}))) == 1
    assert len(fake.sleeps) == 2


def test_timeouts_are_retried(mock: responses.RequestsMock, fake: FakeTime) -> None:
    mock.get(f"{BASE}/Patient", body=requests.exceptions.ReadTimeout("slow"))
    mock.get(f"{BASE}/Patient", body=requests.exceptions.ConnectionError("reset"))
    mock.get(f"{BASE}/Patient", body=_bundle(["a"]))
    assert len(list(_client(fake).search("Patient", {}))) == 1
    assert len(fake.sleeps) == 2


def test_a_plain_post_is_not_retried_after_a_lost_answer(
    mock: responses.RequestsMock, fake: FakeTime
) -> None:
    mock.post(f"{BASE}/DetectedIssue", body=requests.exceptions.ReadTimeout("lost"))
    with pytest.raises(FhirTemporaryError):
        _client(fake).create({"resourceType": "DetectedIssue", "status": "final"})
    assert len(mock.calls) == 1  # it may have been stored: never sent twice


def test_a_conditional_create_is_retried_after_a_lost_answer(
    mock: responses.RequestsMock, fake: FakeTime
) -> None:
    mock.post(f"{BASE}/DetectedIssue", body=requests.exceptions.ReadTimeout("lost"))
    mock.post(
        f"{BASE}/DetectedIssue",
        status=200,
        body=orjson.dumps({"resourceType": "DetectedIssue", "id": "x", "meta": {"versionId": "1"}}),
    )
    result = _client(fake).create(
        {"resourceType": "DetectedIssue", "status": "final"}, if_none_exist="identifier=s|v"
    )
    assert (result.status, result.id, result.version) == (200, "x", "1")
    assert mock.calls[1].request.headers["If-None-Exist"] == "identifier=s|v"


def test_next_links_are_followed_verbatim_and_total_is_never_read(
    mock: responses.RequestsMock, fake: FakeTime
) -> None:
    odd = f"{BASE}/Patient?_getpages=abc&_page=2"  # server-specific paging, not _offset
    mock.get(f"{BASE}/Patient", body=_bundle(["a", "b"], next_url=odd, total=1000))
    mock.get(odd, body=_bundle(["c"]))
    pages = list(_client(fake).search("Patient", {"_count": "2"}))
    assert len(pages) == 2
    assert mock.calls[1].request.url == odd


def test_a_repeated_next_link_is_a_cycle(mock: responses.RequestsMock, fake: FakeTime) -> None:
    page2 = f"{BASE}/Patient?page=2"
    page3 = f"{BASE}/Patient?page=3"
    mock.get(f"{BASE}/Patient", body=_bundle(["a"], next_url=page2))
    mock.get(page2, body=_bundle(["b"], next_url=page3))
    mock.get(page3, body=_bundle(["c"], next_url=page2))
    with pytest.raises(FhirFatalError, match="repeated a next link"):
        list(_client(fake).search("Patient", {}))


def test_a_server_that_ignores_paging_is_caught(
    mock: responses.RequestsMock, fake: FakeTime
) -> None:
    mock.get(f"{BASE}/Patient", body=_bundle(["a", "b"], next_url=f"{BASE}/Patient?o=2"))
    mock.get(f"{BASE}/Patient?o=2", body=_bundle(["a", "b"], next_url=f"{BASE}/Patient?o=4"))
    with pytest.raises(FhirFatalError, match="repeats the previous page"):
        list(_client(fake).search("Patient", {}))


def test_a_broken_next_link_fails_with_the_operation_outcome(
    mock: responses.RequestsMock, fake: FakeTime
) -> None:
    mock.get(f"{BASE}/Patient", body=_bundle(["a"], next_url=f"{BASE}/Patient?cursor=gone"))
    mock.get(f"{BASE}/Patient?cursor=gone", status=410, body=_outcome("search cursor expired"))
    with pytest.raises(FhirFatalError, match=r"HTTP 410.*search cursor expired") as info:
        list(_client(fake).search("Patient", {}))
    assert info.value.url == f"{BASE}/Patient"  # no query string (it may name patients)


def test_a_next_link_to_another_server_is_not_followed(
    mock: responses.RequestsMock, fake: FakeTime
) -> None:
    mock.get(f"{BASE}/Patient", body=_bundle(["a"], next_url="https://evil.test/steal?p=2"))
    with pytest.raises(FhirFatalError, match="another server"):
        list(_client(fake).search("Patient", {}))
    assert len(mock.calls) == 1


def test_4xx_carries_the_operation_outcome_text(
    mock: responses.RequestsMock, fake: FakeTime
) -> None:
    mock.get(
        f"{BASE}/Observation",
        status=400,
        body=_outcome("Unknown search parameter 'foo' for Observation"),
    )
    with pytest.raises(FhirFatalError) as info:
        list(_client(fake).search("Observation", {"foo": "bar"}))
    assert info.value.status == 400
    # The OperationOutcome's codes and its text, scrubbed of what it quotes (issue 9 §5).
    assert "error/invalid: Unknown search parameter … for Observation" in str(info.value)
    assert "foo=bar" not in str(info.value)
    assert fake.sleeps == []


def test_401_refreshes_the_token_once(mock: responses.RequestsMock, fake: FakeTime) -> None:
    tokens = iter(["t1", "t2", "t3"])
    mock.add_callback(
        responses.POST,
        "https://auth.test/token",
        callback=lambda r: (200, {}, orjson.dumps({"access_token": next(tokens), "expires_in": 300})),
    )
    mock.get(f"{BASE}/Patient/a", status=401)
    mock.get(f"{BASE}/Patient/a", body=orjson.dumps({"resourceType": "Patient", "id": "a"}))
    auth = ClientCredentialsAuth("c", Secret(literal="s"), token_url="https://auth.test/token")
    client = _client(fake, auth=auth)
    assert client.read("Patient", "a")["id"] == "a"
    api = [c for c in mock.calls if c.request.url.startswith(BASE)]
    assert [c.request.headers["Authorization"] for c in api] == ["Bearer t1", "Bearer t2"]
    # Two 401s in a row: refused for good, without a third token.
    mock.get(f"{BASE}/Patient/b", status=401, body=_outcome("token revoked"))
    mock.get(f"{BASE}/Patient/b", status=401, body=_outcome("token revoked"))
    with pytest.raises(AuthError, match=r"HTTP 401.*token revoked"):
        client.read("Patient", "b")
    assert auth.tokens_fetched == 3


def test_a_static_token_file_is_read_again_on_401(
    mock: responses.RequestsMock, fake: FakeTime, tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text("old\n")
    seen: list[str] = []

    def answer(request: requests.PreparedRequest) -> tuple[int, dict[str, str], bytes]:
        seen.append(str(request.headers["Authorization"]))
        token.write_text("rotated")
        return (401, {}, b"") if len(seen) == 1 else (200, {}, b'{"resourceType":"Patient"}')

    mock.add_callback(responses.GET, f"{BASE}/Patient/a", callback=answer)
    client = _client(fake, auth=BearerTokenAuth(Secret(file=token)))
    client.read("Patient", "a")
    assert seen == ["Bearer old", "Bearer rotated"]


def test_the_token_endpoint_refusal_is_an_auth_error_without_the_secret(
    mock: responses.RequestsMock, fake: FakeTime
) -> None:
    mock.post(
        "https://auth.test/token",
        status=401,
        json={"error": "invalid_client", "error_description": "bad secret"},
    )
    auth = ClientCredentialsAuth("c", Secret(literal="hunter2"), token_url="https://auth.test/token")
    with pytest.raises(AuthError, match="invalid_client: bad secret") as info:
        _client(fake, auth=auth).read("Patient", "a")
    assert "hunter2" not in str(info.value) and "hunter2" not in repr(auth)


# -- the job: one patient's failure, and an outage -------------------------------------------


def _with_server(mock: responses.RequestsMock, server: SekmetServer) -> None:
    mock.add_passthru(re.compile(re.escape(server.root_url)))


def test_a_patient_whose_data_the_server_refuses_fails_alone(
    server: SekmetServer, state_path: Path, knowledge: Knowledge, profiles: ProfileSet
) -> None:
    base = server.base_url
    seed(
        base,
        *[patient(p) for p in ("f-ok1", "f-bad", "f-ok2")],
        *[anc(f"{p}-anc", p, 0.9, "2026-11-18T08:00:00Z") for p in ("f-ok1", "f-bad", "f-ok2")],
    )
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.add(
            responses.GET,
            re.compile(re.escape(f"{base}/Observation") + r"\?.*f-bad.*"),
            status=422,
            body=_outcome("Patient/f-bad is restricted (break-the-glass required)"),
        )
        _with_server(mock, server)
        report = run_pass(base, state_path, knowledge, profiles, as_of=at("2026-11-20T12:00:00"))
    assert report.actions["create"] == 2 and len(report.failed) == 1
    _alias, reason = report.failed[0]
    assert "HTTP 422" in reason and "break-the-glass" in reason and "f-bad" not in reason
    with State(state_path) as state:
        assert list(state.pending(base)) == ["Patient/f-bad"]
        assert state.watermark(base) is not None


def test_an_outage_stops_the_pass_and_keeps_the_watermark(
    server: SekmetServer, state_path: Path, knowledge: Knowledge, profiles: ProfileSet
) -> None:
    base = server.base_url
    seed(base, *[patient(f"o-{i}") for i in range(4)],
         *[anc(f"o-{i}-anc", f"o-{i}", 0.9, "2026-11-18T08:00:00Z") for i in range(4)])
    run_pass(base, state_path, knowledge, profiles, as_of=at("2026-11-20T12:00:00"))
    with State(state_path) as state:
        before = state.watermark(base)
    seed(base, *[anc(f"o-{i}-anc-2", f"o-{i}", 0.4, "2026-11-19T08:00:00Z") for i in range(4)])
    fake = FakeTime()
    client = FhirClient(base, headers=STRICT, sleep=fake.sleep, clock=fake.clock,
                        retry=RetryPolicy(max_attempts=2))
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.add(responses.GET, re.compile(re.escape(f"{base}/Patient") + r"\?.*"), status=503)
        _with_server(mock, server)
        report = run_pass(
            base, state_path, knowledge, profiles, client=client,
            as_of=at("2026-11-20T13:00:00"), patients_per_request=1,
        )
    assert report.aborted and "unavailable" in report.aborted
    assert report.actions["update"] == 0 and not report.ok
    with State(state_path) as state:
        # Nothing was handled: the watermark stays at or before the first change, and the
        # patients that met the outage are not "pending" failures (the changes stay ahead).
        changed = requests.get(
            f"{base}/Observation", params={"_id": "o-0-anc-2,o-1-anc-2,o-2-anc-2,o-3-anc-2"},
            timeout=30,
        ).json()
        first_change = min(
            parse_fhir_datetime(e["resource"]["meta"]["lastUpdated"]) for e in changed["entry"]
        )
        # Instants compare as instants: "…39Z" and "…39.692Z" are one second apart as text
        # but not in order ("Z" sorts after ".").
        now = parse_fhir_datetime(state.watermark(base))
        start = parse_fhir_datetime(before)
        assert start is not None and now is not None and first_change is not None
        assert start <= now <= first_change
        assert state.pending(base) == {}
        assert state.runs(base)[-1]["status"] == "failed"
    # The server is back: the next pass does the work.
    after = run_pass(base, state_path, knowledge, profiles, as_of=at("2026-11-20T13:00:00"))
    assert after.ok and after.actions["update"] == 4
