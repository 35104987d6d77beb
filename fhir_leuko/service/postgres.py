"""The shared store for several replicas of the service: PostgreSQL (``store = "postgresql"``).

Why PostgreSQL (docs/cds-hooks.md, "Several processes and replicas"): what the replicas share is a
JWT replay cache, and the issued cards and the feedback clinicians give on them. The feedback is a
record a hospital keeps and audits (who overrode which alert, and why), so it belongs in a durable,
transactional database that the hospital already runs, backs up and queries with SQL; the same
tables as the embedded SQLite store, so the same queries work on both. The replay check is one
``INSERT … ON CONFLICT DO NOTHING`` (atomic across replicas) per request. Redis would fit the
replay cache (``SET NX EX``) but would make the feedback a second data model kept in memory, with
durability depending on its persistence settings.

The client is psycopg 3 (the PostgreSQL project's maintained driver family; the ``postgres`` extra:
``pip install 'fhir-leuko[service,postgres]'``) with its connection pool. The connection string
comes from ``FHIR_LEUKO_SERVICE_DATABASE_URL`` or ``database_url_file`` (it may hold a password:
never a flag, never logged).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from ..errors import UsageError

if TYPE_CHECKING:
    from psycopg_pool import ConnectionPool

__all__ = ["PostgresReplayCache", "connect_pool"]

_PRUNE_EVERY = 60.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jwt_replay (
    iss        TEXT NOT NULL,
    jti        TEXT NOT NULL,
    keep_until DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (iss, jti)
);
CREATE INDEX IF NOT EXISTS jwt_replay_keep_until ON jwt_replay (keep_until);
"""


def connect_pool(url: str, *, max_size: int = 8) -> ConnectionPool[Any]:
    """A psycopg connection pool, opened (and checked) now.

    Raises:
        UsageError: psycopg is not installed, or the database cannot be reached.
    """
    try:
        import psycopg  # noqa: F401 (checked here: the pool needs it)
        from psycopg_pool import ConnectionPool
    except ImportError as exc:
        raise UsageError(
            f"store = \"postgresql\" needs the postgres extra (missing module {exc.name!r}): "
            "pip install 'fhir-leuko[service,postgres]'"
        ) from None
    pool: ConnectionPool[Any] = ConnectionPool(
        url, min_size=1, max_size=max_size, open=False, kwargs={"autocommit": True}
    )
    try:
        pool.open(wait=True, timeout=10)
        with pool.connection() as connection:
            connection.execute(_SCHEMA)
    except Exception as exc:  # psycopg.Error, a pool timeout: never the URL (it may hold a password)
        pool.close()
        raise UsageError(f"cannot use the PostgreSQL store: {type(exc).__name__}") from None
    return pool


class PostgresReplayCache:
    """``jwt_replay`` in PostgreSQL: one replay check for every replica."""

    def __init__(self, pool: ConnectionPool[Any]) -> None:
        self._pool = pool
        self._pruned = 0.0
        self._lock = threading.Lock()

    def first_use(self, iss: str, jti: str, keep_until: float, now: float) -> bool:
        with self._pool.connection() as connection:
            with self._lock:
                prune = now - self._pruned > _PRUNE_EVERY
                if prune:
                    self._pruned = now
            if prune:
                connection.execute("DELETE FROM jwt_replay WHERE keep_until < %s", (now,))
            cursor = connection.execute(
                "INSERT INTO jwt_replay (iss, jti, keep_until) VALUES (%s, %s, %s) "
                "ON CONFLICT (iss, jti) DO NOTHING",
                (iss, jti, keep_until),
            )
            return bool(cursor.rowcount == 1)

    def close(self) -> None:
        self._pool.close()
