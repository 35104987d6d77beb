"""``fhir-leuko run`` and ``watch`` from the outside: help, usage errors, dry run, JSON logs,
schedules, outages and signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fhir_leuko.cli import main
from fhir_leuko.core.knowledge import Knowledge
from fhir_leuko.core.profiles import ProfileSet
from fhir_leuko.fhir.client import FhirClient
from fhir_leuko.job.runner import Job, JobOptions
from fhir_leuko.job.state import State
from fhir_leuko.testing.seed import seed_paths
from fhir_leuko.testing.sekmet import SekmetServer, free_port

from .conftest import EXAMPLES, STRICT, anc, at, cli, issues, patient, seed

AS_OF = "2026-11-20"


def _args(server: SekmetServer, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "run", "--server", server.base_url, "--state", str(tmp_path / "state.sqlite3"),
        "--as-of", AS_OF, "--header", "Prefer: handling=strict", "--no-progress", *extra,
    ]


def test_help_teaches(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("run", "watch"):
        with pytest.raises(SystemExit) as info:
            main([command, "--help"])
        assert info.value.code == 0
    out = capsys.readouterr().out
    for text in ("examples:", "exit codes:", "FHIR_LEUKO_FHIR_SERVER", "--dry-run", "--every",
                 "smart-backend", "kill -9", "SIGTERM"):
        assert text in out, text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run"], "no FHIR server"),
        (["run", "--server", "ftp://x"], "http(s) URL"),
        (["run", "--server", "http://x/fhir", "--as-of", "yesterday"], "--as-of 'yesterday'"),
        (["watch", "--server", "http://x/fhir"], "exactly one of --every"),
        (["watch", "--server", "http://x/fhir", "--cron", "every minute"], "--cron"),
        (["run", "--server", "http://x/fhir", "--auth", "basic"], "user name"),
        (["run", "--server", "http://x/fhir", "--header", "nocolon"], "--header"),
    ],
)
def test_usage_errors_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main([*args, "--state", str(tmp_path / "s.sqlite3")]) == 2
    assert message in capsys.readouterr().err


def test_dry_run_prints_ndjson_and_writes_nothing(
    server: SekmetServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seed_paths(server.base_url, [EXAMPLES / "ward", EXAMPLES / "bulk-export"])
    assert main(_args(server, tmp_path, "--dry-run")) == 0
    out = capsys.readouterr()
    lines = [json.loads(line) for line in out.out.splitlines()]
    assert len(lines) == 7 and {r["resourceType"] for r in lines} == {"DetectedIssue"}
    assert "7 would be written" in out.err
    assert issues(server.base_url) == []
    assert not (tmp_path / "state.sqlite3").exists()  # no state file is created by a dry run
    # With a state file from a real pass, a dry run reads it and leaves it as it was.
    assert main(_args(server, tmp_path)) == 0
    with State(tmp_path / "state.sqlite3") as state:
        mark, runs = state.watermark(server.base_url), state.runs(server.base_url)
    capsys.readouterr()
    assert main(_args(server, tmp_path, "--dry-run", "--full")) == 0
    out = capsys.readouterr()
    assert out.out == "" and "7 unchanged" in out.err
    with State(tmp_path / "state.sqlite3") as state:
        assert state.watermark(server.base_url) == mark and state.runs(server.base_url) == runs


def test_json_logs_carry_counts_but_no_patient_data(
    server: SekmetServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seed_paths(server.base_url, [EXAMPLES / "ward", EXAMPLES / "bulk-export"])
    assert main(["-v", *_args(server, tmp_path, "--log-format", "json")]) == 0
    err = capsys.readouterr().err
    records = [json.loads(line) for line in err.splitlines()]
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    (finished,) = [r for r in records if r.get("event") == "pass.finished"]
    assert finished["written"] == 7 and finished["patients_scanned"] == 6
    assert finished["findings"]["neutropenia high"] == 2
    assert "ex-" not in err and "Patient/" not in err  # no patient or resource ids


def test_watch_runs_on_a_schedule(server: SekmetServer, tmp_path: Path) -> None:
    seed_paths(server.base_url, [EXAMPLES / "ward"])
    args = _args(server, tmp_path, "--log-format", "json")
    result = cli("watch", *args[1:], "--every", "1s", "--max-passes", "2")
    assert result.returncode == 0, result.stderr
    passes = [json.loads(line) for line in result.stderr.splitlines() if "pass.finished" in line]
    assert [p["written"] for p in passes] == [6, 0]


def test_watch_survives_an_outage(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}/fhir"  # nobody listens there
    result = cli(
        "watch", "--server", dead, "--state", str(tmp_path / "s.sqlite3"), "--every", "1s",
        "--max-passes", "2",
        env={"FHIR_LEUKO_FHIR_RETRY_ATTEMPTS": "1", "FHIR_LEUKO_FHIR_CONNECT_TIMEOUT": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("pass failed (the next pass runs on schedule)") == 2


def test_watch_stops_cleanly_on_sigterm(server: SekmetServer, tmp_path: Path) -> None:
    seed_paths(server.base_url, [EXAMPLES / "ward"])
    proc = subprocess.Popen(
        [sys.executable, "-m", "fhir_leuko", "watch", *_args(server, tmp_path)[1:], "--every", "1h"],
        stderr=subprocess.PIPE, text=True, env=os.environ.copy(),
    )
    assert proc.stderr is not None
    lines: list[str] = []
    for line in proc.stderr:
        lines.append(line)
        if "next pass at" in line:
            break
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=20)
    assert proc.returncode == 0, "".join(lines) + rest
    assert "SIGTERM received" in rest


def test_a_stop_request_ends_the_run_after_the_current_patient(
    server: SekmetServer, tmp_path: Path, knowledge: Knowledge, profiles: ProfileSet
) -> None:
    base = server.base_url
    seed(base, *[r for i in range(5) for r in (patient(f"s-{i}"), anc(f"s-{i}-anc", f"s-{i}", 0.9, "2026-11-18T08:00:00Z"))])
    state_path = tmp_path / "state.sqlite3"
    stop = threading.Event()
    opts = JobOptions(as_of=at("2026-11-20T12:00:00"), patients_per_request=1, transactions="never")
    with State(state_path) as state:
        job = Job(
            FhirClient(base, headers=STRICT), knowledge, profiles, opts, state=state, stop=stop,
            checkpoint_hook=lambda point, n: stop.set() if point == "write" else None,
        )
        report = job.run()
        assert report.interrupted and report.actions["create"] == 1
        assert report.status == "interrupted"
        assert state.watermark(base) is None  # a first run sets it only when complete
    assert len(issues(base)) == 1
    result = cli(*_args(server, tmp_path))
    assert result.returncode == 0 and "4 written" in result.stderr
    assert len(issues(base)) == 5


def test_schedules() -> None:
    from datetime import UTC, datetime

    from fhir_leuko.cli.run import schedule_from
    from fhir_leuko.job.config import load_job_config

    after = datetime(2026, 11, 20, 10, 7, 30, tzinfo=UTC)
    cron = schedule_from(load_job_config({"run": {"cron": "*/15 * * * *"}}))
    assert cron(after) == datetime(2026, 11, 20, 10, 15, tzinfo=UTC)
    every = schedule_from(load_job_config({"run": {"every": "1h30m"}}))
    assert every(after) == datetime(2026, 11, 20, 11, 37, 30, tzinfo=UTC)
