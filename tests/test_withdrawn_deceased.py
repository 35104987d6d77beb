"""Withdrawn reports and deceased patients (issue 13 §5).

tests/data/withdrawn.json: ANC 0.3 (final) in DiagnosticReports that are entered-in-error,
cancelled or final. tests/data/deceased.json: WBC 1.0 per patient on 2024-05-01T08:00Z; as of
2024-05-02 two patients are deceased, two are not.
"""

from __future__ import annotations

import pytest

from fhir_leuko.core.knowledge import Knowledge
from fhir_leuko.core.pipeline import Evaluation
from fhir_leuko.core.profiles import ProfileSet

from .conftest import DATA, by_patient, fhir_leuko, run_paths, utc


@pytest.fixture(scope="module")
def withdrawn(knowledge: Knowledge, profiles: ProfileSet) -> Evaluation:
    return run_paths([DATA / "withdrawn.json"], knowledge, profiles)


def test_results_of_a_withdrawn_or_cancelled_report_do_not_count(withdrawn: Evaluation) -> None:
    # Only the final report's ANC fires; the one before a withdrawn low is the latest that counts.
    assert set(by_patient(withdrawn)) == {("wd-final", "neutropenia")}


def test_each_result_of_a_withdrawn_report_is_named(withdrawn: Evaluation) -> None:
    assert sorted((p.resource, p.reason, p.kind) for p in withdrawn.problems) == [
        (
            "DiagnosticReport/wd-contained-dr#anc",
            "not counted: DiagnosticReport/wd-contained-dr, which lists it, is withdrawn "
            "(entered-in-error)",
            "withdrawn",
        ),
        (
            "Observation/wd-cancelled-anc",
            "not counted: DiagnosticReport/wd-cancelled-dr, which lists it, is cancelled",
            "withdrawn",
        ),
        (
            "Observation/wd-earlier-normal-anc-2",
            "not counted: DiagnosticReport/wd-earlier-normal-dr-2, which lists it, is withdrawn "
            "(entered-in-error)",
            "withdrawn",
        ),
        (
            "Observation/wd-withdrawn-anc",
            "not counted: DiagnosticReport/wd-withdrawn-dr, which lists it, is withdrawn "
            "(entered-in-error)",
            "withdrawn",
        ),
    ]


@pytest.fixture(scope="module")
def deceased(knowledge: Knowledge, profiles: ProfileSet) -> Evaluation:
    return run_paths([DATA / "deceased.json"], knowledge, profiles)


def test_a_deceased_patient_gets_no_alert(deceased: Evaluation) -> None:
    assert set(by_patient(deceased)) == {
        ("dc-died-later", "leukopenia"),  # deceasedDateTime after the as-of: alive then
        ("dc-alive", "leukopenia"),  # deceasedBoolean false
    }
    assert deceased.counts["patients:deceased"] == 2
    assert deceased.problems == []


def test_deceased_from_the_recorded_time_on(knowledge: Knowledge, profiles: ProfileSet) -> None:
    # As of an hour before the recorded death, the count of that morning is still alerted.
    before = run_paths([DATA / "deceased.json"], knowledge, profiles, utc(2024, 5, 1, 19))
    assert ("dc-died-after-count", "leukopenia") in by_patient(before)


def test_evaluate_command_says_how_many_were_not_alerted() -> None:
    done = fhir_leuko(
        "evaluate", str(DATA / "deceased.json"), str(DATA / "withdrawn.json"),
        "--as-of", "2024-05-02",
    )
    assert done.returncode == 1  # the withdrawn results are named
    assert len(done.stdout.splitlines()) == 3
    assert (
        "fhir-leuko: lab results used: 6 measured, 0 derived; patients evaluated: 9 "
        "(2 deceased: no alert)" in done.stderr.splitlines()
    )
    assert "Observation/wd-withdrawn-anc: not counted" in done.stderr


def test_explain_says_why_there_is_no_alert() -> None:
    dead = fhir_leuko("explain", "dc-deceased", str(DATA / "deceased.json"), "--as-of", "2024-05-02")
    assert "leukopenia: no alert: the patient is recorded as deceased at as-of" in dead.stdout
    withdrawn = fhir_leuko(
        "explain", "wd-withdrawn", str(DATA / "withdrawn.json"), "--as-of", "2024-05-02"
    )
    assert (
        "Observation/wd-withdrawn-anc: not counted: DiagnosticReport/wd-withdrawn-dr, which lists "
        "it, is withdrawn (entered-in-error)" in withdrawn.stdout
    )
