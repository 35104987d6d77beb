"""patient-view: one card condensing the findings; each prefetch key handled as the client sent it."""

from __future__ import annotations

import copy
import json
import logging
from typing import Any

import pytest
import requests

from fhir_leuko.core.detectedissue import build_detected_issue
from fhir_leuko.core.evaluate import evaluate
from fhir_leuko.core.fhirjson import iter_document
from fhir_leuko.core.knowledge import Knowledge
from fhir_leuko.core.normalise import normalise
from fhir_leuko.core.profiles import ProfileSet

from .conftest import FHIR_TOKEN, ServiceEnv
from .harness import AS_OF, CdsClient, Result, hook_request, page_text, page_url, prefetch

SERVICE = "leuko-patient-view"


def view(client: CdsClient, patient: str, **kwargs: Any) -> Result:
    return client.call(SERVICE, hook_request("patient-view", patient, **kwargs))


def issues_for(
    data: dict[str, Any], knowledge: Knowledge, profiles: ProfileSet
) -> list[dict[str, Any]]:
    """The DetectedIssues the scheduled job would write for the same data and time."""
    items = [
        item
        for value in data.values()
        for item in iter_document(json.dumps(value).encode(), "prefetch")
    ]
    dataset = normalise(items, knowledge)
    return [
        build_detected_issue(f, identified=AS_OF)
        for record in dataset.patients.values()
        for f in evaluate(record, profiles, as_of=AS_OF)
    ]


def test_severe_neutropenia_on_clozapine_gives_one_critical_card(
    ehr: CdsClient, knowledge: Knowledge, profiles: ProfileSet
) -> None:
    data = prefetch("clozapine-severe")
    cards = view(ehr, "pt-cloz-severe", prefetch=data).cards
    assert len(cards) == 1
    card = cards[0]
    assert card["indicator"] == "critical"
    assert card["summary"].startswith("Severe neutropenia on clozapine")
    assert "0.3 ×10⁹/L on 2026-11-17" in card["summary"] and "also leukopenia" in card["summary"]
    # The card is short (issue 14 §3): the value, date and grade that matter, the trend in one
    # line, the drug and the action; the rest is behind its link.
    detail = card["detail"]
    assert detail.split("\n\n") == [
        "**ANC 0.3 ×10⁹/L** on 2026-11-17: neutropenia (severe), high severity (lower limit 1.5)",
        "Trend: 2.1 → 1.6 → 0.3 ×10⁹/L, falling over 21 days",
        "Drug: clozapine (active)",
        "**Action:** Recommend haematology consultation. Interrupt clozapine for suspected "
        "clozapine-induced neutropenia; do not rechallenge unless the prescriber decides the "
        "benefits outweigh the risks. …",
        "Also: leukopenia grade 2 (WBC 2.4 ×10⁹/L)",
    ]
    assert (
        card["source"]["label"] == "fhir-leuko: clozapine ANC monitoring (prescribing information)"
    )
    assert card["source"]["url"] == "https://fhir-leuko.github.io/fhir/profiles/clozapine"
    assert card["source"]["topic"]["code"] == "neutropenia"
    assert {link["url"] for link in card["links"]} >= {"https://fhir-leuko.github.io/"}
    # The page behind the link says everything the DetectedIssues of the scheduled job say,
    # sentence by sentence: values, units, dates, grade, limit and source, rule and version.
    page = requests.get(page_url(ehr.base_url, card), timeout=30)
    assert page.status_code == 200
    text = page_text(page.text)
    for expected in (
        "0.3 ×10⁹/L (reported 0.3 10*3/uL) on 2026-11-17T08:20:00-05:00",
        "Recent values: 2.1 ×10⁹/L (2026-10-27), 1.6 ×10⁹/L (2026-11-10), 0.3 ×10⁹/L (2026-11-17)",
        "Clozaril PI 2015-2025 (rev. 2020)",
        "Lower limit used: 1.5 ×10⁹/L, from Clozaril prescribing information §5.1, general population table",
        "Possibly implicated: clozapine (MedicationRequest/cs-cloz",
        "CTCAE v5.0 grade 2",
    ):
        assert expected in text, expected
    for issue in issues_for(data, knowledge, profiles):
        for line in issue["detail"].splitlines():
            assert line in text, line


def test_normal_counts_give_no_card(ehr: CdsClient) -> None:
    assert view(ehr, "pt-normal", prefetch=prefetch("normal")).cards == []


@pytest.mark.parametrize(
    ("anc", "wbc", "indicator"),
    [(1.2, 6.0, "warning"), (1.9, 3.6, "info"), (0.8, 6.0, "critical")],
    ids=["moderate-warning", "low-info", "high-critical"],
)
def test_indicator_follows_the_highest_severity(
    ehr: CdsClient, anc: float, wbc: float, indicator: str
) -> None:
    data = prefetch("normal")
    for entry in data["observations"]["entry"]:
        resource = entry["resource"]
        code = resource["code"]["coding"][0]["code"]
        resource["valueQuantity"]["value"] = {"751-8": anc, "6690-2": wbc}.get(
            code, resource["valueQuantity"]["value"]
        )
    cards = view(ehr, "pt-normal", prefetch=data).cards
    assert [c["indicator"] for c in cards] == [indicator]


def test_null_observations_mean_no_data(ehr: CdsClient) -> None:
    data = prefetch("clozapine-severe")
    data["observations"] = None
    assert view(ehr, "pt-cloz-severe", prefetch=data).cards == []


def test_null_patient_means_age_unknown(ehr: CdsClient) -> None:
    data = prefetch("clozapine-severe")
    data["patient"] = None
    assert view(ehr, "pt-cloz-severe", prefetch=data).cards[0]["indicator"] == "critical"


def test_partial_prefetch_without_authorization(ehr: CdsClient) -> None:
    data = prefetch("clozapine-severe")
    del data["conditions"], data["flags"], data["medicationStatements"]
    card = view(ehr, "pt-cloz-severe", prefetch=data).cards[0]
    assert (
        "_Not available to this check: conditions, medication statements, patient flags"
        in card["detail"]
    )

    del data["observations"]
    result = view(ehr, "pt-cloz-severe", prefetch=data)
    assert result.status == 412
    issues = result.body["issue"]
    assert [i["details"]["text"] for i in issues] == [
        "Required data unavailable: prefetch key 'observations'"
    ]
    assert "absent from the prefetch, and no fhirAuthorization was sent" in issues[0]["diagnostics"]


def test_partial_prefetch_with_authorization_fetches_the_rest(
    env: ServiceEnv, ehr: CdsClient
) -> None:
    complete = view(ehr, "pt-cloz-severe", prefetch=prefetch("clozapine-severe")).cards[0]
    data = prefetch("clozapine-severe")
    del data["observations"], data["medicationRequests"]
    cards = view(
        ehr, "pt-cloz-severe", prefetch=data, fhir_server=env.sekmet.base_url, token=FHIR_TOKEN
    ).cards
    assert cards[0]["detail"] == complete["detail"]


def test_absent_prefetch_is_fetched_from_the_configured_server(
    env: ServiceEnv, ehr: CdsClient
) -> None:
    complete = view(ehr, "pt-cloz-severe", prefetch=prefetch("clozapine-severe")).cards[0]
    fetched = view(ehr, "pt-cloz-severe", fhir_server=env.sekmet.base_url, token=FHIR_TOKEN).cards
    assert [(c["summary"], c["detail"], c["indicator"]) for c in fetched] == [
        (complete["summary"], complete["detail"], complete["indicator"])
    ]
    assert view(ehr, "pt-normal", fhir_server=env.sekmet.base_url, token=FHIR_TOKEN).cards == []


def test_absent_prefetch_without_authorization_is_412_naming_the_keys(ehr: CdsClient) -> None:
    result = view(ehr, "pt-cloz-severe")
    assert result.status == 412
    texts = [i["details"]["text"] for i in result.body["issue"]]
    assert texts == [
        "Required data unavailable: prefetch key 'observations'",
        "Required data unavailable: prefetch key 'patient'",
    ]


def test_a_wrong_token_for_the_fhir_server_is_412(env: ServiceEnv, ehr: CdsClient) -> None:
    result = view(ehr, "pt-cloz-severe", fhir_server=env.sekmet.base_url, token="not-the-token")
    assert result.status == 412
    assert "fetching it from fhirServer failed: the FHIR server answered HTTP 401" in json.dumps(
        result.body
    )


@pytest.mark.parametrize("where", ["top-level", "in-bundle"])
def test_operation_outcome_counts_as_missing(env: ServiceEnv, ehr: CdsClient, where: str) -> None:
    outcome = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "timeout", "diagnostics": "query timed out"}],
    }
    data = prefetch("clozapine-severe")
    if where == "top-level":
        data["observations"] = outcome
    else:
        data["observations"]["entry"].append({"resource": outcome, "search": {"mode": "outcome"}})
    result = view(ehr, "pt-cloz-severe", prefetch=copy.deepcopy(data))
    assert result.status == 412
    assert "prefetch key 'observations'" in result.body["issue"][0]["details"]["text"]
    assert "OperationOutcome" in result.body["issue"][0]["diagnostics"]
    # With a token, the key is fetched instead.
    cards = view(
        ehr, "pt-cloz-severe", prefetch=data, fhir_server=env.sekmet.base_url, token=FHIR_TOKEN
    ).cards
    assert cards[0]["indicator"] == "critical"


def test_a_warning_outcome_in_a_searchset_does_not_discard_the_data(ehr: CdsClient) -> None:
    data = prefetch("clozapine-severe")
    data["observations"]["entry"].append(
        {
            "resource": {
                "resourceType": "OperationOutcome",
                "issue": [
                    {"severity": "warning", "code": "processing", "diagnostics": "_sort ignored"}
                ],
            },
            "search": {"mode": "outcome"},
        }
    )
    assert view(ehr, "pt-cloz-severe", prefetch=data).cards[0]["indicator"] == "critical"


def first_page(env: ServiceEnv, patient: str) -> dict[str, Any]:
    """A real first page of the observations search, with sekmet's own next link."""
    response = requests.get(
        f"{env.sekmet.base_url}/Observation",
        params={"patient": patient, "_sort": "-date", "_count": "2"},
        headers={"Authorization": f"Bearer {FHIR_TOKEN}"},
        timeout=30,
    )
    page: dict[str, Any] = response.json()
    assert any(link["relation"] == "next" for link in page["link"])
    return page


def test_a_paged_prefetch_is_paged_with_the_token(env: ServiceEnv, ehr: CdsClient) -> None:
    complete = view(ehr, "pt-cloz-severe", prefetch=prefetch("clozapine-severe")).cards[0]
    data = prefetch("clozapine-severe")
    data["observations"] = first_page(env, "pt-cloz-severe")
    cards = view(
        ehr, "pt-cloz-severe", prefetch=data, fhir_server=env.sekmet.base_url, token=FHIR_TOKEN
    ).cards
    assert cards[0]["detail"] == complete["detail"]


def test_a_paged_prefetch_without_token_is_incomplete(env: ServiceEnv, ehr: CdsClient) -> None:
    data = prefetch("clozapine-severe")
    data["observations"] = first_page(env, "pt-cloz-severe")
    result = view(ehr, "pt-cloz-severe", prefetch=data)
    assert result.status == 412
    assert "incomplete (it has a next link)" in result.body["issue"][0]["diagnostics"]


def test_a_next_link_off_the_fhir_server_is_not_followed(env: ServiceEnv, ehr: CdsClient) -> None:
    data = prefetch("clozapine-severe")
    page = first_page(env, "pt-cloz-severe")
    for link in page["link"]:
        if link["relation"] == "next":
            link["url"] = env.forbidden_fhir.url("/fhir/Observation?page=2")
    data["observations"] = page
    cards = view(
        ehr, "pt-cloz-severe", prefetch=data, fhir_server=env.sekmet.base_url, token=FHIR_TOKEN
    ).cards
    assert cards[0]["indicator"] == "critical"  # the whole query was fetched from fhirServer
    assert env.forbidden_fhir.hits == []


def test_an_unconfigured_fhir_server_is_never_contacted(env: ServiceEnv, ehr: CdsClient) -> None:
    for server in (env.forbidden_fhir.url("/fhir"), env.other_client_fhir.url("/fhir")):
        result = view(ehr, "pt-cloz-severe", fhir_server=server, token=FHIR_TOKEN)
        assert result.status == 412
        assert "fhirServer is not one configured for this client (not contacted)" in json.dumps(
            result.body
        )
    assert env.forbidden_fhir.hits == []
    assert env.other_client_fhir.hits == []


def test_fhir_authorization_must_be_for_the_patient_in_context(
    env: ServiceEnv, ehr: CdsClient
) -> None:
    body = hook_request(
        "patient-view", "pt-cloz-severe", fhir_server=env.sekmet.base_url, token=FHIR_TOKEN
    )
    body["fhirAuthorization"]["patient"] = "pt-normal"
    result = ehr.call(SERVICE, body)
    assert result.status == 400
    assert "fhirAuthorization.patient does not match context.patientId" in json.dumps(result.body)


def test_fhir_authorization_needs_fhir_server(ehr: CdsClient) -> None:
    body = hook_request("patient-view", "pt-cloz-severe", token=FHIR_TOKEN)
    result = ehr.call(SERVICE, body)
    assert result.status == 400
    assert "cds-r-1" in json.dumps(result.body)


def test_tokens_never_reach_the_logs_or_the_database(
    env: ServiceEnv, ehr: CdsClient, caplog: pytest.LogCaptureFixture
) -> None:
    jwt = ehr.token(f"/cds-services/{SERVICE}")
    with caplog.at_level(logging.DEBUG):
        good = ehr.call(
            SERVICE,
            hook_request(
                "patient-view", "pt-cloz-severe", fhir_server=env.sekmet.base_url, token=FHIR_TOKEN
            ),
            token=jwt,
        )
        replayed = ehr.call(SERVICE, hook_request("patient-view", "pt-normal"), token=jwt)
        bad_fetch = view(
            ehr, "pt-cloz-severe", fhir_server=env.sekmet.base_url, token="wrong-token"
        )
    assert (good.status, replayed.status, bad_fetch.status) == (200, 401, 412)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert any(r.name.startswith("fhir_leuko.service") for r in caplog.records)  # it did log
    for secret in (FHIR_TOKEN, "wrong-token", jwt, jwt.split(".")[2]):
        assert secret not in logged
        assert secret.encode() not in env.database.read_bytes()
        for suffix in ("-wal", "-shm"):
            wal = env.database.with_name(env.database.name + suffix)
            if wal.exists():
                assert secret.encode() not in wal.read_bytes()
