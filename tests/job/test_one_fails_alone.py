"""One bad resource or one bad answer fails only itself (issue 9 §2), against the real test server;
``responses`` injects what it does not do (cut-off and truncated pages, a repeating next link, a
page fhir-leuko cannot use), and a real socket server cuts a body mid-way.

Before, each of these stopped the whole pass (for every patient, on every rerun) or ended it with a
traceback.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import responses

from fhir_leuko.cli.run import pass_exit_code
from fhir_leuko.core.knowledge import Knowledge
from fhir_leuko.core.profiles import ProfileSet
from fhir_leuko.errors import ExitCode, FhirTemporaryError
from fhir_leuko.fhir.client import FhirClient, RetryPolicy
from fhir_leuko.job.runner import PassReport
from fhir_leuko.job.state import State
from fhir_leuko.testing.sekmet import SekmetServer

from .conftest import anc, at, issues, patient, run_pass, seed

AS_OF = at("2026-11-20T12:00:00")
WHEN = "2026-11-18T08:00:00Z"
EDGE = "0001-01-01T00:00:00+01:00"  # 0000-12-31T23:00Z: no such instant in UTC


def _written(base: str) -> set[str]:
    return {i["patient"]["reference"].removeprefix("Patient/") for i in issues(base)}


def _pass(server: SekmetServer, state_path: Path, knowledge: Knowledge, profiles: ProfileSet,
          **options: Any) -> PassReport:
    options.setdefault("as_of", AS_OF)
    options.setdefault("mode", "full")
    options.setdefault("transactions", "never")
    return run_pass(server.base_url, state_path, knowledge, profiles, **options)


def _fetch(url: str) -> tuple[int, dict[str, str], bytes]:
    """The real server's answer, fetched past ``responses`` (for callbacks that edit it)."""
    request = urllib.request.Request(url, headers={"Accept": "application/fhir+json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return answer.status, {"Content-Type": "application/fhir+json"}, answer.read()


@pytest.fixture
def mock(server: SekmetServer) -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.add_passthru(re.compile(re.escape(server.root_url)))
        yield rsps


def _group_of(pids: list[str]) -> list[dict[str, Any]]:
    return [*[patient(p) for p in pids], *[anc(f"{p}-anc", p, 0.9, WHEN) for p in pids]]


# -- data the rule core could not use -----------------------------------------------------------


EDGES = ("0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00")


@pytest.mark.parametrize("edge", EDGES)
def test_calendar_edge_dates_on_the_server_fail_nobody(
    server: SekmetServer, state_path: Path, knowledge: Knowledge, profiles: ProfileSet,
    mock: responses.RequestsMock, edge: str,
) -> None:
    """Dates at the edge of the calendar in every date element, and a birthDate in 9999, are input
    problems at most: every patient is evaluated and written, and the pass is exit 1 (input
    problems only). (The test server can store none of them, and its date searches would not find
    them: they are put into its answers.)"""
    base = server.base_url
    pids = ["c-ok", "c-obs", "c-med", "c-report", "c-born"]
    seed(
        base,
        *_group_of(["c-ok", "c-med", "c-report", "c-born"]),
        patient("c-obs"),
        anc("c-obs-anc", "c-obs", 0.9, WHEN),
        anc("c-obs-anc-2", "c-obs", 0.8, "2026-11-17T08:00:00Z"),
        {
            "resourceType": "MedicationStatement", "id": "c-med-ms", "status": "active",
            "medicationCodeableConcept": {"text": "Clozapine 100 MG Oral Tablet"},
            "subject": {"reference": "Patient/c-med"},
            "effectivePeriod": {"start": "2026-01-01", "end": "2026-12-01"},
        },
        {
            "resourceType": "DiagnosticReport", "id": "c-report-dr", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "58410-2"}]},
            "subject": {"reference": "Patient/c-report"}, "effectiveDateTime": WHEN,
            "result": [{"reference": "Observation/c-report-anc"}],
        },
    )
    edits: dict[str, dict[str, Any]] = {
        "c-born": {"birthDate": "9999-12-31"},
        "c-obs-anc": {"effectiveDateTime": edge},
        "c-med-ms": {"effectivePeriod": {"start": edge, "end": edge}},
        "c-report-dr": {"effectiveDateTime": edge},
    }

    def edited(request: requests.PreparedRequest) -> tuple[int, dict[str, str], bytes]:
        status, headers, body = _fetch(str(request.url))
        page = json.loads(body)
        for entry in page.get("entry", []):
            entry["resource"].update(edits.get(entry["resource"].get("id"), {}))
        return status, headers, json.dumps(page).encode()

    for rtype in ("Patient", "Observation", "DiagnosticReport", "MedicationStatement"):
        mock.add_callback(responses.GET, re.compile(re.escape(f"{base}/{rtype}") + r"\?.*"), edited)
    report = _pass(server, state_path, knowledge, profiles)
    assert report.failed == [] and report.aborted is None
    assert report.patients == len(pids)
    assert [(p.resource, p.reason) for p in report.problems] == [
        ("Observation/c-obs-anc", f"invalid effective time {edge!r}"),
        ("Patient/c-born", "birthDate is after one of the patient's lab results: age treated as unknown"),
    ]
    assert _written(base) == set(pids)
    assert pass_exit_code(report) == ExitCode.INPUT_PROBLEMS


class _CrashingKnowledge(Knowledge):
    """Stands in for any bug or input the rule core cannot handle: it raises on one coding."""

    def flag_for(self, system: str | None, code: str | None) -> Any:
        if code == "crash-the-core":
            raise OverflowError("date value out of range")
        return super().flag_for(system, code)


def test_a_resource_the_core_cannot_use_fails_only_its_patient(
    server: SekmetServer, state_path: Path, knowledge: Knowledge, profiles: ProfileSet
) -> None:
    base = server.base_url
    pids = ["k-1", "k-bad", "k-2", "k-3"]
    seed(
        base,
        *_group_of(pids),
        {
            "resourceType": "Condition", "id": "k-bad-cond",
            "code": {"coding": [{"system": "http://example.org/codes", "code": "crash-the-core"}]},
            "subject": {"reference": "Patient/k-bad"},
        },
    )
    crashing = _CrashingKnowledge(**{f: getattr(knowledge, f) for f in knowledge.__dataclass_fields__})
    report = _pass(server, state_path, crashing, profiles)
    assert report.aborted is None
    assert len(report.failed) == 1
    alias, reason = report.failed[0]
    assert alias.startswith("pt-") and "k-bad" not in reason
    assert reason == "its data could not be used (OverflowError: date value out of range)"
    assert _written(base) == {"k-1", "k-2", "k-3"}
    assert pass_exit_code(report) == ExitCode.INCOMPLETE
    with State(state_path) as state:
        assert list(state.pending(base)) == ["Patient/k-bad"]  # retried first by the next pass


# -- answers the client could not use ---------------------------------------------------------


def test_an_unusable_answer_fails_only_its_patient(
    server: SekmetServer, state_path: Path, knowledge: Knowledge, profiles: ProfileSet,
    mock: responses.RequestsMock,
) -> None:
    """A DetectedIssue page whose entries are not what FHIR says (a string for an identifier)."""
    base = server.base_url
    seed(base, *_group_of(["u-1", "u-bad", "u-2"]))
    odd = {
        "resourceType": "Bundle", "type": "searchset",
        "entry": [{"resource": {"resourceType": "DetectedIssue", "id": "x",
                                "patient": {"reference": "Patient/u-bad"}, "identifier": "oops"}}],
    }
    mock.add(responses.GET, re.compile(re.escape(f"{base}/DetectedIssue") + r"\?.*u-bad.*"),
             json=odd)
    report = _pass(server, state_path, knowledge, profiles)
    assert [r for _a, r in report.failed] == [
        "the answer could not be used (AttributeError: 'str' object has no attribute 'get')"
    ]
    assert _written(base) == {"u-1", "u-2"}


def _truncated(body: bytes) -> bytes:
    return body[: len(body) // 2]


def test_a_truncated_page_is_asked_for_again(
    server: SekmetServer, state_path: Path, knowledge: Knowledge, profiles: ProfileSet,
    mock: responses.RequestsMock,
) -> None:
    base = server.base_url
    seed(base, *_group_of(["t-1", "t-2"]))
    calls: list[str] = []

    def once_cut(request: requests.PreparedRequest) -> tuple[int, dict[str, str], bytes]:
        status, headers, body = _fetch(str(request.url))
        calls.append(str(request.url))
        return status, headers, _truncated(body) if len(calls) == 1 else body

    mock.add_callback(responses.GET, re.compile(re.escape(f"{base}/Observation") + r"\?.*"), once_cut)
    report = _pass(server, state_path, knowledge, profiles, patients_per_request=5)
    assert report.ok, report.summary_lines()
    assert _written(base) == {"t-1", "t-2"}
    assert len(calls) >= 2 and calls[0] == calls[1]  # the same page, once more


def test_a_page_truncated_twice_fails_only_its_group(
    server: SekmetServer, state_path: Path, knowledge: Knowledge, profiles: ProfileSet,
    mock: responses.RequestsMock,
) -> None:
    base = server.base_url
    seed(base, *_group_of(["g-1", "g-bad", "g-2"]))

    def always_cut_for_one(request: requests.PreparedRequest) -> tuple[int, dict[str, str], bytes]:
        status, headers, body = _fetch(str(request.url))
        return status, headers, _truncated(body) if "g-bad" in str(request.url) else body

    mock.add_callback(
        responses.GET, re.compile(re.escape(f"{base}/MedicationRequest") + r"\?.*"), always_cut_for_one
    )
    report = _pass(server, state_path, knowledge, profiles)
    assert report.aborted is None
    assert [r for _a, r in report.failed] == [
        "MedicationRequest search: page 1 is not a FHIR Bundle (twice)"
    ]
    assert _written(base) == {"g-1", "g-2"}


def test_a_repeating_next_link_fails_only_its_group(
    server: SekmetServer, state_path: Path, knowledge: Knowledge, profiles: ProfileSet,
    mock: responses.RequestsMock,
) -> None:
    base = server.base_url
    seed(base, *_group_of(["n-1", "n-bad", "n-2"]))
    loop = f"{base}/Condition?page=loop"
    cycle = {"resourceType": "Bundle", "type": "searchset", "entry": [],
             "link": [{"relation": "next", "url": loop}]}
    mock.add(responses.GET, re.compile(re.escape(f"{base}/Condition") + r"\?.*n-bad.*"), json=cycle)
    mock.add(responses.GET, loop, json=cycle)
    report = _pass(server, state_path, knowledge, profiles)
    assert report.aborted is None
    assert [r for _a, r in report.failed] == [
        "Condition search: the server repeated a next link (cycle) at page 2"
    ]
    assert _written(base) == {"n-1", "n-2"}
    assert pass_exit_code(report) == ExitCode.INCOMPLETE


# -- a body cut off mid-way (ChunkedEncodingError) -----------------------------------------------


class _CuttingServer:
    """A real HTTP server on loopback whose first ``cuts`` answers promise more bytes than they
    send and close the connection (the client sees ChunkedEncodingError), then answers whole."""

    def __init__(self, body: bytes, cuts: int) -> None:
        self.body, self.cuts, self.requests = body, cuts, 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/fhir"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                self.requests += 1
                head = (
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\n"
                    b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(self.body)
                )
                cut = self.requests <= self.cuts
                conn.sendall(head + (self.body[: len(self.body) // 3] if cut else self.body))

    def close(self) -> None:
        self.sock.close()


PAGE = json.dumps({"resourceType": "Bundle", "type": "searchset", "entry": [
    {"fullUrl": "x/Patient/a", "resource": {"resourceType": "Patient", "id": "a"}}
] * 50}).encode()


def _client(url: str, attempts: int = 3) -> FhirClient:
    return FhirClient(url, retry=RetryPolicy(max_attempts=attempts, base=0.0), sleep=lambda s: None)


def test_a_body_cut_off_is_retried_like_a_lost_connection() -> None:
    server = _CuttingServer(PAGE, cuts=2)
    try:
        pages = list(_client(server.url).search("Patient", {"_id": "a"}))
    finally:
        server.close()
    assert pages == [PAGE] and server.requests == 3


def test_a_body_cut_off_every_time_is_a_temporary_error_not_a_traceback() -> None:
    server = _CuttingServer(PAGE, cuts=10)
    try:
        with pytest.raises(FhirTemporaryError, match=r"ChunkedEncodingError \(the response was cut off\).*gave up after 2"):
            list(_client(server.url, attempts=2).search("Patient", {}))
    finally:
        server.close()


def test_a_plain_post_cut_off_is_not_sent_twice() -> None:
    server = _CuttingServer(b'{"resourceType": "DetectedIssue", "id": "1"}', cuts=10)
    try:
        with pytest.raises(FhirTemporaryError, match="cut off"):
            _client(server.url).create({"resourceType": "DetectedIssue", "status": "final"})
    finally:
        server.close()
    assert server.requests == 1  # the server got it: resending could duplicate
