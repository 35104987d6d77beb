"""The strict-production-server proxy behaves like the production server it stands for
(``../shared/knowledge/fhir-servers.md``), so the job's tests through it mean something."""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests

from fhir_leuko.errors import FhirFatalError
from fhir_leuko.fhir.client import FhirClient

from .conftest import FHIR, anc, patient, seed
from .strictproxy import StrictProxy

N = 120  # Observations: more than the proxy's offset cap (50)


@pytest.fixture
def loaded(strict: StrictProxy) -> StrictProxy:
    seed(
        strict.upstream,
        *[patient(f"sp{p:02d}") for p in range(12)],
        *[
            anc(f"sp-o{i:03d}", f"sp{i % 12:02d}", 1.0 + i / 100, "2026-11-01T08:00:00Z")
            for i in range(N)
        ],
    )
    return strict


def walk(url: str, params: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Every page of a search, following next links verbatim."""
    return [json.loads(raw) for raw in FhirClient(url).search("Observation", params)]


def ids(pages: list[dict[str, Any]]) -> list[str]:
    return [e["resource"]["id"] for page in pages for e in page.get("entry", [])]


def test_offset_above_the_cap_is_a_400(loaded: StrictProxy) -> None:
    r = requests.get(f"{loaded.base_url}/Observation?_offset=60", headers=FHIR, timeout=30)
    assert r.status_code == 400
    assert "Search offset exceeds maximum (got 60, max 50)" in r.text
    # an unsorted walk past the cap fails the way the production server fails
    with pytest.raises(FhirFatalError, match="offset exceeds maximum"):
        walk(loaded.base_url, [("_count", "500")])


def test_count_is_capped_and_total_only_when_asked(loaded: StrictProxy) -> None:
    r = requests.get(f"{loaded.base_url}/Observation?_count=500", headers=FHIR, timeout=30)
    page = r.json()
    assert len(page["entry"]) == 20
    assert "total" not in page
    r = requests.get(
        f"{loaded.base_url}/Observation?_count=5&_total=accurate", headers=FHIR, timeout=30
    )
    assert r.json()["total"] == N
    r = requests.get(f"{loaded.base_url}/Observation?_summary=count", headers=FHIR, timeout=30)
    assert r.json()["total"] == N and not r.json().get("entry")


def test_unsorted_pages_are_no_stable_order(loaded: StrictProxy) -> None:
    loaded.configure(offset_cap=10_000)
    seen = ids(walk(loaded.base_url, [("_count", "20")]))
    assert len(seen) == N  # as many rows as there are ...
    assert len(set(seen)) < N  # ... but some twice and others never


def test_sorted_pages_go_by_cursor_past_the_cap(loaded: StrictProxy) -> None:
    pages = walk(loaded.base_url, [("_sort", "_lastUpdated,_id"), ("_count", "20")])
    seen = ids(pages)
    assert sorted(seen) == sorted(f"sp-o{i:03d}" for i in range(N))
    assert len(pages) == N // 20
    queries = loaded.searches("Observation")
    assert not any(name == "_offset" for q in queries for name, _ in q)
    stamps = [e["resource"]["meta"]["lastUpdated"] for p in pages for e in p["entry"]]
    assert stamps == sorted(stamps)


def test_sorted_offset_paging_and_ignored_sort(loaded: StrictProxy) -> None:
    loaded.configure(sorted_paging="offset")
    with pytest.raises(FhirFatalError, match="offset exceeds maximum"):
        walk(loaded.base_url, [("_sort", "_lastUpdated"), ("_count", "20")])
    loaded.configure(ignore_sort=True, offset_cap=10_000)
    pages = walk(loaded.base_url, [("_sort", "_lastUpdated"), ("_count", "20")])
    stamps = [e["resource"]["meta"]["lastUpdated"] for p in pages for e in p["entry"]]
    assert stamps != sorted(stamps)


def test_lost_entries_are_still_counted(loaded: StrictProxy) -> None:
    loaded.configure(lose={"sp-o007"})
    pages = walk(loaded.base_url, [("_sort", "_lastUpdated"), ("_total", "accurate")])
    assert pages[0]["total"] == N
    assert len(set(ids(pages))) == N - 1


def test_reads_writes_and_metadata_pass_through(strict: StrictProxy) -> None:
    client = FhirClient(strict.base_url)
    assert client.capabilities()["resourceType"] == "CapabilityStatement"
    created = client.create({"resourceType": "Patient"}, if_none_exist="identifier=x|y")
    assert created.status == 201 and created.id
    assert client.read("Patient", created.id)["resourceType"] == "Patient"
    assert (created.location or "").startswith(strict.base_url)
