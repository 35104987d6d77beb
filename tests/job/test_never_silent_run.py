"""Issue 7 §5 through ``fhir-leuko run`` against the real test FHIR server: the shapes of
tests/data/never-silent/ give the same DetectedIssues from a server as from the files.

What a server cannot hold is left to ``evaluate`` (tests/test_never_silent.py): a code with spaces
around it (not a valid FHIR ``code``: the server refuses it), a resource type that is not a FHIR
type and a malformed contained Medication (refused likewise), and two versions of one Observation
(a server keeps the current one). A server is one source, so the source-qualified identity of §2 is
covered by ``evaluate`` too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fhir_leuko.testing.seed import seed_paths
from fhir_leuko.testing.sekmet import SekmetServer

from ..conftest import AS_OF, DATA, fhir_leuko
from .conftest import cli

HERE = DATA / "never-silent"
SEEDED = [
    "cross-report.json",
    "components.json",
    "units.ndjson",
    "lower-of-two.ndjson",
    "brands.ndjson",
    "ben-verification.ndjson",
]


def _issues(stdout: str) -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for line in stdout.splitlines():
        if line.strip():
            issue = json.loads(line)
            kind = issue["code"]["coding"][1]["code"]
            out[(issue["patient"]["reference"], kind)] = issue
    return out


def test_run_finds_what_evaluate_finds(server: SekmetServer, tmp_path: Path) -> None:
    codes = tmp_path / "codes.ndjson"
    # Without the code written with spaces around it: a FHIR server refuses it (see above).
    codes.write_text(
        "".join(
            line + "\n"
            for line in (HERE / "codes.ndjson").read_text().splitlines()
            if '" 6690-2 "' not in line
        )
    )
    files = [HERE / name for name in SEEDED] + [codes]
    seed_paths(server.base_url, files)
    as_of = AS_OF.isoformat()
    ran = cli(
        "run",
        "--server",
        server.base_url,
        "--as-of",
        as_of,
        "--state",
        str(tmp_path / "state.sqlite3"),
        "--full",
        "--dry-run",
    )
    evaluated = fhir_leuko("evaluate", *map(str, files), "--same-source", "--as-of", as_of)
    from_server, from_files = _issues(ran.stdout), _issues(evaluated.stdout)
    assert sorted(from_server) == sorted(from_files)
    assert len(from_server) == 43
    for key, issue in from_files.items():
        assert from_server[key]["detail"] == issue["detail"], key
        assert from_server[key]["identifier"] == issue["identifier"], key
    # The shapes at the heart of it, found through the server's searches:
    assert ("Patient/xr-fire", "neutropenia") in from_server  # §1 differential in its own report
    assert ("Patient/comp-cbc", "neutropenia") in from_server  # §3 CBC as components (combo-code)
    assert ("Patient/code-oid", "leukopenia") in from_server  # §3 LOINC by its OID
    assert ("Patient/code-host-case", "neutropenia") in from_server  # 13 §6 system host case
    assert "Not applied:" in from_server[("Patient/ben-provisional", "neutropenia")]["detail"]
    # Named, not dropped: the codes whose system is not LOINC's, the units never guessed.
    problems = [
        line for line in ran.stdout.splitlines() + ran.stderr.splitlines() if "problem" in line
    ]
    for resource in (
        "Observation/code-path",
        "Observation/code-ln",
        "Observation/code-no-system",
        "Observation/unit-lost-superscript",
        "Observation/comp-normal#component[1]",
    ):
        assert any(resource in line for line in problems), (resource, ran.stderr)
