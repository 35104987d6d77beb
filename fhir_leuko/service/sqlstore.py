"""The service's store in SQL, once for both databases: the queries, token checks, snooze and
held-back rules, pruning and the card listing of :class:`~fhir_leuko.service.store.CardStore`.

The backends (:class:`~fhir_leuko.service.feedback.FeedbackStore` on an SQLite file,
:class:`~fhir_leuko.service.postgres.PostgresCardStore` on PostgreSQL) have the same tables and
columns; they differ only in

* how a connection is had and a transaction made (:meth:`SqlCardStore._connection`,
  :meth:`SqlCardStore._transaction`): one SQLite connection serialised by a lock, or a connection
  from a psycopg pool;
* the placeholder: every query here is written with ``?`` (SQLite's); the PostgreSQL connection
  turns each into ``%s`` (so no query here may hold a literal ``?`` or ``%``);
* a few pieces of dialect, all in :class:`Dialect` (:data:`SQLITE`, :data:`POSTGRESQL`);
* their schema, its creation and upgrade, the readiness write and closing: each in its own module.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets
import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar, Protocol

import orjson

from ..core.fhirtime import format_instant
from .models import FeedbackEntry
from .store import CardFinding, CardPage, HeldBack, IssuedCard, Snooze, StoredCard, StoredFeedback

__all__ = [
    "FEEDBACK_TABLES",
    "POSTGRESQL",
    "SNOOZE_TABLES",
    "SQLITE",
    "Connection",
    "Cursor",
    "Dialect",
    "SqlCardStore",
    "entry_key",
    "findings_json",
    "open_sqlite",
    "token_hash",
]


def token_hash(token: str) -> str:
    """What is stored of a card page's token: its SHA-256, hex."""
    return hashlib.sha256(token.encode()).hexdigest()


def entry_key(service_id: str, entry: FeedbackEntry) -> str:
    """The identity of a feedback entry (stored once): the hash of what it says."""
    reason = entry.overrideReason
    identity = {
        "service": service_id,
        "card": entry.card,
        "outcome": entry.outcome,
        "at": format_instant(entry.outcomeTimestamp),
        "accepted": sorted(s.id for s in entry.acceptedSuggestions or []),
        "reason": None
        if reason is None or reason.reason is None
        else [reason.reason.system, reason.reason.code],
        "comment": reason.userComment if reason is not None else None,
    }
    return hashlib.sha256(orjson.dumps(identity, option=orjson.OPT_SORT_KEYS)).hexdigest()


def findings_json(findings: Sequence[CardFinding]) -> str:
    return orjson.dumps(
        [
            {"kind": f.kind, "rank": f.rank, "grade": f.grade, "value": f.value,
             "snooze_seconds": f.snooze_seconds}
            for f in findings
        ]
    ).decode()  # fmt: skip


def open_sqlite(path: Path) -> sqlite3.Connection:
    """The service's SQLite file (and its directory, if missing), in WAL mode, opened the one way
    the card store and the replay cache share it: autocommit (transactions are explicit), usable
    from any thread (callers serialise with a lock), waiting up to 5 s for another process's write.

    Raises:
        OSError, sqlite3.Error: the file cannot be made or opened.
    """
    if str(path) != ":memory:":
        path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA busy_timeout=5000")
    return db


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Connection(Protocol):
    """What the shared code needs of a connection: ``sqlite3.Connection`` as it is; a psycopg
    connection through the wrapper in :mod:`fhir_leuko.service.postgres` (placeholders)."""

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Cursor: ...

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]], /) -> object: ...


@functools.cache
def _insert(or_ignore: bool, table: str, columns: tuple[str, ...], key: str) -> str:
    into = f"INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
    if or_ignore:
        return f"INSERT OR IGNORE {into}"
    return f"INSERT {into} ON CONFLICT ({key}) DO NOTHING"


@dataclass(frozen=True, slots=True)
class Dialect:
    """The pieces of SQL the two databases spell differently."""

    or_ignore: bool
    """How an insert skips a row already there: SQLite's ``INSERT OR IGNORE``, else PostgreSQL's
    ``ON CONFLICT (key) DO NOTHING``."""
    outcomes: str
    """A card ``c``'s feedback outcomes (``feedback f``), comma-joined in the order received."""
    silent: str
    """``c`` is a silent card (an integer 0/1 in SQLite, a BOOLEAN in PostgreSQL)."""
    issued_order: str
    """The order of :meth:`SqlCardStore.issued_cards`, oldest first. SQLite gives a tie of
    ``issued_at`` in the order its index holds it (by rowid: insertion); PostgreSQL by uuid."""
    row_id: str
    """The type of an ``id`` the database numbers (SQLite's rowid alias, PostgreSQL's sequence)."""
    boolean: str
    double: str
    """An 8-byte float (PostgreSQL's REAL has 4)."""
    blob: str

    def ddl(self, tables: str) -> str:
        """:data:`FEEDBACK_TABLES` or :data:`SNOOZE_TABLES` with this database's types."""
        return tables.format(
            row_id=self.row_id, boolean=self.boolean, double=self.double, blob=self.blob
        )

    def insert_new(self, table: str, columns: tuple[str, ...], key: str) -> str:
        """An INSERT of one row that skips (without an error) a row whose ``key`` is taken."""
        return _insert(self.or_ignore, table, columns, key)


SQLITE = Dialect(
    or_ignore=True,
    outcomes="group_concat(f.outcome, ',')",
    silent="c.silent = 1",
    issued_order="issued_at",
    row_id="INTEGER",
    boolean="INTEGER",
    double="REAL",
    blob="BLOB",
)
POSTGRESQL = Dialect(
    or_ignore=False,
    outcomes="string_agg(f.outcome, ',' ORDER BY f.id)",
    silent="c.silent",
    issued_order="issued_at, uuid",
    row_id="BIGSERIAL",
    boolean="BOOLEAN",
    double="DOUBLE PRECISION",
    blob="BYTEA",
)

# The tables both databases define alike but for a few types ({...}: Dialect.ddl). SQLite made
# these in its schema 1 and 2 (service/feedback.py) and keeps each statement's text in every file
# (sqlite_master): change them only with a new schema version. issued_card differs more (SQLite
# adds schema 2's columns to schema 1's table): each backend defines it.
FEEDBACK_TABLES = """
CREATE TABLE IF NOT EXISTS feedback (
    id                   {row_id} PRIMARY KEY,
    entry_key            TEXT NOT NULL UNIQUE,
    service_id           TEXT NOT NULL,
    card                 TEXT NOT NULL,
    outcome              TEXT NOT NULL,
    outcome_timestamp    TEXT NOT NULL,
    accepted_suggestions TEXT NOT NULL,  -- JSON list of suggestion uuids
    override_system      TEXT,
    override_code        TEXT,
    override_display     TEXT,
    user_comment         TEXT,
    client_iss           TEXT,
    known_card           {boolean} NOT NULL,
    received_at          TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS readiness (   -- one row, written by GET /readyz
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    checked_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS feedback_card ON feedback (card);
"""
SNOOZE_TABLES = """
CREATE TABLE IF NOT EXISTS store_key (id INTEGER PRIMARY KEY CHECK (id = 1), key {blob} NOT NULL);
CREATE TABLE IF NOT EXISTS snooze (
    id         {row_id} PRIMARY KEY,
    card       TEXT NOT NULL,
    service_id TEXT NOT NULL,
    subject    TEXT NOT NULL,
    kind       TEXT NOT NULL,
    rank       INTEGER NOT NULL,
    grade      TEXT NOT NULL,
    value      {double} NOT NULL,
    until      TEXT NOT NULL,
    UNIQUE (card, kind)
);
CREATE INDEX IF NOT EXISTS snooze_subject ON snooze (service_id, subject);
CREATE TABLE IF NOT EXISTS held_back (
    id            {row_id} PRIMARY KEY,
    card          TEXT NOT NULL,
    service_id    TEXT NOT NULL,
    hook_instance TEXT NOT NULL,
    at            TEXT NOT NULL,
    what          TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS held_back_card ON held_back (card);
"""

_CARD_COLUMNS = (
    "uuid", "service_id", "hook_instance", "issued_at", "indicator", "topic", "suggestions",
    "summary", "silent", "subject", "findings", "page", "token_hash", "page_expires",
)  # fmt: skip
_FEEDBACK_COLUMNS = (
    "entry_key", "service_id", "card", "outcome", "outcome_timestamp", "accepted_suggestions",
    "override_system", "override_code", "override_display", "user_comment", "client_iss",
    "known_card", "received_at",
)  # fmt: skip
_SNOOZE_COLUMNS = ("card", "service_id", "subject", "kind", "rank", "grade", "value", "until")


class SqlCardStore(ABC):
    """:class:`~fhir_leuko.service.store.CardStore` on the tables both backends share. A backend
    sets :attr:`dialect`, gives connections (:meth:`_connection`, :meth:`_transaction`), calls
    :meth:`_load_key` once open, and implements :meth:`check_writable` and :meth:`close`."""

    dialect: ClassVar[Dialect]

    def __init__(self, retention: timedelta | None) -> None:
        """``retention``: how long issued cards are kept (``None``: forever)."""
        self.retention = retention
        self._pruned_at: datetime | None = None
        self._prune_lock = threading.Lock()
        self._key = b""

    @abstractmethod
    def _connection(self) -> AbstractContextManager[Connection]:
        """A connection for a few statements, each committed on its own (autocommit)."""

    @abstractmethod
    def _transaction(self) -> AbstractContextManager[Connection]:
        """A connection in one transaction: committed at the end, rolled back on an error."""

    @abstractmethod
    def check_writable(self) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

    def _load_key(self, db: Connection) -> None:
        """The pseudonym key: made once per store (the first process to open it wins), then read."""
        select = "SELECT key FROM store_key WHERE id = 1"
        row = db.execute(select).fetchone()
        if row is None:
            insert = self.dialect.insert_new("store_key", ("id", "key"), "id")
            db.execute(insert, (1, secrets.token_bytes(32)))
            row = db.execute(select).fetchone()
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
                c.silent,  # SQLite stores a bool as the integer 0 or 1
                c.subject,
                findings_json(c.findings),
                orjson.dumps(c.page).decode() if c.page is not None else None,
                c.token_hash,
                format_instant(c.page_expires) if c.page_expires is not None else None,
            )
            for c in cards
        ]
        insert = self.dialect.insert_new("issued_card", _CARD_COLUMNS, "uuid")
        with self._transaction() as db:
            db.executemany(insert, rows)
            self._prune(db, issued_at)

    def _prune(self, db: Connection, now: datetime) -> None:
        """Delete issued cards older than the retention, at most once an hour (of ``now``)."""
        if self.retention is None:
            return
        with self._prune_lock:
            last = self._pruned_at
            if last is not None and timedelta(0) <= now - last < timedelta(hours=1):
                return
            self._pruned_at = now
        # issued_at is written by format_instant: second precision, or ".ffffff" within a second;
        # a whole-second cutoff compares correctly as text except inside its own second.
        cutoff = format_instant((now - self.retention).replace(microsecond=0))
        gone = "SELECT uuid FROM issued_card WHERE issued_at < ?"
        db.execute(f"DELETE FROM snooze WHERE card IN ({gone})", (cutoff,))  # noqa: S608
        db.execute(f"DELETE FROM held_back WHERE card IN ({gone})", (cutoff,))  # noqa: S608
        db.execute("DELETE FROM issued_card WHERE issued_at < ?", (cutoff,))

    def issued_cards(self) -> list[str]:
        """The uuids of the issued cards still kept, oldest first."""
        query = f"SELECT uuid FROM issued_card ORDER BY {self.dialect.issued_order}"  # noqa: S608
        with self._connection() as db:
            rows = db.execute(query).fetchall()
        return [str(r[0]) for r in rows]

    def record_feedback(
        self,
        service_id: str,
        entries: Iterable[FeedbackEntry],
        *,
        client_iss: str | None,
        received_at: datetime,
    ) -> int:
        """Store feedback entries; returns how many were new (a repeated entry is ignored). A new
        ``overridden`` entry of a known card snoozes the card's findings from ``received_at``."""
        new = 0
        at = format_instant(received_at)
        insert = self.dialect.insert_new("feedback", _FEEDBACK_COLUMNS, "entry_key")
        with self._transaction() as db:
            for entry in entries:
                known = db.execute(
                    "SELECT subject, findings FROM issued_card WHERE uuid = ? AND service_id = ?",
                    (entry.card, service_id),
                ).fetchone()
                reason = entry.overrideReason
                coding = reason.reason if reason is not None else None
                cursor = db.execute(
                    insert,
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
                if cursor.rowcount != 1:
                    continue  # sent before
                new += 1
                if known is not None and entry.outcome == "overridden":
                    self._snooze(db, service_id, entry.card, known[0], known[1], received_at)
        return new

    def _snooze(
        self, db: Connection, service_id: str, card: str, subject: str, findings: str, at: datetime
    ) -> None:
        insert = self.dialect.insert_new("snooze", _SNOOZE_COLUMNS, "card, kind")
        for item in orjson.loads(findings):
            seconds = int(item["snooze_seconds"])
            if seconds <= 0 or not subject:
                continue
            until = format_instant(at + timedelta(seconds=seconds))
            db.execute(
                insert,
                (card, service_id, subject, item["kind"], int(item["rank"]), str(item["grade"]),
                 float(item["value"]), until),
            )  # fmt: skip

    def snoozes(self, service_id: str, subject: str, now: datetime) -> list[Snooze]:
        with self._connection() as db:
            rows = db.execute(
                "SELECT card, kind, rank, grade, value, until FROM snooze WHERE service_id = ? "
                "AND subject = ? AND until > ? ORDER BY id",
                (service_id, subject, format_instant(now)),
            ).fetchall()
        return [Snooze(r[0], r[1], int(r[2]), r[3], float(r[4]), r[5]) for r in rows]

    def record_held_back(self, held: Sequence[HeldBack]) -> None:
        if not held:
            return
        with self._transaction() as db:
            db.executemany(
                "INSERT INTO held_back (card, service_id, hook_instance, at, what) "
                "VALUES (?, ?, ?, ?, ?)",
                [(h.card, h.service_id, h.hook_instance, h.at, h.what) for h in held],
            )

    def feedback(self, card: str | None = None) -> list[StoredFeedback]:
        """Stored feedback (of one card), oldest first."""
        query = (
            "SELECT card, outcome, outcome_timestamp, accepted_suggestions, override_code, "
            "user_comment, known_card, override_display FROM feedback"
        )
        args: tuple[str, ...] = ()
        if card is not None:
            query += " WHERE card = ?"
            args = (card,)
        with self._connection() as db:
            rows = db.execute(query + " ORDER BY id", args).fetchall()
        return [
            StoredFeedback(
                r[0], r[1], r[2], tuple(orjson.loads(r[3])), r[4], r[5], bool(r[6]), r[7]
            )
            for r in rows
        ]

    def card_page(self, uuid: str, token: str, now: datetime) -> CardPage | None:
        with self._connection() as db:
            row = db.execute(
                "SELECT service_id, issued_at, page, token_hash, page_expires FROM issued_card "
                "WHERE uuid = ?",
                (uuid,),
            ).fetchone()
            if row is None or row[2] is None or not row[3] or row[4] is None:
                return None
            if not hmac.compare_digest(row[3], token_hash(token)):
                return None
            if format_instant(now) >= row[4]:
                return None
            held = db.execute(
                "SELECT card, service_id, hook_instance, at, what FROM held_back WHERE card = ? "
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
        query = (  # the dialect's text only, no input:
            "SELECT c.uuid, c.service_id, c.issued_at, c.indicator, c.topic, c.summary, "  # noqa: S608
            "c.silent, "
            f"(SELECT {self.dialect.outcomes} FROM feedback f WHERE f.card = c.uuid), "
            "(SELECT count(*) FROM held_back h WHERE h.card = c.uuid) "
            "FROM issued_card c WHERE 1 = 1"
        )
        args: list[Any] = []
        if silent_only:
            query += f" AND {self.dialect.silent}"
        if since is not None:
            query += " AND c.issued_at >= ?"
            args.append(format_instant(since))
        query += " ORDER BY c.issued_at DESC, c.uuid LIMIT ?"
        args.append(limit)
        with self._connection() as db:
            rows = db.execute(query, args).fetchall()
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
