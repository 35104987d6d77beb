"""The clozapine profile: the prescribing-information ANC tables, general and BEN.

tests/data/clozapine.json: each patient has one ANC on 2024-05-01 and (unless named no-cloz) a
clozapine record. General table: mild 1000-1499/uL (severity moderate), moderate 500-999 (high),
severe < 500 (high). The BEN table (normal >= 1000/uL) applies only with an explicit Condition or
active Flag coded patient-flag|ben (or duffy-null), never from race.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fhir_leuko.core.knowledge import Knowledge
from fhir_leuko.core.pipeline import Evaluation
from fhir_leuko.core.profiles import ProfileSet

from .conftest import by_patient, run_paths

GENERAL = "Clozapine prescribing information, general population ANC table"
BEN = "Clozapine prescribing information, benign ethnic neutropenia (BEN) ANC table"

CASES = [
    # patient, profile, grading, grade, severity
    ("cloz-mild", "clozapine", GENERAL, "mild", "moderate"),
    ("cloz-1.0", "clozapine", GENERAL, "mild", "moderate"),
    ("cloz-0.99", "clozapine", GENERAL, "moderate", "high"),
    ("cloz-0.5", "clozapine", GENERAL, "moderate", "high"),
    ("cloz-0.49", "clozapine", GENERAL, "severe", "high"),
    ("cloz-1.5", None, None, None, None),
    ("cloz-ben-1.2", None, None, None, None),
    ("cloz-ben-0.8", "clozapine", BEN, "BEN neutropenia", "moderate"),
    ("cloz-ben-0.4", "clozapine", BEN, "BEN severe neutropenia", "high"),
    ("cloz-flag-inactive", "clozapine", GENERAL, "mild", "moderate"),
    ("cloz-race-only", "clozapine", GENERAL, "mild", "moderate"),
    ("no-cloz-1.2", "adult-default", "CTCAE v5.0 Neutrophil count decreased", "2", "moderate"),
    ("cloz-stopped-20", "clozapine", GENERAL, "mild", "moderate"),
    ("cloz-stopped-40", "adult-default", "CTCAE v5.0 Neutrophil count decreased", "2", "moderate"),
    ("cloz-brand", "clozapine", GENERAL, "moderate", "high"),
]


@pytest.fixture(scope="module")
def result(data_dir: Path, knowledge: Knowledge, profiles: ProfileSet) -> Evaluation:
    return run_paths([data_dir / "clozapine.json"], knowledge, profiles)


@pytest.mark.parametrize(
    ("patient", "profile", "grading", "grade", "severity"), CASES, ids=[c[0] for c in CASES]
)
def test_clozapine_tables(
    result: Evaluation,
    patient: str,
    profile: str | None,
    grading: str | None,
    grade: str | None,
    severity: str | None,
) -> None:
    finding = by_patient(result).get((patient, "neutropenia"))
    if profile is None:
        assert finding is None
        return
    assert finding is not None
    assert (finding.profile_id, finding.grading_name, finding.grade, finding.severity) == (
        profile,
        grading,
        grade,
        severity,
    )
    if profile == "clozapine":
        assert [d.drug_labels for d in finding.implicated] == [("clozapine",)]
        assert finding.profile_url == "https://fhir-leuko.github.io/fhir/profiles/clozapine"


def test_ben_only_from_explicit_flag(result: Evaluation) -> None:
    findings = by_patient(result)
    assert findings[("cloz-ben-0.8", "neutropenia")].flags == ("ben",)
    assert findings[("cloz-race-only", "neutropenia")].flags == ()
    assert findings[("cloz-flag-inactive", "neutropenia")].flags == ()


@pytest.mark.parametrize(
    ("patient", "advice"),
    [
        ("cloz-mild", "Continue clozapine."),
        ("cloz-0.99", "Interrupt clozapine for suspected clozapine-induced neutropenia; resume"),
        ("cloz-0.49", "do not rechallenge unless"),
        ("cloz-ben-0.8", "Recommend haematology consultation; continue clozapine."),
    ],
    ids=["mild", "moderate", "severe", "ben"],
)
def test_label_advice_and_rems_note(result: Evaluation, patient: str, advice: str) -> None:
    issue = next(i for i in result.issues if i["patient"]["reference"] == f"Patient/{patient}")
    assert advice in issue["detail"]
    assert "REMS ended in 2025" in issue["detail"]
    assert issue["reference"] == "https://fhir-leuko.github.io/fhir/profiles/clozapine|1.0.0"


def test_severe_is_agranulocytosis_range(result: Evaluation) -> None:
    finding = by_patient(result)[("cloz-0.49", "neutropenia")]
    assert ("17182001", "Agranulocytosis") in finding.evidence_codes
    assert finding.term.startswith("severe neutropenia on clozapine")


def test_stopped_clozapine_relation(result: Evaluation) -> None:
    finding = by_patient(result)[("cloz-stopped-20", "neutropenia")]
    assert finding.implicated[0].relation == "stopped 2024-04-11 (20 days before)"
    assert by_patient(result)[("cloz-stopped-40", "neutropenia")].implicated == ()


def test_leukopenia_of_a_clozapine_patient_is_adult_default_with_clozapine_named(
    result: Evaluation,
) -> None:
    finding = by_patient(result)[("cloz-brand", "leukopenia")]
    assert finding.profile_id == "adult-default"
    assert finding.grade == "2"
    assert [d.exposure.key for d in finding.implicated] == ["MedicationRequest/cloz-brand-mr"]
    assert finding.implicated[0].exposure.drugs[0].via == "name 'Clozaril'"


def test_no_problems(result: Evaluation) -> None:
    assert result.problems == []
