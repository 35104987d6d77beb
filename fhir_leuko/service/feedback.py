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

The queries and rules are those of every backend (:mod:`fhir_leuko.service.sqlstore`); this module
holds what is SQLite's own: the file and its lock, the schema and its upgrade from version 1.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

from ..errors import UsageError
from .sqlstore import (
    FEEDBACK_TABLES,
    SNOOZE_TABLES,
    SQLITE,
    SqlCardStore,
    entry_key,
    findings_json,
    open_sqlite,
    token_hash,
)
from .store import IssuedCard, StoredFeedback

__all__ = ["FeedbackStore", "IssuedCard", "StoredFeedback", "entry_key", "findings_json", "token_hash"]

_SCHEMA_VERSION = 2

# Schema 1 (0.1.0): issued cards, feedback, readiness; schema 2 (issue 14) adds the card's page, its
# token's hash, silent mode and snoozes. A new file is made by both, in this order, as an old one
# was upgraded (the text of each statement stays in the file: sqlite_master).
_SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS issued_card (
    uuid          TEXT PRIMARY KEY,
    service_id    TEXT NOT NULL,
    hook_instance TEXT NOT NULL,
    issued_at     TEXT NOT NULL,
    indicator     TEXT NOT NULL,
    topic         TEXT NOT NULL,
    suggestions   TEXT NOT NULL   -- JSON [{"uuid": ..., "label": ...}]
);"""
    + SQLITE.ddl(FEEDBACK_TABLES)
    + "CREATE INDEX IF NOT EXISTS issued_card_time ON issued_card (issued_at);  -- retention pruning\n"
)
_SCHEMA_2 = """
ALTER TABLE issued_card ADD COLUMN summary TEXT NOT NULL DEFAULT '';
ALTER TABLE issued_card ADD COLUMN silent INTEGER NOT NULL DEFAULT 0;
ALTER TABLE issued_card ADD COLUMN subject TEXT NOT NULL DEFAULT '';
ALTER TABLE issued_card ADD COLUMN findings TEXT NOT NULL DEFAULT '[]';
ALTER TABLE issued_card ADD COLUMN page TEXT;
ALTER TABLE issued_card ADD COLUMN token_hash TEXT NOT NULL DEFAULT '';
ALTER TABLE issued_card ADD COLUMN page_expires TEXT;""" + SQLITE.ddl(SNOOZE_TABLES)


@contextmanager
def _in_transaction(db: sqlite3.Connection, begin: str) -> Iterator[None]:
    """``begin`` … COMMIT, or ROLLBACK on any error (the commit's own included)."""
    db.execute(begin)
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


class FeedbackStore(SqlCardStore):
    """Issued cards, feedback and snoozes in one SQLite file (created with its directory if
    missing). Implements :class:`~fhir_leuko.service.store.CardStore`."""

    dialect = SQLITE

    def __init__(self, path: Path, *, retention: timedelta | None = timedelta(days=90)) -> None:
        """``retention``: how long issued cards are kept (``None``: forever)."""
        super().__init__(retention)
        self.path = path
        try:
            self._db = open_sqlite(path)
            self._migrate(path)
            self._inode = None if str(path) == ":memory:" else path.stat().st_ino
            self._load_key(self._db)
        except (OSError, sqlite3.Error) as exc:
            raise UsageError(f"{path}: cannot open the feedback database: {exc}") from None
        self._lock = threading.Lock()

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        # Every transaction here writes, most after a read (feedback checks the card first).
        # A deferred BEGIN takes the write lock only at the first write, and SQLite answers
        # SQLITE_BUSY at once, without the busy timeout, when two processes (serve --workers N)
        # both hold a read lock and one wants to write. IMMEDIATE takes the write lock up front
        # and waits the busy timeout for it instead (https://www.sqlite.org/lang_transaction.html).
        with self._lock, _in_transaction(self._db, "BEGIN IMMEDIATE"):
            yield self._db

    def _migrate(self, path: Path) -> None:
        """Create or upgrade the schema, in one transaction (another process may open it too)."""
        db = self._db
        with _in_transaction(db, "BEGIN IMMEDIATE"):
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
