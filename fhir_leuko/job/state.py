"""The scheduled job's state: an embedded SQLite file (default in the user data directory).

Per FHIR server (its normalised base URL) it holds:

* the **watermark**: every change with ``meta.lastUpdated`` before it has been handled (written, or
  recorded as a pending patient). It is a server time, so the client's clock never matters;
* **seen**: the resource versions handled at or after ``watermark - overlap``, so the overlap that
  guards against clock skew and slow commits does not make an unchanged server cost work;
* **pending** patients: those whose last evaluation failed, retried by the next run;
* the **run ledger** (one row per pass, with its counts) and the **written ledger** (one row per
  DetectedIssue create/update: identifier, server id, version, action);
* the **lock**: one writer per server. A lock whose process is gone (same host) or whose heartbeat
  is older than ``stale_after`` is taken over with a warning.

The file holds patient references (pending patients), so it is created readable by its owner only.
Writes are short transactions; a watermark and the seen/pending rows it depends on are committed
together, so a crash (kill -9) leaves either the old or the new checkpoint, never half of one.
"""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import platformdirs

from ..configfile import state_dir
from ..core.fhirtime import parse_fhir_datetime
from ..errors import LockError, StateError
from .patients import pseudonym

__all__ = [
    "SCHEMA_VERSION",
    "STATE_FILE",
    "LockInfo",
    "State",
    "default_state_path",
    "legacy_state_path",
    "server_key",
]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
"""2: the written ledger names the patient (pseudonym) and the finding kind (``fhir-leuko state
ledger``); a version 1 file is upgraded in place."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS watermark (
    server TEXT PRIMARY KEY, value TEXT NOT NULL, updated_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS seen (
    server TEXT NOT NULL, resource TEXT NOT NULL, last_updated TEXT NOT NULL,
    PRIMARY KEY (server, resource, last_updated));
CREATE TABLE IF NOT EXISTS pending (
    server TEXT NOT NULL, patient TEXT NOT NULL, reason TEXT NOT NULL, since TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 1, PRIMARY KEY (server, patient));
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, server TEXT NOT NULL, mode TEXT NOT NULL,
    started_at TEXT NOT NULL, finished_at TEXT, status TEXT NOT NULL, as_of TEXT,
    watermark_from TEXT, watermark_to TEXT, counts TEXT, pid INTEGER);
CREATE TABLE IF NOT EXISTS written (
    id INTEGER PRIMARY KEY AUTOINCREMENT, run_id INTEGER, server TEXT NOT NULL,
    identifier TEXT NOT NULL, resource_id TEXT, version TEXT, action TEXT NOT NULL,
    at TEXT NOT NULL, patient TEXT, finding TEXT);
CREATE INDEX IF NOT EXISTS written_identifier ON written (server, identifier);
CREATE TABLE IF NOT EXISTS lock (
    server TEXT PRIMARY KEY, token TEXT NOT NULL, host TEXT NOT NULL, pid INTEGER NOT NULL,
    pid_start TEXT, acquired_at TEXT NOT NULL, heartbeat REAL NOT NULL);
"""


STATE_FILE = "state.sqlite3"


def default_state_path() -> Path:
    """``state.sqlite3`` in the state directory (``configfile.state_dir``: ``FHIR_LEUKO_STATE_DIR``,
    else ``$XDG_STATE_HOME/fhir-leuko``)."""
    return state_dir() / STATE_FILE


def legacy_state_path() -> Path:
    """Where fhir-leuko 0.1.0 kept the state file by default (the user *data* directory)."""
    return Path(platformdirs.user_data_dir("fhir-leuko", appauthor=False)) / STATE_FILE


def server_key(base_url: str) -> str:
    """The identity of a server in the state file: its base URL without trailing slash."""
    return base_url.strip().rstrip("/")


def _now_text() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _process_start(pid: int) -> str | None:
    """The start time of a process (Linux ``/proc``), to tell a reused pid from the original."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return fields[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if start is not None:
        current = _process_start(pid)
        if current is not None and current != start:
            return False  # the pid was reused by another process
    return True


@dataclass(frozen=True)
class LockInfo:
    server: str
    token: str
    host: str
    pid: int
    acquired_at: str


class State:
    """The state file. Use as a context manager, or call :meth:`close`."""

    def __init__(self, path: Path, *, clock: Any = time.time) -> None:
        self.path = path
        self.clock = clock
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                # Owner-only: the file names patients (pending) and servers.
                fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
                os.close(fd)
            self.db = sqlite3.connect(path, timeout=30, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(_SCHEMA)
            row = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                self.db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) == 1:
                self._upgrade_from_1()
            elif int(row[0]) != SCHEMA_VERSION:
                raise StateError(
                    f"{path}: state schema {row[0]}, this fhir-leuko reads {SCHEMA_VERSION}"
                )
            self.schema = SCHEMA_VERSION
        except sqlite3.DatabaseError as exc:
            raise StateError(f"{path}: cannot use the state file: {exc}") from None
        except OSError as exc:
            raise StateError(f"{path}: cannot create the state file: {exc.strerror}") from None

    def _upgrade_from_1(self) -> None:
        with self.transaction() as db:
            columns = {r[1] for r in db.execute("PRAGMA table_info(written)")}
            for column in ("patient", "finding"):
                if column not in columns:
                    db.execute(f"ALTER TABLE written ADD COLUMN {column} TEXT")
            db.execute("UPDATE meta SET value=? WHERE key='schema'", (str(SCHEMA_VERSION),))

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> State:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (rolled back on an exception)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- lock -----------------------------------------------------------------------------------

    def acquire_lock(self, server: str, *, stale_after: float) -> LockInfo:
        """Take the single-writer lock of a server.

        Raises:
            LockError: another live run holds it.
        """
        host = socket.gethostname()
        pid = os.getpid()
        token = uuid.uuid4().hex
        now = self.clock()
        with self.transaction() as db:
            row = db.execute(
                "SELECT token, host, pid, pid_start, acquired_at, heartbeat FROM lock "
                "WHERE server=?",
                (server,),
            ).fetchone()
            if row is not None:
                _token, other_host, other_pid, other_start, acquired, heartbeat = row
                if other_host == host and not _alive(int(other_pid), other_start):
                    log.warning(
                        "taking over a stale lock: the run that held it (pid %s, since %s) is gone",
                        other_pid,
                        acquired,
                    )
                elif now - float(heartbeat) > stale_after:
                    log.warning(
                        "taking over a stale lock: no heartbeat from %s pid %s for %.0f s",
                        other_host,
                        other_pid,
                        now - float(heartbeat),
                    )
                else:
                    raise LockError(
                        f"another run is writing to this server (host {other_host}, pid "
                        f"{other_pid}, since {acquired}); one writer per server at a time"
                    )
            acquired_at = _now_text()
            db.execute(
                "INSERT OR REPLACE INTO lock VALUES (?, ?, ?, ?, ?, ?, ?)",
                (server, token, host, pid, _process_start(pid), acquired_at, now),
            )
        return LockInfo(server, token, host, pid, acquired_at)

    def heartbeat(self, lock: LockInfo) -> None:
        """Refresh the lock; raises LockError if another run took it over meanwhile."""
        cursor = self.db.execute(
            "UPDATE lock SET heartbeat=? WHERE server=? AND token=?",
            (self.clock(), lock.server, lock.token),
        )
        if cursor.rowcount != 1:
            raise LockError("the lock was taken over by another run (this run was presumed dead)")

    def release_lock(self, lock: LockInfo) -> None:
        self.db.execute("DELETE FROM lock WHERE server=? AND token=?", (lock.server, lock.token))

    def lock_holder(self, server: str) -> LockInfo | None:
        row = self.db.execute(
            "SELECT server, token, host, pid, acquired_at FROM lock WHERE server=?", (server,)
        ).fetchone()
        return LockInfo(*row) if row else None

    # -- watermark, seen, pending -----------------------------------------------------------------

    def watermark(self, server: str) -> str | None:
        row = self.db.execute("SELECT value FROM watermark WHERE server=?", (server,)).fetchone()
        return str(row[0]) if row else None

    def seen(self, server: str) -> set[tuple[str, str]]:
        """``(resource, lastUpdated)`` pairs handled within the overlap before the watermark."""
        rows = self.db.execute(
            "SELECT resource, last_updated FROM seen WHERE server=?", (server,)
        ).fetchall()
        return {(str(r), str(t)) for r, t in rows}

    def pending(self, server: str) -> dict[str, int]:
        """Patients whose last evaluation failed, with their number of attempts."""
        rows = self.db.execute(
            "SELECT patient, attempts FROM pending WHERE server=? ORDER BY since, patient",
            (server,),
        ).fetchall()
        return {str(p): int(a) for p, a in rows}

    def checkpoint(
        self,
        server: str,
        *,
        watermark: str | None,
        seen: Iterable[tuple[str, str]] = (),
        keep_seen_from: str | None = None,
        done: Iterable[str] = (),
        failed: Iterable[tuple[str, str]] = (),
    ) -> None:
        """Commit progress atomically: patients done (leave pending), failed (become pending),
        handled resource versions, and the new watermark (only ever moved forward)."""
        now = _now_text()
        with self.transaction() as db:
            db.executemany(
                "DELETE FROM pending WHERE server=? AND patient=?", [(server, p) for p in done]
            )
            for patient, reason in failed:
                db.execute(
                    "INSERT INTO pending (server, patient, reason, since) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (server, patient) DO UPDATE SET reason=excluded.reason, "
                    "attempts=attempts+1",
                    (server, patient, reason, now),
                )
            db.executemany(
                "INSERT OR IGNORE INTO seen VALUES (?, ?, ?)",
                [(server, r, t) for r, t in seen],
            )
            if watermark is not None:
                row = db.execute("SELECT value FROM watermark WHERE server=?", (server,)).fetchone()
                if row is None or _instant_key(watermark) > _instant_key(str(row[0])):
                    db.execute(
                        "INSERT OR REPLACE INTO watermark VALUES (?, ?, ?)",
                        (server, watermark, now),
                    )
            if keep_seen_from is not None:
                stale = [
                    (server, r, t)
                    for r, t in db.execute(
                        "SELECT resource, last_updated FROM seen WHERE server=?", (server,)
                    ).fetchall()
                    if _instant_key(str(t)) < _instant_key(keep_seen_from)
                ]
                db.executemany(
                    "DELETE FROM seen WHERE server=? AND resource=? AND last_updated=?", stale
                )

    # -- ledgers --------------------------------------------------------------------------------

    def start_run(self, server: str, mode: str, as_of: str, watermark_from: str | None) -> int:
        cursor = self.db.execute(
            "INSERT INTO runs (server, mode, started_at, status, as_of, watermark_from, pid) "
            "VALUES (?, ?, ?, 'running', ?, ?, ?)",
            (server, mode, _now_text(), as_of, watermark_from, os.getpid()),
        )
        return int(cursor.lastrowid or 0)

    def finish_run(self, run_id: int, status: str, counts: str, watermark_to: str | None) -> None:
        self.db.execute(
            "UPDATE runs SET finished_at=?, status=?, counts=?, watermark_to=? WHERE id=?",
            (_now_text(), status, counts, watermark_to, run_id),
        )

    def record_write(
        self,
        run_id: int,
        server: str,
        identifier: str,
        resource_id: str | None,
        version: str | None,
        action: str,
        *,
        patient: str | None = None,
        finding: str | None = None,
    ) -> None:
        """One write; ``patient`` is the patient's pseudonym (as in the logs), ``finding`` its kind."""
        self.db.execute(
            "INSERT INTO written (run_id, server, identifier, resource_id, version, action, at, "
            "patient, finding) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (run_id, server, identifier, resource_id, version, action, _now_text(), patient, finding),
        )

    def runs(self, server: str) -> list[dict[str, Any]]:
        """The run ledger of a server, oldest first."""
        cursor = self.db.execute("SELECT * FROM runs WHERE server=? ORDER BY id", (server,))
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def writes(self, server: str) -> list[dict[str, Any]]:
        """The written ledger of a server, oldest first."""
        cursor = self.db.execute("SELECT * FROM written WHERE server=? ORDER BY id", (server,))
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


    # -- for people: fhir-leuko state -----------------------------------------------------------

    def servers(self) -> list[str]:
        """Every server the file knows (a pass, a watermark, pending patients, a lock)."""
        rows = self.db.execute(
            "SELECT server FROM runs UNION SELECT server FROM watermark "
            "UNION SELECT server FROM pending UNION SELECT server FROM lock ORDER BY 1"
        ).fetchall()
        return [str(r[0]) for r in rows]

    def pending_rows(self, server: str) -> list[dict[str, Any]]:
        cursor = self.db.execute(
            "SELECT patient, reason, since, attempts FROM pending WHERE server=? "
            "ORDER BY since, patient",
            (server,),
        )
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def patient_of(self, server: str, alias: str) -> str | None:
        """The reference behind a pseudonym, when the file holds it (a pending patient)."""
        for row in self.pending_rows(server):
            if pseudonym(server, row["patient"]) == alias:
                return str(row["patient"])
        return None

    def ledger(self, server: str, patient: str, identifiers: Iterable[str] = ()) -> list[dict[str, Any]]:
        """The writes for one patient: by pseudonym, or by the identifiers of its findings (rows
        written before schema 2 name no patient)."""
        wanted = list(identifiers)
        marks = ",".join("?" * len(wanted))
        where = "patient=?" + (f" OR identifier IN ({marks})" if wanted else "")
        query = (
            "SELECT id, run_id, identifier, resource_id, version, action, at, patient, finding "  # noqa: S608 (only ? marks are added)
            f"FROM written WHERE server=? AND ({where}) ORDER BY id"
        )
        cursor = self.db.execute(query, (server, patient, *wanted))
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def set_last_success(self, server: str, at: str) -> None:
        """When a pass that wrote everything (exit 0 or 1) ended (monitoring)."""
        self.db.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (f"last_success {server}", at)
        )

    def last_success(self, server: str) -> str | None:
        row = self.db.execute(
            "SELECT value FROM meta WHERE key=?", (f"last_success {server}",)
        ).fetchone()
        return str(row[0]) if row else None

    def reset(self, server: str) -> None:
        """Forget a server's progress (watermark, seen versions, pending patients); the ledgers
        are kept and the reset is recorded in the pass ledger.

        Raises:
            LockError: a run holds the server's lock.
        """
        with self.transaction() as db:
            holder = db.execute("SELECT host, pid FROM lock WHERE server=?", (server,)).fetchone()
            if holder is not None:
                raise LockError(f"{server}: a run holds the lock (host {holder[0]}, pid {holder[1]})")
            for table in ("watermark", "seen", "pending"):
                db.execute(f"DELETE FROM {table} WHERE server=?", (server,))  # noqa: S608
            now = _now_text()
            db.execute(
                "INSERT INTO runs (server, mode, started_at, finished_at, status, pid) "
                "VALUES (?, 'reset', ?, ?, 'reset', ?)",
                (server, now, now, os.getpid()),
            )


def _instant_key(text: str) -> datetime:
    """Order FHIR instants correctly whatever their precision or offset."""
    value = parse_fhir_datetime(text)
    if value is None:
        raise StateError(f"not an instant in the state file: {text!r}")
    return value
