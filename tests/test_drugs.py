"""Which drug records are implicated in a low count (tests/data/drug-window.json).

A drug is implicated when a MedicationStatement/MedicationRequest naming it was active at the time
of the count or stopped within the profile's drug window (30 days) before it; a record that
started after the count does not count, one started the same day does. not-taken,
entered-in-error, cancelled, draft, intended and doNotPerform records never implicate, and neither
does a drug not known to cause the finding. Every patient has WBC 2.5 on 2024-05-01T08:00Z.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fhir_leuko.core.knowledge import Knowledge
from fhir_leuko.core.pipeline import Evaluation
from fhir_leuko.core.profiles import ProfileSet

from .conftest import by_patient, run_paths

CASES = [
    # patient, implicated records, drug label, relation (start of the text)
    ("dw-stopped-30", ["MedicationStatement/dw-stopped-30-ms"], "methotrexate", "stopped 2024-04-01 (30 days before)"),
    ("dw-stopped-30-time", ["MedicationRequest/dw-stopped-30-time-mr"], "mycophenolate", "stopped 2024-04-01 (30 days before)"),
    ("dw-stopped-31", [], None, None),
    ("dw-started-after", [], None, None),
    ("dw-same-day", ["MedicationRequest/dw-same-day-mr"], "cytotoxic chemotherapy (ATC L01CD02)", "active"),
    ("dw-active", ["MedicationStatement/dw-active-ms"], "sulfasalazine", "active"),
    ("dw-not-taken", [], None, None),
    ("dw-entered-in-error", [], None, None),
    ("dw-intended", [], None, None),
    ("dw-cancelled", [], None, None),
    ("dw-draft", [], None, None),
    ("dw-do-not-perform", [], None, None),
    # Synthea-style stopped orders without dates: only their authoredOn day is known. The order 20
    # days before implicates; 61 days before and 9 days after do not.
    ("dw-stopped-status", ["MedicationRequest/dw-stopped-status-recent-mr"], "cisplatin", "stopped, last recorded 2024-04-11 (20 days before)"),
    ("dw-harmless", [], None, None),
    ("dw-topical", [], None, None),
]


@pytest.fixture(scope="module")
def result(data_dir: Path, knowledge: Knowledge, profiles: ProfileSet) -> Evaluation:
    return run_paths([data_dir / "drug-window.json"], knowledge, profiles)


@pytest.mark.parametrize(("patient", "records", "label", "relation"), CASES, ids=[c[0] for c in CASES])
def test_drug_window(
    result: Evaluation, patient: str, records: list[str], label: str | None, relation: str | None
) -> None:
    finding = by_patient(result)[(patient, "leukopenia")]  # the count itself always fires
    assert [d.exposure.key for d in finding.implicated] == records
    if label is None:
        assert finding.implicated == ()
        return
    drug = finding.implicated[0]
    assert drug.drug_labels == (label,)
    assert drug.relation == relation


def test_implicated_drugs_reach_the_detectedissue(result: Evaluation) -> None:
    issues = {i["patient"]["reference"]: i for i in result.issues}
    issue = issues["Patient/dw-stopped-30"]
    assert issue["implicated"] == [{"reference": "MedicationStatement/dw-stopped-30-ms"}]
    assert "Possibly implicated: methotrexate" in issue["detail"]
    assert "implicated" not in issues["Patient/dw-stopped-31"]
    assert "No drug known to cause it was active" in issues["Patient/dw-stopped-31"]["detail"]


def test_no_problems(result: Evaluation) -> None:
    assert result.problems == []
