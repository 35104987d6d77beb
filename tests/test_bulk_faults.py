"""Fault injection for the Bulk Data client (``responses``): what the real test server never does.
Status polling (Retry-After, X-Progress, 429/503, a failed export), downloads broken mid-way and
resumed with ``Range``, a wrong count, error files, ``requiresAccessToken``, and a server that
refuses ``_typeFilter``. The happy paths run against the real server in tests/job/test_export.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
import requests
import responses

from fhir_leuko.cli import main
from fhir_leuko.errors import FhirFatalError
from fhir_leuko.fhir.auth import BearerTokenAuth, Secret
from fhir_leuko.fhir.bulk import BulkExport, ExportRequest
from fhir_leuko.fhir.client import FhirClient

BASE = "https://ehr.test/fhir"
STATUS = f"{BASE}/bulk-status/42"
FILE = "https://files.test/obs-1.ndjson"
LINES = [
    orjson.dumps({"resourceType": "Observation", "id": f"o{i}", "status": "final"}) + b"\n"
    for i in range(40)
]
BODY = b"".join(LINES)


def _manifest(**extra: Any) -> dict[str, Any]:
    return {
        "transactionTime": "2026-11-20T12:00:00Z",
        "request": f"{BASE}/$export",
        "requiresAccessToken": False,
        "output": [{"type": "Observation", "url": FILE, "count": len(LINES)}],
        "error": [],
        **extra,
    }


class Recorder:
    def __init__(self) -> None:
        self.sleeps: list[float] = []
        self.status: list[str] = []


def _export(tmp_path: Path, rec: Recorder, **kwargs: Any) -> BulkExport:
    auth = BearerTokenAuth(Secret(literal="tok"))
    client = FhirClient(BASE, auth=auth, sleep=rec.sleeps.append)
    request = kwargs.pop("request", ExportRequest())
    return BulkExport(
        client, tmp_path / "out", request, on_status=rec.status.append, sleep=rec.sleeps.append,
        **kwargs,
    )


def _kickoff(rsps: responses.RequestsMock) -> None:
    rsps.get(f"{BASE}/$export", status=202, headers={"Content-Location": STATUS})
    rsps.delete(STATUS, status=202)


@responses.activate
def test_polling_honours_retry_after_and_shows_progress(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rec = Recorder()
    _kickoff(responses.mock)
    responses.get(STATUS, status=503, headers={"Retry-After": "3"})
    responses.get(STATUS, status=202, headers={"X-Progress": "40% done", "Retry-After": "7"})
    responses.get(STATUS, status=429, headers={"Retry-After": "2"})
    responses.get(STATUS, status=202, headers={"X-Progress": "90% done"})
    responses.get(STATUS, json=_manifest())
    responses.get(FILE, body=BODY)
    result = _export(tmp_path, rec).run()
    assert rec.sleeps == [3.0, 7.0, 2.0, 1.5]  # Retry-After, else 1 s growing
    assert "export in progress: 40% done" in rec.status
    assert "export in progress: 90% done" in rec.status
    assert result.counts() == {"Observation": 40}
    assert (tmp_path / "out" / "Observation.000.ndjson").read_bytes() == BODY
    # The file needs no token (requiresAccessToken false: it may be on another host); the rest do.
    sent = {c.request.url.split("?")[0]: c.request.headers for c in responses.calls}
    assert "Authorization" not in sent[FILE] and sent[STATUS]["Authorization"] == "Bearer tok"
    assert responses.calls[-1].request.method == "DELETE"
    # The near miss of the error files' test: a clean export gives evaluate nothing to name.
    assert _evaluated(tmp_path / "out", capsys) == (0, [])


@responses.activate
def test_a_failed_export_names_the_servers_reason(tmp_path: Path) -> None:
    _kickoff(responses.mock)
    outcome = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "exception", "diagnostics": "disk full"}],
    }
    responses.get(STATUS, status=500, json=outcome)
    with pytest.raises(FhirFatalError, match=r"the server failed the export.*disk full"):
        _export(tmp_path, Recorder()).run()


@responses.activate
def test_a_broken_download_resumes_with_range(tmp_path: Path) -> None:
    rec = Recorder()
    _kickoff(responses.mock)
    responses.get(STATUS, json=_manifest(requiresAccessToken=True))
    half = len(BODY) // 2

    def first(_request: requests.PreparedRequest) -> Any:
        # What is on disk when a connection breaks mid-file (as the streamed writes leave it).
        part = tmp_path / "out" / ".fhir-leuko" / "parts" / "Observation.000.ndjson.part"
        part.write_bytes(BODY[:half])
        raise requests.exceptions.ChunkedEncodingError("connection broken mid-file")

    responses.add_callback(responses.GET, FILE, callback=first)
    responses.get(FILE, status=206, body=BODY[half:])
    result = _export(tmp_path, rec).run()
    assert (tmp_path / "out" / "Observation.000.ndjson").read_bytes() == BODY
    ranges = [c.request.headers.get("Range") for c in responses.calls if c.request.url == FILE]
    assert ranges == [None, f"bytes={half}-"]
    assert result.files[0].lines == 40
    # requiresAccessToken: the token goes with the files too.
    assert all(
        c.request.headers.get("Authorization") == "Bearer tok"
        for c in responses.calls
        if c.request.url == FILE
    )


@responses.activate
def test_a_server_without_range_sends_the_whole_file_again(tmp_path: Path) -> None:
    _kickoff(responses.mock)
    responses.get(STATUS, json=_manifest())
    parts = tmp_path / "out" / ".fhir-leuko" / "parts"
    parts.mkdir(parents=True)
    (parts / "Observation.000.ndjson.part").write_bytes(BODY[:100])
    export = _export(tmp_path, Recorder())
    export.state_dir.mkdir(parents=True, exist_ok=True)
    responses.get(FILE, status=200, body=BODY)  # ignores Range
    export.run()
    assert (tmp_path / "out" / "Observation.000.ndjson").read_bytes() == BODY


@responses.activate
def test_a_short_file_is_downloaded_again_and_error_files_are_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _kickoff(responses.mock)
    errors = "https://files.test/errors-1.ndjson"
    issue = {
        "severity": "error",
        "code": "processing",
        "diagnostics": "could not serialise",
        "expression": ["Observation/o77"],
    }
    responses.get(
        STATUS, json=_manifest(error=[{"type": "OperationOutcome", "url": errors}])
    )
    responses.get(FILE, body=b"".join(LINES[:39]))  # one resource short of the manifest's count
    responses.get(FILE, body=BODY)
    responses.get(
        errors, body=orjson.dumps({"resourceType": "OperationOutcome", "issue": [issue]}) + b"\n"
    )
    result = _export(tmp_path, Recorder()).run()
    assert result.files[0].lines == 40
    assert result.server_errors == ["Observation/o77: error/processing: could not serialise"]
    # Error files are kept out of what evaluate reads (a hidden directory).
    assert (tmp_path / "out" / ".fhir-leuko" / "errors" / "OperationOutcome.000.ndjson").exists()
    # ... but evaluate, long after the export's own report, still names what is missing (exit 1).
    said = _evaluated(tmp_path / "out", capsys)
    assert said == (1, [
        f"problem: {tmp_path / 'out' / '.fhir-leuko' / 'errors'}: the server could not export "
        "it (Observation/o77: error/processing: could not serialise): it is not in the export, so "
        "it is not evaluated",
    ])  # fmt: skip


def _evaluated(directory: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    """``evaluate`` of an export directory: the exit code and the problems it names."""
    capsys.readouterr()
    code = main(["evaluate", str(directory), "--as-of", "2026-11-20T12:00:00Z", "-o", "-"])
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.startswith("problem:")]


@responses.activate
def test_a_server_that_refuses_type_filter_is_asked_again_without_it(tmp_path: Path) -> None:
    refused = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "not-supported", "diagnostics": "_typeFilter"}],
    }
    responses.get(
        f"{BASE}/$export",
        status=400,
        json=refused,
        match=[responses.matchers.query_param_matcher({"_typeFilter": "Observation?code=x"}, strict_match=False)],
    )
    _kickoff(responses.mock)
    responses.get(STATUS, json=_manifest())
    responses.get(FILE, body=BODY)
    result = _export(tmp_path, Recorder(), request=ExportRequest(type_filters=("Observation?code=x",))).run()
    assert any("refused _typeFilter" in n for n in result.notes)
    second = responses.calls[1].request
    assert "_typeFilter" not in (second.url or "") and "_type=Patient" in (second.url or "")
    assert "respond-async" in second.headers["Prefer"]


def test_a_directory_of_another_export_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "out" / ".fhir-leuko"
    state.mkdir(parents=True)
    (state / "export.json").write_bytes(
        orjson.dumps({"server": "https://elsewhere.test/fhir", "request": {}})
    )
    from fhir_leuko.errors import UsageError

    with pytest.raises(UsageError, match="another server or request"):
        _export(tmp_path, Recorder()).run()


@responses.activate
def test_a_download_that_cannot_be_written_is_resumed_not_a_bug(tmp_path: Path) -> None:
    """The disk, not the server: a partial file that cannot be written (here a directory stands
    where it goes, as a full disk refuses a write) ends the export with ExportWriteError (exit 3)
    naming the file; the same export then resumes without a new kick-off."""
    from fhir_leuko.errors import ExitCode, ExportWriteError

    rec = Recorder()
    _kickoff(responses.mock)
    responses.get(STATUS, json=_manifest())
    responses.get(FILE, body=BODY)
    blocked = tmp_path / "out" / ".fhir-leuko" / "parts" / "Observation.000.ndjson.part"
    blocked.mkdir(parents=True)
    with pytest.raises(ExportWriteError) as refused:
        _export(tmp_path, rec).run()
    assert str(blocked) in str(refused.value) and "resume" in str(refused.value)
    assert refused.value.exit_code == ExitCode.INCOMPLETE
    blocked.rmdir()  # room again
    result = _export(tmp_path, rec).run()
    assert (tmp_path / "out" / "Observation.000.ndjson").read_bytes() == BODY
    assert result.files[0].lines == 40
    kick_offs = [c for c in responses.calls if c.request.url.startswith(f"{BASE}/$export")]
    assert len(kick_offs) == 1


def test_an_output_dir_that_is_a_file_is_a_usage_error(tmp_path: Path) -> None:
    from .conftest import fhir_leuko

    taken = tmp_path / "export"
    taken.write_text("not a directory")
    done = fhir_leuko("export", "--server", "http://127.0.0.1:9/fhir", "--output-dir", str(taken))
    assert done.returncode == 2 and f"--output-dir {taken}: not a directory" in done.stderr
