"""`fhir-leuko serve`'s address (issue 11 §1, §4): --port is checked like the configuration's
port, a port in use is one clear line and exit 5 before anything claims to be listening, and the
start-up line says where it listens and what clients call."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from fhir_leuko.cli.serve import startup_line
from fhir_leuko.errors import ExitCode
from fhir_leuko.testing.sekmet import free_port

from ..conftest import wait_for_healthz
from .test_spec_examples import EXAMPLES

LOCAL = EXAMPLES / "local.toml"


def _serve(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_LEUKO_")}
    env["FHIR_LEUKO_SERVICE_FEEDBACK_DATABASE"] = str(tmp_path / "feedback.sqlite3")
    return subprocess.run(
        [sys.executable, "-m", "fhir_leuko", "serve", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("port", ["99999", "0", "-1", "http"])
def test_port_out_of_range_is_a_usage_error(tmp_path: Path, port: str) -> None:
    done = _serve(tmp_path, "--config", str(LOCAL), "--port", port)
    assert done.returncode == ExitCode.USAGE
    assert "argument --port:" in done.stderr and "not a port number (1-65535)" in done.stderr
    assert "listening" not in done.stderr


def test_config_port_out_of_range_is_a_usage_error(tmp_path: Path) -> None:
    config = tmp_path / "service.toml"
    config.write_text(LOCAL.read_text(encoding="utf-8").replace("[service]\n", "[service]\nport = 99999\n"))
    done = _serve(tmp_path, "--config", str(config))
    assert done.returncode == ExitCode.USAGE
    assert "port" in done.stderr and "listening" not in done.stderr


def test_port_in_use_is_exit_5_before_anything_listens(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _serve(tmp_path, "--config", str(LOCAL), "--port", str(port))
    assert done.returncode == ExitCode.CANNOT_LISTEN == 5
    assert f"fhir-leuko: error: cannot listen on 127.0.0.1:{port}: Address already in use" in done.stderr
    assert "listening" not in done.stderr and "Uvicorn running" not in done.stderr
    assert "Traceback" not in done.stderr


def test_unknown_host_is_exit_5(tmp_path: Path) -> None:
    done = _serve(tmp_path, "--config", str(LOCAL), "--host", "no-such-host.invalid")
    assert done.returncode == ExitCode.CANNOT_LISTEN
    assert "cannot listen on no-such-host.invalid:8080: unknown host" in done.stderr


def test_startup_line_reads_correctly() -> None:
    assert startup_line("0.0.0.0", 8080, "https://cds.example.org") == (
        "fhir-leuko: CDS Hooks service listening on http://0.0.0.0:8080/cds-services; "
        "clients call https://cds.example.org/cds-services"
    )
    assert startup_line("127.0.0.1", 8080, None) == (
        "fhir-leuko: CDS Hooks service listening on http://127.0.0.1:8080/cds-services "
        "(no JWT checked: local tests only)"
    )


def test_the_listening_line_comes_when_it_listens(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_LEUKO_")}
    env["FHIR_LEUKO_SERVICE_FEEDBACK_DATABASE"] = str(tmp_path / "feedback.sqlite3")
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "fhir_leuko", "serve", "--config", str(LOCAL), "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            deadline = time.monotonic() + 60
            while "listening on" not in log.read_text():
                assert process.poll() is None, log.read_text()
                assert time.monotonic() < deadline
                time.sleep(0.05)
            # Once the line is out, a connection is accepted (queued until the app is up).
            answer = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=30)
            assert answer.status_code == 200
        finally:
            process.terminate()
            # uvicorn shuts down gracefully, then re-raises SIGTERM: the shell sees 143.
            assert process.wait(timeout=30) == -15
    text = log.read_text()
    assert "Application shutdown complete" in text
    assert (
        f"fhir-leuko: CDS Hooks service listening on http://127.0.0.1:{port}/cds-services "
        "(no JWT checked: local tests only)"
    ) in text


def test_log_format_json_is_one_object_per_line(tmp_path: Path) -> None:
    import json

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_LEUKO_")}
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "fhir_leuko", "serve", "--config", str(LOCAL), "--port", str(port),
             "--log-format", "json", "--state-dir", str(tmp_path)],
            stdout=subprocess.DEVNULL, stderr=out, env=env,
        )
        try:
            wait_for_healthz(f"http://127.0.0.1:{port}", process, log=log)
            from .test_spec_examples import read_http

            _, path, body = read_http(EXAMPLES / "patient-view.http")
            assert requests.post(f"http://127.0.0.1:{port}{path}", json=body, timeout=30).status_code == 200
        finally:
            process.terminate()
            process.wait(timeout=30)
    lines = [json.loads(line) for line in log.read_text().splitlines()]  # every line is JSON
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    events = {line.get("event") for line in lines}
    assert "service.listening" in events
    loggers = {line["logger"] for line in lines}
    assert {"fhir_leuko.service", "uvicorn.access", "uvicorn.error"} <= loggers
    assert (tmp_path / "cds-feedback.sqlite3").exists()  # --state-dir
    text = log.read_text()
    assert "pt-cloz-severe" not in text and "Okafor" not in text
