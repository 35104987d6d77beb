"""The pediatric profile: children's counts judged by age-partitioned lower limits.

tests/data/pediatric.json, counts taken 2024-05-01. WBC limits from the St Luke's table (9.0 in the
first week, 5.0 to 1 year, 4.0 after), ANC 1.7 and lymphocytes 1.25 from 5 years (Univ. of Iowa);
under 5 years no verified ANC limit exists, so only CTCAE grade 2-4 values fire there.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fhir_leuko.core.knowledge import Knowledge
from fhir_leuko.core.pipeline import Evaluation
from fhir_leuko.core.profiles import ProfileSet

from .conftest import by_patient, run_paths

CASES = [
    # patient, kind, profile (None: no finding), grade, lower limit used
    ("ped-6d", "leukopenia", "pediatric", "1", 9.0),
    ("ped-7d", "leukopenia", None, None, None),
    ("ped-10d-6.0", "leukopenia", None, None, None),
    ("ped-10d-4.9", "leukopenia", "pediatric", "1", 5.0),
    ("ped-3y-anc-1.6", "neutropenia", None, None, None),
    ("ped-3y-anc-1.4", "neutropenia", "pediatric", "2", None),
    ("ped-10y-anc-1.6", "neutropenia", "pediatric", "1", 1.7),
    ("ped-10y-anc-1.75", "neutropenia", None, None, None),
    ("ped-10y-anc-lab-range", "neutropenia", None, None, None),
    ("ped-10y-alc-1.2", "lymphopenia", "pediatric", "1", 1.25),
    ("ped-17y", "leukopenia", "pediatric", "1", 4.0),
    ("ped-18y", "leukopenia", "adult-default", "1", 4.0),
    ("age-unknown", "leukopenia", "adult-default", "1", 4.0),
]


@pytest.fixture(scope="module")
def result(data_dir: Path, knowledge: Knowledge, profiles: ProfileSet) -> Evaluation:
    return run_paths([data_dir / "pediatric.json"], knowledge, profiles)


@pytest.mark.parametrize(
    ("patient", "kind", "profile", "grade", "limit"), CASES, ids=[c[0] for c in CASES]
)
def test_age_partitioned_limits(
    result: Evaluation,
    patient: str,
    kind: str,
    profile: str | None,
    grade: str | None,
    limit: float | None,
) -> None:
    finding = by_patient(result).get((patient, kind))
    if profile is None:
        assert finding is None, f"{patient}: unexpected {kind} grade {finding and finding.grade}"
        return
    assert finding is not None
    assert (finding.profile_id, finding.grade, finding.lower_limit.value) == (profile, grade, limit)


def test_no_verified_limit_is_said_in_the_text(result: Evaluation) -> None:
    issue = next(i for i in result.issues if i["patient"]["reference"] == "Patient/ped-3y-anc-1.4")
    assert "No lower limit is known for this result" in issue["detail"]
    assert "no verified lower limit under 5 years" in issue["detail"]
    assert issue["reference"] == "https://fhir-leuko.github.io/fhir/profiles/pediatric|1.0.0"


def test_source_of_the_limit_is_named(result: Evaluation) -> None:
    finding = by_patient(result)[("ped-6d", "leukopenia")]
    assert "St Luke's Hospital laboratory, WBC 0-1 week 9.0-30.0 K/uL" in finding.lower_limit.source
