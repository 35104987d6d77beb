"""The service's SQLite store: the cards it issued, and the feedback clients sent about them.

CDS Hooks 2.0 §Feedback: a client SHOULD send feedback when a user accepts or overrides a card, and
"a CDS Service may receive feedback for the same card instance multiple times". Feedback is stored
idempotently: an entry is identified by the hash of what it says (service, card, outcome, time,
accepted suggestions, override reason), so the same feedback sent twice is one row.

Issued cards are kept (uuid, service, hook instance, indicator, topic, suggestion uuids and labels)
so feedback can be matched to what was shown, for ``retention`` (default 90 days: feedback comes
within minutes of a card, so that is generous) and then deleted, checked at most once an hour of
issue time so the table stays small without a cron job. Feedback rows are kept. Nothing identifying
the patient, and never a token, is stored. One connection, serialised by a lock: writes are small
and SQLite in WAL mode is fast enough for a hook's budget (see benchmarks/README.md).
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import orjson

from ..core.fhirtime import format_instant
from ..errors import UsageError
from .models import FeedbackEntry

__all__ = ["FeedbackStore", "IssuedCard", "StoredFeedback"]

_SCHEMA_VERSION = 1

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


@dataclass(frozen=True, slots=True)
class IssuedCard:
    uuid: str
    indicator: str
    topic: str
    suggestions: tuple[tuple[str, str], ...]
    """``(uuid, label)`` of each suggestion."""


@dataclass(frozen=True, slots=True)
class StoredFeedback:
    card: str
    outcome: str
    outcome_timestamp: str
    accepted_suggestions: tuple[str, ...]
    override_code: str | None
    user_comment: str | None
    known_card: bool


def _entry_key(service_id: str, entry: FeedbackEntry) -> str:
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


class FeedbackStore:
    """Issued cards and feedback in one SQLite file (created with its directory if missing)."""

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
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > _SCHEMA_VERSION:
                raise UsageError(
                    f"{path}: feedback database schema {version} is newer than this fhir-leuko "
                    f"({_SCHEMA_VERSION})"
                )
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
            self._inode = None if str(path) == ":memory:" else path.stat().st_ino
        except (OSError, sqlite3.Error) as exc:
            raise UsageError(f"{path}: cannot open the feedback database: {exc}") from None
        self._lock = threading.Lock()

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
            )
            for c in cards
        ]
        with self._lock:
            self._db.executemany(
                "INSERT OR IGNORE INTO issued_card VALUES (?, ?, ?, ?, ?, ?, ?)", rows
            )
            self._prune(issued_at)

    def _prune(self, now: datetime) -> None:
        """Delete issued cards older than the retention, at most once an hour (of ``now``)."""
        if self.retention is None:
            return
        if self._pruned_at is not None and timedelta(0) <= now - self._pruned_at < timedelta(hours=1):
            return
        self._pruned_at = now
        # issued_at is written by format_instant: second precision, or ".ffffff" within a second;
        # a whole-second cutoff compares correctly as text except inside its own second.
        cutoff = format_instant((now - self.retention).replace(microsecond=0))
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
        """Store feedback entries; returns how many were new (a repeated entry is ignored)."""
        new = 0
        at = format_instant(received_at)
        with self._lock:
            self._db.execute("BEGIN")
            try:
                for entry in entries:
                    known = self._db.execute(
                        "SELECT 1 FROM issued_card WHERE uuid = ? AND service_id = ?",
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
                            _entry_key(service_id, entry),
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
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return new

    def feedback(self, card: str | None = None) -> list[StoredFeedback]:
        """Stored feedback (of one card), oldest first."""
        query = (
            "SELECT card, outcome, outcome_timestamp, accepted_suggestions, override_code, "
            "user_comment, known_card FROM feedback"
        )
        args: tuple[str, ...] = ()
        if card is not None:
            query += " WHERE card = ?"
            args = (card,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY id", args).fetchall()
        return [
            StoredFeedback(r[0], r[1], r[2], tuple(orjson.loads(r[3])), r[4], r[5], bool(r[6]))
            for r in rows
        ]
