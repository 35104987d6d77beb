"""Lab results as labs code them, fetched by the service from the EHR's FHIR server (issue 7 §3):
LOINC written under its OID counts like LOINC; the same code strings under a local code system do
not. The prefetch template's codes carry no system, so the server returns both: the rule core
decides (data/prefetch-oid-coded.json, seeded into the test FHIR server)."""

from __future__ import annotations

from .conftest import FHIR_TOKEN, ServiceEnv
from .harness import CdsClient, Result, hook_request

VIEW = "leuko-patient-view"


def fetched(env: ServiceEnv, ehr: CdsClient, patient: str) -> Result:
    """patient-view without prefetch: the service fetches every key from the FHIR server."""
    request = hook_request(
        "patient-view", patient, fhir_server=env.sekmet.base_url, token=FHIR_TOKEN
    )
    return ehr.call(VIEW, request)


def test_results_coded_under_the_loinc_oid_fire(env: ServiceEnv, ehr: CdsClient) -> None:
    result = fetched(env, ehr, "pt-oid")
    assert result.status == 200, result.body
    [card] = result.cards
    assert card["indicator"] == "critical"
    assert card["summary"].startswith("Severe neutropenia")
    assert "**ANC 0.4 ×10⁹/L** on 2026-11-19" in card["detail"]


def test_the_same_codes_under_a_local_system_do_not_count(env: ServiceEnv, ehr: CdsClient) -> None:
    result = fetched(env, ehr, "pt-oid-local")
    assert result.status == 200, result.body
    assert not [c for c in result.cards if "neutropenia" in c["summary"].lower()]
