"""Build the DetectedIssue of a finding, and the NDJSON / transaction Bundle that carry them.

Pure and deterministic: the same finding and ``identified`` time give byte-identical JSON, and the
``id``/``identifier`` depend only on the patient and the finding kind, so no re-run can duplicate an
alert (one DetectedIssue per patient and finding kind; a changed finding updates it).

Structure (clinical.md §5): ``status`` final, ``code`` v3-ActCode LAB plus fhir-leuko's finding code,
``severity`` from the grade, ``implicated`` the drug records, ``evidence`` the SNOMED CT code and the
Observations used, ``detail`` the explanation, ``reference`` the profile's ``url|version``, ``author``
a (contained) Device standing for fhir-leuko.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import orjson

from .._version import __version__
from .explain import explain, reference_of
from .fhir_models import check_resource
from .fhirtime import format_instant
from .model import (
    PATIENT_IDENTIFIER_KEY,
    Finding,
    FindingKind,
    local_key,
    patient_reference,
    source_reference,
)

__all__ = [
    "FINDING_SYSTEM",
    "IDENTIFIER_SYSTEM",
    "PROJECT_BASE",
    "build_detected_issue",
    "issue_id",
    "to_ndjson",
    "to_transaction_bundle",
]

PROJECT_BASE = "https://fhir-leuko.github.io/fhir"
FINDING_SYSTEM = f"{PROJECT_BASE}/CodeSystem/finding"
"""fhir-leuko's own CodeSystem of finding kinds (codes: FindingKind values)."""
IDENTIFIER_SYSTEM = f"{PROJECT_BASE}/sid/detectedissue"
DEVICE_SYSTEM = f"{PROJECT_BASE}/sid/device"
ACTCODE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
SNOMED_SYSTEM = "http://snomed.info/sct"
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, IDENTIFIER_SYSTEM)

_FINDING_DISPLAY = {
    FindingKind.LEUKOPENIA: "Leukopenia",
    FindingKind.NEUTROPENIA: "Neutropenia",
    FindingKind.LYMPHOPENIA: "Lymphopenia",
    FindingKind.MONOCYTOPENIA: "Monocytopenia",
    FindingKind.EOSINOPENIA: "Eosinopenia",
    FindingKind.BASOPENIA: "Basopenia",
}


def _patient(key: str, source: str) -> dict[str, Any]:
    """DetectedIssue.patient: a reference to the Patient, or the identifier of a patient known
    only by one (a contained Patient without a Patient resource: normalise/identity.py)."""
    local = local_key(key, source)
    if local.startswith(PATIENT_IDENTIFIER_KEY):
        return patient_reference(local)
    return {"reference": source_reference(source, local)}


def issue_id(patient: str, kind: FindingKind) -> str:
    """The deterministic id (a UUID v5, accepted by servers that allow client ids) of a finding.

    ``patient`` is the patient's key: ``Patient/1`` when the input is one source, so the id of a
    source's finding never depends on where it was read; ``<source>|Patient/1`` when the input
    holds several (``normalise/sources.py``), so two sources' ``Patient/1`` never share an id."""
    return str(uuid.uuid5(_NAMESPACE, f"{patient}|{kind.value}"))


def build_detected_issue(
    finding: Finding, *, identified: datetime, version: str = __version__
) -> dict[str, Any]:
    """The FHIR R4 DetectedIssue of a finding, checked with fhir.resources before it is returned."""
    ident = issue_id(finding.patient, finding.kind)
    source = finding.source
    # A resource read without id or fullUrl has an internal key ("Observation@file:line 3") that
    # is no FHIR reference: the detail text names it, the evidence cannot point at it.
    evidence_refs = list(
        dict.fromkeys(
            source_reference(source, reference_of(k))
            for k in finding.result.evidence
            if not k.startswith("derived:") and "@" not in k.split("#", 1)[0]
        )
    )
    evidence: dict[str, Any] = {}
    if finding.evidence_codes:
        evidence["code"] = [
            {"coding": [{"system": SNOMED_SYSTEM, "code": code, "display": display}]}
            for code, display in finding.evidence_codes
        ]
    if evidence_refs:
        evidence["detail"] = [{"reference": ref} for ref in evidence_refs]
    resource: dict[str, Any] = {
        "resourceType": "DetectedIssue",
        "id": ident,
        "contained": [
            {
                "resourceType": "Device",
                "id": "fhir-leuko",
                "identifier": [{"system": DEVICE_SYSTEM, "value": "fhir-leuko"}],
                "deviceName": [{"name": "fhir-leuko", "type": "manufacturer-name"}],
                "version": [{"value": version}],
            }
        ],
        "identifier": [{"use": "official", "system": IDENTIFIER_SYSTEM, "value": ident}],
        "status": "final",
        "code": {
            "coding": [
                {"system": ACTCODE_SYSTEM, "code": "LAB", "display": "Lab Alert"},
                {
                    "system": FINDING_SYSTEM,
                    "code": finding.kind.value,
                    "display": _FINDING_DISPLAY[finding.kind],
                },
            ],
            "text": finding.term,
        },
        "severity": finding.severity,
        "patient": _patient(finding.patient, source),
        "identifiedDateTime": format_instant(identified),
        "author": {"reference": "#fhir-leuko", "display": f"fhir-leuko {version}"},
    }
    implicated = list(
        dict.fromkeys(
            source_reference(source, reference_of(d.exposure.key)) for d in finding.implicated
        )
    )
    if implicated:
        resource["implicated"] = [{"reference": ref} for ref in implicated]
    if evidence:
        resource["evidence"] = [evidence]
    resource["detail"] = "\n".join(explain(finding).lines())
    resource["reference"] = f"{finding.profile_url}|{finding.profile_version}"
    return check_resource(resource)


def to_ndjson(issues: Iterable[dict[str, Any]]) -> bytes:
    """One resource per line (FHIR Bulk Data NDJSON)."""
    return b"".join(orjson.dumps(issue) + b"\n" for issue in issues)


def conditional_query(issue: dict[str, Any]) -> str:
    """The ``If-None-Exist`` query of a DetectedIssue: its fhir-leuko identifier."""
    identifier = next(i for i in issue["identifier"] if i["system"] == IDENTIFIER_SYSTEM)
    return f"identifier={IDENTIFIER_SYSTEM}|{identifier['value']}"


def to_transaction_bundle(issues: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A transaction Bundle of conditional creates, ready to POST to a server's base URL."""
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": f"urn:uuid:{issue['id']}",
                "resource": issue,
                "request": {
                    "method": "POST",
                    "url": "DetectedIssue",
                    "ifNoneExist": conditional_query(issue),
                },
            }
            for issue in issues
        ],
    }
    return check_resource(bundle)
