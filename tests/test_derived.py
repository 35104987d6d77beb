"""Derived absolute counts: WBC x percentage of the same specimen, report or time.

tests/data/derived-anc.json. ANC = WBC x total neutrophil % (770-8) or fraction (71676-1); with a
segmented percentage (26505-8) bands (26508-2) are added, never to a total percentage; a measured
absolute count always wins. The DetectedIssue names both source Observations.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fhir_leuko.core.knowledge import Knowledge
from fhir_leuko.core.pipeline import Evaluation
from fhir_leuko.core.profiles import ProfileSet

from .conftest import by_patient, run_paths

CASES = [
    # patient, kind, value (None: no finding), grade, source Observations
    ("der-total", "neutropenia", 0.6, "3", ["Observation/der-total-wbc", "Observation/der-total-neut-pct"]),
    ("der-segs-bands", "neutropenia", 1.0, "2", ["Observation/der-segs-bands-wbc", "Observation/der-segs-bands-segs", "Observation/der-segs-bands-bands"]),
    ("der-total-bands", "neutropenia", 0.6, "3", ["Observation/der-total-bands-wbc", "Observation/der-total-bands-neut"]),
    ("der-fraction", "neutropenia", 0.6, "3", ["Observation/der-fraction-wbc", "Observation/der-fraction-neut"]),
    ("der-fraction-1", "neutropenia", 0.6, "3", ["Observation/der-fraction-1-wbc", "Observation/der-fraction-1-neut"]),
    ("der-measured", "neutropenia", 1.2, "2", ["Observation/der-measured-anc"]),
    ("der-segs-count", "neutropenia", 0.5, "3", ["Observation/der-segs-count-segs", "Observation/der-segs-count-bands"]),
    ("der-lymph", "lymphopenia", 0.4, "3", ["Observation/der-lymph-wbc", "Observation/der-lymph-pct"]),
    ("der-specimen", "neutropenia", 0.5, "3", ["Observation/der-specimen-wbc", "Observation/der-specimen-neut"]),
    ("der-same-time", "neutropenia", 0.5, "3", ["Observation/der-same-time-wbc", "Observation/der-same-time-neut"]),
    ("der-split", "neutropenia", None, None, []),
    ("der-bands-only", "neutropenia", None, None, []),
    ("der-prelim", "neutropenia", None, None, []),
    # A band-form count alone is not an ANC (it used to be graded as profound neutropenia).
    ("der-band-count-only", "neutropenia", None, None, []),
]


@pytest.fixture(scope="module")
def result(data_dir: Path, knowledge: Knowledge, profiles: ProfileSet) -> Evaluation:
    return run_paths([data_dir / "derived-anc.json"], knowledge, profiles)


@pytest.mark.parametrize(
    ("patient", "kind", "value", "grade", "sources"), CASES, ids=[c[0] for c in CASES]
)
def test_derived_counts(
    result: Evaluation,
    patient: str,
    kind: str,
    value: float | None,
    grade: str | None,
    sources: list[str],
) -> None:
    finding = by_patient(result).get((patient, kind))
    if value is None:
        assert finding is None
        return
    assert finding is not None
    assert finding.result.value == pytest.approx(value)
    assert finding.grade == grade
    assert list(finding.result.evidence) == sources
    assert finding.result.derived == (len(sources) > 1)
    issue = next(
        i
        for i in result.issues
        if i["patient"]["reference"] == f"Patient/{patient}"
        and i["code"]["coding"][1]["code"] == kind
    )
    # evidence.detail references every Observation the value rests on
    assert [d["reference"] for d in issue["evidence"][0]["detail"]] == sources


def test_derivation_is_explained(result: Evaluation) -> None:
    issue = next(
        i
        for i in result.issues
        if i["patient"]["reference"] == "Patient/der-segs-bands"
        and i["code"]["coding"][1]["code"] == "neutropenia"
    )
    assert (
        "Derived from the same specimen: WBC 2 10*3/uL (Observation/der-segs-bands-wbc) x "
        "40 % (segmented neutrophils, Observation/der-segs-bands-segs) + "
        "10 % (band neutrophils, Observation/der-segs-bands-bands)." in issue["detail"]
    )


def test_bands_never_added_to_a_total_percentage(result: Evaluation) -> None:
    finding = by_patient(result)[("der-total-bands", "neutropenia")]
    assert "der-total-bands-bands" not in finding.result.derivation
    assert finding.result.value == pytest.approx(0.6)  # 2.0 x 30 %, not 2.0 x 40 %


def test_report_time_and_subject_are_inherited(result: Evaluation) -> None:
    """der-total's Observations carry neither subject nor time: DiagnosticReport.result gives them."""
    finding = by_patient(result)[("der-total", "leukopenia")]
    assert finding.result.effective_text == "2024-05-01T08:00:00Z"
    assert finding.patient == "Patient/der-total"


def test_counts(result: Evaluation) -> None:
    assert result.problems == []
    # der-total, -segs-bands, -total-bands, -fraction, -fraction-1, -segs-count, -specimen,
    # -same-time, -prelim (neutrophils); der-lymph, der-specimen... lymphocytes: only der-lymph.
    assert result.counts["results:derived"] == 10
