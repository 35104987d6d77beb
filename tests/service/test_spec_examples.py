"""Real request shapes: the CDS Hooks spec's example requests, the sandbox's lenient ones, and the
examples shipped in examples/cds/."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from fhir_leuko.core.knowledge import Knowledge
from fhir_leuko.core.profiles import ProfileSet
from fhir_leuko.service import create_app, load_settings

from .conftest import ServiceEnv
from .harness import (
    REQUESTS,
    CdsClient,
    ClientKeys,
    MutableClock,
    ServiceServer,
    load_json,
    prefetch,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "cds"


def test_spec_patient_view_example(env: ServiceEnv, ehr: CdsClient) -> None:
    """CDS Hooks 2.0 §Calling a CDS Service example: its fhirServer is not configured for this
    client, so nothing is fetched, and the service's own prefetch keys are missing."""
    body = load_json(REQUESTS / "spec-patient-view.json")
    result = ehr.call("leuko-patient-view", body)
    assert result.status == 412
    assert [i["details"]["text"] for i in result.body["issue"]] == [
        "Required data unavailable: prefetch key 'observations'",
        "Required data unavailable: prefetch key 'patient'",
    ]
    assert all(
        "not one configured for this client (not contacted)" in i["diagnostics"]
        for i in result.body["issue"]
    )
    # With this service's prefetch keys the same request is answered.
    body["prefetch"]["patient"] = body["prefetch"]["patientToGreet"]
    body["prefetch"]["observations"] = {"resourceType": "Bundle", "type": "searchset", "total": 0}
    assert ehr.call("leuko-patient-view", body).cards == []


@pytest.mark.parametrize(
    ("name", "service"),
    [
        ("spec-order-select-r4.json", "leuko-order-select"),
        ("spec-order-sign-r4.json", "leuko-order-sign"),
        ("sandbox-order-select-no-medication.json", "leuko-order-select"),
    ],
)
def test_orders_for_drugs_that_do_not_lower_counts(ehr: CdsClient, name: str, service: str) -> None:
    """Amoxicillin/clavulanate (the hook library's R4 examples, with a NutritionOrder next to it) and
    a sandbox draft without a medication yet: no card, no data needed, not an error."""
    assert ehr.call(service, load_json(REQUESTS / name)).cards == []


def test_sandbox_shaped_clozapine_order(ehr: CdsClient) -> None:
    """draftOrders without Bundle.type and MedicationRequest.category as an object."""
    body = load_json(REQUESTS / "sandbox-order-select-clozapine.json")
    body["prefetch"] = prefetch("clozapine-stale")
    [card] = ehr.call("leuko-order-select", body).cards
    assert card["indicator"] == "warning"
    assert card["summary"] == "Clozapine order: no absolute neutrophil count in the last 7 days"


def read_http(path: Path) -> tuple[str, str, dict[str, Any]]:
    """Method, path and JSON body of a .http example file."""
    lines = [
        line for line in path.read_text(encoding="utf-8").splitlines() if not line.startswith("#")
    ]
    method, url = lines[0].split(" ", 1)
    blank = lines.index("")
    return method, re.sub(r"^https?://[^/]+", "", url), json.loads("\n".join(lines[blank + 1 :]))


@pytest.fixture
def local_service(tmp_path: Path, knowledge: Knowledge, profiles: ProfileSet) -> Any:
    settings = load_settings(
        EXAMPLES / "local.toml", feedback_database=tmp_path / "feedback.sqlite3"
    )
    server = ServiceServer(create_app(settings, knowledge=knowledge, profiles=profiles))
    yield CdsClient(server.url, "", ClientKeys("unused"), "", MutableClock())
    server.stop()


def test_the_example_requests_work(local_service: CdsClient) -> None:
    answers = {}
    for path in sorted(EXAMPLES.glob("*.http")):
        method, url, body = read_http(path)
        answers[path.stem] = local_service.request(method, url, body, token=None)
    assert [c["indicator"] for c in answers["patient-view"].cards] == ["critical"]
    assert [c["indicator"] for c in answers["order-select"].cards] == ["warning"]
    [sign] = answers["order-sign"].cards
    assert [s["label"] for s in sign["suggestions"]][-1] == "Remove the clozapine order"
    assert answers["feedback"].status == 200


def test_the_example_configuration_loads() -> None:
    settings = load_settings(EXAMPLES / "service.toml")
    assert settings.public_base_url == "https://cds.example.org"
    assert [c.iss for c in settings.clients] == [
        "https://ehr.example.org",
        "https://lab-portal.example.org",
    ]
    assert (
        settings.clients[1].jwks_file == EXAMPLES / "lab-portal-jwks.json"
    )  # relative to the file
    assert settings.cbc_order.code == "57021-8"
