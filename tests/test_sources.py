"""A resource's identity includes its source (issue 7 §2).

tests/data/sources/: two searchset Bundles from two servers (servers/north.json, servers/south.json)
and two NDJSON exports (export-a/, export-b/) that use the same ids (Patient/1, Observation/1;
Patient/p1, Observation/o1) for different people; export-a-day2/ is a later export of export-a's
server (Observation/o1 again, versionId 2, corrected). Each path given is a source; a Bundle entry
with a server's fullUrl belongs to that server; --same-source reads everything as one source.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest

from fhir_leuko.core.detectedissue import issue_id
from fhir_leuko.core.knowledge import Knowledge
from fhir_leuko.core.model import FindingKind
from fhir_leuko.core.normalise import normalise
from fhir_leuko.core.pipeline import Evaluation, evaluate_dataset, evaluate_resources
from fhir_leuko.core.profiles import ProfileSet
from fhir_leuko.files.reader import input_files, read_paths

from .conftest import AS_OF, DATA, fhir_leuko

SOURCES = DATA / "sources"
NORTH = SOURCES / "servers" / "north.json"
SOUTH = SOURCES / "servers" / "south.json"
EXPORT_A = SOURCES / "export-a"
EXPORT_B = SOURCES / "export-b"
DAY2 = SOURCES / "export-a-day2"


def _run(
    paths: list[Path],
    knowledge: Knowledge,
    profiles: ProfileSet,
    *,
    same_source: bool = False,
) -> Evaluation:
    items = read_paths(paths, same_source=same_source)
    return evaluate_resources(items, knowledge, profiles, as_of=AS_OF)


def _issues(result: Evaluation) -> dict[tuple[str, str], dict[str, object]]:
    return {
        (i["patient"]["reference"], i["code"]["coding"][1]["code"]): i  # type: ignore[index]
        for i in result.issues
    }


# -- two servers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("given", [[NORTH, SOUTH], [SOURCES / "servers"]], ids=["files", "dir"])
def test_two_servers_with_the_same_ids_are_two_people(
    knowledge: Knowledge, profiles: ProfileSet, given: list[Path]
) -> None:
    """North's Patient/1 (45, clozapine, WBC 1.8, ANC 0.4) and south's Patient/1 (a child with
    normal counts): read together they once were one patient whose Observation/1 was whichever was
    read last. Now north's counts fire with north's clozapine, and south's child has nothing."""
    result = _run(given, knowledge, profiles)
    issues = _issues(result)
    north = "https://north.example.org/fhir/Patient/1"
    assert sorted(issues) == [(north, "leukopenia"), (north, "neutropenia")]
    neutropenia = issues[(north, "neutropenia")]
    assert neutropenia["implicated"] == [
        {"reference": "https://north.example.org/fhir/MedicationStatement/1"}
    ]
    assert neutropenia["evidence"][0]["detail"] == [  # type: ignore[index]
        {"reference": "https://north.example.org/fhir/Observation/2"}
    ]
    assert "on clozapine" in str(neutropenia["detail"])
    assert str(neutropenia["detail"]).splitlines()[1] == (
        "Source: https://north.example.org/fhir (Patient/1)."
    )
    key = "https://north.example.org/fhir|Patient/1"
    assert neutropenia["id"] == issue_id(key, FindingKind.NEUTROPENIA)
    assert neutropenia["id"] != issue_id("Patient/1", FindingKind.NEUTROPENIA)


def test_references_resolve_within_their_source(knowledge: Knowledge) -> None:
    """South's MedicationRequest names Medication/med1, which only north has: it is not north's."""
    data = normalise(read_paths([NORTH, SOUTH]), knowledge)
    south = data.patients["https://south.example.org/fhir|Patient/1"]
    assert south.exposures == []
    assert south.birth_date is not None and south.birth_date.year == 2016
    assert [r.value for r in south.results] == [7.2, 4.1]
    north = data.patients["https://north.example.org/fhir|Patient/1"]
    assert [e.key for e in north.exposures] == ["MedicationStatement/1"]
    assert (north.source, south.source) == (
        "https://north.example.org/fhir",
        "https://south.example.org/fhir",
    )


def test_one_server_alone_gives_the_output_it_always_gave(
    knowledge: Knowledge, profiles: ProfileSet
) -> None:
    """The near miss: one source keeps its plain keys, ids and text (no "Source:" line)."""
    issues = _issues(_run([NORTH], knowledge, profiles))
    assert sorted(issues) == [("Patient/1", "leukopenia"), ("Patient/1", "neutropenia")]
    neutropenia = issues[("Patient/1", "neutropenia")]
    assert neutropenia["id"] == issue_id("Patient/1", FindingKind.NEUTROPENIA)
    assert neutropenia["implicated"] == [{"reference": "MedicationStatement/1"}]
    assert "Source:" not in str(neutropenia["detail"])


# -- two NDJSON exports ---------------------------------------------------------------------------


def test_two_exports_with_the_same_ids_are_two_people(
    knowledge: Knowledge, profiles: ProfileSet
) -> None:
    """export-a's p1 (WBC 2.6, clozapine) and export-b's p1 (WBC 6.4, 73 years old)."""
    result = _run([EXPORT_A, EXPORT_B], knowledge, profiles)
    assert [(f.patient, f.kind.value, f.result.value) for f in result.findings] == [
        (f"{EXPORT_A}|Patient/p1", "leukopenia", 2.6)
    ]
    (issue,) = result.issues
    assert issue["patient"] == {"reference": "Patient/p1"}
    assert f"Source: {EXPORT_A} (Patient/p1)." in issue["detail"]
    assert issue["implicated"] == [{"reference": "MedicationRequest/m1"}]
    data = normalise(read_paths([EXPORT_A, EXPORT_B]), knowledge)
    assert data.counts["results:used"] == 2
    assert data.patients[f"{EXPORT_B}|Patient/p1"].birth_date.year == 1950  # type: ignore[union-attr]


def test_files_of_one_bulk_export_given_one_by_one_are_that_export(
    knowledge: Knowledge, profiles: ProfileSet
) -> None:
    one_by_one = sorted(EXPORT_A.iterdir())
    assert {label for _file, label in input_files(one_by_one)} == {str(EXPORT_A)}
    assert (
        _run(one_by_one, knowledge, profiles).issues == _run([EXPORT_A], knowledge, profiles).issues
    )


def test_overlapping_exports_of_one_source_count_each_resource_once(
    knowledge: Knowledge, profiles: ProfileSet
) -> None:
    """--same-source: export-a-day2 has Observation/o1 again as versionId 2 (corrected, WBC 1.6),
    with an older lastUpdated than version 1: the higher versionId counts, read in either order."""
    for order in ([EXPORT_A, DAY2], [DAY2, EXPORT_A]):
        result = _run(order, knowledge, profiles, same_source=True)
        assert result.counts["Observation"] == 2
        assert result.counts["results:used"] == 1
        (finding,) = result.findings
        assert (finding.patient, finding.result.value, finding.result.status) == (
            "Patient/p1",
            1.6,
            "corrected",
        )
        assert [d.exposure.key for d in finding.implicated] == ["MedicationRequest/m1"]


def test_without_same_source_two_exports_stay_apart(
    knowledge: Knowledge, profiles: ProfileSet
) -> None:
    result = _run([EXPORT_A, DAY2], knowledge, profiles)
    assert sorted((f.patient, f.result.value) for f in result.findings) == [
        (f"{DAY2}|Patient/p1", 1.6),
        (f"{EXPORT_A}|Patient/p1", 2.6),
    ]


# -- the order of the input never matters ---------------------------------------------------------


ALL = [NORTH, SOUTH, EXPORT_A, EXPORT_B, DAY2]


def test_any_order_of_the_paths_gives_the_same_issues(
    knowledge: Knowledge, profiles: ProfileSet
) -> None:
    first = json.dumps(_run(ALL, knowledge, profiles).issues, sort_keys=False)
    for order in itertools.islice(itertools.permutations(ALL), 1, None, 7):
        assert json.dumps(_run(list(order), knowledge, profiles).issues) == first


def test_any_order_of_the_resources_gives_the_same_issues(
    knowledge: Knowledge, profiles: ProfileSet
) -> None:
    """Deeper than the paths: the resources themselves, shuffled (seeded), give the same output."""
    items = list(read_paths([*ALL, DATA / "derived-anc.json", DATA / "clozapine.json"]))
    first = evaluate_dataset(normalise(items, knowledge), profiles, as_of=AS_OF).issues
    rng = random.Random(7)
    for _ in range(5):
        rng.shuffle(items)
        again = evaluate_dataset(normalise(items, knowledge), profiles, as_of=AS_OF).issues
        assert again == first


def test_the_command_shuffled_gives_byte_identical_output() -> None:
    orders = [ALL, list(reversed(ALL)), [DAY2, NORTH, EXPORT_B, SOUTH, EXPORT_A]]
    outputs = {
        fhir_leuko("evaluate", *map(str, order), "--as-of", AS_OF.isoformat()).stdout
        for order in orders
    }
    assert len(outputs) == 1
    (output,) = outputs
    assert output.count("\n") == 4  # north: 2, export-a: 1, export-a-day2: 1 (south, b: normal)
