"""The JWT replay cache shared by every process that serves one deployment.

CDS Hooks 2.0 (Trusting CDS Clients): a ``jti`` must not be accepted twice. With ``serve --workers N``
or several replicas, a cache held in one process's memory would let the same token through once per
process. Each backend records a ``(iss, jti)`` pair with one atomic statement that inserts it only
if absent, so whichever process sees the token first accepts it and every other one refuses it:

* :class:`SqliteReplayCache`: a table in the service's SQLite file (the embedded default; every
  process of one machine, ``--workers N`` included, shares the file);
* :class:`fhir_leuko.service.postgres.PostgresReplayCache`: the same in PostgreSQL, for replicas.

Rows are kept until the token could no longer be accepted (``exp`` + leeway) and then pruned, at
most once a minute. Time is always passed in (the service's clock).
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Protocol

from ..errors import UsageError

__all__ = ["ReplayStore", "SqliteReplayCache"]

_PRUNE_EVERY = 60.0


class ReplayStore(Protocol):
    def first_use(self, iss: str, jti: str, keep_until: float, now: float) -> bool:
        """Record ``(iss, jti)``; ``False`` if it was recorded before (a replay)."""
        ...


class SqliteReplayCache:
    """``jwt_replay`` in an SQLite file (WAL), shared by the processes that open it."""

    def __init__(self, path: Path) -> None:
        try:
            if str(path) != ":memory:":
                path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS jwt_replay (iss TEXT NOT NULL, jti TEXT NOT NULL, "
                "keep_until REAL NOT NULL, PRIMARY KEY (iss, jti))"
            )
        except (OSError, sqlite3.Error) as exc:
            raise UsageError(f"{path}: cannot open the JWT replay cache: {exc}") from None
        self._lock = threading.Lock()
        self._pruned = 0.0

    def first_use(self, iss: str, jti: str, keep_until: float, now: float) -> bool:
        with self._lock:
            if now - self._pruned > _PRUNE_EVERY:
                self._pruned = now
                self._db.execute("DELETE FROM jwt_replay WHERE keep_until < ?", (now,))
            cursor = self._db.execute(
                "INSERT INTO jwt_replay (iss, jti, keep_until) VALUES (?, ?, ?) "
                "ON CONFLICT (iss, jti) DO NOTHING",
                (iss, jti, keep_until),
            )
            return cursor.rowcount == 1

    def close(self) -> None:
        with self._lock:
            self._db.close()
