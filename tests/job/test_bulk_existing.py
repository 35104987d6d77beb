"""`run --bulk` reads fhir-leuko's own DetectedIssues back from the export: a line it cannot read is
a problem naming the file and line, never the end of the pass (issue 9 §2: one bad answer fails
only itself)."""

from __future__ import annotations

import json
from pathlib import Path

from fhir_leuko.core.detectedissue import IDENTIFIER_SYSTEM
from fhir_leuko.core.model import Problem
from fhir_leuko.job.bulk import _existing

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
    existing = _existing([(export, None)], problems)
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
    assert _existing([(export, None)], problems) == {}
    assert len(problems) == 1 and problems[0].source == "DetectedIssue.ndjson.gz"
    assert "cannot be read" in problems[0].reason
