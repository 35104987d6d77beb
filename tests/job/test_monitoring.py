"""The job where monitoring can read it (issue 11 §2): a Prometheus textfile for node_exporter
(written atomically), a Pushgateway push, and /metrics of `watch --metrics-listen`; one XDG state
directory (--state-dir / FHIR_LEUKO_STATE_DIR) shared with the service; `fhir-leuko state`."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests
from prometheus_client.parser import text_string_to_metric_families

from fhir_leuko.job.patients import pseudonym
from fhir_leuko.job.state import State
from fhir_leuko.testing.sekmet import SekmetServer, free_port

from .conftest import anc, cli, patient, seed, wbc

AS_OF = "2026-11-20"


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _value(samples: dict[Any, float], name: str, **labels: str) -> float:
    for (sample, found), value in samples.items():
        if sample == name and all((k, v) in found for k, v in labels.items()):
            return value
    raise KeyError((name, labels))


def _seed_two(server: SekmetServer) -> None:
    seed(
        server.base_url,
        patient("p1"),
        patient("p2"),
        anc("o1", "p1", 0.4, "2026-11-18T08:00:00Z"),
        wbc("o2", "p2", 2.1, "2026-11-18T08:00:00Z"),
    )


def test_textfile_after_a_pass(server: SekmetServer, tmp_path: Path) -> None:
    _seed_two(server)
    textfile = tmp_path / "textfile" / "fhir-leuko.prom"
    done = cli(
        "run", "--server", server.base_url, "--as-of", AS_OF, "--state-dir", str(tmp_path / "state"),
        "--metrics-textfile", str(textfile), "--no-progress",
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "state" / "state.sqlite3").exists()
    assert sorted(p.name for p in textfile.parent.iterdir()) == ["fhir-leuko.prom"]  # no temp file left
    samples = _samples(textfile.read_text())
    server_label = server.base_url
    assert _value(samples, "fhir_leuko_job_last_pass_status", server=server_label, status="ok") == 1
    assert _value(samples, "fhir_leuko_job_last_pass_status", server=server_label, status="failed") == 0
    assert _value(samples, "fhir_leuko_job_last_pass_exit_code", server=server_label) == 0
    assert _value(samples, "fhir_leuko_job_last_pass_findings", kind="neutropenia", severity="high") == 1
    assert _value(samples, "fhir_leuko_job_last_pass_findings", kind="leukopenia") == 1
    assert _value(samples, "fhir_leuko_job_last_pass_detectedissues", action="written") == 2
    assert _value(samples, "fhir_leuko_job_last_pass_detectedissues", action="updated") == 0
    assert _value(samples, "fhir_leuko_job_last_pass_patients_failed") == 0
    assert _value(samples, "fhir_leuko_job_last_pass_http_requests") > 0
    duration = _value(samples, "fhir_leuko_job_last_pass_duration_seconds")
    start = _value(samples, "fhir_leuko_job_last_pass_start_timestamp_seconds")
    assert 0 < duration < 120 and abs(start - time.time()) < 300
    success = _value(samples, "fhir_leuko_job_last_success_timestamp_seconds")
    assert success == _value(samples, "fhir_leuko_job_last_pass_end_timestamp_seconds")
    assert _value(samples, "fhir_leuko_build_info") == 1
    # No patient data in the metrics.
    assert "p1" not in textfile.read_text().replace(server.base_url, "")

    # The server gone: the next pass fails; the textfile says so and keeps the last success.
    dead = f"http://127.0.0.1:{free_port()}/fhir"
    failed = cli(
        "run", "--server", dead, "--as-of", AS_OF, "--state-dir", str(tmp_path / "state"),
        "--metrics-textfile", str(textfile), "--no-progress", env={"FHIR_LEUKO_FHIR_RETRY_TOTAL": "1", "FHIR_LEUKO_FHIR_RETRY_ATTEMPTS": "1"},
    )
    assert failed.returncode == 3, failed.stderr
    samples = _samples(textfile.read_text())
    assert _value(samples, "fhir_leuko_job_last_pass_status", server=dead, status="error") == 1
    assert _value(samples, "fhir_leuko_job_last_pass_exit_code", server=dead) == 3


def test_textfile_must_be_prom(server: SekmetServer, tmp_path: Path) -> None:
    done = cli("run", "--server", server.base_url, "--state-dir", str(tmp_path), "--metrics-textfile", str(tmp_path / "x.txt"))
    assert done.returncode == 2
    assert "reads only *.prom files" in done.stderr


class _Recorder(ThreadingHTTPServer):
    def __init__(self) -> None:
        self.pushes: list[tuple[str, str, bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                outer.pushes.append(("PUT", self.path, body))
                self.send_response(200)
                self.end_headers()

            do_POST = do_PUT

            def log_message(self, format: str, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def test_pushgateway(server: SekmetServer, tmp_path: Path) -> None:
    _seed_two(server)
    gateway = _Recorder()
    try:
        done = cli(
            "run", "--server", server.base_url, "--as-of", AS_OF, "--state-dir", str(tmp_path),
            "--metrics-pushgateway", f"http://127.0.0.1:{gateway.server_address[1]}", "--no-progress",
        )
        assert done.returncode == 0, done.stderr
        ((method, path, body),) = gateway.pushes
        assert method == "PUT"
        assert path.startswith("/metrics/job/fhir-leuko/server@base64/")
        samples = _samples(body.decode())
        assert _value(samples, "fhir_leuko_job_last_pass_detectedissues", action="written") == 2
    finally:
        gateway.shutdown()
        gateway.server_close()


def test_pushgateway_down_is_a_warning_not_a_failure(server: SekmetServer, tmp_path: Path) -> None:
    done = cli(
        "run", "--server", server.base_url, "--as-of", AS_OF, "--state-dir", str(tmp_path),
        "--metrics-pushgateway", f"http://127.0.0.1:{free_port()}", "--no-progress",
    )
    assert done.returncode == 0, done.stderr
    assert "could not export the pass's metrics" in done.stderr


def test_watch_serves_metrics(server: SekmetServer, tmp_path: Path) -> None:
    _seed_two(server)
    port = free_port()
    log = tmp_path / "watch.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "fhir_leuko", "watch", "--server", server.base_url, "--as-of", AS_OF,
             "--every", "1h", "--state-dir", str(tmp_path), "--metrics-listen", f"127.0.0.1:{port}", "--no-progress"],
            stdout=out, stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 90
            while True:
                try:
                    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
                    if "fhir_leuko_job_passes_total{" in text:
                        break
                except requests.ConnectionError:
                    pass
                assert process.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
            samples = _samples(text)
            assert _value(samples, "fhir_leuko_job_passes_total", status="ok") == 1
            assert _value(samples, "fhir_leuko_job_last_pass_detectedissues", action="written") == 2
        finally:
            process.terminate()
            assert process.wait(timeout=60) == 0
    assert "metrics at http://127.0.0.1:" in log.read_text()


def test_watch_metrics_port_in_use_is_a_usage_error(server: SekmetServer, tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = cli("watch", "--server", server.base_url, "--every", "1h", "--max-passes", "1",
                   "--state-dir", str(tmp_path), "--metrics-listen", str(port))
    assert done.returncode == 2
    assert f"--metrics-listen 127.0.0.1:{port}: cannot listen" in done.stderr


# -- one state directory ----------------------------------------------------------------------


def test_state_dir_from_the_environment_is_shared_with_the_service(server: SekmetServer, tmp_path: Path) -> None:
    env = {"FHIR_LEUKO_STATE_DIR": str(tmp_path / "shared")}
    done = cli("run", "--server", server.base_url, "--as-of", AS_OF, "--no-progress", env=env)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "shared" / "state.sqlite3").exists()
    from fhir_leuko.service.settings import load_settings

    old = os.environ.get("FHIR_LEUKO_STATE_DIR")
    os.environ["FHIR_LEUKO_STATE_DIR"] = str(tmp_path / "shared")
    try:
        settings = load_settings(None, testing={"disable_jwt": True})
    finally:
        if old is None:
            del os.environ["FHIR_LEUKO_STATE_DIR"]
        else:
            os.environ["FHIR_LEUKO_STATE_DIR"] = old
    assert settings.feedback_database == tmp_path / "shared" / "cds-feedback.sqlite3"


def test_xdg_default_and_the_old_place(server: SekmetServer, tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_LEUKO_")}
    env.update(HOME=str(home), XDG_STATE_HOME=str(home / ".local" / "state"), XDG_DATA_HOME=str(home / ".local" / "share"))
    # fhir-leuko 0.1.0 kept the state in the data directory: it is used, with a warning.
    old = home / ".local" / "share" / "fhir-leuko" / "state.sqlite3"
    old.parent.mkdir(parents=True)
    State(old).close()
    run = [sys.executable, "-m", "fhir_leuko", "run", "--server", server.base_url, "--as-of", AS_OF, "--no-progress"]
    done = subprocess.run(run, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert f"using the state file at its old place {old}" in done.stderr
    assert not (home / ".local" / "state" / "fhir-leuko" / "state.sqlite3").exists()
    old.unlink()
    done = subprocess.run(run, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert (home / ".local" / "state" / "fhir-leuko" / "state.sqlite3").exists()


# -- fhir-leuko state ---------------------------------------------------------------------------


def test_state_show_ledger_reset(server: SekmetServer, tmp_path: Path) -> None:
    _seed_two(server)
    state_dir = ["--state-dir", str(tmp_path)]
    assert cli("run", "--server", server.base_url, "--as-of", AS_OF, "--no-progress", *state_dir).returncode == 0
    seed(server.base_url, anc("o3", "p1", 2.5, "2026-11-19T08:00:00Z"))  # p1 recovers
    assert cli("run", "--server", server.base_url, "--as-of", AS_OF, "--no-progress", *state_dir).returncode == 0

    shown = cli("state", "show", *state_dir)
    assert shown.returncode == 0, shown.stderr
    assert f"server {server.base_url}" in shown.stdout
    assert "watermark:    20" in shown.stdout and "lock:         free" in shown.stdout
    assert shown.stdout.count(" incremental ") == 2
    as_json = json.loads(cli("state", "show", "--json", "--passes", "1", *state_dir).stdout)
    (view,) = as_json["servers"]
    assert view["server"] == server.base_url and len(view["passes"]) == 1
    assert view["passes"][0]["resolved"] == 1 and view["last_success"]
    assert as_json["schema"] == 2

    alias = pseudonym(server.base_url, "Patient/p1")
    ledger = cli("state", "ledger", alias, *state_dir)
    assert ledger.returncode == 0, ledger.stderr
    lines = [line for line in ledger.stdout.splitlines() if "DetectedIssue/" in line]
    assert [line.split()[3:5] for line in lines] == [["create", "neutropenia"], ["resolve", "neutropenia"]]
    assert "p1" not in ledger.stdout.replace(alias, "")  # the pseudonym, never the reference
    by_reference = cli("state", "ledger", "Patient/p1", "--server", server.base_url, *state_dir)
    assert by_reference.stdout == ledger.stdout
    assert "nothing recorded for pt-0000000000" in cli("state", "ledger", "pt-0000000000", *state_dir).stdout

    # reset: asks, and without a terminal needs --yes
    refused = cli("state", "reset", "--server", server.base_url, *state_dir)
    assert refused.returncode == 2 and "add --yes" in refused.stderr
    reset = cli("state", "reset", "--server", server.base_url, "--yes", *state_dir)
    assert reset.returncode == 0, reset.stderr
    view = json.loads(cli("state", "show", "--json", *state_dir).stdout)["servers"][0]
    assert view["watermark"] is None and view["passes"][0]["mode"] == "reset"
    # the next pass is a first pass, and writes nothing twice
    again = cli("run", "--server", server.base_url, "--as-of", AS_OF, "--no-progress", *state_dir)
    assert again.returncode == 0, again.stderr
    assert "full pass" in again.stderr or "watermark - ->" in again.stderr
    assert "0 written" in again.stderr


def test_state_reset_refuses_while_a_run_holds_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    with State(path) as state:
        state.acquire_lock("https://ehr.example.org/fhir", stale_after=3600)
        done = cli("state", "reset", "--server", "https://ehr.example.org/fhir", "--yes", "--state", str(path))
    assert done.returncode == 4
    assert "holds the lock" in done.stderr


def test_state_without_a_file_says_so(tmp_path: Path) -> None:
    done = cli("state", "show", "--state-dir", str(tmp_path / "none"))
    assert done.returncode == 2
    assert f"no state file at {tmp_path / 'none' / 'state.sqlite3'}" in done.stderr


def test_a_version_1_state_file_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "INSERT INTO meta VALUES ('schema', '1');"
        "CREATE TABLE written (id INTEGER PRIMARY KEY AUTOINCREMENT, run_id INTEGER, server TEXT NOT NULL,"
        " identifier TEXT NOT NULL, resource_id TEXT, version TEXT, action TEXT NOT NULL, at TEXT NOT NULL);"
        "INSERT INTO written (run_id, server, identifier, action, at) VALUES (1, 's', 'i', 'create', 't');"
    )
    db.commit()
    db.close()
    with State(path) as state:
        assert state.schema == 2
        assert state.ledger("s", "pt-x", ["i"])[0]["patient"] is None
