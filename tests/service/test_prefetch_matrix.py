"""Every hook against every shape of prefetch (CDS Hooks 2.0 §Prefetch; issue 4 §2): complete,
partial, null, an OperationOutcome, paged, absent (fetched), absent without authorization (412)."""

from __future__ import annotations

from typing import Any

import pytest
import requests

from .conftest import FHIR_TOKEN, ServiceEnv
from .harness import CdsClient, Result, clozapine_draft, hook_request, prefetch

# (service, hook, patient, scenario, draft orders)
HOOKS = [
    ("leuko-patient-view", "patient-view", "pt-cloz-severe", "clozapine-severe", None),
    ("leuko-order-select", "order-select", "pt-neutro", "neutropenia", "draft"),
    ("leuko-order-sign", "order-sign", "pt-neutro", "neutropenia", "draft"),
]


def send(
    env: ServiceEnv,
    ehr: CdsClient,
    hook: tuple[Any, ...],
    data: dict[str, Any] | None,
    *,
    token: bool,
) -> Result:
    service, name, patient, _, drafts = hook
    extra: dict[str, Any] = {}
    if drafts:
        extra["draft_orders"] = clozapine_draft(patient)
        if name == "order-select":
            extra["selections"] = ["MedicationRequest/draft-cloz-1"]
    if token:
        extra.update(fhir_server=env.sekmet.base_url, token=FHIR_TOKEN)
    return ehr.call(service, hook_request(name, patient, prefetch=data, **extra))


def first_page(env: ServiceEnv, patient: str) -> dict[str, Any]:
    page: dict[str, Any] = requests.get(
        f"{env.sekmet.base_url}/Observation",
        params={"patient": patient, "_count": "1"},
        headers={"Authorization": f"Bearer {FHIR_TOKEN}"},
        timeout=30,
    ).json()
    assert any(link["relation"] == "next" for link in page["link"])
    return page


@pytest.fixture(params=HOOKS, ids=[h[1] for h in HOOKS])
def hook(request: pytest.FixtureRequest) -> tuple[Any, ...]:
    value: tuple[Any, ...] = request.param
    return value


def summary(result: Result) -> list[tuple[str, str]]:
    return [(c["indicator"], c["summary"]) for c in result.cards]


def test_prefetch_shapes(env: ServiceEnv, ehr: CdsClient, hook: tuple[Any, ...]) -> None:
    scenario = hook[3]
    complete = send(env, ehr, hook, prefetch(scenario), token=False)
    expected = summary(complete)
    assert expected and expected[0][0] == "critical"

    partial = prefetch(scenario)
    del partial["conditions"], partial["medicationStatements"]
    result = send(env, ehr, hook, partial, token=False)
    assert summary(result) == expected
    assert (
        "Not available to this check: conditions, medication statements"
        in result.cards[0]["detail"]
    )
    del partial["observations"]
    assert send(env, ehr, hook, partial, token=False).status == 412
    assert summary(send(env, ehr, hook, partial, token=True)) == expected

    nothing = prefetch(scenario)
    nothing["observations"] = None  # the client looked and found no results
    cards = send(env, ehr, hook, nothing, token=False).cards
    if hook[1] == "patient-view":
        assert cards == []
    else:  # clozapine ordered with no ANC at all: the monitoring card
        assert [c["summary"] for c in cards] == [
            "Clozapine order: no absolute neutrophil count in the last 7 days"
        ]

    outcome = prefetch(scenario)
    outcome["observations"] = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "exception"}],
    }
    assert send(env, ehr, hook, outcome, token=False).status == 412
    assert summary(send(env, ehr, hook, outcome, token=True)) == expected

    paged = prefetch(scenario)
    paged["observations"] = first_page(env, hook[2])
    assert send(env, ehr, hook, paged, token=False).status == 412
    assert summary(send(env, ehr, hook, paged, token=True)) == expected

    assert summary(send(env, ehr, hook, None, token=True)) == expected
    absent = send(env, ehr, hook, None, token=False)
    assert absent.status == 412
    assert {i["details"]["text"] for i in absent.body["issue"]} == {
        "Required data unavailable: prefetch key 'observations'",
        "Required data unavailable: prefetch key 'patient'",
    }
