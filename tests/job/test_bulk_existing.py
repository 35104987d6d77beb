"""`run --bulk` reads fhir-leuko's own DetectedIssues back from the export: a line it cannot read is
a problem naming the file and line, never the end of the pass (issue 9 §2: one bad answer fails
only itself)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fhir_leuko.core.detectedissue import IDENTIFIER_SYSTEM
from fhir_leuko.core.model import Problem
from fhir_leuko.errors import InputError
from fhir_leuko.job.exportissues import ExportIssues

ISSUE = {
    "resourceType": "DetectedIssue",
    "id": "di-1",
    "status": "final",
    "patient": {"reference": "Patient/p1"},
    "identifier": [{"system": IDENTIFIER_SYSTEM, "value": "abc"}],
}


def test_unreadable_lines_are_named_and_the_readable_ones_kept(tmp_path: Path) -> None:
    export = tmp_path / "DetectedIssue.ndjson"
    deep = '{"resourceType": "DetectedIssue", "extension": ' + "[" * 5000 + "]" * 5000 + "}"
    export.write_text(
        "\n".join(["{not json", json.dumps(ISSUE), "[1, 2]", deep, ""]), encoding="utf-8"
    )
    problems: list[Problem] = []
    with ExportIssues([(export, None)], problems) as existing:
        assert list(existing) == ["Patient/p1"]
        assert existing["Patient/p1"]["abc"][0]["id"] == "di-1"
    assert [(p.source, p.position) for p in problems] == [
        ("DetectedIssue.ndjson", "line 1"),
        ("DetectedIssue.ndjson", "line 3"),
        ("DetectedIssue.ndjson", "line 4"),
    ]
    assert all("not a readable DetectedIssue" in p.reason for p in problems)


def test_a_corrupt_gzip_is_a_problem_not_a_stop(tmp_path: Path) -> None:
    export = tmp_path / "DetectedIssue.ndjson.gz"
    export.write_bytes(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03garbage-not-deflate")
    problems: list[Problem] = []
    with ExportIssues([(export, None)], problems) as existing:
        assert dict(existing) == {}
    assert len(problems) == 1 and problems[0].source == "DetectedIssue.ndjson.gz"
    assert "cannot be read" in problems[0].reason


def test_each_patients_issues_are_read_when_asked_plain_and_gzipped(tmp_path: Path) -> None:
    """Only where each of our DetectedIssues is stays in memory (800 MB for 100,000 as parsed
    JSON): a patient's are read from the file when the planner asks, the same as parsed at once;
    a gzipped file keeps its lines. Other issues (not ours, no patient) are left out."""
    import gzip

    issues = [
        {**ISSUE, "id": "di-1"},
        {**ISSUE, "id": "di-2", "identifier": [{"system": IDENTIFIER_SYSTEM, "value": "def"}]},
        {**ISSUE, "id": "di-3", "patient": {"reference": "Patient/p2"}},
        {**ISSUE, "id": "theirs", "identifier": [{"system": "urn:other", "value": "x"}]},
        {**ISSUE, "id": "nobody", "patient": None},
        {"resourceType": "Patient", "id": "p1"},
    ]
    lines = "".join(json.dumps(i) + "\n" for i in issues).encode()
    plain = tmp_path / "DetectedIssue.ndjson"
    plain.write_bytes(lines)
    packed = tmp_path / "DetectedIssue.2.ndjson.gz"
    packed.write_bytes(gzip.compress(lines.replace(b'"di-', b'"gz-')))
    problems: list[Problem] = []
    with ExportIssues([(plain, None), (packed, None)], problems) as existing:
        assert sorted(existing) == ["Patient/p1", "Patient/p2"] and len(existing) == 2
        p1 = existing["Patient/p1"]
        assert {k: [i["id"] for i in v] for k, v in p1.items()} == {
            "abc": ["di-1", "gz-1"],
            "def": ["di-2", "gz-2"],
        }
        assert p1["abc"][0] == issues[0]  # the whole resource, as parsed at once
        assert [i["id"] for i in existing["Patient/p2"]["abc"]] == ["di-3", "gz-3"]
        assert "Patient/p9" not in existing and existing.get("Patient/p9") is None
        plain.write_bytes(b"x" * len(lines))  # read when asked: not a copy kept from the index
        with pytest.raises(InputError) as changed:  # (the planner fails this patient alone)
            existing["Patient/p2"]
        assert "DetectedIssue.ndjson cannot be read again or changed" in str(changed.value)
    assert problems == []
