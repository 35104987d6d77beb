"""kill -9 of ``fhir-leuko run`` at several points, then a re-run: exactly one DetectedIssue per
finding, no version written twice, and the watermark never skips a patient (issue 3 §3, §7).

The process pauses at an exact point (FHIR_LEUKO_TEST_PAUSE, see fhir_leuko/cli/run.py) and the
test sends it a real SIGKILL; a few runs are also killed after a fixed delay, wherever they are."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fhir_leuko.job.state import State
from fhir_leuko.testing.sekmet import SekmetServer

from .conftest import anc, by_identity, cli, issues, low_ward, patient, seed, valproate_order

AS_OF = "2026-11-20T12:00:00Z"
LATER = "2026-11-21T12:00:00Z"


def _ward(base: str) -> None:
    seed(base, *low_ward("k"))


def _changes(base: str) -> None:
    seed(
        base,
        anc("k-0-anc-2", "k-0", 2.5, "2026-11-21T08:00:00Z"),  # recovered
        anc("k-1-anc-2", "k-1", 0.3, "2026-11-21T08:00:00Z"),  # worse
        valproate_order("k-2-vpa", "k-2", "2026-11-01"),  # drug started
        patient("k-9"),
        anc("k-9-anc-1", "k-9", 0.4, "2026-11-21T08:00:00Z"),  # new
    )


def _args(base: str, state: Path, as_of: str, *extra: str) -> list[str]:
    return [
        "run", "--server", base, "--state", str(state), "--as-of", as_of,
        "--header", "Prefer: handling=strict", "--no-progress", *extra,
    ]


def _run_and_kill(args: list[str], tmp_path: Path, point: str | None, delay: float = 0) -> None:
    marker = tmp_path / f"paused-{time.monotonic_ns()}"
    env = {**os.environ}
    if point:
        env["FHIR_LEUKO_TEST_PAUSE"] = point
        env["FHIR_LEUKO_TEST_PAUSE_FILE"] = str(marker)
    proc = subprocess.Popen(
        [sys.executable, "-m", "fhir_leuko", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        if point:
            while not marker.exists():
                if proc.poll() is not None:
                    err = proc.stderr.read().decode() if proc.stderr else ""
                    pytest.fail(f"the run ended before reaching {point}: {err[-2000:]}")
                assert time.monotonic() < deadline, f"never reached {point}"
                time.sleep(0.02)
        else:
            time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        if proc.stderr:
            proc.stderr.close()


def _assert_exactly_once(base: str, expected: dict[tuple[str, str], str]) -> None:
    """One DetectedIssue per (patient, kind), at the expected version."""
    groups = by_identity(issues(base))
    assert {k: len(v) for k, v in groups.items()} == {k: 1 for k in expected}
    versions = {k: v[0]["meta"]["versionId"] for k, v in groups.items()}
    assert versions == expected


FIRST = {(f"Patient/k-{i}", kind): "1" for i in range(6) for kind in ("neutropenia", "leukopenia")}
AFTER = {
    **FIRST,
    ("Patient/k-0", "neutropenia"): "2",  # resolved
    ("Patient/k-1", "neutropenia"): "2",  # worse
    ("Patient/k-2", "leukopenia"): "2",  # drug implicated
    ("Patient/k-2", "neutropenia"): "2",
    ("Patient/k-9", "neutropenia"): "1",  # new
}


@pytest.mark.server
@pytest.mark.parametrize(
    ("point", "extra"),
    [
        ("fetched:1", ()),
        ("write:1", ()),  # after the first transaction
        ("write:1", ("--patients-per-request", "2")),
        ("checkpoint:1", ("--patients-per-request", "2")),
        ("write:3", ("--transactions", "never")),
        ("write:7", ("--transactions", "never", "--patients-per-request", "4")),
    ],
)
def test_killed_first_run_then_rerun_writes_each_finding_once(
    server: SekmetServer, tmp_path: Path, point: str, extra: tuple[str, ...]
) -> None:
    base = server.base_url
    state = tmp_path / "state.sqlite3"
    _ward(base)
    _run_and_kill(_args(base, state, AS_OF, *extra), tmp_path, point)
    rerun = cli(*_args(base, state, AS_OF, *extra))
    assert rerun.returncode == 0, rerun.stderr
    assert "taking over a stale lock" in rerun.stderr  # the killed run's lock was left behind
    _assert_exactly_once(base, FIRST)


@pytest.mark.server
@pytest.mark.parametrize(
    ("point", "extra"),
    [
        ("write:1", ("--patients-per-request", "1")),
        ("checkpoint:2", ("--patients-per-request", "1")),
        ("write:2", ("--transactions", "never")),
        ("write:4", ("--transactions", "never", "--patients-per-request", "1")),
        (None, ()),  # killed after a fixed delay, wherever it is
    ],
)
def test_killed_incremental_run_then_rerun_applies_each_change_once(
    server: SekmetServer, tmp_path: Path, point: str | None, extra: tuple[str, ...]
) -> None:
    base = server.base_url
    state = tmp_path / "state.sqlite3"
    _ward(base)
    assert cli(*_args(base, state, AS_OF)).returncode == 0
    _changes(base)
    _run_and_kill(_args(base, state, LATER, *extra), tmp_path, point, delay=1.2)
    rerun = cli(*_args(base, state, LATER, *extra))
    assert rerun.returncode == 0, rerun.stderr
    _assert_exactly_once(base, AFTER)
    # Nothing is left over: a further run finds nothing to do.
    last = cli(*_args(base, state, LATER))
    assert "0 written, 0 updated, 0 resolved" in last.stderr
    with State(state) as st:
        assert st.lock_holder(base) is None and st.pending(base) == {}
