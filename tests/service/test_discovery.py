"""Discovery (CDS Hooks 2.0 §Discovery): shape, prefetch templates, JWT, OpenAPI."""

from __future__ import annotations

from urllib.parse import parse_qsl

import requests

from fhir_leuko.core.fhirjson import INPUT_TYPES
from fhir_leuko.core.knowledge import Knowledge
from fhir_leuko.fhir.r4search import check_search_params

from .conftest import ServiceEnv
from .harness import CdsClient

# CDS Hooks 2.0 §Prefetch Template, recommended query subset: instance read, type search with
# reference and token (equality) parameters, date prefixes, _count and _sort. R4 search
# parameters of each resource type used (https://hl7.org/fhir/R4/searchparameter-registry.html).
REFERENCE_PARAMS = {"patient"}
TOKEN_PARAMS = {"code", "status"}
CONTROL_PARAMS = {"_count", "_sort"}
R4_SORT_KEYS = {
    "date",
    "-date",
    "authoredon",
    "-authoredon",
    "effective-time",
    "-effective-time",
    "whenhandedover",
    "-whenhandedover",
}


def test_discovery_lists_one_service_per_hook(ehr: CdsClient) -> None:
    result = ehr.discovery()
    assert result.status == 200
    services = {s["id"]: s for s in result.body["services"]}
    assert {s["hook"] for s in services.values()} == {"patient-view", "order-select", "order-sign"}
    assert set(services) == {"leuko-patient-view", "leuko-order-select", "leuko-order-sign"}
    for service in services.values():
        assert service["title"] and service["description"] and service["usageRequirements"]
        assert set(service["prefetch"]) == {
            "patient",
            "observations",
            "medicationRequests",
            "medicationStatements",
            "medicationAdministrations",
            "medicationDispenses",
            "withdrawnReports",
            "conditions",
            "flags",
        }


def test_prefetch_templates_stay_in_the_recommended_query_subset(
    ehr: CdsClient, knowledge: Knowledge
) -> None:
    for service in ehr.discovery().body["services"]:
        for key, template in service["prefetch"].items():
            assert "sort:desc" not in template, "DSTU2 sort syntax; R4 is _sort=-date"
            # The only token is {{context.patientId}} (Prefetch Token: Yes in all three hooks).
            assert template.count("{{") == template.count("{{context.patientId}}") >= 1, key
            if "?" not in template:
                rtype, rid = template.split("/")
                assert rtype == "Patient" and rid == "{{context.patientId}}"
                continue
            rtype, query = template.split("?", 1)
            for name, value in parse_qsl(query, keep_blank_values=True):
                assert ":" not in name, f"{key}: modifier in {name} (not in the subset)"
                assert name in REFERENCE_PARAMS | TOKEN_PARAMS | CONTROL_PARAMS, (key, name)
                if name == "_sort":
                    assert value in R4_SORT_KEYS, (key, value)
                if name == "_count":
                    assert value.isdigit()
            if rtype == "Observation":
                codes = dict(parse_qsl(query))["code"].split(",")
                # Without a system, so that LOINC under its OID is found too (issue 7 §3).
                assert codes == list(knowledge.loinc)
            check_search_params(rtype, parse_qsl(query))  # R4 parameters of that type only


def test_prefetch_covers_every_type_the_profiles_need(ehr: CdsClient) -> None:
    """INPUT_TYPES is the one list (job searches, prefetch, Bulk Data _type); a prefetch has no
    _include, so Medication is read from the records themselves (code, contained, display)."""
    for service in ehr.discovery().body["services"]:
        types = {template.split("?")[0].split("/")[0] for template in service["prefetch"].values()}
        assert types == set(INPUT_TYPES) - {"Medication"}


def test_discovery_needs_a_jwt_for_its_own_url(ehr: CdsClient) -> None:
    assert ehr.discovery(token=None).status == 401
    token_for_a_service = ehr.token("/cds-services/leuko-patient-view")
    assert ehr.discovery(token=token_for_a_service).status == 401


def test_openapi_document_is_served(env: ServiceEnv) -> None:
    document = requests.get(f"{env.server.url}/openapi.json", timeout=30).json()
    assert {
        "/cds-services",
        "/cds-services/{service_id}",
        "/cds-services/{service_id}/feedback",
    } <= set(document["paths"])
    schemas = document["components"]["schemas"]
    assert {"HookRequest", "CardsResponse", "Card", "OperationOutcome", "FeedbackRequest"} <= set(
        schemas
    )
    call = document["paths"]["/cds-services/{service_id}"]["post"]
    assert call["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "HookRequest"
    )
    assert {"200", "401", "412"} <= set(call["responses"])
