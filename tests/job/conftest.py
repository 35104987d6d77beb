"""Fixtures of the scheduled-job tests: a real FHIR server (sekmet-fhir on 127.0.0.1), emptied
before each test, and helpers that run one pass in-process or as a ``fhir-leuko run`` process."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests

from fhir_leuko.core.detectedissue import FINDING_SYSTEM, IDENTIFIER_SYSTEM
from fhir_leuko.core.knowledge import Knowledge
from fhir_leuko.core.profiles import ProfileSet
from fhir_leuko.fhir.client import FhirClient
from fhir_leuko.job.runner import Job, JobOptions, PassReport
from fhir_leuko.job.state import State
from fhir_leuko.testing.seed import seed_resources
from fhir_leuko.testing.sekmet import SekmetServer

from .strictproxy import StrictProxy

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
# Strict servers answer 400 to unknown search parameters; sekmet does too with this header.
STRICT = {"Prefer": "handling=strict"}
FHIR = {"Accept": "application/fhir+json", "Content-Type": "application/fhir+json"}


@pytest.fixture(scope="session")
def sekmet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SekmetServer]:
    with SekmetServer(tmp_path_factory.mktemp("sekmet")) as server:
        yield server


@pytest.fixture
def server(sekmet: SekmetServer) -> SekmetServer:
    """The session's FHIR server, emptied."""
    sekmet.reset()
    return sekmet


@pytest.fixture(scope="session")
def _strict_proxy(sekmet: SekmetServer) -> Iterator[StrictProxy]:
    with StrictProxy(sekmet.base_url) as proxy:
        yield proxy


@pytest.fixture
def strict(server: SekmetServer, _strict_proxy: StrictProxy) -> StrictProxy:
    """A production-like server (offset cap 50, _count cap 20, no order without _sort, no total
    unless asked) in front of the emptied test server: ``strict.configure(...)`` changes it."""
    return _strict_proxy.configure()


@pytest.fixture
def state_path(tmp_path: Path) -> Path:
    return tmp_path / "state.sqlite3"


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def run_pass(
    base_url: str,
    state_path: Path,
    knowledge: Knowledge,
    profiles: ProfileSet,
    *,
    client: FhirClient | None = None,
    **options: Any,
) -> PassReport:
    """One pass in-process, with strict search-parameter handling."""
    client = client or FhirClient(base_url, headers=STRICT)
    hook = options.pop("hook", None)
    emit = options.pop("emit", None)
    with State(state_path) as state:
        job = Job(
            client,
            knowledge,
            profiles,
            JobOptions(**options),
            state=state,
            emit=emit,
            checkpoint_hook=hook,
        )
        return job.run()


def seed(base_url: str, *resources: Mapping[str, Any]) -> None:
    seed_resources(base_url, [(r, None) for r in resources])


def issues(base_url: str, auth: tuple[str, str] | None = None) -> list[dict[str, Any]]:
    """Every DetectedIssue fhir-leuko wrote (by its finding CodeSystem), all pages."""
    out: list[dict[str, Any]] = []
    url: str | None = f"{base_url}/DetectedIssue?code={FINDING_SYSTEM}|&_count=1000"
    while url:
        response = requests.get(url, headers=FHIR, timeout=30, auth=auth)
        response.raise_for_status()
        page = response.json()
        out.extend(e["resource"] for e in page.get("entry", []))
        url = next((k["url"] for k in page.get("link", []) if k["relation"] == "next"), None)
    return out


def by_identity(found: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """DetectedIssues grouped by (patient, finding kind)."""
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for issue in found:
        kind = next(c["code"] for c in issue["code"]["coding"] if c["system"] == FINDING_SYSTEM)
        out.setdefault((issue["patient"]["reference"], kind), []).append(issue)
    return out


def identifier_of(issue: Mapping[str, Any]) -> str:
    return next(i["value"] for i in issue["identifier"] if i["system"] == IDENTIFIER_SYSTEM)


def cli(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``fhir-leuko ARGS`` as a separate process."""
    return subprocess.run(
        [sys.executable, "-m", "fhir_leuko", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


# -- hand-written FHIR R4 JSON ---------------------------------------------------------------

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"


def patient(pid: str, birth: str = "1970-01-01") -> dict[str, Any]:
    return {"resourceType": "Patient", "id": pid, "birthDate": birth}


def count(oid: str, pid: str, loinc: str, value: float, when: str) -> dict[str, Any]:
    """A final lab Observation: a count in 10*3/uL (= 10*9/L)."""
    return {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "laboratory",
                    }
                ]
            }
        ],
        "code": {"coding": [{"system": LOINC, "code": loinc}]},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": when,
        "valueQuantity": {"value": value, "unit": "10*3/uL", "system": UCUM, "code": "10*3/uL"},
    }


def anc(oid: str, pid: str, value: float, when: str) -> dict[str, Any]:
    return count(oid, pid, "751-8", value, when)


def wbc(oid: str, pid: str, value: float, when: str) -> dict[str, Any]:
    return count(oid, pid, "6690-2", value, when)


def low_ward(prefix: str, size: int = 6) -> list[dict[str, Any]]:
    """``size`` patients ``<prefix>-0`` ... with ANC 0.6, 0.7 ... and WBC 2.5 on 2026-11-18 (each
    neutropenic, the first ones more so)."""
    return [
        resource
        for i in range(size)
        for resource in (
            patient(f"{prefix}-{i}"),
            anc(f"{prefix}-{i}-anc-1", f"{prefix}-{i}", 0.6 + 0.1 * i, "2026-11-18T08:00:00Z"),
            wbc(f"{prefix}-{i}-wbc-1", f"{prefix}-{i}", 2.5, "2026-11-18T08:00:00Z"),
        )
    ]


def valproate_order(mid: str, pid: str, authored: str) -> dict[str, Any]:
    return {
        "resourceType": "MedicationRequest",
        "id": mid,
        "status": "active",
        "intent": "order",
        "medicationCodeableConcept": {
            "coding": [
                {
                    "system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                    "code": "11118",
                    "display": "valproic acid",
                }
            ],
            "text": "Valproic acid 250 mg capsule",
        },
        "subject": {"reference": f"Patient/{pid}"},
        "authoredOn": authored,
    }
