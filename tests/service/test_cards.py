"""Card text: escaping and the summary limit, with a site profile whose wording is long."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

from fhir_leuko.core.evaluate import evaluate
from fhir_leuko.core.fhirjson import iter_document
from fhir_leuko.core.knowledge import Knowledge
from fhir_leuko.core.normalise import normalise
from fhir_leuko.files.documents import load_profiles
from fhir_leuko.service.cards import CardContext, md_escape, patient_card
from fhir_leuko.service.settings import DEFAULT_CBC_ORDER, DEFAULT_OVERRIDE_REASONS

from .harness import AS_OF, prefetch
from .invariants import check_card, check_cards_response


def test_markdown_escaping_leaves_no_markup() -> None:
    assert md_escape("<script>alert(1)</script>") == "\\<script\\>alert(1)\\</script\\>"
    assert md_escape("*a* _b_ [c](d) `e` #f |g| ~h~ &amp; !x") == (
        "\\*a\\* \\_b\\_ \\[c\\](d) \\`e\\` \\#f \\|g\\| \\~h\\~ \\&amp; \\!x"
    )
    assert md_escape("two\nlines") == "two lines"


def test_long_site_wording_still_gives_a_short_summary(
    tmp_path: Path, knowledge: Knowledge
) -> None:
    term = "neutropenia " + "with a very long local description of the finding " * 5
    (tmp_path / "adult-local.toml").write_text(
        f"""id = "adult-local"
extends = "adult-default"
url = "https://hospital.example.org/fhir-leuko/adult-local"
version = "1.0.0"
title = "Adult leukopenia, local wording"
when = "As adult-default."
then = "As adult-default."
priority = 1

[card]
source_label = "St Elsewhere haematology <b>rules</b>"

[[rules]]
finding = "neutropenia"
term = "{term.strip()}"
terms = []
""",
        encoding="utf-8",
    )
    profiles = load_profiles(knowledge, [tmp_path])
    data = prefetch("neutropenia")
    items = [i for v in data.values() for i in iter_document(json.dumps(v).encode(), "t")]
    record = normalise(items, knowledge).patients["Patient/pt-neutro"]
    findings = evaluate(record, profiles, as_of=AS_OF)
    context = CardContext(
        profiles=profiles,
        as_of=AS_OF,
        patient_id="pt-neutro",
        documentation_url="https://fhir-leuko.github.io/",
        override_reasons=DEFAULT_OVERRIDE_REASONS,
        cbc_order=DEFAULT_CBC_ORDER,
        page_base="https://cds.example.org",
        page_expires=AS_OF + timedelta(days=7),
    )
    made = patient_card(findings, context)
    assert made is not None
    card, issued = made
    assert (
        card["summary"] == "Neutropenia (high severity): 0.4 ×10⁹/L on 2026-11-19; also leukopenia"
    )
    assert card["source"]["label"] == "St Elsewhere haematology <b>rules</b>"  # plain text field
    # The long local term is on the card's page (behind its link); the card stays short (issue 14).
    assert "with a very long local description" not in card["detail"]
    assert issued.page is not None
    assert "with a very long local description" in issued.page["sections"][0]["title"]
    assert card["links"][0]["label"] == "Full explanation and trend plot"
    assert card["links"][0]["url"].startswith(f"https://cds.example.org/cards/{card['uuid']}?token=")
    check_card(card, "$.cards[0]")
    check_cards_response({"cards": [card]})
    assert issued.uuid == card["uuid"] and issued.indicator == "critical"
