"""Only R4 search parameters reach a server (strict servers answer 400 to others; lenient ones
ignore them and return too much)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest
import requests

from fhir_leuko.core.fhirjson import INPUT_TYPES
from fhir_leuko.core.knowledge import Knowledge
from fhir_leuko.core.profiles import ProfileSet
from fhir_leuko.fhir.bulk import EXPORT_TYPES
from fhir_leuko.fhir.client import FhirClient
from fhir_leuko.fhir.r4search import R4_SEARCH_PARAMS, check_search_params
from fhir_leuko.testing.seed import seed_paths
from fhir_leuko.testing.sekmet import SekmetServer

from .conftest import EXAMPLES, STRICT, anc, at, run_pass, seed


def test_every_parameter_the_job_sends_is_an_r4_search_parameter(
    server: SekmetServer, state_path: Path, knowledge: Knowledge, profiles: ProfileSet
) -> None:
    sent: list[tuple[str, str, list[tuple[str, str]]]] = []

    def record(response: requests.Response, *args: object, **kwargs: object) -> None:
        parts = urlsplit(response.request.url or "")
        path = parts.path.removeprefix(urlsplit(server.base_url).path).strip("/")
        sent.append((response.request.method or "", path, parse_qsl(parts.query)))

    session = requests.Session()
    session.hooks["response"].append(record)
    client = FhirClient(server.base_url, session=session, headers=STRICT)
    seed_paths(server.base_url, [EXAMPLES / "ward", EXAMPLES / "bulk-export"])
    as_of = at("2026-11-20T12:00:00")
    run_pass(server.base_url, state_path, knowledge, profiles, client=client, as_of=as_of)
    seed(server.base_url, anc("ex-tx-1-anc-2", "ex-tx-1", 2.5, "2026-11-20T08:00:00Z"))
    for mode in ("incremental", "full"):
        run_pass(server.base_url, state_path, knowledge, profiles, client=client, as_of=as_of, mode=mode)
    run_pass(
        server.base_url, state_path, knowledge, profiles, client=client, as_of=as_of,
        mode="patients", patients=["ex-cloz-1"],
    )
    searches = [(path, params) for method, path, params in sent if method == "GET" and params]
    # Every type the profiles need (INPUT_TYPES: the one list, also for Bulk Data _type) is
    # searched; Medications come with the medication records (_include).
    assert {path for path, _ in searches} == {*INPUT_TYPES, "DetectedIssue"} - {"Medication"}
    includes = {v for _, params in searches for k, v in params if k == "_include"}
    assert {i.split(":")[0] for i in includes if i.endswith(":medication")} == {
        t for t in INPUT_TYPES if t.startswith("Medication") and t != "Medication"
    }
    for path, params in searches:
        check_search_params(path, params)  # raises on anything R4 does not define
    assert not any(path == "DetectedIssue" and name == "status" for path, p in searches for name, _ in p)
    assert all(status for status in sent)  # and with Prefer: handling=strict no search was a 400


@pytest.mark.parametrize(
    ("rtype", "param"),
    [
        ("DetectedIssue", "status"),  # not in R4 (sekmet's test launcher adds it)
        ("Flag", "code"),  # not in R4
        ("Observation", "foo"),
        ("MedicationRequest", "_include=MedicationRequest:requester"),
        ("Observation", "_sort=_lastUpdated,foo"),
        ("Observation", "_total=exact"),
        ("Observation", "_summary=counts"),
        ("MedicationAdministration", "effective"),  # MedicationStatement's; R4 says effective-time
        ("MedicationDispense", "date"),  # R4 has whenhandedover and whenprepared, no date
    ],
)
def test_non_r4_parameters_are_refused(rtype: str, param: str) -> None:
    name, _, value = param.partition("=")
    with pytest.raises(ValueError, match="not an R4"):
        check_search_params(rtype, [(name, value or "x")])


def test_the_table_covers_every_type_the_job_searches() -> None:
    assert set(R4_SEARCH_PARAMS) >= {*INPUT_TYPES, "DetectedIssue"}
    assert EXPORT_TYPES == INPUT_TYPES  # a Bulk Data export asks for the same types (_type)
    check_search_params("Observation", {"patient": "Patient/1", "code": "x", "date": ["ge1", "le2"]})
    check_search_params("DetectedIssue", {"identifier": "s|v", "patient": "Patient/1"})
    check_search_params(
        "Observation",
        [("_sort", "_lastUpdated,_id"), ("_sort", "-date"), ("_total", "accurate")],
    )
    check_search_params("Patient", [("_summary", "count"), ("_lastUpdated", "ge2026-11-20")])
