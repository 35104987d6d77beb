"""`fhir-leuko serve`: the real command in a child process, on a free loopback port."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from fhir_leuko.testing.sekmet import free_port

from .harness import prefetch
from .invariants import check_response
from .test_spec_examples import EXAMPLES, read_http


def test_serve_runs_the_service(tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "FHIR_LEUKO_SERVICE_FEEDBACK_DATABASE": str(tmp_path / "feedback.sqlite3"),
        "PYTHONUNBUFFERED": "1",
    }
    log = (tmp_path / "serve.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fhir_leuko",
            "serve",
            "--config",
            str(EXAMPLES / "local.toml"),
            "--port",
            str(port),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                discovery = requests.get(f"{base}/cds-services", timeout=2)
                break
            except requests.ConnectionError:
                assert process.poll() is None, (tmp_path / "serve.log").read_text()
                assert time.monotonic() < deadline, "fhir-leuko serve did not start"
                time.sleep(0.1)
        assert discovery.status_code == 200
        check_response("/cds-services", 200, discovery.json())
        assert "server" not in discovery.headers  # no server banner
        _, path, body = read_http(EXAMPLES / "patient-view.http")
        answer = requests.post(f"{base}{path}", json=body, timeout=30).json()
        check_response(path, 200, answer)
        assert answer["cards"][0]["indicator"] == "critical"
        body["prefetch"] = prefetch("normal")
        body["context"]["patientId"] = "pt-normal"
        answer = requests.post(f"{base}{path}", json=body, timeout=30).json()
        check_response(path, 200, answer)
        assert answer == {"cards": []}
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()
    output = (tmp_path / "serve.log").read_text()
    assert "CDS Hooks service listening on" in output
    assert "leuko-patient-view hookInstance=" in output  # one log line per call
    assert json.dumps(body["hookInstance"]).strip('"') in output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "public_base_url is required"),
        (["--config", "/no/such/file.toml"], "cannot read"),
    ],
)
def test_serve_configuration_errors_exit_2(args: list[str], message: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_LEUKO_SERVICE_")}
    done = subprocess.run(
        [sys.executable, "-m", "fhir_leuko", "serve", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    assert message in done.stderr


def test_the_core_and_the_cli_work_without_the_service_extra() -> None:
    """Nothing outside fhir_leuko.service imports FastAPI, uvicorn or PyJWT's service use."""
    code = """
import sys
for name in ("fastapi", "uvicorn", "starlette"):
    sys.modules[name] = None  # as if the service extra were not installed
import fhir_leuko
from fhir_leuko.cli import main
assert main(["profiles", "list"]) == 0
assert main(["serve"]) == 2
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "needs the service extra" in done.stderr
    assert "pip install 'fhir-leuko[service]'" in done.stderr
