"""The records hospitals hold, through the scheduled job against the real test FHIR server (issue 13):
administrations and dispenses (searched, and their changes detected), orders that are no exposure,
the lab's range for the patient, withdrawn reports and deceased patients.

The hand-written files of tests/data are loaded into the server; one pass as of 2024-05-02 must
write exactly the DetectedIssues ``fhir-leuko evaluate`` gives for the same files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import requests

from fhir_leuko.core.knowledge import Knowledge
from fhir_leuko.core.pipeline import Evaluation
from fhir_leuko.core.profiles import ProfileSet
from fhir_leuko.testing.seed import seed_paths
from fhir_leuko.testing.sekmet import SekmetServer

from ..conftest import DATA, run_paths
from .conftest import FHIR, anc, at, by_identity, cli, issues, patient, run_pass, seed

AS_OF = at("2024-05-02T23:59:59")
REFUSED = {"ma-no-time-ma"}
"""Resources the server refuses to store (R4 MedicationAdministration.effective[x] is 1..1); the
files keep them to show that ``evaluate`` names them."""
FILES = [
    "administrations.json",
    "dispenses.json",
    "orders.json",
    "reference-ranges.json",
    "withdrawn.json",
    "deceased.json",
]


def _said(found: list[dict[str, Any]]) -> dict[tuple[str, str], tuple[Any, ...]]:
    """What each DetectedIssue says (its identity, and what the job compares)."""
    out: dict[tuple[str, str], tuple[Any, ...]] = {}
    for identity, [issue] in by_identity(found).items():
        out[identity] = (
            issue["severity"],
            issue["reference"],
            issue.get("implicated"),
            issue["detail"],
        )
    return out


@pytest.fixture(scope="module")
def evaluated(knowledge: Knowledge, profiles: ProfileSet) -> Evaluation:
    """``evaluate`` of each file (each is one source, as the server is; its patients are distinct)."""
    out = Evaluation()
    for name in FILES:
        part = run_paths([DATA / name], knowledge, profiles, AS_OF)
        out.issues.extend(part.issues)
        out.problems.extend(part.problems)
    return out


def test_one_pass_writes_what_evaluate_gives(
    server: SekmetServer,
    state_path: Path,
    knowledge: Knowledge,
    profiles: ProfileSet,
    evaluated: Evaluation,
) -> None:
    resources = [
        entry["resource"]
        for name in FILES
        for entry in json.loads((DATA / name).read_text(encoding="utf-8"))["entry"]
        if entry["resource"].get("id") not in REFUSED
    ]
    seed(server.base_url, *resources)
    report = run_pass(server.base_url, state_path, knowledge, profiles, as_of=AS_OF)
    assert not report.failed, report.summary_lines()
    found = issues(server.base_url)
    assert _said(found) == _said(evaluated.issues)
    assert len(found) == len(evaluated.issues) == 48
    # The deceased patients were evaluated (they have counts) and left alone.
    assert report.actions["deceased"] == 2
    assert "; 2 deceased patients left as they are" in report.summary_lines()[3]
    # The named problems of the files are the job's problems too (the same records, from a server).
    assert sorted(p.resource for p in report.problems) == sorted(
        p.resource for p in evaluated.problems if p.resource.split("/")[-1] not in REFUSED
    )
    # The MedicationAdministration and MedicationDispense searches ran, and found the changes.
    assert report.changes["Observation"] > 0


def _clozapine_dispense(did: str, pid: str, handed_over: str) -> dict[str, Any]:
    return {
        "resourceType": "MedicationDispense",
        "id": did,
        "status": "completed",
        "medicationCodeableConcept": {
            "coding": [
                {
                    "system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                    "code": "2626",
                    "display": "clozapine",
                }
            ],
            "text": "Clozapine 100 MG Oral Tablet",
        },
        "subject": {"reference": f"Patient/{pid}"},
        "daysSupply": {"value": 28, "unit": "days", "system": "http://unitsofmeasure.org", "code": "d"},
        "whenHandedOver": handed_over,
    }


def _administration(aid: str, pid: str, given: str) -> dict[str, Any]:
    return {
        "resourceType": "MedicationAdministration",
        "id": aid,
        "status": "completed",
        "medicationCodeableConcept": {"text": "Cyclophosphamide 1000 MG Injection"},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": given,
    }


def test_a_new_dispense_or_administration_is_a_change(
    server: SekmetServer, state_path: Path, knowledge: Knowledge, profiles: ProfileSet
) -> None:
    base = server.base_url
    as_of = at("2026-11-20T12:00:00")
    seed(
        base,
        patient("p-disp"),
        anc("p-disp-anc", "p-disp", 1.2, "2026-11-19T08:00:00Z"),
        patient("p-adm"),
        anc("p-adm-anc", "p-adm", 0.4, "2026-11-19T08:00:00Z"),
    )
    first = run_pass(base, state_path, knowledge, profiles, as_of=as_of)
    assert first.ok and first.actions["create"] == 2
    before = {k: v[0] for k, v in by_identity(issues(base)).items()}
    assert before[("Patient/p-disp", "neutropenia")]["reference"].split("|")[0].endswith(
        "adult-default"
    )
    assert "implicated" not in before[("Patient/p-adm", "neutropenia")]

    # The pharmacy records a clozapine dispense; the infusion centre a cyclophosphamide infusion.
    seed(
        base,
        _clozapine_dispense("p-disp-md", "p-disp", "2026-11-10T10:00:00Z"),
        _administration("p-adm-ma", "p-adm", "2026-11-14T09:00:00Z"),
    )
    second = run_pass(base, state_path, knowledge, profiles, as_of=as_of)
    assert second.ok, second.summary_lines()
    assert second.changes["MedicationDispense"] == 1
    assert second.changes["MedicationAdministration"] == 1
    assert second.actions["update"] == 2
    after = {k: v[0] for k, v in by_identity(issues(base)).items()}
    cloz = after[("Patient/p-disp", "neutropenia")]
    assert cloz["reference"].split("|")[0].endswith("/clozapine")
    assert cloz["implicated"] == [{"reference": "MedicationDispense/p-disp-md"}]
    assert "dispensed 2026-11-10, 28 days' supply (daysSupply) to 2026-12-08" in cloz["detail"]
    chemo = after[("Patient/p-adm", "neutropenia")]
    assert chemo["implicated"] == [{"reference": "MedicationAdministration/p-adm-ma"}]
    assert "given 2026-11-14, 5 days before" in chemo["detail"]


def test_an_open_detectedissue_of_a_deceased_patient_is_never_amended(
    server: SekmetServer, state_path: Path, knowledge: Knowledge, profiles: ProfileSet
) -> None:
    base = server.base_url
    seed(base, patient("p-dead"), anc("p-dead-anc-1", "p-dead", 0.4, "2026-11-18T08:00:00Z"))
    first = run_pass(base, state_path, knowledge, profiles, as_of=at("2026-11-19T12:00:00"))
    assert first.actions["create"] == 1
    [before] = issues(base)

    # The patient dies; a later count (taken before death) is normal, another lower one follows.
    seed(
        base,
        {**patient("p-dead"), "deceasedDateTime": "2026-11-21T03:00:00Z"},
        anc("p-dead-anc-2", "p-dead", 2.5, "2026-11-20T08:00:00Z"),
        anc("p-dead-anc-3", "p-dead", 0.2, "2026-11-20T20:00:00Z"),
    )
    later = run_pass(base, state_path, knowledge, profiles, as_of=at("2026-11-22T12:00:00"))
    assert later.ok and later.patients == 1
    assert later.actions == {"deceased": 1}
    [after] = issues(base)
    assert after["meta"]["versionId"] == before["meta"]["versionId"] == "1"
    assert after["status"] == "final" and "mitigation" not in after


def test_run_command_against_the_server(server: SekmetServer, tmp_path: Path) -> None:
    """``fhir-leuko run`` as a process: a clozapine patient seen only through a dispense."""
    seed_paths(server.base_url, [DATA / "dispenses.json"])
    done = cli(
        "run", "--server", server.base_url, "--state", str(tmp_path / "state.sqlite3"),
        "--as-of", "2024-05-02", "--header", "Prefer: handling=strict", "--no-progress",
    )
    # 1: the completed dispense without whenHandedOver is named; everything else was written.
    assert done.returncode == 1, done.stderr
    assert "changes: 14 MedicationDispense" in done.stderr
    assert "MedicationDispense/md-no-hand-over-md: no whenHandedOver" in done.stderr
    assert "14 written" in done.stderr
    response = requests.get(
        f"{server.base_url}/DetectedIssue",
        params={"patient": "Patient/md-supply", "_count": "10"},
        headers=FHIR,
        timeout=30,
    )
    [entry] = response.json()["entry"]
    issue = entry["resource"]
    assert issue["implicated"] == [{"reference": "MedicationDispense/md-supply-md"}]
    assert "Recommendation: Continue clozapine." in issue["detail"]
    assert issue["reference"].startswith("https://fhir-leuko.github.io/fhir/profiles/clozapine|")


def test_a_replaced_patient_record_is_alerted_on_its_survivor(
    server: SekmetServer, state_path: Path, knowledge: Knowledge, profiles: ProfileSet
) -> None:
    """Patient.link replaced-by: the retired record's count, found by change detection on the
    retired record, is evaluated and alerted on the surviving record (fetched with Patient?link)."""
    base = server.base_url
    seed(
        base,
        patient("p-new"),
        {**patient("p-old"), "link": [{"other": {"reference": "Patient/p-new"}, "type": "replaced-by"}]},
        anc("p-old-anc", "p-old", 0.8, "2026-11-19T08:00:00Z"),
    )
    report = run_pass(base, state_path, knowledge, profiles, as_of=at("2026-11-20T12:00:00"))
    assert report.ok, report.summary_lines()
    [issue] = issues(base)
    assert issue["patient"] == {"reference": "Patient/p-new"}
    assert issue["evidence"][0]["detail"] == [{"reference": "Observation/p-old-anc"}]
    assert "Also counted: the records of Patient/p-old" in issue["detail"]
    # Asked for the survivor alone, the job finds the retired record through Patient?link.
    again = run_pass(
        base, state_path, knowledge, profiles, as_of=at("2026-11-20T12:00:00"),
        mode="patients", patients=["p-new"],
    )
    assert again.ok and again.actions == {"unchanged": 1}
