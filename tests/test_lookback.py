"""Which result counts: the latest valid one within the lookback (30 days before as-of).

tests/data/lookback.json, evaluated as of 2024-05-01T12:00:00Z: exactly 30 days before is in, one
second more is out, and a result after as-of is not seen yet. A recovered patient (latest count
normal) gets no finding; preliminary and entered-in-error results do not count.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fhir_leuko.core.knowledge import Knowledge
from fhir_leuko.core.pipeline import Evaluation
from fhir_leuko.core.profiles import ProfileSet

from .conftest import by_patient, run_paths, utc

AS_OF = utc(2024, 5, 1, 12, 0, 0)


@pytest.fixture(scope="module")
def result(data_dir: Path, knowledge: Knowledge, profiles: ProfileSet) -> Evaluation:
    return run_paths([data_dir / "lookback.json"], knowledge, profiles, as_of=AS_OF)


@pytest.mark.parametrize(
    ("patient", "fires", "result_key"),
    [
        ("lb-in", True, "Observation/lb-in-wbc"),
        ("lb-out", False, None),
        ("lb-future", False, None),
        ("lb-recovered", False, None),
        ("lb-relapsed", True, "Observation/lb-relapsed-low"),
        ("lb-old-low", False, None),
        ("lb-prelim", True, "Observation/lb-prelim-final-low"),
        ("lb-eie", False, None),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_latest_result_in_lookback(
    result: Evaluation, patient: str, fires: bool, result_key: str | None
) -> None:
    finding = by_patient(result).get((patient, "leukopenia"))
    assert (finding is not None) == fires
    if finding is not None:
        assert finding.result.key == result_key


def test_relapse_shows_the_trend(result: Evaluation) -> None:
    finding = by_patient(result)[("lb-relapsed", "leukopenia")]
    assert [r.value for r in finding.trend] == [5.0, 2.0]
    issue = next(i for i in result.issues if i["patient"]["reference"] == "Patient/lb-relapsed")
    assert "Recent values: 5.0 ×10⁹/L (2024-04-20), 2.0 ×10⁹/L (2024-04-28)." in issue["detail"]


def test_a_day_later_the_edge_result_is_out(
    data_dir: Path, knowledge: Knowledge, profiles: ProfileSet
) -> None:
    later = run_paths([data_dir / "lookback.json"], knowledge, profiles, as_of=utc(2024, 5, 2))
    assert ("lb-in", "leukopenia") not in by_patient(later)
    assert ("lb-future", "leukopenia") in by_patient(later)


def test_ignored_statuses_are_counted_not_reported(result: Evaluation) -> None:
    assert result.problems == []
    assert result.counts["results:ignored-entered-in-error"] == 1
