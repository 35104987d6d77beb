"""order-select and order-sign: a card when a drug known to lower white counts is ordered while the
latest counts are low, or missing or too old for the drug's monitoring."""

from __future__ import annotations

import copy
import json
from typing import Any

import requests

from fhir_leuko.core.evaluate import evaluate
from fhir_leuko.core.fhir_models import check_resource
from fhir_leuko.core.fhirjson import iter_document
from fhir_leuko.core.normalise import normalise

from .conftest import FHIR_TOKEN, ServiceEnv
from .harness import CdsClient, Result, clozapine_draft, hook_request, page_text, page_url, prefetch

SELECT, SIGN = "leuko-order-select", "leuko-order-sign"


def order(
    client: CdsClient,
    service: str,
    patient: str,
    drafts: dict[str, Any] | None,
    **kwargs: Any,
) -> Result:
    hook = "order-sign" if service == SIGN else "order-select"
    if hook == "order-select" and drafts is not None and "selections" not in kwargs:
        kwargs["selections"] = [
            f"{e['resource']['resourceType']}/{e['resource']['id']}"
            for e in drafts["entry"]
            if "id" in e["resource"]
        ]
    return client.call(service, hook_request(hook, patient, draft_orders=drafts, **kwargs))


def draft(patient: str, medication: dict[str, Any], order_id: str = "draft-1") -> dict[str, Any]:
    bundle = clozapine_draft(patient, order_id)
    bundle["entry"][0]["resource"]["medicationCodeableConcept"] = medication
    return bundle


def methotrexate() -> dict[str, Any]:
    return {
        "coding": [
            {
                "system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                "code": "105585",
                "display": "methotrexate 2.5 MG Oral Tablet",
            }
        ],
        "text": "methotrexate 2.5 MG Oral Tablet",
    }


def suggestion_labels(card: dict[str, Any]) -> list[str]:
    return [s["label"] for s in card["suggestions"]]


def test_clozapine_without_an_anc_in_7_days_gets_a_monitoring_card(ehr: CdsClient) -> None:
    result = order(
        ehr,
        SELECT,
        "pt-cloz-stale",
        clozapine_draft("pt-cloz-stale"),
        prefetch=prefetch("clozapine-stale"),
    )
    [card] = result.cards
    assert card["indicator"] == "warning"
    assert card["summary"] == "Clozapine order: no absolute neutrophil count in the last 7 days"
    # Short (issue 14 §3); the monitoring's source and the whole advice are on the card's page.
    assert card["detail"].split("\n\n")[1:] == [
        "**No absolute neutrophil count in the last 7 days** (latest 2.2 ×10⁹/L on 2026-11-05, "
        "15 days ago)",
        "**Action:** Clozapine is started, continued or interrupted according to the label's ANC "
        "table: check the current ANC (a CBC with differential) before signing.",
    ]
    text = page_text(requests.get(page_url(ehr.base_url, card), timeout=30).text)
    assert "Latest absolute neutrophil count: 2.2 ×10⁹/L on 2026-11-05T09:00:00Z" in text
    assert "15 days before now" in text
    assert "Clozaril PI §5.1" in text  # the monitoring's source, from the profile
    assert "Advice: Clozapine is started, continued or interrupted" in text
    assert card["selectionBehavior"] == "any"
    assert suggestion_labels(card) == ["Order a CBC with differential"]
    [action] = card["suggestions"][0]["actions"]
    service_request = action["resource"]
    assert service_request["resourceType"] == "ServiceRequest"
    assert service_request["code"]["coding"][0] == {
        "system": "http://loinc.org",
        "code": "57021-8",
        "display": "CBC W Auto Differential panel - Blood",
    }
    assert service_request["subject"] == {"reference": "Patient/pt-cloz-stale"}
    assert service_request["requester"] == {"reference": "Practitioner/dr-1"}
    assert all(r["display"] for r in card["overrideReasons"])


def test_clozapine_with_a_recent_normal_anc_gets_no_card(ehr: CdsClient) -> None:
    for service in (SELECT, SIGN):
        result = order(
            ehr, service, "pt-normal", clozapine_draft("pt-normal"), prefetch=prefetch("normal")
        )
        assert result.cards == []


def test_order_sign_with_severe_neutropenia_suggests_removing_the_draft(ehr: CdsClient) -> None:
    data = prefetch("neutropenia")
    [card] = order(
        ehr, SIGN, "pt-neutro", clozapine_draft("pt-neutro", "draft-cloz-9"), prefetch=data
    ).cards
    assert card["indicator"] == "critical"
    assert card["summary"].startswith("Clozapine order: ")
    assert "0.4 ×10⁹/L on 2026-11-19" in card["summary"]
    assert suggestion_labels(card) == [
        "Order a CBC with differential",
        "Record the finding in the chart (DetectedIssue)",
        "Remove the clozapine order",
    ]
    delete = card["suggestions"][2]["actions"]
    assert delete == [
        {
            "type": "delete",
            "description": "Remove the draft order MedicationRequest/draft-cloz-9 (clozapine)",
            "resourceId": "MedicationRequest/draft-cloz-9",
        }
    ]
    issues = [a["resource"] for a in card["suggestions"][1]["actions"]]
    assert {i["code"]["coding"][1]["code"] for i in issues} == {"neutropenia", "leukopenia"}
    for issue in issues:
        check_resource(issue)
        assert issue["patient"] == {"reference": "Patient/pt-neutro"}
        assert issue["identifiedDateTime"] == "2026-11-20T12:00:00Z"


def test_order_select_never_suggests_removing_the_draft(ehr: CdsClient) -> None:
    [card] = order(
        ehr, SELECT, "pt-neutro", clozapine_draft("pt-neutro"), prefetch=prefetch("neutropenia")
    ).cards
    assert card["indicator"] == "critical"
    assert "Remove the clozapine order" not in suggestion_labels(card)


def test_a_draft_without_an_id_cannot_be_removed(ehr: CdsClient) -> None:
    drafts = clozapine_draft("pt-neutro")
    del drafts["entry"][0]["resource"]["id"]
    [card] = order(ehr, SIGN, "pt-neutro", drafts, prefetch=prefetch("neutropenia")).cards
    assert all(a["type"] != "delete" for s in card["suggestions"] for a in s["actions"])


def test_chemotherapy_with_low_counts_gets_a_card_without_monitoring(ehr: CdsClient) -> None:
    [card] = order(
        ehr, SIGN, "pt-neutro", draft("pt-neutro", methotrexate()), prefetch=prefetch("neutropenia")
    ).cards
    assert card["summary"].startswith("Methotrexate order: ")
    assert "known to cause" in card["detail"] and "neutropenia" in card["detail"]
    # No profile asks for monitoring of methotrexate: normal counts give no card.
    assert (
        order(
            ehr, SIGN, "pt-normal", draft("pt-normal", methotrexate()), prefetch=prefetch("normal")
        ).cards
        == []
    )


def test_drugs_that_do_not_lower_counts_need_no_data(ehr: CdsClient) -> None:
    paracetamol = {"text": "Paracetamol 500 mg tablet"}
    for service in (SELECT, SIGN):
        result = order(ehr, service, "pt-neutro", draft("pt-neutro", paracetamol))
        assert result.cards == []  # no prefetch, no fhirAuthorization, and still no 412


def test_only_selected_orders_count_in_order_select(ehr: CdsClient) -> None:
    drafts = clozapine_draft("pt-neutro", "cloz")
    other = copy.deepcopy(drafts["entry"][0])
    other["resource"].update(id="para", medicationCodeableConcept={"text": "paracetamol"})
    drafts["entry"].append(other)
    data = prefetch("neutropenia")
    assert (
        order(
            ehr, SELECT, "pt-neutro", drafts, prefetch=data, selections=["MedicationRequest/para"]
        ).cards
        == []
    )
    assert (
        len(
            order(
                ehr,
                SELECT,
                "pt-neutro",
                drafts,
                prefetch=data,
                selections=["MedicationRequest/cloz"],
            ).cards
        )
        == 1
    )
    assert len(order(ehr, SIGN, "pt-neutro", drafts, prefetch=data).cards) == 1  # sign: all orders


def test_medication_reference_into_the_draft_bundle(ehr: CdsClient) -> None:
    drafts = clozapine_draft("pt-neutro")
    request = drafts["entry"][0]["resource"]
    del request["medicationCodeableConcept"]
    request["medicationReference"] = {"reference": "urn:uuid:9b1f8d7e-64a2-4c3b-9e0d-2f1a3b4c5d6e"}
    drafts["entry"].append(
        {
            "fullUrl": "urn:uuid:9b1f8d7e-64a2-4c3b-9e0d-2f1a3b4c5d6e",
            "resource": {
                "resourceType": "Medication",
                "code": {
                    "coding": [
                        {
                            "system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                            "code": "2626",
                            "display": "clozapine",
                        }
                    ]
                },
            },
        }
    )
    [card] = order(ehr, SIGN, "pt-neutro", drafts, prefetch=prefetch("neutropenia")).cards
    assert card["summary"].startswith("Clozapine order")


def test_order_sign_without_draft_orders_has_nothing_to_say(ehr: CdsClient) -> None:
    assert order(ehr, SIGN, "pt-neutro", None).cards == []


def test_risky_order_without_data_is_412(ehr: CdsClient) -> None:
    result = order(ehr, SIGN, "pt-neutro", clozapine_draft("pt-neutro"))
    assert result.status == 412


def test_order_data_can_be_fetched(env: ServiceEnv, ehr: CdsClient) -> None:
    result = order(
        ehr,
        SELECT,
        "pt-cloz-stale",
        clozapine_draft("pt-cloz-stale"),
        fhir_server=env.sekmet.base_url,
        token=FHIR_TOKEN,
    )
    assert (
        result.cards[0]["summary"]
        == "Clozapine order: no absolute neutrophil count in the last 7 days"
    )


def test_card_findings_are_the_rule_core_findings(env: ServiceEnv, ehr: CdsClient) -> None:
    """The service adds no rule: the DetectedIssues it offers are the core's, for the same data."""
    engine = env.app.state.engine
    data = prefetch("neutropenia")
    items = [i for v in data.values() for i in iter_document(json.dumps(v).encode(), "t")]
    record = normalise(items, engine.knowledge).patients["Patient/pt-neutro"]
    expected = {
        (f.kind.value, f.severity) for f in evaluate(record, engine.profiles, as_of=env.clock())
    }
    [card] = order(ehr, SIGN, "pt-neutro", clozapine_draft("pt-neutro"), prefetch=data).cards
    offered = {
        (a["resource"]["code"]["coding"][1]["code"], a["resource"]["severity"])
        for a in card["suggestions"][1]["actions"]
    }
    assert offered == expected
