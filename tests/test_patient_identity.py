"""Patient identity (issue 13 §4): contained subjects, Patient.link, subjects given by identifier.

tests/data/patient-identity.json: one WBC per case on 2024-05-01T08:00Z (unless said). The rules are
in fhir_leuko/core/normalise/identity.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fhir_leuko.core.detectedissue import issue_id
from fhir_leuko.core.knowledge import Knowledge
from fhir_leuko.core.model import FindingKind
from fhir_leuko.core.pipeline import Evaluation
from fhir_leuko.core.profiles import ProfileSet

from .conftest import DATA, fhir_leuko, run_paths

MRN = "https://hospital.example.org/sid/mrn"
BY_MRN = f"Patient?identifier={MRN}|"


@pytest.fixture(scope="module")
def result(knowledge: Knowledge, profiles: ProfileSet) -> Evaluation:
    return run_paths([DATA / "patient-identity.json"], knowledge, profiles)


def test_two_contained_patients_with_one_local_id_are_two_patients(result: Evaluation) -> None:
    # Each Observation contains its own Patient "#p1": MRN 1001 (WBC 1.2) and 1002 (WBC 3.5).
    found = {f.patient: f for f in result.findings}
    assert found[f"{BY_MRN}1001"].result.key == "Observation/pi-c1-wbc"
    assert found[f"{BY_MRN}1001"].grade == "3"
    assert found[f"{BY_MRN}1002"].result.key == "Observation/pi-c2-wbc"
    # Their DetectedIssues refer to each patient by identifier, and have different identifiers.
    one = next(i for i in result.issues if i["patient"].get("identifier", {}).get("value") == "1001")
    two = next(i for i in result.issues if i["patient"].get("identifier", {}).get("value") == "1002")
    assert one["patient"] == {"type": "Patient", "identifier": {"system": MRN, "value": "1001"}}
    assert one["id"] != two["id"]
    assert one["id"] == issue_id(f"{BY_MRN}1001", FindingKind.LEUKOPENIA)


def test_one_person_contained_in_two_resources_is_one_patient(result: Evaluation) -> None:
    [finding] = [f for f in result.findings if f.patient == f"{BY_MRN}1004"]
    assert finding.result.key == "Observation/pi-same-2"  # the latest of the two counts
    assert [r.key for r in finding.trend] == ["Observation/pi-same-1", "Observation/pi-same-2"]


def test_a_contained_patient_is_matched_to_the_patient_with_its_identifier(
    result: Evaluation,
) -> None:
    [finding] = [f for f in result.findings if f.patient == "Patient/pi-known"]
    assert finding.result.key == "Observation/pi-c3-wbc"
    assert not any(f.patient.endswith("|1003") for f in result.findings)


def test_a_contained_patient_without_identifier_is_a_problem(result: Evaluation) -> None:
    problems = {p.resource: p for p in result.problems}
    problem = problems["Observation/pi-c4-wbc"]
    assert problem.kind == "identity"
    assert problem.reason.startswith(
        "its subject is a contained Patient (#p1) without an identifier: no DetectedIssue could "
        "name this patient"
    )
    assert not any("#" in f.patient for f in result.findings)


def test_a_replaced_record_counts_for_its_survivor(result: Evaluation) -> None:
    patients = {f.patient for f in result.findings}
    assert {"Patient/pi-new", "Patient/pi-new2"} <= patients
    assert not {"Patient/pi-old", "Patient/pi-old2"} & patients
    [finding] = [f for f in result.findings if f.patient == "Patient/pi-new"]
    assert finding.result.key == "Observation/pi-old-wbc"
    assert [d.exposure.key for d in finding.implicated] == ["MedicationStatement/pi-old-ms"]
    issue = next(i for i in result.issues if i["patient"] == {"reference": "Patient/pi-new"})
    assert (
        "Also counted: the records of Patient/pi-old, replaced by this patient's record "
        "(Patient.link)." in issue["detail"]
    )


def test_seealso_keeps_records_apart(result: Evaluation) -> None:
    patients = {f.patient for f in result.findings}
    assert "Patient/pi-see" in patients and "Patient/pi-also" not in patients


def test_a_subject_given_by_identifier(result: Evaluation) -> None:
    [finding] = [f for f in result.findings if f.patient == "Patient/pi-ident"]
    assert finding.result.key == "Observation/pi-ident-wbc"
    problems = {p.resource: p.reason for p in result.problems}
    assert problems["Observation/pi-nobody-wbc"] == (
        f"its subject is given by identifier {MRN}|2999, and no Patient of this source has it"
    )


def test_every_finding_and_problem(result: Evaluation) -> None:
    assert sorted(f.patient for f in result.findings) == sorted(
        [
            f"{BY_MRN}1001",
            f"{BY_MRN}1002",
            f"{BY_MRN}1004",
            "Patient/pi-known",
            "Patient/pi-new",
            "Patient/pi-new2",
            "Patient/pi-see",
            "Patient/pi-ident",
        ]
    )
    assert sorted(p.resource for p in result.problems) == [
        "Observation/pi-c4-wbc",
        "Observation/pi-nobody-wbc",
    ]


def test_link_cycles_and_two_survivors_merge_nothing(
    knowledge: Knowledge, profiles: ProfileSet, tmp_path: Path
) -> None:
    """Hand-written FHIR JSON: a replaced-by cycle, and a record replaced by two others."""
    resources = [
        {"resourceType": "Patient", "id": "a", "link": [{"other": {"reference": "Patient/b"}, "type": "replaced-by"}]},
        {"resourceType": "Patient", "id": "b", "link": [{"other": {"reference": "Patient/a"}, "type": "replaced-by"}]},
        {"resourceType": "Patient", "id": "c", "link": [
            {"other": {"reference": "Patient/d"}, "type": "replaced-by"},
            {"other": {"reference": "Patient/e"}, "type": "replaced-by"},
        ]},
        *(
            {
                "resourceType": "Observation", "id": f"{p}-wbc", "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "6690-2"}]},
                "subject": {"reference": f"Patient/{p}"}, "effectiveDateTime": "2024-05-01T08:00:00Z",
                "valueQuantity": {"value": 1.5, "unit": "10*3/uL", "system": "http://unitsofmeasure.org", "code": "10*3/uL"},
            }
            for p in ("a", "b", "c")
        ),
    ]
    path = tmp_path / "links.json"
    path.write_text(json.dumps({"resourceType": "Bundle", "type": "collection",
                                "entry": [{"resource": r} for r in resources]}))
    result = run_paths([path], knowledge, profiles)
    assert sorted(f.patient for f in result.findings) == ["Patient/a", "Patient/b", "Patient/c"]
    reasons = sorted(p.reason for p in result.problems)
    assert reasons == [
        "Patient.link: replaced by several records (Patient/d, Patient/e); not merged",
        "Patient.link: replaced-by links form a cycle; not merged",
        "Patient.link: replaced-by links form a cycle; not merged",
    ]


def test_evaluate_command() -> None:
    done = fhir_leuko("evaluate", str(DATA / "patient-identity.json"), "--as-of", "2024-05-02")
    assert done.returncode == 1  # the two named problems
    issues = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(issues) == 8
    assert len({i["id"] for i in issues}) == 8
    assert "Observation/pi-c4-wbc: its subject is a contained Patient (#p1)" in done.stderr
