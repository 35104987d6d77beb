"""Every rule of adult-default, and every CTCAE v5.0 band edge, fires and misses as written.

Data: tests/data/bands/*.ndjson, one hand-written Observation per patient, all taken 2024-05-01.
CTCAE v5.0 (clinical.md §4.1): a band holds values strictly below its edge, so a value exactly at an
edge belongs to the milder grade (ANC 1.0 is grade 2, 0.99 grade 3). Without a lab range the
default lower limit (WBC 4.0, ANC 1.5, lymphocytes 1.0 ×10⁹/L) is the grade 1 edge.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fhir_leuko.core.knowledge import Knowledge
from fhir_leuko.core.pipeline import Evaluation
from fhir_leuko.core.profiles import ProfileSet

from .conftest import by_patient, run_paths

# (patient, finding kind, expected grade or None for no finding, severity)
WBC = [
    ("wbc-4.0", None, None),
    ("wbc-3.99", "1", "low"),
    ("wbc-3.0", "1", "low"),
    ("wbc-2.99", "2", "moderate"),
    ("wbc-2.0", "2", "moderate"),
    ("wbc-1.99", "3", "high"),
    ("wbc-1.0", "3", "high"),
    ("wbc-0.99", "4", "high"),
]
ANC = [
    # With the default lower limit 1.5 grade 1 ("<LLN - 1.5") is empty: below 1.5 is grade 2.
    ("anc-1.5", None, None),
    ("anc-1.49", "2", "moderate"),
    ("anc-1.0", "2", "moderate"),
    ("anc-0.99", "3", "high"),
    ("anc-0.5", "3", "high"),
    ("anc-0.49", "4", "high"),
    ("anc-0.1", "4", "high"),
    ("anc-0.09", "4", "high"),
]
ALC = [
    ("alc-1.0", None, None),
    ("alc-0.99", "1", "low"),
    ("alc-0.8", "1", "low"),
    ("alc-0.79", "2", "moderate"),
    ("alc-0.5", "2", "moderate"),
    ("alc-0.49", "3", "high"),
    ("alc-0.2", "3", "high"),
    ("alc-0.19", "4", "high"),
]


@pytest.fixture(scope="module")
def bands(data_dir: Path, knowledge: Knowledge, profiles: ProfileSet) -> Evaluation:
    return run_paths([data_dir / "bands"], knowledge, profiles)


@pytest.mark.parametrize(
    ("patient", "kind", "grade", "severity"),
    [
        *[(p, "leukopenia", g, s) for p, g, s in WBC],
        *[(p, "neutropenia", g, s) for p, g, s in ANC],
        *[(p, "lymphopenia", g, s) for p, g, s in ALC],
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_ctcae_band_edges(
    bands: Evaluation, patient: str, kind: str, grade: str | None, severity: str | None
) -> None:
    findings = by_patient(bands)
    finding = findings.get((patient, kind))
    if grade is None:
        assert finding is None, f"{patient}: no {kind} expected, got grade {finding and finding.grade}"
        assert not [f for f in bands.findings if f.patient == f"Patient/{patient}"]
        return
    assert finding is not None, f"{patient}: {kind} grade {grade} expected, got none"
    assert finding.grade == grade
    assert finding.severity == severity
    assert finding.profile_id == "adult-default"
    assert finding.grading_version == "CTCAE v5.0"


@pytest.mark.parametrize(
    ("patient", "term", "snomed"),
    [
        ("anc-1.0", "neutropenia", ["165517008"]),
        ("anc-0.5", "neutropenia", ["165517008"]),
        ("anc-0.49", "severe neutropenia (agranulocytosis range", ["165517008", "17182001"]),
        # 0.1 is not below 0.1: severe, not profound.
        ("anc-0.1", "severe neutropenia (agranulocytosis range", ["165517008", "17182001"]),
        ("anc-0.09", "profound neutropenia", ["165517008", "17182001"]),
        # "< 0.1" is graded below 0.1: profound.
        ("anc-lt-0.1", "profound neutropenia", ["165517008", "17182001"]),
    ],
    ids=["1.0", "0.5", "0.49", "0.1", "0.09", "lt-0.1"],
)
def test_neutropenia_wording_and_snomed(
    bands: Evaluation, patient: str, term: str, snomed: list[str]
) -> None:
    finding = by_patient(bands)[(patient, "neutropenia")]
    assert finding.term.startswith(term)
    assert [code for code, _ in finding.evidence_codes] == snomed


@pytest.mark.parametrize(
    ("patient", "grade"),
    [
        ("anc-lt-0.1", "4"),  # < 0.1: certainly below 0.5
        ("anc-le-0.5", "3"),  # <= 0.5 may be 0.5 itself: not certainly below 0.5, so grade 3
        ("anc-gt-0.2", None),  # > 0.2 is a lower bound only: never taken as low
    ],
    ids=["lt", "le", "gt"],
)
def test_comparators(bands: Evaluation, patient: str, grade: str | None) -> None:
    finding = by_patient(bands).get((patient, "neutropenia"))
    assert (finding.grade if finding else None) == grade
    if finding is not None:
        assert finding.result.comparator is not None
        assert "(reported " + finding.result.comparator in finding.result.reported or (
            finding.result.reported.startswith(finding.result.comparator)
        )


# The lab's lower limit (referenceRange.low) wins over the default when the Observation has one;
# monocytes, eosinophils and basophils have no default: without a lab range they never fire.
LAB_RANGE = [
    ("wbc-3.8-lln-3.5", "leukopenia", None, None),
    ("wbc-3.4-lln-3.5", "leukopenia", "1", 3.5),
    ("wbc-4.4-lln-4.5", "leukopenia", "1", 4.5),
    ("wbc-4.5-lln-4.5", "leukopenia", None, None),
    ("wbc-4400-lln-4500-per-uL", "leukopenia", "1", 4.5),
    ("anc-1.9-lln-2.0", "neutropenia", "1", 2.0),
    ("anc-2.0-lln-2.0", "neutropenia", None, None),
    ("alc-0.95-lln-0.9", "lymphopenia", None, None),
    ("alc-1.1-lln-1.2", "lymphopenia", "1", 1.2),
    ("mono-0.15-lln-0.2", "monocytopenia", "below range", 0.2),
    ("mono-0.2-lln-0.2", "monocytopenia", None, None),
    ("mono-0.05-no-range", "monocytopenia", None, None),
    ("eos-20-lln-40-per-uL", "eosinopenia", "below range", 0.04),
    ("eos-40-lln-40-per-uL", "eosinopenia", None, None),
    ("eos-0.01-no-range", "eosinopenia", None, None),
    ("baso-0.005-lln-0.01", "basopenia", "below range", 0.01),
    ("baso-0.01-lln-0.01", "basopenia", None, None),
    # A range whose type is not "normal" (here: treatment) is not the lab's normal range.
    ("wbc-3.8-range-type-treatment", "leukopenia", "1", 4.0),
]


@pytest.mark.parametrize(
    ("patient", "kind", "grade", "limit"), LAB_RANGE, ids=[row[0] for row in LAB_RANGE]
)
def test_lab_lower_limit_against_default(
    bands: Evaluation, patient: str, kind: str, grade: str | None, limit: float | None
) -> None:
    finding = by_patient(bands).get((patient, kind))
    if grade is None:
        assert finding is None
        return
    assert finding is not None
    assert finding.grade == grade
    assert finding.lower_limit.value == pytest.approx(limit)
    if limit != 4.0:
        assert "referenceRange" in finding.lower_limit.source
    if kind in ("monocytopenia", "eosinopenia", "basopenia"):
        assert finding.severity == "low"
        assert finding.evidence_codes == ()  # no verified SNOMED CT code (clinical.md §3)


def test_no_problems_in_band_files(bands: Evaluation) -> None:
    assert bands.problems == []
