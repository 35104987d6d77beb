"""The scheduled job against a real FHIR server (issue 3 §7): seed, run twice, change the data,
run incrementally; exactly the changes are picked up and every finding has one DetectedIssue."""

from __future__ import annotations

from pathlib import Path

import requests

from fhir_leuko.core.detectedissue import issue_id
from fhir_leuko.core.knowledge import Knowledge
from fhir_leuko.core.model import FindingKind
from fhir_leuko.core.profiles import ProfileSet
from fhir_leuko.job.runner import CHANGE_TYPES, MITIGATION_SYSTEM, RECOVERED_CODE
from fhir_leuko.job.state import State
from fhir_leuko.testing.seed import seed_paths
from fhir_leuko.testing.sekmet import SekmetServer

from .conftest import (
    EXAMPLES,
    FHIR,
    anc,
    at,
    by_identity,
    identifier_of,
    issues,
    patient,
    run_pass,
    seed,
    valproate_order,
    wbc,
)

AS_OF = at("2026-11-20T12:00:00")
LATER = at("2026-11-21T12:00:00")


def test_examples_seeded_then_run_twice_gives_no_duplicates(
    server: SekmetServer, state_path: Path, knowledge: Knowledge, profiles: ProfileSet
) -> None:
    seed_paths(server.base_url, [EXAMPLES / "ward", EXAMPLES / "bulk-export"])
    first = run_pass(server.base_url, state_path, knowledge, profiles, as_of=AS_OF)
    assert first.ok, first.summary_lines()
    assert first.actions["create"] == 7
    second = run_pass(server.base_url, state_path, knowledge, profiles, as_of=AS_OF)
    assert second.ok and second.patients == 0  # nothing changed since
    # Evaluating everyone again writes nothing either.
    third = run_pass(server.base_url, state_path, knowledge, profiles, as_of=AS_OF, mode="full")
    assert third.ok and third.patients == 6
    assert third.actions == {"unchanged": 7}
    found = issues(server.base_url)
    assert len(found) == 7
    assert all(len(group) == 1 for group in by_identity(found).values())
    assert len({identifier_of(i) for i in found}) == 7
    assert all(i["status"] == "final" and i["meta"]["versionId"] == "1" for i in found)
    # The same findings as `fhir-leuko evaluate examples/` (README): kinds and severities.
    summary = sorted(
        (k, i[0]["severity"]) for (_p, k), i in by_identity(found).items()
    )
    assert summary == sorted(
        [
            ("leukopenia", "high"),
            ("leukopenia", "low"),
            ("lymphopenia", "low"),
            ("neutropenia", "high"),
            ("neutropenia", "high"),
            ("neutropenia", "moderate"),
            ("neutropenia", "moderate"),
        ]
    )


def _ward(base_url: str) -> None:
    seed(
        base_url,
        patient("p-new"),
        anc("p-new-anc-1", "p-new", 3.0, "2026-11-18T08:00:00Z"),
        patient("p-rec"),
        anc("p-rec-anc-1", "p-rec", 0.8, "2026-11-18T08:00:00Z"),
        patient("p-worse"),
        anc("p-worse-anc-1", "p-worse", 1.2, "2026-11-18T08:00:00Z"),
        patient("p-drug"),
        wbc("p-drug-wbc-1", "p-drug", 3.5, "2026-11-18T08:00:00Z"),
        patient("p-same"),
        anc("p-same-anc-1", "p-same", 1.3, "2026-11-18T08:00:00Z"),
    )


def _one(base_url: str, pid: str, kind: str) -> dict[str, object]:
    group = by_identity(issues(base_url))[(f"Patient/{pid}", kind)]
    assert len(group) == 1, f"{len(group)} DetectedIssues for {pid} {kind}"
    return group[0]


def test_incremental_run_picks_up_exactly_the_changes(
    server: SekmetServer, state_path: Path, knowledge: Knowledge, profiles: ProfileSet
) -> None:
    base = server.base_url
    _ward(base)
    first = run_pass(base, state_path, knowledge, profiles, as_of=AS_OF)
    assert first.ok and first.actions["create"] == 4  # p-new has a normal count

    # The changes: a new low count, a recovered count, a worsened grade, a newly started drug.
    seed(
        base,
        anc("p-new-anc-2", "p-new", 0.4, "2026-11-21T08:00:00Z"),
        anc("p-rec-anc-2", "p-rec", 2.5, "2026-11-21T08:00:00Z"),
        anc("p-worse-anc-2", "p-worse", 0.7, "2026-11-21T08:00:00Z"),
        valproate_order("p-drug-vpa", "p-drug", "2026-11-01"),
    )
    second = run_pass(base, state_path, knowledge, profiles, as_of=LATER)
    assert second.ok, second.summary_lines()
    assert second.mode == "incremental"
    assert second.patients == 4  # p-same was not touched, so not re-evaluated
    assert second.changes == {"Observation": 3, "MedicationRequest": 1}
    assert dict(second.actions) == {"create": 1, "update": 2, "resolve": 1}

    new = _one(base, "p-new", "neutropenia")
    assert (new["status"], new["severity"], new["meta"]["versionId"]) == ("final", "high", "1")  # type: ignore[index]

    worse = _one(base, "p-worse", "neutropenia")
    assert worse["status"] == "amended" and worse["severity"] == "high"
    assert worse["meta"]["versionId"] == "2"  # type: ignore[index]
    assert "0.7 ×10⁹/L" in str(worse["detail"]) and "Recent values: 1.2" in str(worse["detail"])
    assert worse["identifiedDateTime"] == "2026-11-21T12:00:00Z"

    drug = _one(base, "p-drug", "leukopenia")
    assert drug["status"] == "amended" and drug["meta"]["versionId"] == "2"  # type: ignore[index]
    assert drug["implicated"] == [{"reference": "MedicationRequest/p-drug-vpa"}]

    recovered = _one(base, "p-rec", "neutropenia")
    assert recovered["status"] == "amended" and recovered["meta"]["versionId"] == "2"  # type: ignore[index]
    assert recovered["severity"] == "high"  # the episode's severity is kept
    detail = str(recovered["detail"])
    assert detail.startswith("Resolved on 2026-11-21: the latest absolute neutrophil count, 2.5")
    assert "[Observation/p-rec-anc-2, status final], is no longer low" in detail
    assert "0.8 ×10⁹/L" in detail  # the earlier finding's text is kept below
    (mitigation,) = recovered["mitigation"]  # type: ignore[misc]
    assert mitigation["action"]["coding"][0] == {
        "system": MITIGATION_SYSTEM,
        "code": RECOVERED_CODE,
        "display": "Count recovered",
    }
    assert mitigation["date"] == "2026-11-21T12:00:00Z"

    same = _one(base, "p-same", "neutropenia")
    assert same["meta"]["versionId"] == "1"  # type: ignore[index]
    assert len(issues(base)) == 5

    # Nothing changed since: O(1) requests (metadata + one search per change type), no writes.
    third = run_pass(base, state_path, knowledge, profiles, as_of=LATER)
    assert third.ok and third.patients == 0 and third.requests == 1 + len(CHANGE_TYPES)
    assert sum(third.actions.values()) == 0

    # A recovered patient falls again: the same DetectedIssue is reopened (no mitigation).
    seed(base, anc("p-rec-anc-3", "p-rec", 0.9, "2026-11-22T08:00:00Z"))
    fourth = run_pass(base, state_path, knowledge, profiles, as_of=at("2026-11-22T12:00:00"))
    assert dict(fourth.actions) == {"update": 1}
    reopened = _one(base, "p-rec", "neutropenia")
    assert reopened["meta"]["versionId"] == "3" and "mitigation" not in reopened  # type: ignore[index]
    assert not str(reopened["detail"]).startswith("Resolved")
    assert len(issues(base)) == 5

    with State(state_path) as state:
        runs = state.runs(base)
        assert [r["status"] for r in runs] == ["ok"] * 4
        actions = [w["action"] for w in state.writes(base)]
        assert actions.count("create") == 5 and actions.count("resolve") == 1


def test_an_old_finding_without_newer_count_is_not_called_recovered(
    server: SekmetServer, state_path: Path, knowledge: Knowledge, profiles: ProfileSet
) -> None:
    """Ageing out of the 30-day lookback is not recovery: the DetectedIssue stays as it was."""
    base = server.base_url
    seed(base, patient("p-old"), anc("p-old-anc", "p-old", 0.8, "2026-11-18T08:00:00Z"))
    run_pass(base, state_path, knowledge, profiles, as_of=AS_OF)
    report = run_pass(
        base, state_path, knowledge, profiles, as_of=at("2027-01-30T00:00:00"), mode="full",
    )
    assert report.actions["resolve"] == 0
    issue = _one(base, "p-old", "neutropenia")
    assert issue["meta"]["versionId"] == "1" and issue["status"] == "final"  # type: ignore[index]


def test_a_detected_issue_closed_by_a_person_stays_closed(
    server: SekmetServer, state_path: Path, knowledge: Knowledge, profiles: ProfileSet
) -> None:
    base = server.base_url
    seed(base, patient("p-h"), anc("p-h-anc", "p-h", 1.2, "2026-11-18T08:00:00Z"))
    run_pass(base, state_path, knowledge, profiles, as_of=AS_OF)
    issue = _one(base, "p-h", "neutropenia")
    issue = {**issue, "status": "entered-in-error"}
    r = requests.put(f"{base}/DetectedIssue/{issue['id']}", json=issue, headers=FHIR, timeout=30)
    assert r.status_code == 200
    report = run_pass(
        base, state_path, knowledge, profiles, as_of=AS_OF, mode="patients", patients=["p-h"]
    )
    assert report.actions == {"unchanged": 1}
    assert _one(base, "p-h", "neutropenia")["status"] == "entered-in-error"


def test_put_mode_uses_the_deterministic_id(
    server: SekmetServer, state_path: Path, knowledge: Knowledge, profiles: ProfileSet
) -> None:
    base = server.base_url
    _ward(base)
    report = run_pass(
        base, state_path, knowledge, profiles, as_of=AS_OF, write_mode="put", transactions="never"
    )
    assert report.ok and report.actions["create"] == 4
    for issue in issues(base):
        kind = FindingKind(issue["code"]["coding"][1]["code"])
        assert issue["id"] == issue_id(issue["patient"]["reference"], kind) == identifier_of(issue)
    again = run_pass(
        base, state_path, knowledge, profiles, as_of=AS_OF, write_mode="put", mode="full"
    )
    assert again.actions == {"unchanged": 4}
    assert len(issues(base)) == 4


def test_single_requests_without_transactions(
    server: SekmetServer, state_path: Path, knowledge: Knowledge, profiles: ProfileSet
) -> None:
    base = server.base_url
    _ward(base)
    report = run_pass(
        base, state_path, knowledge, profiles, as_of=AS_OF, transactions="never",
        patients_per_request=2,
    )
    assert report.ok and report.actions["create"] == 4
    # metadata, 2 first-run searches, 6 recent-change searches (CHANGE_TYPES), 3 groups x 11
    # searches (INPUT_TYPES but Medication, which comes by _include, DetectedIssue, and the
    # Patients linked to the group: Patient?link=), 4 creates
    assert report.requests == 1 + 2 + len(CHANGE_TYPES) + 3 * 11 + 4
    assert len(issues(base)) == 4


def test_a_version_conflict_is_resolved_by_reading_again(
    server: SekmetServer, state_path: Path, knowledge: Knowledge, profiles: ProfileSet
) -> None:
    """Someone edits the DetectedIssue between our read and our write: If-Match gives 412, the
    job reads the new version and updates it; still one resource."""
    base = server.base_url
    seed(base, patient("p-c"), anc("p-c-anc-1", "p-c", 1.2, "2026-11-18T08:00:00Z"))
    run_pass(base, state_path, knowledge, profiles, as_of=AS_OF)
    seed(base, anc("p-c-anc-2", "p-c", 0.7, "2026-11-21T08:00:00Z"))

    def meddle(point: str, count: int) -> None:
        if point == "fetched":
            issue = _one(base, "p-c", "neutropenia")
            issue = {
                **issue,
                "mitigation": [
                    {"action": {"text": "Pharmacist reviewed; haematology informed"}}
                ],
            }
            issue.pop("meta")
            r = requests.put(f"{base}/DetectedIssue/{issue['id']}", json=issue, headers=FHIR, timeout=30)
            assert r.status_code == 200

    report = run_pass(
        base, state_path, knowledge, profiles, as_of=LATER, transactions="never", hook=meddle
    )
    assert report.ok and report.actions == {"update": 1}
    issue = _one(base, "p-c", "neutropenia")
    assert issue["meta"]["versionId"] == "3" and issue["severity"] == "high"  # type: ignore[index]
    # The pharmacist's mitigation is kept by the update.
    assert issue["mitigation"] == [
        {"action": {"text": "Pharmacist reviewed; haematology informed"}}
    ]


def test_duplicates_made_by_others_fail_only_that_patient(
    server: SekmetServer, state_path: Path, knowledge: Knowledge, profiles: ProfileSet
) -> None:
    base = server.base_url
    _ward(base)
    run_pass(base, state_path, knowledge, profiles, as_of=AS_OF)
    dup = _one(base, "p-same", "neutropenia")
    copy = {k: v for k, v in dup.items() if k not in ("id", "meta")}
    assert requests.post(f"{base}/DetectedIssue", json=copy, headers=FHIR, timeout=30).status_code == 201
    seed(
        base,
        anc("p-same-anc-2", "p-same", 0.6, "2026-11-21T08:00:00Z"),
        anc("p-worse-anc-2", "p-worse", 0.7, "2026-11-21T08:00:00Z"),
    )
    report = run_pass(base, state_path, knowledge, profiles, as_of=LATER)
    assert not report.ok and len(report.failed) == 1
    alias, reason = report.failed[0]
    assert alias.startswith("pt-") and "p-same" not in reason and "merge them by hand" in reason
    assert report.actions["update"] == 1  # p-worse was still written
    with State(state_path) as state:
        assert state.pending(base) == {"Patient/p-same": 1}
    # The next run retries the pending patient (and fails it again, still exit 1).
    again = run_pass(base, state_path, knowledge, profiles, as_of=LATER)
    assert again.patients == 1 and len(again.failed) == 1
    with State(state_path) as state:
        assert state.pending(base) == {"Patient/p-same": 2}
