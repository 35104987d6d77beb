"""The JWT replay cache shared by every process that serves one deployment.

CDS Hooks 2.0 (Trusting CDS Clients): a ``jti`` must not be accepted twice. With ``serve --workers N``
or several replicas, a cache held in one process's memory would let the same token through once per
process. Each backend records a ``(iss, jti)`` pair with one atomic statement that inserts it only
if absent, so whichever process sees the token first accepts it and every other one refuses it:

* :class:`SqliteReplayCache`: a table in the service's SQLite file (the embedded default; every
  process of one machine, ``--workers N`` included, shares the file);
* :class:`fhir_leuko.service.postgres.PostgresReplayCache`: the same in PostgreSQL, for replicas.

Rows are kept until the token could no longer be accepted (``exp`` + leeway) and then pruned, at
most once a minute. Time is always passed in (the service's clock). Both backends run the same two
statements (:class:`SqlReplayCache`); they differ in how they have a connection.
"""

from __future__ import annotations

import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Protocol

from ..errors import UsageError
from .sqlstore import Connection, open_sqlite

__all__ = ["ReplayStore", "SqlReplayCache", "SqliteReplayCache"]

_PRUNE_EVERY = 60.0


class ReplayStore(Protocol):
    def first_use(self, iss: str, jti: str, keep_until: float, now: float) -> bool:
        """Record ``(iss, jti)``; ``False`` if it was recorded before (a replay)."""
        ...


class SqlReplayCache(ABC):
    """``jwt_replay (iss, jti, keep_until)`` in a database; a backend gives the connection."""

    def __init__(self) -> None:
        self._pruned = 0.0
        self._prune_lock = threading.Lock()

    @abstractmethod
    def _connection(self) -> AbstractContextManager[Connection]:
        """A connection in autocommit: each statement is atomic on its own."""

    def first_use(self, iss: str, jti: str, keep_until: float, now: float) -> bool:
        with self._connection() as db:
            with self._prune_lock:
                prune = now - self._pruned > _PRUNE_EVERY
                if prune:
                    self._pruned = now
            if prune:
                db.execute("DELETE FROM jwt_replay WHERE keep_until < ?", (now,))
            cursor = db.execute(
                "INSERT INTO jwt_replay (iss, jti, keep_until) VALUES (?, ?, ?) "
                "ON CONFLICT (iss, jti) DO NOTHING",
                (iss, jti, keep_until),
            )
            return cursor.rowcount == 1


class SqliteReplayCache(SqlReplayCache):
    """``jwt_replay`` in an SQLite file (WAL), shared by the processes that open it."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        try:
            self._db = open_sqlite(path)
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS jwt_replay (iss TEXT NOT NULL, jti TEXT NOT NULL, "
                "keep_until REAL NOT NULL, PRIMARY KEY (iss, jti))"
            )
        except (OSError, sqlite3.Error) as exc:
            raise UsageError(f"{path}: cannot open the JWT replay cache: {exc}") from None
        self._lock = threading.Lock()

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._db

    def close(self) -> None:
        with self._lock:
            self._db.close()
