"""The service's SQLite store (:class:`~fhir_leuko.service.store.CardStore` on one SQLite file):
the cards it issued with their pages, the feedback clients sent about them, snoozes and what they
held back.

CDS Hooks 2.0 §Feedback: a client SHOULD send feedback when a user accepts or overrides a card, and
"a CDS Service may receive feedback for the same card instance multiple times". Feedback is stored
idempotently: an entry is identified by the hash of what it says (service, card, outcome, time,
accepted suggestions, override reason), so the same feedback sent twice is one row.

Issued cards are kept (uuid, service, hook instance, indicator, topic, summary, suggestion uuids and
labels, the page data behind the card's link, the SHA-256 of the link's token, the findings an
override would snooze and the patient's pseudonym) so feedback can be matched to what was shown,
for ``retention`` (default 90 days: feedback comes within minutes of a card, so that is generous)
and then deleted with their snoozes and held-back records, checked at most once an hour of issue
time so the tables stay small without a cron job. Feedback rows are kept. The patient appears only
as a keyed pseudonym (HMAC-SHA-256 with a random key kept in this file); the page data holds the
clinical values, dates and drug names of the card, as the card itself did. Never a token. One
connection, serialised by a lock: writes are small and SQLite in WAL mode is fast enough for a
hook's budget (see benchmarks/README.md).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from ..core.fhirtime import format_instant
from ..errors import UsageError
from .models import FeedbackEntry
from .store import (
    CardFinding,
    CardPage,
    HeldBack,
    IssuedCard,
    Snooze,
    StoredCard,
    StoredFeedback,
)

__all__ = ["FeedbackStore", "IssuedCard", "StoredFeedback", "entry_key", "findings_json", "token_hash"]

_SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS issued_card (
    uuid          TEXT PRIMARY KEY,
    service_id    TEXT NOT NULL,
    hook_instance TEXT NOT NULL,
    issued_at     TEXT NOT NULL,
    indicator     TEXT NOT NULL,
    topic         TEXT NOT NULL,
    suggestions   TEXT NOT NULL   -- JSON [{"uuid": ..., "label": ...}]
);
CREATE TABLE IF NOT EXISTS feedback (
    id                   INTEGER PRIMARY KEY,
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
    known_card           INTEGER NOT NULL,
    received_at          TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS readiness (   -- one row, written by GET /readyz
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    checked_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS feedback_card ON feedback (card);
CREATE INDEX IF NOT EXISTS issued_card_time ON issued_card (issued_at);  -- retention pruning
"""

# Version 2 (issue 14): the card's page, its token's hash, silent mode, snoozes.
_SCHEMA_2 = """
ALTER TABLE issued_card ADD COLUMN summary TEXT NOT NULL DEFAULT '';
ALTER TABLE issued_card ADD COLUMN silent INTEGER NOT NULL DEFAULT 0;
ALTER TABLE issued_card ADD COLUMN subject TEXT NOT NULL DEFAULT '';
ALTER TABLE issued_card ADD COLUMN findings TEXT NOT NULL DEFAULT '[]';
ALTER TABLE issued_card ADD COLUMN page TEXT;
ALTER TABLE issued_card ADD COLUMN token_hash TEXT NOT NULL DEFAULT '';
ALTER TABLE issued_card ADD COLUMN page_expires TEXT;
CREATE TABLE IF NOT EXISTS store_key (id INTEGER PRIMARY KEY CHECK (id = 1), key BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS snooze (
    id         INTEGER PRIMARY KEY,
    card       TEXT NOT NULL,
    service_id TEXT NOT NULL,
    subject    TEXT NOT NULL,
    kind       TEXT NOT NULL,
    rank       INTEGER NOT NULL,
    grade      TEXT NOT NULL,
    value      REAL NOT NULL,
    until      TEXT NOT NULL,
    UNIQUE (card, kind)
);
CREATE INDEX IF NOT EXISTS snooze_subject ON snooze (service_id, subject);
CREATE TABLE IF NOT EXISTS held_back (
    id            INTEGER PRIMARY KEY,
    card          TEXT NOT NULL,
    service_id    TEXT NOT NULL,
    hook_instance TEXT NOT NULL,
    at            TEXT NOT NULL,
    what          TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS held_back_card ON held_back (card);
"""


def token_hash(token: str) -> str:
    """What is stored of a card page's token: its SHA-256, hex."""
    return hashlib.sha256(token.encode()).hexdigest()


def entry_key(service_id: str, entry: FeedbackEntry) -> str:
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


class FeedbackStore:
    """Issued cards, feedback and snoozes in one SQLite file (created with its directory if
    missing). Implements :class:`~fhir_leuko.service.store.CardStore`."""

    def __init__(self, path: Path, *, retention: timedelta | None = timedelta(days=90)) -> None:
        """``retention``: how long issued cards are kept (``None``: forever)."""
        self.path = path
        self.retention = retention
        self._pruned_at: datetime | None = None
        try:
            if str(path) != ":memory:":
                path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._migrate(path)
            self._inode = None if str(path) == ":memory:" else path.stat().st_ino
            row = self._db.execute("SELECT key FROM store_key WHERE id = 1").fetchone()
            if row is None:
                self._db.execute(
                    "INSERT OR IGNORE INTO store_key VALUES (1, ?)", (secrets.token_bytes(32),)
                )
                row = self._db.execute("SELECT key FROM store_key WHERE id = 1").fetchone()
            self._key = bytes(row[0])
        except (OSError, sqlite3.Error) as exc:
            raise UsageError(f"{path}: cannot open the feedback database: {exc}") from None
        self._lock = threading.Lock()

    def _migrate(self, path: Path) -> None:
        """Create or upgrade the schema, in one transaction (another process may open it too)."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > _SCHEMA_VERSION:
                raise UsageError(
                    f"{path}: feedback database schema {version} is newer than this fhir-leuko "
                    f"({_SCHEMA_VERSION})"
                )
            if version < _SCHEMA_VERSION:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                if version < 2:
                    for statement in _SCHEMA_2.split(";"):
                        if statement.strip():
                            db.execute(statement)
                db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def check_writable(self) -> None:
        """Write one row (readiness probe).

        Raises:
            OSError: the file was removed or replaced since it was opened (a volume wiped or
                remounted): writes would go to a file nobody will read.
            sqlite3.Error: the write failed.
        """
        if self._inode is not None and self.path.stat().st_ino != self._inode:
            raise OSError(f"{self.path} was replaced since it was opened")
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO readiness (id, checked_at) VALUES (1, datetime('now'))"
            )

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
                1 if c.silent else 0,
                c.subject,
                findings_json(c.findings),
                orjson.dumps(c.page).decode() if c.page is not None else None,
                c.token_hash,
                format_instant(c.page_expires) if c.page_expires is not None else None,
            )
            for c in cards
        ]
        with self._lock:
            self._db.executemany(
                "INSERT OR IGNORE INTO issued_card (uuid, service_id, hook_instance, issued_at, "
                "indicator, topic, suggestions, summary, silent, subject, findings, page, "
                "token_hash, page_expires) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            self._prune(issued_at)

    def _prune(self, now: datetime) -> None:
        """Delete issued cards older than the retention, at most once an hour (of ``now``)."""
        if self.retention is None:
            return
        if self._pruned_at is not None and timedelta(0) <= now - self._pruned_at < timedelta(
            hours=1
        ):
            return
        self._pruned_at = now
        # issued_at is written by format_instant: second precision, or ".ffffff" within a second;
        # a whole-second cutoff compares correctly as text except inside its own second.
        cutoff = format_instant((now - self.retention).replace(microsecond=0))
        gone = "SELECT uuid FROM issued_card WHERE issued_at < ?"
        self._db.execute(f"DELETE FROM snooze WHERE card IN ({gone})", (cutoff,))  # noqa: S608
        self._db.execute(f"DELETE FROM held_back WHERE card IN ({gone})", (cutoff,))  # noqa: S608
        self._db.execute("DELETE FROM issued_card WHERE issued_at < ?", (cutoff,))

    def issued_cards(self) -> list[str]:
        """The uuids of the issued cards still kept, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT uuid FROM issued_card ORDER BY issued_at").fetchall()
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
        with self._lock:
            self._db.execute("BEGIN")
            try:
                for entry in entries:
                    known = self._db.execute(
                        "SELECT subject, findings FROM issued_card WHERE uuid = ? "
                        "AND service_id = ?",
                        (entry.card, service_id),
                    ).fetchone()
                    reason = entry.overrideReason
                    coding = reason.reason if reason is not None else None
                    cursor = self._db.execute(
                        "INSERT OR IGNORE INTO feedback (entry_key, service_id, card, outcome, "
                        "outcome_timestamp, accepted_suggestions, override_system, override_code, "
                        "override_display, user_comment, client_iss, known_card, received_at) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                            1 if known else 0,
                            at,
                        ),
                    )
                    new += cursor.rowcount
                    if cursor.rowcount and known and entry.outcome == "overridden":
                        self._snooze(service_id, entry.card, known[0], known[1], received_at)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return new

    def _snooze(
        self, service_id: str, card: str, subject: str, findings: str, at: datetime
    ) -> None:
        for item in orjson.loads(findings):
            seconds = int(item["snooze_seconds"])
            if seconds <= 0 or not subject:
                continue
            self._db.execute(
                "INSERT OR IGNORE INTO snooze (card, service_id, subject, kind, rank, grade, "
                "value, until) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
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
        with self._lock:
            rows = self._db.execute(
                "SELECT card, kind, rank, grade, value, until FROM snooze WHERE service_id = ? "
                "AND subject = ? AND until > ? ORDER BY id",
                (service_id, subject, format_instant(now)),
            ).fetchall()
        return [Snooze(r[0], r[1], int(r[2]), r[3], float(r[4]), r[5]) for r in rows]

    def record_held_back(self, held: Sequence[HeldBack]) -> None:
        if not held:
            return
        with self._lock:
            self._db.executemany(
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
        with self._lock:
            rows = self._db.execute(query + " ORDER BY id", args).fetchall()
        return [
            StoredFeedback(
                r[0], r[1], r[2], tuple(orjson.loads(r[3])), r[4], r[5], bool(r[6]), r[7]
            )
            for r in rows
        ]

    def card_page(self, uuid: str, token: str, now: datetime) -> CardPage | None:
        with self._lock:
            row = self._db.execute(
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
        with self._lock:
            held = self._db.execute(
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
        query = (
            "SELECT c.uuid, c.service_id, c.issued_at, c.indicator, c.topic, c.summary, c.silent, "
            "(SELECT group_concat(f.outcome, ',') FROM feedback f WHERE f.card = c.uuid), "
            "(SELECT count(*) FROM held_back h WHERE h.card = c.uuid) "
            "FROM issued_card c WHERE 1 = 1"
        )
        args: list[Any] = []
        if silent_only:
            query += " AND c.silent = 1"
        if since is not None:
            query += " AND c.issued_at >= ?"
            args.append(format_instant(since))
        query += " ORDER BY c.issued_at DESC, c.uuid LIMIT ?"
        args.append(limit)
        with self._lock:
            rows = self._db.execute(query, args).fetchall()
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
