"""Drug exposure from every kind of medication record (issue 13 §1-§2).

tests/data/administrations.json: ANC 0.4 on 2024-05-01T08:00Z per patient and one cyclophosphamide
MedicationAdministration. tests/data/dispenses.json and orders.json: ANC 1.2 on 2024-05-01T08:00Z
and one clozapine MedicationDispense or MedicationRequest; the clozapine label's table (mild
neutropenia, "Continue clozapine") applies only when that record is an exposure at the count,
otherwise the adult CTCAE table (grade 2). The rules are in fhir_leuko/core/normalise/exposure.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fhir_leuko.core.knowledge import Knowledge
from fhir_leuko.core.pipeline import Evaluation
from fhir_leuko.core.profiles import ProfileSet

from .conftest import DATA, by_patient, fhir_leuko, run_paths


@pytest.fixture(scope="module")
def administrations(knowledge: Knowledge, profiles: ProfileSet) -> Evaluation:
    return run_paths([DATA / "administrations.json"], knowledge, profiles)


@pytest.fixture(scope="module")
def dispenses(knowledge: Knowledge, profiles: ProfileSet) -> Evaluation:
    return run_paths([DATA / "dispenses.json"], knowledge, profiles)


@pytest.fixture(scope="module")
def orders(knowledge: Knowledge, profiles: ProfileSet) -> Evaluation:
    return run_paths([DATA / "orders.json"], knowledge, profiles)


ADMINISTRATIONS = [
    # patient, relation of the implicated administration (None: not implicated)
    ("ma-given-5d", "given 2024-04-26, 5 days before"),
    ("ma-not-done", None),
    ("ma-entered-in-error", None),
    ("ma-after", None),
    ("ma-30d", "given 2024-04-01, 30 days before"),
    ("ma-31d", None),
    ("ma-in-progress", "given from 2024-04-30, in progress"),
    ("ma-stopped", "given 2024-04-29 (status stopped), 2 days before"),
    ("ma-same-day", "given 2024-05-01, the same day"),
    ("ma-no-time", None),
    ("ma-bad-status", None),
]


@pytest.mark.parametrize(("patient", "relation"), ADMINISTRATIONS, ids=[c[0] for c in ADMINISTRATIONS])
def test_administrations(administrations: Evaluation, patient: str, relation: str | None) -> None:
    finding = by_patient(administrations)[(patient, "neutropenia")]  # ANC 0.4 always fires
    assert finding.profile_id == "adult-default" and finding.grade == "4"
    if relation is None:
        assert finding.implicated == ()
        return
    [drug] = finding.implicated
    assert drug.exposure.key == f"MedicationAdministration/{patient}-ma"
    assert drug.drug_labels == ("cyclophosphamide",)
    assert drug.relation == relation


def test_an_administration_is_named_in_the_detectedissue(administrations: Evaluation) -> None:
    issue = next(
        i for i in administrations.issues if i["patient"]["reference"] == "Patient/ma-given-5d"
    )
    assert issue["implicated"] == [{"reference": "MedicationAdministration/ma-given-5d-ma"}]
    # The referenced Medication names the drug; the detail names the record and when it was given.
    assert (
        "Possibly implicated: cyclophosphamide (MedicationAdministration/ma-given-5d-ma: "
        "Cyclophosphamide 1000 MG Injection; given 2024-04-26, 5 days before)." in issue["detail"]
    )


def test_administrations_that_cannot_count_are_named(administrations: Evaluation) -> None:
    assert sorted((p.resource, p.reason) for p in administrations.problems) == [
        (
            "MedicationAdministration/ma-bad-status-ma",
            "invalid MedicationAdministration.status 'given'",
        ),
        (
            "MedicationAdministration/ma-no-time-ma",
            "no effective[x]: when it was given is unknown",
        ),
    ]


CLOZAPINE = ("clozapine", "mild")
ADULT = ("adult-default", "2")
DISPENSES = [
    # patient, (profile, grade), relation of the implicated dispense
    ("md-supply", CLOZAPINE,
     "dispensed 2024-04-20, 28 days' supply (daysSupply) to 2024-05-18, active at this count"),
    ("md-quantity", CLOZAPINE,
     "dispensed 2024-04-10, 28 days' supply (quantity 56 tablet at 2 tablet a day) to 2024-05-08, "
     "active at this count"),
    ("md-weeks", CLOZAPINE,
     "dispensed 2024-04-20, 28 days' supply (daysSupply 4 wk) to 2024-05-18, active at this count"),
    ("md-ended-recent", CLOZAPINE,
     "dispensed 2024-03-15, 28 days' supply (daysSupply) to 2024-04-12, supply ended 19 days before"),
    ("md-ended", ADULT, None),
    ("md-hand-over-only", CLOZAPINE,
     "dispensed 2024-04-25, supply length not recorded (no daysSupply, no quantity), counted as "
     "taken that day only, 6 days before"),
    ("md-units-differ", CLOZAPINE,
     "dispensed 2024-04-25, supply length not known (no daysSupply; quantity in {tbl}, dose in mg), "
     "counted as taken that day only, 6 days before"),
    ("md-contained", CLOZAPINE,
     "dispensed 2024-04-20, 28 days' supply (daysSupply) to 2024-05-18, active at this count"),
    ("md-not-picked-up", ADULT, None),
    ("md-declined", ADULT, None),
    ("md-cancelled", ADULT, None),
    ("md-entered-in-error", ADULT, None),
    ("md-after", ADULT, None),
    ("md-no-hand-over", ADULT, None),
]


@pytest.mark.parametrize(
    ("patient", "decided", "relation"), DISPENSES, ids=[c[0] for c in DISPENSES]
)
def test_dispenses(
    dispenses: Evaluation, patient: str, decided: tuple[str, str], relation: str | None
) -> None:
    finding = by_patient(dispenses)[(patient, "neutropenia")]
    assert (finding.profile_id, finding.grade) == decided
    if relation is None:
        assert finding.implicated == ()
        assert "Continue clozapine" not in finding.recommendation
        return
    [drug] = finding.implicated
    assert drug.exposure.key == f"MedicationDispense/{patient}-md"
    assert drug.drug_labels == ("clozapine",)
    assert drug.relation == relation
    assert finding.recommendation.startswith("Continue clozapine.")


def test_a_completed_dispense_without_hand_over_time_is_named(dispenses: Evaluation) -> None:
    assert [(p.resource, p.reason) for p in dispenses.problems] == [
        (
            "MedicationDispense/md-no-hand-over-md",
            "no whenHandedOver: when the patient got it is unknown (a completed dispense needs "
            "it)",
        )
    ]


ORDERS = [
    # patient, (profile, grade)
    ("mo-starts-after", ADULT),  # scheduled (boundsPeriod) 3 days after the low ANC
    ("mo-started", CLOZAPINE),
    ("mo-order", CLOZAPINE),
    ("mo-schedule-ended", ADULT),  # the schedule ended 42 days before, the order still active
    ("mo-proposal", ADULT),
    ("mo-plan", ADULT),
    ("mo-option", ADULT),
    ("mo-do-not-perform", ADULT),
    ("mo-bad-intent", ADULT),
]


@pytest.mark.parametrize(("patient", "decided"), ORDERS, ids=[c[0] for c in ORDERS])
def test_orders(orders: Evaluation, patient: str, decided: tuple[str, str]) -> None:
    finding = by_patient(orders)[(patient, "neutropenia")]
    assert (finding.profile_id, finding.grade) == decided
    if decided == ADULT:
        assert finding.implicated == ()
        assert "Continue clozapine" not in finding.recommendation
    else:
        assert [d.exposure.key for d in finding.implicated] == [f"MedicationRequest/{patient}-mr"]


def test_an_invalid_intent_is_named(orders: Evaluation) -> None:
    assert [(p.resource, p.reason) for p in orders.problems] == [
        ("MedicationRequest/mo-bad-intent-mr", "invalid MedicationRequest.intent 'prescription'")
    ]


def test_evaluate_command_reads_administrations_and_dispenses() -> None:
    done = fhir_leuko(
        "evaluate", str(DATA / "administrations.json"), str(DATA / "dispenses.json"),
        "--as-of", "2024-05-02",
    )
    assert done.returncode == 1, done.stderr  # the named problems
    issues = {i["patient"]["reference"]: i for i in map(json.loads, done.stdout.splitlines())}
    assert len(issues) == 25
    cloz = issues["Patient/md-supply"]
    assert cloz["implicated"] == [{"reference": "MedicationDispense/md-supply-md"}]
    assert cloz["reference"].startswith("https://fhir-leuko.github.io/fhir/profiles/clozapine|")
    assert "Recommendation: Continue clozapine." in cloz["detail"]
    lines = done.stderr.splitlines()
    assert (
        "fhir-leuko: read 2 files: 25 Observation, 25 Patient, 11 MedicationAdministration, "
        "14 MedicationDispense, 1 Medication" in lines
    )
    assert any("MedicationDispense/md-no-hand-over-md: no whenHandedOver" in line for line in lines)


def test_every_record_of_the_data_files_is_read(data_dir: Path) -> None:
    """The files hold what their tests say (a guard against a case silently missing)."""
    for name, rtype, count in (
        ("administrations.json", "MedicationAdministration", len(ADMINISTRATIONS)),
        ("dispenses.json", "MedicationDispense", len(DISPENSES)),
        ("orders.json", "MedicationRequest", len(ORDERS)),
    ):
        entries = json.loads((data_dir / name).read_text(encoding="utf-8"))["entry"]
        assert sum(e["resource"]["resourceType"] == rtype for e in entries) == count
