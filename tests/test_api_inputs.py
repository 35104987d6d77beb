"""The Python API takes resources already in memory as well as paths (issue 11 §4): a Bundle dict
(``json.loads``), resources from fhirpy, ``fhir.resources`` models, JSON bytes, mixed with paths.
Each gives exactly what reading the same JSON from a file gives."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.bundle import Bundle as BundleModel
from fhirpy import SyncFHIRClient

import fhir_leuko as fl
from fhir_leuko.core.knowledge import Knowledge
from fhir_leuko.core.profiles import ProfileSet

from .conftest import REPO

WARD = REPO / "examples" / "ward" / "clozapine-patient.json"
AS_OF = datetime(2026, 11, 20, tzinfo=UTC)


def _bundle() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(WARD.read_text(encoding="utf-8"))
    return document


def _evaluate(inputs: Any, knowledge: Knowledge, profiles: ProfileSet) -> fl.Evaluation:
    return fl.evaluate_resources(inputs, knowledge, profiles, as_of=AS_OF)


@pytest.fixture(scope="module")
def from_file(knowledge: Knowledge, profiles: ProfileSet) -> fl.Evaluation:
    result = _evaluate([WARD], knowledge, profiles)
    assert [i["code"]["coding"][1]["code"] for i in result.issues] == ["leukopenia", "neutropenia"]
    return result


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: [_bundle()], id="list-of-bundle-dict"),
        pytest.param(_bundle, id="bundle-dict-alone"),
        pytest.param(lambda: [json.dumps(_bundle()).encode()], id="json-bytes"),
        pytest.param(lambda: [BundleModel.model_validate(_bundle())], id="fhir.resources-model"),
        pytest.param(lambda: [str(WARD)], id="str-path"),
        pytest.param(lambda: WARD, id="path-alone"),
        pytest.param(lambda: [e["resource"] for e in _bundle()["entry"]], id="resource-dicts"),
    ],
)
def test_in_memory_equals_file(
    make: Any, from_file: fl.Evaluation, knowledge: Knowledge, profiles: ProfileSet
) -> None:
    result = _evaluate(make(), knowledge, profiles)
    assert result.problems == []
    assert result.issues == from_file.issues


def test_fhirpy_resources(from_file: fl.Evaluation, knowledge: Knowledge, profiles: ProfileSet) -> None:
    # fhirpy builds resources locally (no request is sent): dict subclasses whose references are
    # objects of their own; serialize() gives their JSON.
    client = SyncFHIRClient("http://127.0.0.1:9/fhir")
    resources = [client.resource(e["resource"]["resourceType"], **e["resource"]) for e in _bundle()["entry"]]
    observation = next(r for r in resources if r["resourceType"] == "Observation")
    observation["subject"] = client.reference("Patient", "ex-cloz-1")
    assert type(observation["subject"]) is not dict
    result = _evaluate(resources, knowledge, profiles)
    assert result.problems == []
    assert result.issues == from_file.issues


def test_mixed_with_paths_and_normalise(knowledge: Knowledge) -> None:
    oncology = REPO / "examples" / "ward" / "oncology-patient.json"
    dataset = fl.normalise([_bundle(), oncology], knowledge)
    # Two inputs, so keys name their source: the Bundle's entries name their server (fullUrl),
    # whether the Bundle was read from a file or handed over in memory.
    assert sorted(dataset.patients) == sorted(fl.normalise([WARD, oncology], knowledge).patients)
    assert "https://ehr.example.org/fhir|Patient/ex-cloz-1" in dataset.patients
    assert len(dataset.patients) == 2


def test_a_malformed_resource_is_a_problem_not_an_exception(
    knowledge: Knowledge, profiles: ProfileSet
) -> None:
    bad = {"resourceType": "Observation", "id": "o-bad", "status": ["final"]}
    result = _evaluate([bad, _bundle()], knowledge, profiles)
    assert len(result.issues) == 2
    (problem,) = result.problems
    assert problem.source == "<in memory>" and problem.position == "[0]"
    assert "Observation/o-bad" in str(problem)


def test_not_a_resource_is_a_clear_type_error(knowledge: Knowledge, profiles: ProfileSet) -> None:
    with pytest.raises(TypeError, match=r"\[1\]: a int is not a FHIR resource"):
        _evaluate([_bundle(), 42], knowledge, profiles)


def test_a_missing_path_is_an_input_error(knowledge: Knowledge, profiles: ProfileSet, tmp_path: Path) -> None:
    with pytest.raises(fl.InputError):
        _evaluate([tmp_path / "missing.json"], knowledge, profiles)
