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

The queries and rules are those of the SQLite store (:mod:`fhir_leuko.service.sqlstore`,
:class:`fhir_leuko.service.replay.SqlReplayCache`); this module holds what is PostgreSQL's own: the
pool and its connections, the schema, the readiness write.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from .replay import SqlReplayCache
from .sqlstore import FEEDBACK_TABLES, POSTGRESQL, SNOOZE_TABLES, Cursor, SqlCardStore

if TYPE_CHECKING:
    from psycopg_pool import ConnectionPool

__all__ = ["PostgresCardStore", "PostgresReplayCache", "connect_pool"]

# The tables and columns of the SQLite store (service/feedback.py, schema 2), so the same queries
# work on both; instants are the same text (fhirtime.format_instant).
_SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS jwt_replay (
    iss        TEXT NOT NULL,
    jti        TEXT NOT NULL,
    keep_until DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (iss, jti)
);
CREATE INDEX IF NOT EXISTS jwt_replay_keep_until ON jwt_replay (keep_until);
CREATE TABLE IF NOT EXISTS issued_card (
    uuid          TEXT PRIMARY KEY,
    service_id    TEXT NOT NULL,
    hook_instance TEXT NOT NULL,
    issued_at     TEXT NOT NULL,
    indicator     TEXT NOT NULL,
    topic         TEXT NOT NULL,
    suggestions   TEXT NOT NULL,
    summary       TEXT NOT NULL DEFAULT '',
    silent        BOOLEAN NOT NULL DEFAULT FALSE,
    subject       TEXT NOT NULL DEFAULT '',
    findings      TEXT NOT NULL DEFAULT '[]',
    page          TEXT,
    token_hash    TEXT NOT NULL DEFAULT '',
    page_expires  TEXT
);
CREATE INDEX IF NOT EXISTS issued_card_time ON issued_card (issued_at);"""
    + POSTGRESQL.ddl(FEEDBACK_TABLES)
    + POSTGRESQL.ddl(SNOOZE_TABLES)
)


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
        with pool.connection() as connection, connection.transaction():
            # One replica creates the tables; the others wait for it (same lock key).
            connection.execute("SELECT pg_advisory_xact_lock(7411)")
            connection.execute(_SCHEMA)
    except Exception as exc:  # psycopg.Error, a pool timeout: never the URL (it may hold a password)
        pool.close()
        raise UsageError(f"cannot use the PostgreSQL store: {type(exc).__name__}") from None
    return pool


@functools.lru_cache(maxsize=64)
def _placeholders(sql: str) -> str:
    return sql.replace("?", "%s")


class _PgConnection:
    """A psycopg connection that runs the shared queries: their ``?`` placeholders as psycopg's
    ``%s``; ``executemany`` on a cursor (:class:`fhir_leuko.service.sqlstore.Connection`)."""

    __slots__ = ("_connection",)

    def __init__(self, connection: Any) -> None:
        self._connection = connection

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Cursor:
        cursor: Cursor = self._connection.execute(_placeholders(sql), parameters or None)
        return cursor

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]], /) -> None:
        self._connection.cursor().executemany(_placeholders(sql), rows)


class PostgresReplayCache(SqlReplayCache):
    """``jwt_replay`` in PostgreSQL: one replay check for every replica."""

    def __init__(self, pool: ConnectionPool[Any]) -> None:
        super().__init__()
        self._pool = pool

    @contextmanager
    def _connection(self) -> Iterator[_PgConnection]:
        with self._pool.connection() as connection:
            yield _PgConnection(connection)

    def close(self) -> None:
        self._pool.close()


class PostgresCardStore(SqlCardStore):
    """Issued cards, feedback, snoozes and held-back records in PostgreSQL, shared by every
    replica. Implements :class:`~fhir_leuko.service.store.CardStore` with the meaning of the SQLite
    store (:class:`~fhir_leuko.service.feedback.FeedbackStore`), and passes the same contract
    tests (``tests/service/test_store.py``)."""

    dialect = POSTGRESQL

    def __init__(
        self, pool: ConnectionPool[Any], *, retention: timedelta | None = timedelta(days=90)
    ) -> None:
        super().__init__(retention)
        self._pool = pool
        with self._connection() as db:
            self._load_key(db)

    @contextmanager
    def _connection(self) -> Iterator[_PgConnection]:
        with self._pool.connection() as connection:
            yield _PgConnection(connection)

    @contextmanager
    def _transaction(self) -> Iterator[_PgConnection]:
        with self._pool.connection() as connection, connection.transaction():
            yield _PgConnection(connection)

    def check_writable(self) -> None:
        with self._connection() as db:
            db.execute(
                "INSERT INTO readiness (id, checked_at) VALUES (1, now()::text) "
                "ON CONFLICT (id) DO UPDATE SET checked_at = EXCLUDED.checked_at"
            )

    def close(self) -> None:
        """The pool is shared with the replay cache: closed by its owner."""
