"""What reaches the logs of a faulted run (issue 9 §5): every log line of ``fhir-leuko run`` and of
``fhir-leuko serve``, at every verbosity and in both log formats, is searched for the secrets a
fault could carry into it: the bearer token, the CDS client's JWT and its FHIR access token, patient
ids, names, birth dates and lab values.

The faults come from a real HTTP proxy in front of the real test server: every first request of a
path is a 503 (the client logs its retries) whose OperationOutcome quotes a name, a birth date, a
patient id and a lab value, and every write is a 422 whose OperationOutcome quotes the DetectedIssue
that was sent (as HAPI does). Both commands still name what failed: by codes, a scrubbed text and
patient pseudonyms.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from fhir_leuko.testing.sekmet import SekmetServer, free_port

from ..service.harness import CdsClient, ClientKeys, hook_request
from .conftest import anc, seed, wbc

# Lab values of four decimals: a log line's time has three ("11:03:11.234+00:00" holds "1.234"),
# so a value of three was found "leaked" by the clock one run in a few dozen.
PATIENTS = {
    "lk-7f3q9z": ("Quentin", "Zyxwvut", "1961-07-13", 0.4371),
    "lk-8w2m4x": ("Philippa", "Qwertyuiop", "1958-03-29", 1.2347),
}
TOKEN = "tok-SECRET-5d41402abc"  # the job's bearer token
FHIR_TOKEN = "fhir-SECRET-7c6a180b36"  # the CDS client's fhirAuthorization access token
AS_OF = "2026-11-20T12:00:00Z"


def _secrets() -> list[str]:
    out = [TOKEN, FHIR_TOKEN]
    for pid, (given, family, born, value) in PATIENTS.items():
        out += [pid, given, family, born, str(value)]
    return out


def _quote_everything() -> str:
    """What a careless server's diagnostics say: every kind of patient data there is."""
    return "; ".join(
        f"Patient/{pid} {given} {family} born {born} has ANC {value} x10*9/L ({pid})"
        for pid, (given, family, born, value) in PATIENTS.items()
    )


class FaultyFhir:
    """A loopback proxy in front of the test server that fails as described above."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.seen: set[tuple[str, str]] = set()
        self.hits: list[tuple[str, int]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                proxy.answer(self)

            do_POST = do_PUT = do_DELETE = do_GET

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/fhir"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def answer(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        path = handler.path.split("?", 1)[0]
        first = (handler.command, path) not in self.seen
        self.seen.add((handler.command, path))
        if first:
            status, headers, data = 503, {"Retry-After": "0"}, _outcome("transient", _quote_everything())
        elif handler.command in ("POST", "PUT"):
            # As HAPI does: the rejected resource quoted back in the diagnostics.
            quoted = body.decode("utf-8", "replace")[:2000]
            status, headers, data = 422, {}, _outcome("processing", f"{_quote_everything()} {quoted}")
        else:
            status, headers, data = self._forward(handler, body)
        self.hits.append((f"{handler.command} {path}", status))
        handler.send_response(status)
        for name, value in {"Content-Type": "application/fhir+json", **headers}.items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def _forward(self, handler: BaseHTTPRequestHandler, body: bytes) -> tuple[int, dict[str, str], bytes]:
        url = self.upstream + handler.path.removeprefix("/fhir")
        request = urllib.request.Request(
            url, data=body or None, method=handler.command,
            headers={"Accept": "application/fhir+json", "Content-Type": "application/fhir+json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:  # loopback only
                status, data = answer.status, answer.read()
        except urllib.error.HTTPError as exc:
            status, data = exc.code, exc.read()
        return status, {}, data.replace(self.upstream.encode(), self.base_url.encode())

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _outcome(code: str, text: str) -> bytes:
    issue = {"severity": "error", "code": code, "diagnostics": text}
    return json.dumps({"resourceType": "OperationOutcome", "issue": [issue]}).encode()


@pytest.fixture
def faulty(server: SekmetServer) -> Iterator[FaultyFhir]:
    resources: list[dict[str, Any]] = []
    for pid, (given, family, born, value) in PATIENTS.items():
        resources.append(
            {"resourceType": "Patient", "id": pid, "birthDate": born,
             "name": [{"given": [given], "family": family}]}
        )
        resources.append(anc(f"obs-{len(resources)}", pid, value, "2026-11-18T08:00:00Z"))
        resources.append(wbc(f"obs-{len(resources)}", pid, value + 1, "2026-11-18T08:00:00Z"))
    seed(server.base_url, *resources)
    proxy = FaultyFhir(server.base_url)
    try:
        yield proxy
    finally:
        proxy.close()


def _leaks(text: str) -> list[str]:
    return [s for s in _secrets() if s in text]


VERBOSITY = [[], ["-v"], ["-vv"]]


@pytest.mark.parametrize("log_format", ["text", "json"])
@pytest.mark.parametrize("verbose", VERBOSITY, ids=["quiet", "v", "vv"])
def test_a_faulted_job_run_logs_no_secret_and_no_patient_data(
    faulty: FaultyFhir, tmp_path: Path, verbose: list[str], log_format: str
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN, encoding="utf-8")
    done = subprocess.run(
        [
            sys.executable, "-m", "fhir_leuko", *verbose, "run", "--server", faulty.base_url,
            "--auth", "bearer", "--token-file", str(token_file), "--state",
            str(tmp_path / "state.sqlite3"), "--as-of", AS_OF, "--no-progress",
            "--log-format", log_format, "--full",
        ],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "FHIR_LEUKO_FHIR_RETRY_ATTEMPTS": "3"},
    )
    logs = done.stderr
    assert done.returncode == 3, logs  # the writes failed: patients failed, the pass went on
    # The faults did reach the logs, as codes, scrubbed texts and pseudonyms ...
    assert "HTTP 422" in logs and "error/processing" in logs
    assert "retry 1" in logs and "pt-" in logs
    # ... and nothing they quoted did.
    assert _leaks(logs) == [], logs


def _service_config(tmp_path: Path, fhir: str, keys: ClientKeys, port: int) -> Path:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(keys.jwks()), encoding="utf-8")
    config = tmp_path / "service.toml"
    config.write_text(
        f"""
[service]
public_base_url = "https://cds.test"
port = {port}
feedback_database = "{tmp_path / 'feedback.sqlite3'}"

[[service.clients]]
iss = "https://ehr.test"
jwks_file = "{jwks}"
fhir_servers = ["{fhir}"]

[service.testing]
allow_http = true
as_of = "{AS_OF}"
""",
        encoding="utf-8",
    )
    return config


@pytest.mark.parametrize("verbose", VERBOSITY, ids=["quiet", "v", "vv"])
def test_a_faulted_service_logs_no_secret_and_no_patient_data(
    faulty: FaultyFhir, tmp_path: Path, verbose: list[str]
) -> None:
    keys, port = ClientKeys("leak"), free_port()
    config = _service_config(tmp_path, faulty.base_url, keys, port)
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "fhir_leuko", *verbose, "serve", "--config", str(config)],
            stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                requests.get(f"http://127.0.0.1:{port}/cds-services", timeout=2)
                break
            except requests.ConnectionError:
                assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.1)
        ehr = CdsClient(
            f"http://127.0.0.1:{port}", "https://cds.test", keys, "https://ehr.test",
            lambda: datetime.fromisoformat(AS_OF),  # the service's clock is the testing as_of
        )
        jwts: list[str] = []
        for pid in PATIENTS:
            jwt = ehr.token("/cds-services/leuko-patient-view")
            jwts.append(jwt)
            answered = ehr.call(
                "leuko-patient-view",
                hook_request("patient-view", pid, fhir_server=faulty.base_url, token=FHIR_TOKEN),
                token=jwt,
            )
            assert answered.status in (200, 412), answered.body
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
    logs = log_path.read_text(encoding="utf-8")
    assert any(path.startswith("GET /fhir/Patient/") for path, _s in faulty.hits), faulty.hits
    assert "pt-" in logs and "HTTP 503" in logs  # the retried reads were logged, by pseudonym
    assert _leaks(logs) == [], logs
    assert [j for j in jwts if j in logs or j.split(".")[2] in logs] == []
