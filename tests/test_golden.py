"""Golden DetectedIssues: the exact output for a few scenarios, valid against the R4 JSON schema.

tests/data/expected/<scenario>.ndjson holds the DetectedIssues fhir-leuko writes for a scenario as
of AS_OF. They are compared as parsed JSON (not bytes), with the fhir-leuko version replaced by
"{version}" so a release does not invalidate them. After an intended change, regenerate them with

    FHIR_LEUKO_UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_golden.py

and review the diff like code.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from fhir_leuko._version import __version__
from fhir_leuko.core.detectedissue import (
    IDENTIFIER_SYSTEM,
    issue_id,
    to_ndjson,
    to_transaction_bundle,
)
from fhir_leuko.core.knowledge import Knowledge
from fhir_leuko.core.model import FindingKind
from fhir_leuko.core.profiles import ProfileSet

from .conftest import AS_OF, DATA, fhir_leuko, run_paths, schema_errors

EXPECTED = DATA / "expected"
UPDATE = os.environ.get("FHIR_LEUKO_UPDATE_GOLDEN") == "1"

SCENARIOS = {
    "clozapine": [DATA / "clozapine.json"],
    "derived-anc": [DATA / "derived-anc.json"],
    "drug-window": [DATA / "drug-window.json"],
    "pediatric": [DATA / "pediatric.json"],
    "references": [DATA / "references.json"],
}


def _without_version(value: Any) -> Any:
    text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    return json.loads(text.replace(f"fhir-leuko {__version__}", "fhir-leuko {version}").replace(
        f'"value": "{__version__}"', '"value": "{version}"'
    ))


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_golden_detected_issues(
    scenario: str, knowledge: Knowledge, profiles: ProfileSet
) -> None:
    issues = run_paths(SCENARIOS[scenario], knowledge, profiles).issues
    golden = EXPECTED / f"{scenario}.ndjson"
    actual = [_without_version(i) for i in issues]
    if UPDATE:
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(
            "".join(json.dumps(i, ensure_ascii=False, sort_keys=True) + "\n" for i in actual),
            encoding="utf-8",
        )
    if not golden.is_file():
        pytest.fail(f"{golden} is missing: run with FHIR_LEUKO_UPDATE_GOLDEN=1 to create it")
    expected = [json.loads(line) for line in golden.read_text(encoding="utf-8").splitlines()]
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected, strict=True):
        assert got == want, f"{scenario}: {want['patient']} {want['code']['coding'][1]['code']}"


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_golden_files_are_valid_r4(scenario: str, r4_schema: dict[str, Any]) -> None:
    golden = EXPECTED / f"{scenario}.ndjson"
    lines = golden.read_text(encoding="utf-8").splitlines()
    assert lines
    for line in lines:
        issue = json.loads(line)
        assert schema_errors(r4_schema, issue) == [], issue["id"]


def test_transaction_bundle_is_valid_r4(
    knowledge: Knowledge, profiles: ProfileSet, r4_schema: dict[str, Any]
) -> None:
    issues = run_paths([DATA / "clozapine.json", DATA / "derived-anc.json"], knowledge, profiles).issues
    bundle = to_transaction_bundle(issues)
    assert schema_errors(r4_schema, bundle) == []
    for entry in bundle["entry"]:
        assert entry["request"]["ifNoneExist"] == (
            f"identifier={IDENTIFIER_SYSTEM}|{entry['resource']['id']}"
        )


def test_ids_are_deterministic_uuid5_per_patient_and_kind(
    knowledge: Knowledge, profiles: ProfileSet
) -> None:
    issues = run_paths([DATA / "clozapine.json"], knowledge, profiles).issues
    for issue in issues:
        kind = FindingKind(issue["code"]["coding"][1]["code"])
        assert issue["id"] == issue_id(issue["patient"]["reference"], kind)
        assert uuid.UUID(issue["id"]).version == 5
        assert issue["identifier"] == [
            {"use": "official", "system": IDENTIFIER_SYSTEM, "value": issue["id"]}
        ]
    # a different as-of changes the time stamp, never the id (an update, not a duplicate)
    later = run_paths([DATA / "clozapine.json"], knowledge, profiles, AS_OF.replace(hour=1))
    assert [i["id"] for i in later.issues] == [i["id"] for i in issues]
    assert len({i["id"] for i in issues}) == len(issues)


@pytest.mark.parametrize("output_format", ["ndjson", "bundle"])
def test_same_input_and_as_of_give_byte_identical_output(tmp_path: Path, output_format: str) -> None:
    outputs = []
    for run in ("first", "second"):
        out = tmp_path / f"{run}.out"
        done = fhir_leuko(
            "evaluate", str(DATA), "--as-of", "2024-05-02", "--output", str(out),
            "--format", output_format,
        )
        assert done.returncode == 1, done.stderr  # tests/data/problems is in there
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
    assert len(outputs[0]) > 10_000


def test_in_process_ndjson_is_the_cli_output(tmp_path: Path, knowledge: Knowledge, profiles: ProfileSet) -> None:
    out = tmp_path / "issues.ndjson"
    done = fhir_leuko("evaluate", str(DATA / "clozapine.json"), "--as-of", "2024-05-02", "-o", str(out))
    assert done.returncode == 0, done.stderr
    issues = run_paths([DATA / "clozapine.json"], knowledge, profiles).issues
    assert out.read_bytes() == to_ndjson(issues)


def test_schema_check_catches_a_broken_issue(r4_schema: dict[str, Any]) -> None:
    """The validator used above is not vacuous: a wrong severity and a stray element fail."""
    issue = json.loads((EXPECTED / "clozapine.ndjson").read_text(encoding="utf-8").splitlines()[0])
    issue["severity"] = "critical"
    issue["colour"] = "red"
    errors = schema_errors(r4_schema, issue)
    assert any(e.startswith("severity:") for e in errors)
    assert any("colour" in e for e in errors)


def test_real_hl7_example_output_is_valid_r4(
    shared_fixtures: Path, knowledge: Knowledge, profiles: ProfileSet, r4_schema: dict[str, Any]
) -> None:
    from .conftest import utc

    path = shared_fixtures / "hl7-fhir-r4-examples" / "Bundle-101.json"
    issues = run_paths([path], knowledge, profiles, utc(2011, 3, 5)).issues
    assert len(issues) == 2
    for issue in issues:
        assert schema_errors(r4_schema, issue) == []
