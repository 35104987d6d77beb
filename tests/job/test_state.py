"""The state file: the single-writer lock (and stale locks), the watermark, seen and pending."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fhir_leuko.errors import LockError, StateError
from fhir_leuko.job.state import State, default_state_path

SERVER = "https://fhir.test/fhir"


def test_one_writer_per_server(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    with State(path) as first, State(path) as second:
        lock = first.acquire_lock(SERVER, stale_after=600)
        with pytest.raises(LockError, match="another run is writing to this server"):
            second.acquire_lock(SERVER, stale_after=600)
        other = second.acquire_lock("https://other.test/fhir", stale_after=600)  # per server
        first.release_lock(lock)
        second.release_lock(other)
        again = second.acquire_lock(SERVER, stale_after=600)
        second.release_lock(again)


def test_a_lock_whose_process_is_gone_is_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    with State(path) as state:
        state.acquire_lock(SERVER, stale_after=600)
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
        state.db.execute("UPDATE lock SET pid=?, pid_start=NULL", (int(dead.stdout),))
        lock = state.acquire_lock(SERVER, stale_after=600)  # the holder is dead: taken over
        assert lock.pid != int(dead.stdout)


def test_a_lock_without_heartbeat_is_stale(tmp_path: Path) -> None:
    now = [1000.0]
    path = tmp_path / "state.sqlite3"
    with State(path, clock=lambda: now[0]) as state:
        first = state.acquire_lock(SERVER, stale_after=60)
        state.db.execute("UPDATE lock SET host='another-host'")  # its pid means nothing here
        now[0] += 30
        with pytest.raises(LockError):
            state.acquire_lock(SERVER, stale_after=60)
        now[0] += 31
        second = state.acquire_lock(SERVER, stale_after=60)
        # The presumed-dead run notices at its next heartbeat and stops writing.
        with pytest.raises(LockError, match="taken over"):
            state.heartbeat(first)
        state.heartbeat(second)


def test_the_watermark_only_moves_forward_with_its_seen_and_pending_rows(tmp_path: Path) -> None:
    with State(tmp_path / "s.sqlite3") as state:
        state.checkpoint(
            SERVER, watermark="2026-11-20T10:00:00.500Z",
            seen=[("Observation/1", "2026-11-20T09:58:00Z"), ("Observation/2", "2026-11-20T10:00:00.500Z")],
            keep_seen_from="2026-11-20T09:55:00Z",
            failed=[("Patient/a", "HTTP 422")],
        )
        state.checkpoint(SERVER, watermark="2026-11-20T11:00:00+01:00")  # = 10:00 UTC: earlier
        assert state.watermark(SERVER) == "2026-11-20T10:00:00.500Z"
        assert state.pending(SERVER) == {"Patient/a": 1}
        state.checkpoint(
            SERVER, watermark="2026-11-20T10:10:00Z", keep_seen_from="2026-11-20T09:59:00Z",
            failed=[("Patient/a", "HTTP 422")], done=["Patient/b"],
        )
        assert state.pending(SERVER) == {"Patient/a": 2}
        assert state.seen(SERVER) == {("Observation/2", "2026-11-20T10:00:00.500Z")}
        state.checkpoint(SERVER, watermark=None, done=["Patient/a"])
        assert state.pending(SERVER) == {}


def test_the_file_is_private_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "state.sqlite3"
    State(path).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    bad = tmp_path / "bad.sqlite3"
    bad.write_text("not a database at all " * 100)
    with pytest.raises(StateError, match="cannot use the state file"):
        State(bad)
    assert default_state_path().name == "state.sqlite3"
