"""Fewer cards, better timed (issue 14 §4): snooze after an override, and silent mode.

Through the real service under uvicorn with its SQLite store, and the clock moved by hand.
"""

from __future__ import annotations

import copy
import json
from datetime import timedelta
from typing import Any

import pytest
import requests

from fhir_leuko.errors import UsageError

from ..conftest import fhir_leuko
from .conftest import FILE_ISS, PUBLIC_BASE
from .harness import CdsClient, MutableClock, hook_request, page_text, page_url, prefetch

VIEW = "leuko-patient-view"


def client_for(server: Any, keys: Any, clock: MutableClock) -> CdsClient:
    return CdsClient(
        base_url=server.url, audience_base=PUBLIC_BASE, keys=keys, iss=FILE_ISS, clock=clock
    )


def view(client: CdsClient, data: dict[str, Any]) -> list[dict[str, Any]]:
    return client.call(VIEW, hook_request("patient-view", "pt-neutro", prefetch=data)).cards


def with_anc(value: float) -> dict[str, Any]:
    data = copy.deepcopy(prefetch("neutropenia"))
    for entry in data["observations"]["entry"]:
        if entry["resource"]["code"]["coding"][0]["code"] == "751-8":
            entry["resource"]["valueQuantity"]["value"] = value
    return data


def card_reason_display(card: dict[str, Any]) -> str:
    return str(card["overrideReasons"][0]["display"])


def override(client: CdsClient, card: dict[str, Any], at: str) -> None:
    reason = card["overrideReasons"][0]
    entry = {
        "card": card["uuid"],
        "outcome": "overridden",
        "overrideReason": {
            "reason": {"system": reason["system"], "code": reason["code"]},
            "userComment": "Known; haematology <b>involved</b>",
        },
        "outcomeTimestamp": at,
    }
    assert client.feedback(VIEW, {"feedback": [entry]}).status == 200


def test_an_override_holds_the_finding_back_until_it_worsens_or_the_snooze_ends(
    make_service: Any,
) -> None:
    clock = MutableClock()
    server, _settings, keys = make_service(snooze_after_override_hours=24, clock=clock)
    client = client_for(server, keys, clock)
    [first] = view(client, prefetch("neutropenia"))  # ANC 0.4 (grade 4), WBC 1.9 (grade 3)
    override(client, first, "2026-11-20T12:01:00Z")

    clock.now += timedelta(hours=1)
    assert view(client, prefetch("neutropenia")) == []  # the same findings: held back
    # Worse (a lower ANC): shown again, alone; the leukopenia is still held back.
    [worse] = view(client, with_anc(0.3))
    assert worse["summary"].startswith("Severe neutropenia") and "also" not in worse["summary"]
    assert worse["detail"].startswith("**ANC 0.3 ×10⁹/L**")

    # What was held back is shown on the overridden card's page, with the feedback.
    text = page_text(requests.get(page_url(client.base_url, first), timeout=30).text)
    assert "overridden" in text and "Known; haematology <b>involved</b>" in text
    assert card_reason_display(first) in text  # the code's display, though only the code was sent
    assert "neutropenia grade 4, high severity: ANC 0.4 ×10⁹/L on 2026-11-19" in text
    assert "leukopenia grade 3, high severity: WBC 1.9 ×10⁹/L on 2026-11-19" in text

    clock.now += timedelta(hours=24)  # the snooze has ended
    [again] = view(client, prefetch("neutropenia"))
    assert "also leukopenia" in again["summary"]


def test_without_a_snooze_setting_an_override_holds_nothing_back(make_service: Any) -> None:
    clock = MutableClock()
    server, _settings, keys = make_service(clock=clock)  # snooze_after_override_hours = 0
    client = client_for(server, keys, clock)
    [first] = view(client, prefetch("neutropenia"))
    override(client, first, "2026-11-20T12:01:00Z")
    assert len(view(client, prefetch("neutropenia"))) == 1


def test_silent_mode_keeps_and_logs_cards_but_returns_none(
    make_service: Any, caplog: pytest.LogCaptureFixture
) -> None:
    clock = MutableClock()
    server, settings, keys = make_service(silent_services=[VIEW], clock=clock)
    client = client_for(server, keys, clock)
    with caplog.at_level("INFO", logger="fhir_leuko.service"):
        assert view(client, prefetch("neutropenia")) == []
    logged = [r.getMessage() for r in caplog.records if "silent card" in r.getMessage()]
    assert len(logged) == 1 and "indicator=critical topic=neutropenia" in logged[0]
    # Reviewed with fhir-leuko cards, without tokens.
    done = fhir_leuko(
        "cards", "list", "--database", str(settings.feedback_database), "--silent",
        "--format", "ndjson",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    [card] = [json.loads(line) for line in done.stdout.splitlines()]
    assert card["silent"] is True and card["service"] == VIEW
    assert card["summary"].startswith("Severe neutropenia") and card["indicator"] == "critical"
    assert "token" not in done.stdout
    table = fhir_leuko("cards", "list", "--database", str(settings.feedback_database))
    assert "silent" in table.stdout and card["uuid"] in table.stdout


def test_an_unknown_silent_service_is_refused_at_start(make_service: Any) -> None:
    with pytest.raises(UsageError, match="silent_services: no service 'leuko-nothing'"):
        make_service(silent_services=["leuko-nothing"])
