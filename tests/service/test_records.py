"""The records hospitals hold, through the CDS service's prefetch (issue 13): a clozapine patient
seen only through a pharmacy dispense, and a deceased patient.

data/prefetch-clozapine-dispensed.json: ANC 1.2 x10^9/L on 2026-11-18 and a clozapine
MedicationDispense handed over 2026-11-05 with 28 days' supply, nothing else about clozapine. The
clozapine label's table decides (mild neutropenia, "Continue clozapine"); without the dispense the
adult CTCAE table would (grade 2).
"""

from __future__ import annotations

from typing import Any

import requests

from .conftest import FHIR_TOKEN, ServiceEnv
from .harness import CdsClient, Result, clozapine_draft, hook_request, page_text, page_url, prefetch

SIGN = "leuko-order-sign"
PATIENT = "pt-cloz-disp"


def sign(client: CdsClient, data: dict[str, Any] | None, **kwargs: Any) -> Result:
    request = hook_request(
        "order-sign", PATIENT, prefetch=data, draft_orders=clozapine_draft(PATIENT), **kwargs
    )
    return client.call(SIGN, request)


def test_order_sign_when_the_only_clozapine_record_is_a_dispense(ehr: CdsClient) -> None:
    [card] = sign(ehr, prefetch("clozapine-dispensed")).cards
    assert card["summary"].startswith("Clozapine order: ")
    # The card is short (issue 14): the clozapine table's grade and the dispense as the drug; the
    # full sentences are on the card's page.
    detail = card["detail"]
    assert "**ANC 1.2 ×10⁹/L** on 2026-11-18: neutropenia (mild), moderate severity" in detail
    assert "Drug: clozapine (dispensed 2026-11-05, 28 days' supply" in detail
    text = page_text(requests.get(page_url(ehr.base_url, card), timeout=30).text)
    assert "mild neutropenia (1000-1499/uL) per the clozapine label" in text
    assert "Continue clozapine." in text
    assert (
        "MedicationDispense/cd-cloz-dispense: Clozapine 100 MG Oral Tablet; dispensed 2026-11-05, "
        "28 days' supply (daysSupply) to 2026-12-03, active at this count" in text
    )
    [record] = [
        a["resource"]
        for s in card["suggestions"]
        for a in s["actions"]
        if a.get("resource", {}).get("resourceType") == "DetectedIssue"
    ]
    assert record["implicated"] == [{"reference": "MedicationDispense/cd-cloz-dispense"}]
    assert record["reference"].startswith("https://fhir-leuko.github.io/fhir/profiles/clozapine|")


def test_without_the_dispense_the_adult_table_decides(ehr: CdsClient) -> None:
    data = prefetch("clozapine-dispensed")
    data["medicationDispenses"] = None  # the client looked and found none
    [card] = sign(ehr, data).cards
    assert "neutropenia grade 2" in card["detail"]
    assert "per the clozapine label" not in card["detail"]
    assert "MedicationDispense" not in card["detail"]


def test_an_absent_dispense_key_is_fetched_from_the_fhir_server(
    env: ServiceEnv, ehr: CdsClient
) -> None:
    data = prefetch("clozapine-dispensed")
    del data["medicationDispenses"]
    without = sign(ehr, data).cards[0]
    assert "Not available to this check: medication dispenses" in without["detail"]
    fetched = sign(ehr, data, fhir_server=env.sekmet.base_url, token=FHIR_TOKEN).cards[0]
    assert "Drug: clozapine (dispensed 2026-11-05" in fetched["detail"]
    assert "Not available" not in fetched["detail"]
    text = page_text(requests.get(page_url(ehr.base_url, fetched), timeout=30).text)
    assert "MedicationDispense/cd-cloz-dispense" in text


def test_a_deceased_patient_gets_no_card(ehr: CdsClient) -> None:
    data = prefetch("clozapine-dispensed")
    data["patient"]["deceasedDateTime"] = "2026-11-19T22:00:00Z"
    assert sign(ehr, data).cards == []
    view = ehr.call(
        "leuko-patient-view", hook_request("patient-view", PATIENT, prefetch=data)
    )
    assert view.status == 200 and view.cards == []
    data["patient"]["deceasedDateTime"] = "2026-12-01"  # after the call: alive then
    assert len(sign(ehr, data).cards) == 1
