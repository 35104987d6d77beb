"""The fast file path (NDJSON lines decoded in one loop) gives what the generic path gives."""

from __future__ import annotations

from pathlib import Path

import pytest

from fhir_leuko.core.knowledge import Knowledge
from fhir_leuko.core.normalise import Dataset, normalise
from fhir_leuko.files.bulkread import normalise_paths
from fhir_leuko.files.reader import read_paths

from .conftest import DATA, REPO

INPUTS = [REPO / "examples", DATA]


def _summary(dataset: Dataset) -> tuple[object, ...]:
    patients = {
        key: (
            record.birth_date,
            [
                (r.key, r.value, r.comparator, r.effective, r.status, r.group, r.ref_low, r.sources)
                for r in record.results
            ],
            [(e.key, e.start, e.end, e.status) for e in record.exposures],
            sorted(record.flags),
            [(c.key, c.cause_id) for c in record.conditions],
        )
        for key, record in sorted(dataset.patients.items())
    }
    problems = sorted((p.source, p.position, p.resource, p.reason) for p in dataset.problems)
    return patients, problems, sorted(dataset.counts.items())


@pytest.mark.parametrize("path", INPUTS, ids=lambda p: p.name)
def test_bulkread_normalise_paths_equals_normalise_of_read_paths(
    path: Path, knowledge: Knowledge
) -> None:
    fast = normalise_paths([path], knowledge)
    generic = normalise(read_paths([path]), knowledge)
    assert fast.patients, "the inputs have patients: the comparison is not vacuous"
    assert _summary(fast) == _summary(generic)


def test_bulkread_reports_each_bad_ndjson_line_with_its_number(
    tmp_path: Path, knowledge: Knowledge
) -> None:
    export = tmp_path / "Observation.ndjson"
    export.write_bytes(
        b'{"resourceType":"Patient","id":"p1"}\n'
        b"\n"
        b'{"resourceType":"Observation","id":"o1",\n'
        b'{"resourceType":"Observation","id":"o2","status":"bogus","code":{"coding":'
        b'[{"system":"http://loinc.org","code":"6690-2"}]},"subject":{"reference":"Patient/p1"},'
        b'"effectiveDateTime":"2026-01-01","valueQuantity":{"value":3,"code":"10*3/uL"}}\n'
    )
    problems = {
        (p.position, p.reason.split(" ")[0]) for p in normalise_paths([export], knowledge).problems
    }
    assert ("line 3", "not") in problems  # invalid JSON on line 3
    assert ("line 4", "invalid") in problems  # the invalid status on line 4
