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

import hashlib
import hmac
import secrets
import threading
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import orjson

from ..core.fhirtime import format_instant
from ..errors import UsageError
from .feedback import entry_key, findings_json, token_hash
from .models import FeedbackEntry
from .store import CardPage, HeldBack, IssuedCard, Snooze, StoredCard, StoredFeedback

if TYPE_CHECKING:
    from psycopg_pool import ConnectionPool

__all__ = ["PostgresCardStore", "PostgresReplayCache", "connect_pool"]

_PRUNE_EVERY = 60.0

_SCHEMA = """
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
CREATE INDEX IF NOT EXISTS issued_card_time ON issued_card (issued_at);
CREATE TABLE IF NOT EXISTS feedback (
    id                   BIGSERIAL PRIMARY KEY,
    entry_key            TEXT NOT NULL UNIQUE,
    service_id           TEXT NOT NULL,
    card                 TEXT NOT NULL,
    outcome              TEXT NOT NULL,
    outcome_timestamp    TEXT NOT NULL,
    accepted_suggestions TEXT NOT NULL,
    override_system      TEXT,
    override_code        TEXT,
    override_display     TEXT,
    user_comment         TEXT,
    client_iss           TEXT,
    known_card           BOOLEAN NOT NULL,
    received_at          TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS feedback_card ON feedback (card);
CREATE TABLE IF NOT EXISTS store_key (id INTEGER PRIMARY KEY CHECK (id = 1), key BYTEA NOT NULL);
CREATE TABLE IF NOT EXISTS snooze (
    id         BIGSERIAL PRIMARY KEY,
    card       TEXT NOT NULL,
    service_id TEXT NOT NULL,
    subject    TEXT NOT NULL,
    kind       TEXT NOT NULL,
    rank       INTEGER NOT NULL,
    grade      TEXT NOT NULL,
    value      DOUBLE PRECISION NOT NULL,
    until      TEXT NOT NULL,
    UNIQUE (card, kind)
);
CREATE INDEX IF NOT EXISTS snooze_subject ON snooze (service_id, subject);
CREATE TABLE IF NOT EXISTS held_back (
    id            BIGSERIAL PRIMARY KEY,
    card          TEXT NOT NULL,
    service_id    TEXT NOT NULL,
    hook_instance TEXT NOT NULL,
    at            TEXT NOT NULL,
    what          TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS held_back_card ON held_back (card);
CREATE TABLE IF NOT EXISTS readiness (id INTEGER PRIMARY KEY CHECK (id = 1), checked_at TEXT NOT NULL);
"""
# The tables and columns are those of the SQLite store (service/feedback.py, schema 2), so the same
# queries work on both; instants are the same text (fhirtime.format_instant).


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


class PostgresCardStore:
    """Issued cards, feedback, snoozes and held-back records in PostgreSQL, shared by every
    replica. Implements :class:`~fhir_leuko.service.store.CardStore` with the meaning of the SQLite
    store (:class:`~fhir_leuko.service.feedback.FeedbackStore`), and passes the same contract
    tests (``tests/service/test_store.py``)."""

    def __init__(
        self, pool: ConnectionPool[Any], *, retention: timedelta | None = timedelta(days=90)
    ) -> None:
        self._pool = pool
        self.retention = retention
        self._pruned_at: datetime | None = None
        self._lock = threading.Lock()
        with pool.connection() as connection:
            connection.execute(
                "INSERT INTO store_key (id, key) VALUES (1, %s) ON CONFLICT (id) DO NOTHING",
                (secrets.token_bytes(32),),
            )
            row = connection.execute("SELECT key FROM store_key WHERE id = 1").fetchone()
        assert row is not None
        self._key = bytes(row[0])

    def subject_of(self, patient_id: str) -> str:
        return hmac.new(self._key, patient_id.encode(), hashlib.sha256).hexdigest()[:32]

    def record_cards(
        self,
        service_id: str,
        hook_instance: str,
        issued_at: datetime,
        cards: Sequence[IssuedCard],
    ) -> None:
        if not cards:
            return
        at = format_instant(issued_at)
        rows = [
            (
                c.uuid,
                service_id,
                hook_instance,
                at,
                c.indicator,
                c.topic,
                orjson.dumps([{"uuid": u, "label": label} for u, label in c.suggestions]).decode(),
                c.summary,
                c.silent,
                c.subject,
                findings_json(c.findings),
                orjson.dumps(c.page).decode() if c.page is not None else None,
                c.token_hash,
                format_instant(c.page_expires) if c.page_expires is not None else None,
            )
            for c in cards
        ]
        with self._pool.connection() as connection, connection.transaction():
            connection.cursor().executemany(
                "INSERT INTO issued_card (uuid, service_id, hook_instance, issued_at, indicator, "
                "topic, suggestions, summary, silent, subject, findings, page, token_hash, "
                "page_expires) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (uuid) DO NOTHING",
                rows,
            )
            self._prune(connection, issued_at)

    def _prune(self, connection: Any, now: datetime) -> None:
        """Delete issued cards older than the retention, at most once an hour (of ``now``)."""
        if self.retention is None:
            return
        with self._lock:
            last = self._pruned_at
            if last is not None and timedelta(0) <= now - last < timedelta(hours=1):
                return
            self._pruned_at = now
        cutoff = format_instant((now - self.retention).replace(microsecond=0))
        gone = "SELECT uuid FROM issued_card WHERE issued_at < %s"
        connection.execute(f"DELETE FROM snooze WHERE card IN ({gone})", (cutoff,))  # noqa: S608
        connection.execute(f"DELETE FROM held_back WHERE card IN ({gone})", (cutoff,))  # noqa: S608
        connection.execute("DELETE FROM issued_card WHERE issued_at < %s", (cutoff,))

    def issued_cards(self) -> list[str]:
        with self._pool.connection() as connection:
            rows = connection.execute(
                "SELECT uuid FROM issued_card ORDER BY issued_at, uuid"
            ).fetchall()
        return [str(r[0]) for r in rows]

    def record_feedback(
        self,
        service_id: str,
        entries: Iterable[FeedbackEntry],
        *,
        client_iss: str | None,
        received_at: datetime,
    ) -> int:
        new = 0
        at = format_instant(received_at)
        with self._pool.connection() as connection, connection.transaction():
            for entry in entries:
                known = connection.execute(
                    "SELECT subject, findings FROM issued_card WHERE uuid = %s AND service_id = %s",
                    (entry.card, service_id),
                ).fetchone()
                reason = entry.overrideReason
                coding = reason.reason if reason is not None else None
                cursor = connection.execute(
                    "INSERT INTO feedback (entry_key, service_id, card, outcome, outcome_timestamp, "
                    "accepted_suggestions, override_system, override_code, override_display, "
                    "user_comment, client_iss, known_card, received_at) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                    "ON CONFLICT (entry_key) DO NOTHING",
                    (
                        entry_key(service_id, entry),
                        service_id,
                        entry.card,
                        entry.outcome,
                        format_instant(entry.outcomeTimestamp),
                        orjson.dumps([s.id for s in entry.acceptedSuggestions or []]).decode(),
                        coding.system if coding else None,
                        coding.code if coding else None,
                        coding.display if coding else None,
                        reason.userComment if reason is not None else None,
                        client_iss,
                        known is not None,
                        at,
                    ),
                )
                added = cursor.rowcount == 1
                new += 1 if added else 0
                if added and known is not None and entry.outcome == "overridden":
                    self._snooze(connection, service_id, entry.card, known[0], known[1], received_at)
        return new

    def _snooze(
        self, connection: Any, service_id: str, card: str, subject: str, findings: str, at: datetime
    ) -> None:
        for item in orjson.loads(findings):
            seconds = int(item["snooze_seconds"])
            if seconds <= 0 or not subject:
                continue
            connection.execute(
                "INSERT INTO snooze (card, service_id, subject, kind, rank, grade, value, until) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (card, kind) DO NOTHING",
                (
                    card,
                    service_id,
                    subject,
                    item["kind"],
                    int(item["rank"]),
                    str(item["grade"]),
                    float(item["value"]),
                    format_instant(at + timedelta(seconds=seconds)),
                ),
            )

    def snoozes(self, service_id: str, subject: str, now: datetime) -> list[Snooze]:
        with self._pool.connection() as connection:
            rows = connection.execute(
                "SELECT card, kind, rank, grade, value, until FROM snooze WHERE service_id = %s "
                "AND subject = %s AND until > %s ORDER BY id",
                (service_id, subject, format_instant(now)),
            ).fetchall()
        return [Snooze(r[0], r[1], int(r[2]), r[3], float(r[4]), r[5]) for r in rows]

    def record_held_back(self, held: Sequence[HeldBack]) -> None:
        if not held:
            return
        with self._pool.connection() as connection, connection.transaction():
            connection.cursor().executemany(
                "INSERT INTO held_back (card, service_id, hook_instance, at, what) "
                "VALUES (%s, %s, %s, %s, %s)",
                [(h.card, h.service_id, h.hook_instance, h.at, h.what) for h in held],
            )

    def feedback(self, card: str | None = None) -> list[StoredFeedback]:
        query = (
            "SELECT card, outcome, outcome_timestamp, accepted_suggestions, override_code, "
            "user_comment, known_card, override_display FROM feedback"
        )
        args: tuple[str, ...] = ()
        if card is not None:
            query += " WHERE card = %s"
            args = (card,)
        with self._pool.connection() as connection:
            rows = connection.execute(query + " ORDER BY id", args).fetchall()
        return [
            StoredFeedback(r[0], r[1], r[2], tuple(orjson.loads(r[3])), r[4], r[5], bool(r[6]), r[7])
            for r in rows
        ]

    def card_page(self, uuid: str, token: str, now: datetime) -> CardPage | None:
        with self._pool.connection() as connection:
            row = connection.execute(
                "SELECT service_id, issued_at, page, token_hash, page_expires FROM issued_card "
                "WHERE uuid = %s",
                (uuid,),
            ).fetchone()
            if row is None or row[2] is None or not row[3] or row[4] is None:
                return None
            if not hmac.compare_digest(row[3], token_hash(token)):
                return None
            if format_instant(now) >= row[4]:
                return None
            held = connection.execute(
                "SELECT card, service_id, hook_instance, at, what FROM held_back WHERE card = %s "
                "ORDER BY id",
                (uuid,),
            ).fetchall()
        page: dict[str, Any] = orjson.loads(row[2])
        return CardPage(
            uuid=uuid,
            service_id=row[0],
            issued_at=row[1],
            expires=row[4],
            page=page,
            feedback=self.feedback(uuid),
            held_back=[HeldBack(*h) for h in held],
        )

    def cards(
        self, *, silent_only: bool = False, since: datetime | None = None, limit: int = 1000
    ) -> list[StoredCard]:
        query = (
            "SELECT c.uuid, c.service_id, c.issued_at, c.indicator, c.topic, c.summary, c.silent, "
            "(SELECT string_agg(f.outcome, ',' ORDER BY f.id) FROM feedback f WHERE f.card = c.uuid), "
            "(SELECT count(*) FROM held_back h WHERE h.card = c.uuid) "
            "FROM issued_card c WHERE 1 = 1"
        )
        args: list[Any] = []
        if silent_only:
            query += " AND c.silent"
        if since is not None:
            query += " AND c.issued_at >= %s"
            args.append(format_instant(since))
        query += " ORDER BY c.issued_at DESC, c.uuid LIMIT %s"
        args.append(limit)
        with self._pool.connection() as connection:
            rows = connection.execute(query, args).fetchall()
        return [
            StoredCard(
                uuid=r[0],
                service_id=r[1],
                issued_at=r[2],
                indicator=r[3],
                topic=r[4],
                summary=r[5],
                silent=bool(r[6]),
                feedback=tuple(r[7].split(",")) if r[7] else (),
                held_back=int(r[8]),
            )
            for r in rows
        ]

    def check_writable(self) -> None:
        with self._pool.connection() as connection:
            connection.execute(
                "INSERT INTO readiness (id, checked_at) VALUES (1, now()::text) "
                "ON CONFLICT (id) DO UPDATE SET checked_at = EXCLUDED.checked_at"
            )

    def close(self) -> None:
        """The pool is shared with the replay cache: closed by its owner."""
