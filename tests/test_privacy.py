"""The one log-scrubbing mechanism of the job and the service (issue 9 §5, fhir_leuko.fhir.privacy):
a server's error text keeps its shape and loses what it quotes; every log record names patients by
pseudonyms, whoever logs it (urllib3 and uvicorn too), in its message, traceback and JSON fields."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from uvicorn.config import LOGGING_CONFIG
from uvicorn.logging import AccessFormatter

from fhir_leuko.fhir.client import operation_outcome_text
from fhir_leuko.fhir.privacy import (
    LogScrubber,
    install_log_scrubbing,
    patients_in_scope,
    pseudonym,
    scrub_patients,
    scrub_server_text,
    uvicorn_log_config,
)

SERVER = "https://ehr.example.org/fhir"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (  # HAPI: the shape stays, the quoted names go
            'HAPI-0450: Failed to parse request body as JSON resource. Error was: Incorrect resource '
            'type found, expected "DetectedIssue" but found "Observation"',
            "HAPI-0450: Failed to parse request body as JSON resource. Error was: Incorrect resource "
            "type found, expected … but found …",
        ),
        (  # a server quoting what it holds: id, name, birth date, value
            "Patient/p-1 Quentin Zyxwvut born 1961-07-13 has ANC 0.437 ×10⁹/L: DetectedIssue.detail rejected",
            "Patient/… born … has …: DetectedIssue.detail rejected",
        ),
        (  # the DetectedIssue it was sent, as JSON
            'Unprocessable: {"resourceType": "DetectedIssue", "detail": "Severe neutropenia: ANC 0.2"}',
            "Unprocessable: …",
        ),
        ("SMITH, JOHN (DOB 13.07.1961) see https://ehr.example.org/fhir/Patient/9?x=1", "…, … (…) see …"),
        ("Resource Patient/abc-123 is restricted (break-the-glass required)",
         "Resource Patient/… is restricted (break-the-glass required)"),
        ("maintenance", "maintenance"),
    ],
)
def test_server_text_keeps_its_shape_and_loses_what_it_quotes(text: str, expected: str) -> None:
    assert scrub_server_text(text) == expected


def test_operation_outcome_text_is_codes_and_a_scrubbed_text() -> None:
    body = json.dumps(
        {
            "resourceType": "OperationOutcome",
            "issue": [
                {"severity": "error", "code": "processing",
                 "diagnostics": "DetectedIssue.detail 'ANC 0.437 for Quentin Zyxwvut' too long"},
                {"severity": "warning", "code": "informational",
                 "details": {"text": "Patient Quentin Zyxwvut, born 1961-07-13"}},
            ],
        }
    ).encode()
    assert operation_outcome_text(body) == (
        "error/processing: DetectedIssue.detail … too long; "
        "warning/informational: Patient …, born …"
    )


def test_patients_become_pseudonyms_in_references_urls_and_in_scope() -> None:
    alias = pseudonym(SERVER, "Patient/abc123")
    assert scrub_patients("GET /fhir/Patient/abc123/_history/2: HTTP 503", SERVER) == (
        f"GET /fhir/Patient/{alias}/_history/2: HTTP 503"
    )
    # query strings name patients: they go, whatever they hold
    assert scrub_patients(f"GET {SERVER}/Observation?patient=xyz&code=1: 404", SERVER) == (
        f"GET {SERVER}/Observation?…: 404"
    )
    assert scrub_patients("patient abc123 failed", SERVER) == "patient abc123 failed"  # near miss
    with patients_in_scope(SERVER, ["abc123"]):
        assert scrub_patients("patient abc123 failed; abc1234 is another") == (
            f"patient {alias} failed; abc1234 is another"
        )
    once = scrub_patients("Patient/abc123", SERVER)
    assert scrub_patients(once, SERVER) == once  # scrubbed twice, named the same way


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    install_log_scrubbing()
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def test_every_logger_message_and_traceback_is_scrubbed(captured: io.StringIO) -> None:
    with patients_in_scope(SERVER, ["Patient/abc123"]):
        logging.getLogger("anything.at.all").warning("read %s failed", "Patient/abc123")
        try:
            raise KeyError("abc123")
        except KeyError:
            logging.getLogger("fhir_leuko.service").exception("internal error")
    logging.getLogger("urllib3.connectionpool").debug('"GET /fhir/Patient/abc123?x=1 HTTP/1.1" 200')
    text = captured.getvalue()
    assert "abc123" not in text
    assert f"read Patient/{pseudonym(SERVER, 'Patient/abc123')} failed" in text
    assert "KeyError" in text  # the traceback is still there, scrubbed
    assert "urllib3" not in text  # its request lines are silenced


def test_json_fields_are_scrubbed() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "pass finished", None, None)
    record.fields = {"aborted": "GET /fhir/Patient/abc123: HTTP 503", "written": 3}
    LogScrubber().filter(record)
    assert record.fields == {
        "aborted": f"GET /fhir/Patient/{pseudonym('', 'Patient/abc123')}: HTTP 503",
        "written": 3,
    }


def test_uvicorn_handlers_get_the_scrubber_and_access_lines_still_format() -> None:
    config = uvicorn_log_config(LOGGING_CONFIG)
    assert all("scrub" in h["filters"] for h in config["handlers"].values())
    assert "filters" not in LOGGING_CONFIG["handlers"]["default"]  # the original is untouched
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5", "GET", "/fhir/Patient/abc123", "1.1", 200), None,
    )
    LogScrubber().filter(record)
    line = AccessFormatter("%(client_addr)s %(request_line)s %(status_code)s").format(record)
    assert "abc123" not in line and "GET /fhir/Patient/pt-" in line
