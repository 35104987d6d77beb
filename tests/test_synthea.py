"""The Synthea patients in ../shared/fixtures (SMART sample data, dates shifted +2 years).

Facts per patient are in ../shared/fixtures/PROVENANCE.md §4. Chemotherapy orders are Synthea's:
one `active` order at the first cycle (FOLFOX, docetaxel) with no end, or one `stopped` order per
cycle with only its authoredOn day (lung cancer), so the drug window decides which orders count.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from fhir_leuko.core.evaluate import implicated_drugs
from fhir_leuko.core.knowledge import Knowledge
from fhir_leuko.core.model import FindingKind
from fhir_leuko.core.normalise import normalise
from fhir_leuko.core.profiles import ProfileSet
from fhir_leuko.files.reader import read_paths

from .conftest import run_paths, utc


def synthea(shared: Path, name: str) -> Path:
    folder = shared / "synthea-smart-sample-data"
    found = sorted(folder.glob(f"*/{name}_*.json"))
    assert len(found) == 1, f"{name}: {found}"
    return found[0]


CASES = [
    # file, as-of (the day after the count), WBC (10*3/uL), CTCAE grade, implicated drugs
    ("Chadwick_Von", (2003, 10, 11), 0.51, "4", ["docetaxel"]),
    ("Cleo_Friesen", (1988, 8, 25), 0.54, "4", ["oxaliplatin"]),
    ("Keira_Huel", (1997, 12, 3), 0.96, "4", ["oxaliplatin"]),
    ("Granville_Crooks", (2004, 7, 11), 0.54, "4", ["oxaliplatin"]),
    # the first low count has the same timestamp as the order: the same day counts
    ("Ali_Herman", (2020, 6, 9), 0.63, "4", ["docetaxel"]),
    ("Sherman_McGlynn", (2003, 1, 8), 2.18, "2", ["docetaxel"]),
    # mild drug-free lows >= 3.5 (Synthea's uniform 3.5-10.5 baseline)
    ("Christa_Heller", (2016, 7, 25), 3.59, "1", []),
    ("Cleo_Friesen", (1982, 7, 4), 3.72, "1", []),
    ("Micah_Schinner", (2012, 5, 1), 3.75, "1", []),
    # lung cancer: the cisplatin + paclitaxel orders of 2009-09-15 (8 days before) implicate,
    # those of 2009-08-16 (38 days) and 2009-10-16 (after the count) do not
    ("Gilbert_Wunsch", (2009, 9, 24), 3.65, "1", ["cisplatin", "paclitaxel"]),
    # normal counts: no finding
    ("Austin_Franecki", (1986, 8, 31), 6.91, None, []),
    ("Jordan_Cruickshank", (2017, 6, 25), 11.07, None, []),
    ("Luis_Miguel_Delarosa", (2021, 3, 19), 4.02, None, []),
]


@pytest.mark.parametrize(
    ("name", "day", "wbc", "grade", "drugs"), CASES, ids=[f"{c[0]}-{c[1][0]}" for c in CASES]
)
def test_synthea_patient(
    shared_fixtures: Path,
    knowledge: Knowledge,
    profiles: ProfileSet,
    name: str,
    day: tuple[int, int, int],
    wbc: float,
    grade: str | None,
    drugs: list[str],
) -> None:
    result = run_paths([synthea(shared_fixtures, name)], knowledge, profiles, utc(*day))
    assert result.problems == []
    if grade is None:
        assert result.findings == []
        return
    assert [f.kind.value for f in result.findings] == ["leukopenia"]  # no differential in Synthea
    finding = result.findings[0]
    assert finding.result.value == pytest.approx(wbc, abs=0.005)
    assert finding.grade == grade
    assert finding.profile_id == "adult-default"
    assert sorted(label for d in finding.implicated for label in d.drug_labels) == drugs
    issue = result.issues[0]
    assert issue["patient"]["reference"] == finding.patient
    if drugs:
        assert all(i["reference"].startswith("MedicationRequest/") for i in issue["implicated"])
        # Leucovorin (folinic acid) is ordered with oxaliplatin but causes nothing
        assert "eucovorin" not in issue["detail"].split("Possibly implicated:")[1].split("\n")[0]


def test_chadwick_von_implicates_the_docetaxel_request(
    shared_fixtures: Path, knowledge: Knowledge, profiles: ProfileSet
) -> None:
    result = run_paths([synthea(shared_fixtures, "Chadwick_Von")], knowledge, profiles, utc(2003, 10, 11))
    issue = result.issues[0]
    assert issue["severity"] == "high"
    assert issue["implicated"] == [{"reference": "MedicationRequest/fe1eb793-53ff-4757-9536-0f290e435465"}]
    assert "docetaxel (MedicationRequest/fe1eb793-53ff-4757-9536-0f290e435465: 1 ML DOCEtaxel 20 MG/ML Injection; active)" in issue["detail"]
    assert "Recent values: 4.474 ×10⁹/L (2003-07-12), 0.508 ×10⁹/L (2003-10-10)." in issue["detail"]


def test_chadwick_von_a_day_too_late_for_the_lookback(
    shared_fixtures: Path, knowledge: Knowledge, profiles: ProfileSet
) -> None:
    """The 0.51 count of 2003-10-10T07:44Z is out of the 30-day lookback by 2003-11-10."""
    path = synthea(shared_fixtures, "Chadwick_Von")
    assert run_paths([path], knowledge, profiles, utc(2003, 11, 9)).findings
    assert not run_paths([path], knowledge, profiles, utc(2003, 11, 10)).findings


def test_austin_franecki_cisplatin_window(shared_fixtures: Path, knowledge: Knowledge) -> None:
    """Austin's normal WBC of 1986-08-30: of the monthly stopped cisplatin/paclitaxel orders only
    those of 1986-08-01 (29 days before) are in the 30-day window; 1986-07-01 is out and
    1986-08-31 is after the count."""
    data = normalise(read_paths([synthea(shared_fixtures, "Austin_Franecki")]), knowledge)
    (record,) = data.patients.values()
    count = next(r for r in record.results if r.effective.date().isoformat() == "1986-08-30")
    found = implicated_drugs(record, count.effective, timedelta(days=30), kind=FindingKind.LEUKOPENIA)
    assert sorted(d.exposure.key for d in found) == [
        "MedicationRequest/81e2a9fd-93f9-4228-af1b-9f12ca05f705",
        "MedicationRequest/d1259ba3-08b8-4913-903c-586a6f4bf228",
    ]
    assert {d.relation for d in found} == {"stopped, last recorded 1986-08-01 (29 days before)"}


def test_all_cbc_subset_patients_read_cleanly(
    shared_fixtures: Path, knowledge: Knowledge, profiles: ProfileSet
) -> None:
    folder = shared_fixtures / "synthea-smart-sample-data" / "cbc-subset"
    result = run_paths([folder], knowledge, profiles, utc(2030, 1, 1))
    assert result.problems == []
    assert result.patients == 12
    assert result.counts["results:used"] == 51  # every WBC of PROVENANCE.md §4 is read
    assert result.findings == []  # nothing within 30 days of 2030
