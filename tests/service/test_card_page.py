"""Concise cards and the page behind their link (issue 14 §3): ``GET /cards/{uuid}?token=...``.

The link holds an unguessable token and the card's uuid, never patient data; the page needs the
token, expires, is never cached and makes no request; the token is neither stored nor logged. One
headless Chromium for this module looks at the page and saves tests/out/card.png.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from fhir_leuko.service.pages import TokenScrubber

from ..browser import chromium, screenshot, visit
from .conftest import PUBLIC_BASE, ServiceEnv
from .harness import CdsClient, hook_request, page_text, page_url, prefetch

VIEW = "leuko-patient-view"


def neutropenia_card(ehr: CdsClient) -> dict[str, Any]:
    [card] = ehr.call(VIEW, hook_request("patient-view", "pt-neutro", prefetch=prefetch("neutropenia"))).cards  # fmt: skip
    return card


def link_of(card: dict[str, Any]) -> str:
    [link] = [i["url"] for i in card["links"] if i["label"] == "Full explanation and trend plot"]
    return str(link)


def test_a_card_is_short_and_links_to_its_page_without_patient_data(ehr: CdsClient) -> None:
    card = neutropenia_card(ehr)
    assert len(card["summary"]) < 140
    assert card["detail"].split("\n\n") == [
        "**ANC 0.4 ×10⁹/L** on 2026-11-19: neutropenia grade 4, high severity (lower limit 1.5)",
        "Drug: none known to cause it was active",
        "**Action:** Confirm with a repeat CBC with differential. Review any drug and other cause "
        "named above. Below 1.0 x10^9/L ask about fever and signs of infection now: febrile "
        "neutropenia needs same-day care.",
        "Also: leukopenia grade 3 (WBC 1.9 ×10⁹/L)",
    ]
    link = link_of(card)
    parts = urlsplit(link)
    assert f"{parts.scheme}://{parts.netloc}" == PUBLIC_BASE
    assert parts.path == f"/cards/{card['uuid']}"
    query = parse_qs(parts.query)
    assert list(query) == ["token"] and len(query["token"][0]) >= 43  # 256 random bits
    assert "pt-neutro" not in link and "Patient" not in link


def test_the_page_shows_the_full_explanation_and_the_plot(ehr: CdsClient) -> None:
    card = neutropenia_card(ehr)
    page = requests.get(page_url(ehr.base_url, card), timeout=30)
    assert page.status_code == 200
    assert page.headers["cache-control"] == "no-store"
    assert page.headers["referrer-policy"] == "no-referrer"
    assert "default-src 'none'" in page.headers["content-security-policy"]
    text = page_text(page.text)
    for expected in (
        card["summary"],
        "Lower limit used: 1.5 ×10⁹/L",
        "Rule: Leukopenia and its subtypes in adults (CTCAE v5.0) [adult-default",
        "Feedback on this card",
    ):
        assert expected in text, expected
    assert '<img class="trend" src="data:image/svg+xml;base64,' in page.text
    assert "Patient/pt-neutro" not in page.text


def test_a_wrong_missing_or_expired_token_is_the_same_404(env: ServiceEnv, ehr: CdsClient) -> None:
    card, other = neutropenia_card(ehr), neutropenia_card(ehr)
    good = page_url(ehr.base_url, card)
    base = good.split("?")[0]
    answers = [
        requests.get(base, timeout=30),
        requests.get(base + "?token=", timeout=30),
        requests.get(base + "?token=" + "A" * 43, timeout=30),
        requests.get(base + "?" + urlsplit(page_url(ehr.base_url, other)).query, timeout=30),
        requests.get(f"{ehr.base_url}/cards/not-a-card?token=x", timeout=30),
    ]
    assert {a.status_code for a in answers} == {404}
    assert len({a.text for a in answers}) == 1
    assert "not valid or has expired" in answers[0].text
    assert requests.get(good, timeout=30).status_code == 200
    saved = env.clock.now
    try:
        env.clock.now = saved + timedelta(days=7, seconds=1)  # card_page_days = 7
        assert requests.get(good, timeout=30).status_code == 404
    finally:
        env.clock.now = saved


def test_the_token_is_neither_stored_nor_logged(env: ServiceEnv, ehr: CdsClient) -> None:
    card = neutropenia_card(ehr)
    token = parse_qs(urlsplit(link_of(card)).query)["token"][0]
    with sqlite3.connect(env.database) as db:
        stored = db.execute(
            "SELECT token_hash, page FROM issued_card WHERE uuid = ?", (card["uuid"],)
        ).fetchone()
    assert stored[0] and token not in stored[0] and token not in stored[1]
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5", "GET", f"/cards/{card['uuid']}?token={token}", "1.1", 200), None,
    )  # fmt: skip
    assert TokenScrubber().filter(record)
    assert token not in record.getMessage()
    assert f"/cards/{card['uuid']}?token=-" in record.getMessage()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as launched:
        yield launched


def test_the_page_in_a_browser(browser: Any, ehr: CdsClient) -> None:
    [card] = ehr.call(VIEW, hook_request("patient-view", "pt-cloz-severe", prefetch=prefetch("clozapine-severe"))).cards  # fmt: skip
    url = page_url(ehr.base_url, card)
    with visit(browser, url, width=1000) as seen:
        width = seen.page.eval_on_selector("img.trend", "img => img.naturalWidth")
        assert width > 0
        assert seen.page.locator("section.explanation").count() == 2  # neutropenia, leukopenia
        screenshot(seen.page, "card.png")
    assert seen.requests == [url]
    assert seen.errors == []
