"""The rule of issue 7 §3, over every input file there is: every Observation with an analyte's
LOINC code (whatever its system or spacing, also as a component, also under a resource type that
is not read) and every medication record either contributes to the evaluation or is named as a
problem; what does neither is one of the few documented reasons not to count (a status that never
counts, an older version of a resource read twice, a medication record whose status says it was
not taken or that names no drug of knowledge/drugs.toml), and the summary counts it.

The expectations are found independently of the normaliser: each file is parsed here with orjson
and every accountable resource looked up in what ``normalise`` returned (the lab results in the
patients' records and what they were derived from, the exposures, the problems).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from fhir_leuko.core.fhirjson import R4_RESOURCE_TYPES
from fhir_leuko.core.knowledge import LOINC_SYSTEMS, Knowledge, normalise_system
from fhir_leuko.core.normalise import normalise
from fhir_leuko.files.reader import expand_paths, is_ndjson, open_input, read_paths

from .conftest import DATA, SHARED_FIXTURES

# Statuses that never count (R4 ObservationStatus; README "What is checked on input").
NOT_COUNTED = {"entered-in-error", "cancelled", "registered", "unknown"}
# Medication records that say the drug was not taken (README, "Drug exposure"), by type.
NOT_TAKEN = {
    "MedicationStatement": {"not-taken", "entered-in-error", "intended"},
    "MedicationRequest": {"cancelled", "entered-in-error", "draft"},
    "MedicationAdministration": {"not-done", "entered-in-error"},
}
MEDICATION_RECORDS = {
    "MedicationRequest",
    "MedicationStatement",
    "MedicationAdministration",
    "MedicationDispense",
}


def _inputs() -> list[Path]:
    files = [p for p in expand_paths([DATA]) if "expected" not in p.parts]
    if SHARED_FIXTURES.is_dir():
        files += expand_paths([SHARED_FIXTURES])
    return files


@dataclass
class Item:
    """One accountable resource as this test finds it in the raw file."""

    key: str
    position: str
    raw: dict[str, Any]
    kind: str  # "lab" | "medication"


def _documents(path: Path) -> Iterator[tuple[str, Any]]:
    with open_input(path) as stream:
        data = stream.read()
    lines = is_ndjson(path)
    if not lines:
        try:
            yield "", orjson.loads(data)
            return
        except orjson.JSONDecodeError:
            lines = True  # a .json holding NDJSON, as the reader allows
    for number, line in enumerate(data.splitlines(), start=1):
        if line.strip():
            try:
                yield f"line {number}", orjson.loads(line)
            except orjson.JSONDecodeError:
                continue  # not JSON at all: the reader names the line, nothing inside is known


def _resources(path: Path) -> Iterator[tuple[str, str | None, dict[str, Any]]]:
    """(position, fullUrl, resource) as the reader positions them."""

    def flatten(obj: Any, position: str) -> Iterator[tuple[str, str | None, dict[str, Any]]]:
        if not isinstance(obj, dict):
            return
        if obj.get("resourceType") == "Bundle":
            prefix = f"{position} " if position else ""
            for index, entry in enumerate(obj.get("entry") or []):
                if isinstance(entry, dict) and isinstance(entry.get("resource"), dict):
                    inner = entry["resource"]
                    where = f"{prefix}entry[{index}]"
                    if inner.get("resourceType") == "Bundle":
                        yield from flatten(inner, where)
                    else:
                        yield where, entry.get("fullUrl"), inner
            return
        yield position, None, obj

    for position, document in _documents(path):
        yield from flatten(document, position)


def _analyte_codes(concept: Any, knowledge: Knowledge) -> bool:
    """A coding with an analyte's code, whatever its system, unless LOINC itself codes the concept
    as something else (a hemoglobin whose local code happens to read 6690-2 is a hemoglobin)."""
    codings = concept.get("coding") if isinstance(concept, dict) else None
    codings = [c for c in (codings if isinstance(codings, list) else []) if isinstance(c, dict)]
    codes = [c["code"].strip() for c in codings if isinstance(c.get("code"), str)]
    loinc = [
        c["code"].strip()
        for c in codings
        if isinstance(c.get("system"), str)
        and normalise_system(c["system"]) in LOINC_SYSTEMS
        and isinstance(c.get("code"), str)
    ]
    if loinc and not any(code in knowledge.loinc for code in loinc):
        return False
    return any(code in knowledge.loinc for code in codes)


def _items(path: Path, knowledge: Knowledge) -> Iterator[Item]:
    for position, full_url, resource in _resources(path):
        rtype = resource.get("resourceType")
        if not isinstance(rtype, str):
            continue
        rid = resource.get("id")
        key = f"{rtype}/{rid}" if isinstance(rid, str) else full_url or f"{rtype}@{path}:{position}"
        unknown = rtype not in R4_RESOURCE_TYPES
        if rtype == "Observation" or unknown:
            if _analyte_codes(resource.get("code"), knowledge):
                yield Item(key, position, resource, "lab")
            for index, part in enumerate(resource.get("component") or []):
                if isinstance(part, dict) and _analyte_codes(part.get("code"), knowledge):
                    yield Item(f"{key}#component[{index}]", position, resource, "lab")
        if rtype == "DiagnosticReport":
            for inner in resource.get("contained") or []:
                if (
                    isinstance(inner, dict)
                    and inner.get("resourceType") == "Observation"
                    and isinstance(inner.get("id"), str)
                    and _analyte_codes(inner.get("code"), knowledge)
                ):
                    yield Item(f"{key}#{inner['id']}", position, inner, "lab")
        if rtype in MEDICATION_RECORDS or (
            unknown
            and ("medicationCodeableConcept" in resource or "medicationReference" in resource)
        ):
            yield Item(key, position, resource, "medication")


def _strings(obj: Any) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _strings(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _strings(value)


def _names_a_known_drug(record: dict[str, Any], knowledge: Knowledge) -> bool:
    codings: list[tuple[str | None, str | None]] = []

    def walk(obj: Any) -> None:
        if isinstance(obj, dict):
            if isinstance(obj.get("code"), str):
                system = obj.get("system")
                codings.append((system if isinstance(system, str) else None, obj["code"]))
            for value in obj.values():
                walk(value)
        elif isinstance(obj, list):
            for value in obj:
                walk(value)

    walk(record)
    texts = [s for s in _strings(record) if " " in s or s.isalpha()]
    return bool(knowledge.match_drugs(codings, texts))


def _outcome(
    item: Item,
    used: set[str],
    exposed: set[str],
    named: set[str],
    twice: set[str],
    medications: set[str],
    knowledge: Knowledge,
) -> str | None:
    """Why the item is accounted for, or None when it is not."""
    if item.key in named or item.key.split("#", 1)[0] in named:
        return "named"
    if item.kind == "lab":
        if item.key in used:
            return "used"
        if item.raw.get("status") in NOT_COUNTED:
            return "status never counts"
        if item.key in twice:
            return "an older version"
        return None
    if item.key in exposed:
        return "exposure"
    status, rtype = item.raw.get("status"), item.raw.get("resourceType")
    if status in NOT_TAKEN.get(str(rtype), ()) or item.raw.get("doNotPerform") is True:
        return "not an exposure"
    if rtype == "MedicationDispense" and status != "completed":
        return "not an exposure"  # never handed over
    if item.raw.get("intent") in ("proposal", "plan", "option"):
        return "not an exposure"
    if not _drug_readable(item.raw, medications):
        return None  # a drug that cannot be read must be named
    if not _names_a_known_drug(item.raw, knowledge):
        return "no known drug"
    return None


def _drug_readable(record: dict[str, Any], medications: set[str]) -> bool:
    """Whether the record's drug can be read at all: a coded or written medication, a reference
    with a display, a well-formed contained Medication, or a Medication of the same file."""
    concept = record.get("medicationCodeableConcept")
    if isinstance(concept, dict) and (concept.get("text") or concept.get("coding")):
        return True
    reference = record.get("medicationReference")
    if not isinstance(reference, dict):
        return False
    if reference.get("display"):
        return True
    target = reference.get("reference")
    if not isinstance(target, str):
        return False
    if target.startswith("#"):
        return any(
            isinstance(c, dict)
            and f"#{c.get('id')}" == target
            and isinstance(c.get("code"), dict)
            and isinstance(c["code"].get("coding", []), list)
            for c in record.get("contained") or []
        )
    return target.split("/_history/")[0].rsplit("/", 2)[-1] in medications or target in medications


FILES = _inputs()


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(p.parents[2])) for p in FILES])
def test_every_analyte_observation_and_medication_record_counts_or_is_named(
    path: Path, knowledge: Knowledge
) -> None:
    items = list(_items(path, knowledge))
    if not items:
        pytest.skip("nothing accountable in this file")
    data = normalise(read_paths([path]), knowledge)
    used: set[str] = set()
    exposed: set[str] = set()
    for record in data.patients.values():
        for result in record.results:
            used.add(result.key)
            used.update(result.sources)
        exposed.update(e.key for e in record.exposures)
    named = {p.resource for p in data.problems}
    medications = {
        key
        for _position, full_url, resource in _resources(path)
        if resource.get("resourceType") == "Medication"
        for key in (f"Medication/{resource.get('id')}", resource.get("id"), full_url)
        if isinstance(key, str)
    }
    seen: set[str] = set()
    twice: set[str] = set()
    for item in items:
        (twice if item.key in seen else seen).add(item.key)
    silent = [
        (item.key, item.position)
        for item in items
        if _outcome(item, used, exposed, named, twice, medications, knowledge) is None
    ]
    assert silent == [], f"{path}: neither counted nor named: {silent}"


def test_the_rule_covers_the_shared_fixtures() -> None:
    if not SHARED_FIXTURES.is_dir():
        pytest.skip(
            f"shared fixtures not found at {SHARED_FIXTURES} (CI has ../shared beside the checkout)"
        )
    assert any(SHARED_FIXTURES in p.parents for p in FILES)
