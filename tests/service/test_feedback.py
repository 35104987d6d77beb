"""Feedback (CDS Hooks 2.0 §Feedback): accepted, overridden, duplicates stored once, in SQLite."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from fhir_leuko.service.feedback import FeedbackStore, IssuedCard

from .conftest import ServiceEnv
from .harness import CdsClient, clozapine_draft, hook_request, prefetch

SIGN = "leuko-order-sign"


def issued_card(ehr: CdsClient) -> dict[str, Any]:
    body = hook_request(
        "order-sign",
        "pt-neutro",
        draft_orders=clozapine_draft("pt-neutro"),
        prefetch=prefetch("neutropenia"),
    )
    [card] = ehr.call(SIGN, body).cards
    return card


def rows(env: ServiceEnv, card: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(env.database) as db:
        return db.execute(
            "SELECT outcome, accepted_suggestions, override_code, user_comment, known_card, "
            "client_iss FROM feedback WHERE card = ? ORDER BY id",
            (card,),
        ).fetchall()


def test_accepted_feedback_is_stored_once(env: ServiceEnv, ehr: CdsClient) -> None:
    card = issued_card(ehr)
    suggestion = card["suggestions"][0]["uuid"]
    entry = {
        "card": card["uuid"],
        "outcome": "accepted",
        "acceptedSuggestions": [{"id": suggestion}],
        "outcomeTimestamp": "2026-11-20T12:00:05.52Z",
    }
    assert ehr.feedback(SIGN, {"feedback": [entry]}).status == 200
    assert ehr.feedback(SIGN, {"feedback": [entry]}).status == 200  # sent again: one record
    assert ehr.feedback(SIGN, {"feedback": [entry, dict(entry)]}).status == 200
    assert rows(env, card["uuid"]) == [
        ("accepted", f'["{suggestion}"]', None, None, 1, "https://ehr.example.org")
    ]
    with sqlite3.connect(env.database) as db:
        issued = db.execute(
            "SELECT service_id, indicator, suggestions FROM issued_card WHERE uuid = ?",
            (card["uuid"],),
        ).fetchone()
    assert issued[0] == SIGN and issued[1] == "critical" and suggestion in issued[2]


def test_overridden_feedback_as_the_sandbox_sends_it(env: ServiceEnv, ehr: CdsClient) -> None:
    card = issued_card(ehr)
    reason = card["overrideReasons"][0]
    entry = {
        "card": card["uuid"],
        "outcome": "overridden",
        # The sandbox sends the reason without its display (cds-hooks.md §2.1).
        "overrideReason": {"reason": {"code": reason["code"], "system": reason["system"]}},
        "outcomeTimestamp": "2026-11-20T12:01:00Z",
    }
    comment = {
        "card": card["uuid"],
        "outcome": "overridden",
        "overrideReason": {"userComment": "ANC repeated this morning at the outside lab"},
        "outcomeTimestamp": "2026-11-20T12:02:00Z",
    }
    assert ehr.feedback(SIGN, {"feedback": [entry]}).status == 200
    assert ehr.feedback(SIGN, {"feedback": [comment]}).status == 200
    assert ehr.feedback(SIGN, {"feedback": [entry, comment]}).status == 200
    assert rows(env, card["uuid"]) == [
        ("overridden", "[]", reason["code"], None, 1, "https://ehr.example.org"),
        (
            "overridden",
            "[]",
            None,
            "ANC repeated this morning at the outside lab",
            1,
            "https://ehr.example.org",
        ),
    ]


def test_feedback_for_an_unknown_card_is_kept_and_marked(env: ServiceEnv, ehr: CdsClient) -> None:
    entry = {
        "card": "0f2e1d3c-4b5a-4968-8778-695a4b3c2d1e",
        "outcome": "overridden",
        "overrideReason": {"userComment": "not ours"},
        "outcomeTimestamp": "2026-11-20T12:00:00Z",
    }
    assert ehr.feedback(SIGN, {"feedback": [entry]}).status == 200
    assert rows(env, entry["card"])[0][4] == 0


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"outcome": "ignored"}, "outcome"),
        ({"outcome": "accepted"}, "cds-fb-2"),
        ({"outcome": "overridden", "overrideReason": {}}, "cds-fb-3"),
        ({"outcomeTimestamp": "yesterday"}, "outcomeTimestamp"),
        ({"outcomeTimestamp": "2026-11-20T12:00:00"}, "outcomeTimestamp"),  # no zone
        ({"card": ""}, "card"),
    ],
    ids=[
        "outcome-unknown",
        "accepted-without-suggestions",
        "empty-override",
        "bad-time",
        "no-zone",
        "no-card",
    ],
)
def test_invalid_feedback_is_400(ehr: CdsClient, entry: dict[str, Any], message: str) -> None:
    base = {"card": "c1", "outcome": "overridden", "outcomeTimestamp": "2026-11-20T12:00:00Z"}
    result = ehr.feedback(SIGN, {"feedback": [{**base, **entry}]})
    assert result.status == 400
    assert message in result.body["issue"][0]["details"]["text"]


def test_feedback_envelope_errors(ehr: CdsClient) -> None:
    assert ehr.feedback(SIGN, {"feedback": []}).status == 400
    assert ehr.feedback(SIGN, {}).status == 400
    assert ehr.feedback(SIGN, None, data=b"{not json").status == 400
    assert ehr.feedback("no-such-service", {"feedback": []}).status == 404


def test_feedback_needs_a_jwt_for_the_feedback_url(ehr: CdsClient) -> None:
    wrong = ehr.token(f"/cds-services/{SIGN}")
    assert ehr.feedback(SIGN, {"feedback": []}, token=wrong).status == 401
    assert ehr.feedback(SIGN, {"feedback": []}, token=None).status == 401


def test_issued_cards_older_than_the_retention_are_pruned(tmp_path: Path) -> None:
    store = FeedbackStore(tmp_path / "fb.sqlite3", retention=timedelta(days=30))
    t0 = datetime(2026, 10, 1, 8, 0, tzinfo=UTC)

    def card(uuid: str) -> IssuedCard:
        return IssuedCard(uuid, "warning", "neutropenia", (("s-" + uuid, "Order a CBC"),))

    store.record_cards(SIGN, "h-1", t0, [card("old")])
    store.record_cards(SIGN, "h-2", t0 + timedelta(days=29, hours=23), [card("recent")])
    assert store.issued_cards() == ["old", "recent"]  # nothing is 30 days old yet
    # The near miss: exactly 30 days after "old" (not older than the retention), and within an
    # hour of the last check.
    store.record_cards(SIGN, "h-3", t0 + timedelta(days=30), [card("c3")])
    assert "old" in store.issued_cards()
    store.record_cards(SIGN, "h-4", t0 + timedelta(days=30, hours=1), [card("c4")])
    assert store.issued_cards() == ["recent", "c3", "c4"]
    store.close()
    # Retention None keeps every card.
    keep = FeedbackStore(tmp_path / "keep.sqlite3", retention=None)
    keep.record_cards(SIGN, "h-1", t0, [card("old")])
    keep.record_cards(SIGN, "h-2", t0 + timedelta(days=400), [card("new")])
    assert keep.issued_cards() == ["old", "new"]
    keep.close()
