"""The laboratory's reference range that applies to the patient (issue 13 §3).

tests/data/reference-ranges.json: one WBC or ANC per patient on 2024-05-01T08:00Z, with several
``referenceRange`` entries (by sex, by age, a treatment range, a range for a race) or a range given
only as text. The rules are in fhir_leuko/core/normalise/ranges.py.
"""

from __future__ import annotations

import json

import pytest

from fhir_leuko.core.knowledge import Knowledge
from fhir_leuko.core.pipeline import Evaluation
from fhir_leuko.core.profiles import ProfileSet

from .conftest import DATA, by_patient, fhir_leuko, run_paths

DEFAULT_WBC = "fhir-leuko's default adult lower limit, used when the lab gives no range"
CASES = [
    # patient, finding kind, lower limit used (None: no finding), its source (start), note
    ("rr-man", "leukopenia", 4.2, "the laboratory's reference range for male (", ""),
    ("rr-woman", "leukopenia", None, None, None),  # 3.8 is within a woman's range (3.6)
    ("rr-woman-text", "leukopenia", None, None, None),
    ("rr-child", "neutropenia", 1.8, "the laboratory's reference range for age 5-17 a (", ""),
    ("rr-adult", "neutropenia", None, None, None),  # 1.6 is within an adult's range (1.5)
    ("rr-turns-18", "neutropenia", 1.8, "the laboratory's reference range for age 5-17 a (", ""),
    (
        "rr-race",
        "neutropenia",
        1.5,
        "the laboratory's reference range that has no conditions; its range for 'Black or "
        "African American' is not used, as ranges are chosen by sex and age only, never by race",
        "",
    ),
    ("rr-type", "leukopenia", 4.0, "the laboratory's reference range (", ""),
    (
        "rr-none-applies",
        "leukopenia",
        4.0,
        DEFAULT_WBC,
        "none of its ranges applies to this patient (female, 44 years old at the draw)",
    ),
    (
        "rr-no-sex",
        "leukopenia",
        4.0,
        DEFAULT_WBC,
        "none of its ranges applies to this patient (sex not recorded, 44 years old at the draw)",
    ),
    (
        "rr-no-birth",
        "neutropenia",
        1.5,
        "fhir-leuko's default adult lower limit",
        "none of its ranges applies to this patient (female, no birth date)",
    ),
    (
        "rr-text",
        "leukopenia",
        4.5,
        "the laboratory's reference range given as text '4.5-11.0 10*3/uL' "
        "(Observation.referenceRange.text)",
        "",
    ),
    ("rr-text-x10", "leukopenia", 4.5, "the laboratory's reference range given as text", ""),
    (
        "rr-text-other",
        "leukopenia",
        4.0,
        DEFAULT_WBC,
        "its text 'Adults 4.5-11.0; children: see the laboratory handbook' is not a plain "
        "'low-high unit' range",
    ),
]


@pytest.fixture(scope="module")
def result(knowledge: Knowledge, profiles: ProfileSet) -> Evaluation:
    return run_paths([DATA / "reference-ranges.json"], knowledge, profiles)


@pytest.mark.parametrize(
    ("patient", "kind", "limit", "source", "note"), CASES, ids=[c[0] for c in CASES]
)
def test_reference_range_choice(
    result: Evaluation,
    patient: str,
    kind: str,
    limit: float | None,
    source: str | None,
    note: str | None,
) -> None:
    finding = by_patient(result).get((patient, kind))
    if limit is None:
        assert finding is None
        return
    assert finding is not None
    assert finding.lower_limit.value == limit
    assert finding.lower_limit.source.startswith(source or "")
    assert finding.lower_limit.note == note


def test_no_other_findings_and_no_problems(result: Evaluation) -> None:
    expected = {(c[0], c[1]) for c in CASES if c[2] is not None}
    assert set(by_patient(result)) == expected
    assert result.problems == []


def test_the_detail_says_which_range_and_why_none(result: Evaluation) -> None:
    issues = {i["patient"]["reference"]: i["detail"] for i in result.issues}
    assert (
        "Lower limit used: 4.2 ×10⁹/L, from the laboratory's reference range for male "
        "(Observation.referenceRange.low)." in issues["Patient/rr-man"]
    )
    assert (
        "The laboratory's reference range was not used: none of its ranges applies to this "
        "patient (female, 44 years old at the draw)." in issues["Patient/rr-none-applies"]
    )


def test_evaluate_command() -> None:
    done = fhir_leuko("evaluate", str(DATA / "reference-ranges.json"), "--as-of", "2024-05-02")
    assert done.returncode == 0, done.stderr
    patients = sorted(json.loads(line)["patient"]["reference"] for line in done.stdout.splitlines())
    assert patients == sorted(f"Patient/{c[0]}" for c in CASES if c[2] is not None)
