"""The contract of the service's store (:class:`fhir_leuko.service.store.CardStore`).

Every backend runs these tests: the ``store`` fixture is parametrised by backend (today SQLite); a
shared backend for several replicas (issue 11) adds itself to ``BACKENDS`` and must pass them
unchanged. Time is always passed in.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from fhir_leuko.service.feedback import FeedbackStore, token_hash
from fhir_leuko.service.models import FeedbackEntry
from fhir_leuko.service.store import CardFinding, CardStore, HeldBack, IssuedCard

T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


def _sqlite(tmp_path: Path, retention: timedelta | None) -> CardStore:
    return FeedbackStore(tmp_path / "store.sqlite3", retention=retention)


BACKENDS: dict[str, Callable[[Path, timedelta | None], CardStore]] = {"sqlite": _sqlite}


def _postgresql_database(request: pytest.FixtureRequest) -> str:
    """A new, empty database on the session's PostgreSQL server (issue 11's shared store)."""
    import psycopg

    server: str = request.getfixturevalue("postgres")
    name = "store_" + uuid.uuid4().hex[:12]
    with psycopg.connect(server, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return server.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(params=[*sorted(BACKENDS), "postgresql"])
def make_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[..., CardStore]]:
    made: list[CardStore] = []
    closers: list[Callable[[], None]] = []
    database = _postgresql_database(request) if request.param == "postgresql" else ""

    def make(retention: timedelta | None = timedelta(days=90)) -> CardStore:
        if request.param == "postgresql":
            from fhir_leuko.service.postgres import PostgresCardStore, connect_pool

            pool = connect_pool(database, max_size=2)
            closers.append(pool.close)
            store: CardStore = PostgresCardStore(pool, retention=retention)
        else:
            store = BACKENDS[request.param](tmp_path, retention)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()
    for close in closers:
        close()


def card(uuid: str, *, snooze: int = 3600, silent: bool = False, token: str = "tok") -> IssuedCard:
    return IssuedCard(
        uuid=uuid,
        indicator="critical",
        topic="neutropenia",
        suggestions=(("s-" + uuid, "Order a CBC"),),
        summary=f"Neutropenia: {uuid}",
        silent=silent,
        subject="subject-1",
        findings=(CardFinding("neutropenia", 3, "4", 0.4, snooze),),
        page={"summary": f"Neutropenia: {uuid}", "sections": []},
        token_hash=token_hash(token),
        page_expires=T0 + timedelta(days=7),
    )


def overridden(uuid: str, at: str = "2026-11-20T12:05:00Z") -> FeedbackEntry:
    return FeedbackEntry.model_validate(
        {"card": uuid, "outcome": "overridden", "outcomeTimestamp": at}
    )


def test_cards_and_feedback_are_stored_once(make_store: Callable[..., CardStore]) -> None:
    store = make_store()
    store.record_cards("svc", "hook-1", T0, [card("a"), card("b")])
    store.record_cards("svc", "hook-1", T0, [card("a")])
    assert store.issued_cards() == ["a", "b"]
    entry = overridden("a")
    assert store.record_feedback("svc", [entry, entry], client_iss="iss", received_at=T0) == 1
    assert store.record_feedback("svc", [entry], client_iss="iss", received_at=T0) == 0
    assert [(f.card, f.outcome, f.known_card) for f in store.feedback()] == [
        ("a", "overridden", True)
    ]


def test_an_override_snoozes_the_cards_findings_until_their_time(
    make_store: Callable[..., CardStore],
) -> None:
    store = make_store()
    store.record_cards("svc", "h", T0, [card("a"), card("never", snooze=0)])
    store.record_feedback(
        "svc", [overridden("a"), overridden("never")], client_iss=None, received_at=T0
    )
    store.record_feedback("svc", [overridden("unknown")], client_iss=None, received_at=T0)
    [snooze] = store.snoozes("svc", "subject-1", T0 + timedelta(minutes=59))
    assert (snooze.card, snooze.kind, snooze.rank, snooze.value) == ("a", "neutropenia", 3, 0.4)
    assert store.snoozes("svc", "subject-1", T0 + timedelta(hours=1)) == []
    assert store.snoozes("other-svc", "subject-1", T0) == []
    assert store.snoozes("svc", "subject-2", T0) == []


def test_the_page_needs_its_token_and_expires(make_store: Callable[..., CardStore]) -> None:
    store = make_store()
    store.record_cards("svc", "h", T0, [card("a", token="right")])
    store.record_held_back([HeldBack("a", "svc", "h2", "2026-11-20T13:00:00Z", "neutropenia")])
    page = store.card_page("a", "right", T0 + timedelta(days=6))
    assert page is not None and page.page["summary"] == "Neutropenia: a"
    assert [h.what for h in page.held_back] == ["neutropenia"]
    assert store.card_page("a", "wrong", T0) is None
    assert store.card_page("b", "right", T0) is None
    assert store.card_page("a", "right", T0 + timedelta(days=7)) is None


def test_retention_removes_cards_with_their_snoozes(make_store: Callable[..., CardStore]) -> None:
    store = make_store(timedelta(days=1))
    store.record_cards("svc", "h", T0, [card("old", snooze=10 * 86400)])
    store.record_feedback("svc", [overridden("old")], client_iss=None, received_at=T0)
    store.record_cards("svc", "h", T0 + timedelta(days=2), [card("new")])
    assert store.issued_cards() == ["new"]
    assert store.snoozes("svc", "subject-1", T0 + timedelta(days=2)) == []


def test_the_review_list_has_no_token(make_store: Callable[..., CardStore]) -> None:
    store = make_store()
    store.record_cards("svc", "h", T0, [card("a", silent=True, token="secret-token")])
    store.record_cards("svc", "h", T0 + timedelta(minutes=1), [card("b")])
    assert [c.uuid for c in store.cards()] == ["b", "a"]
    [silent] = store.cards(silent_only=True)
    assert silent.silent and silent.summary == "Neutropenia: a"
    text = repr(store.cards())
    assert "secret-token" not in text and token_hash("secret-token") not in text


def test_the_pseudonym_is_stable_and_keyed(
    make_store: Callable[..., CardStore], tmp_path: Path
) -> None:
    store = make_store()
    assert store.subject_of("pt-1") == store.subject_of("pt-1") != store.subject_of("pt-2")
    assert "pt-1" not in store.subject_of("pt-1")


def test_a_version_1_sqlite_store_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "v1.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript(
            "CREATE TABLE issued_card (uuid TEXT PRIMARY KEY, service_id TEXT NOT NULL, "
            "hook_instance TEXT NOT NULL, issued_at TEXT NOT NULL, indicator TEXT NOT NULL, "
            "topic TEXT NOT NULL, suggestions TEXT NOT NULL);"
            "INSERT INTO issued_card VALUES ('old', 'svc', 'h', '2026-11-20T11:00:00Z', 'info', "
            "'neutropenia', '[]');"
            "PRAGMA user_version=1;"
        )
    store = FeedbackStore(path, retention=None)
    try:
        assert store.issued_cards() == ["old"]
        assert [c.uuid for c in store.cards()] == ["old"]
        assert store.card_page("old", "", T0) is None
    finally:
        store.close()


def test_sqlite_writers_in_two_processes_wait_for_each_other(tmp_path: Path) -> None:
    """``serve --workers N`` opens one SQLite file in several processes (two connections here).
    Feedback reads the card, then writes: in a deferred transaction whose snapshot predates
    another writer's commit, SQLite answers SQLITE_BUSY at once instead of waiting its busy
    timeout, and the feedback was lost. Write transactions take the write lock up front."""
    import threading
    import time

    first = FeedbackStore(tmp_path / "store.sqlite3", retention=None)
    second = FeedbackStore(tmp_path / "store.sqlite3", retention=None)
    first.record_cards("svc", "hook-1", T0, [card("a")])
    writing = threading.Event()

    def other_process_writes() -> None:
        with first._transaction() as db:
            db.execute("UPDATE issued_card SET summary = summary")
            writing.set()
            time.sleep(0.5)

    other = threading.Thread(target=other_process_writes)
    other.start()
    try:
        assert writing.wait(5)
        assert second.record_feedback("svc", [overridden("a")], client_iss=None, received_at=T0) == 1
    finally:
        other.join()
    assert [f.card for f in first.feedback()] == ["a"]
    first.close()
    second.close()
