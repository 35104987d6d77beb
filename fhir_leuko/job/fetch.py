"""What a group of patients needs, fetched in one search per resource type.

For up to ``patients_per_request`` patients at once (R4 search parameters take comma-separated
values as OR): the Patients (``_id``), their lab Observations in the window (``code`` = the mapped
LOINC codes, ``date`` = the longest lookback plus trend window), their DiagnosticReports with
``_include=DiagnosticReport:result`` (results without their own subject or time; a withdrawn
report takes its results out of the count), MedicationRequests, MedicationStatements,
MedicationAdministrations and MedicationDispenses with ``_include=...:medication``, Conditions,
Flags, and fhir-leuko's own DetectedIssues (``patient`` + ``code`` of fhir-leuko's finding
CodeSystem). Ten searches for the whole group: well under one request per patient. Together they
cover :data:`fhir_leuko.core.fhirjson.INPUT_TYPES` (a test checks it). Each is sorted by
``_lastUpdated`` (and ``_id``) and walked like every paged search of the job
(:mod:`fhir_leuko.job.walk`): a server that ignores ``_sort`` fails the group rather than lose a
result between pages.

Medication records are fetched whatever their date: a dispense's supply or a statement's period
may reach into the window from long before it. Administrations are events, so only those in the
window widened by the longest drug window are fetched (``effective-time``, which matches a period
that overlaps it).
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson

from ..core.detectedissue import IDENTIFIER_SYSTEM
from ..core.fhirjson import Sourced, iter_document
from ..core.fhirtime import format_instant
from ..core.model import Problem
from .patients import patient_key

if TYPE_CHECKING:
    from .runner import Job

__all__ = ["Existing", "fetch"]

Existing = dict[str, dict[str, list[dict[str, Any]]]]
"""fhir-leuko's DetectedIssues on the server, by patient and by identifier value."""


def fetch(job: Job, group: list[str], as_of: datetime) -> tuple[list[Sourced | Problem], Existing]:
    """The resources of a group's patients (decoded, for the rule core) and their DetectedIssues.

    Raises:
        FhirError: a search failed (the caller retries patient by patient).
    """
    refs = ",".join(group)
    ids = ",".join(p.split("/", 1)[1] for p in group)
    count = ("_count", str(job.options.page_size))
    start = format_instant(as_of - job.window)
    end = format_instant(as_of)
    searches: list[tuple[str, list[tuple[str, str]]]] = [
        ("Patient", [("_id", ids), count]),
        (
            "Observation",
            [
                ("patient", refs),
                ("code", job.codes),
                ("date", f"ge{start}"),
                ("date", f"le{end}"),
                count,
            ],
        ),
        (
            "DiagnosticReport",
            [
                ("patient", refs),
                ("date", f"ge{start}"),
                ("date", f"le{end}"),
                ("_include", "DiagnosticReport:result"),
                count,
            ],
        ),
        (
            "MedicationRequest",
            [("patient", refs), ("_include", "MedicationRequest:medication"), count],
        ),
        (
            "MedicationStatement",
            [("patient", refs), ("_include", "MedicationStatement:medication"), count],
        ),
        (
            "MedicationAdministration",
            [
                ("patient", refs),
                ("effective-time", f"ge{format_instant(as_of - job.window - job.drug_window)}"),
                ("_include", "MedicationAdministration:medication"),
                count,
            ],
        ),
        (
            "MedicationDispense",
            [("patient", refs), ("_include", "MedicationDispense:medication"), count],
        ),
        ("Condition", [("patient", refs), count]),
        ("Flag", [("patient", refs), count]),
    ]
    items: list[Sourced | Problem] = []
    for rtype, params in searches:
        for number, page in enumerate(job.walker.pages(rtype, params), start=1):
            items.extend(iter_document(page, f"{rtype} search", f"page {number}"))
    existing: Existing = {}
    issue_params = [("patient", refs), ("code", job.finding_codes), count]
    for page in job.walker.pages("DetectedIssue", issue_params):
        bundle = orjson.loads(page)
        for entry in bundle.get("entry") or []:
            resource = entry.get("resource") or {}
            if resource.get("resourceType") != "DetectedIssue":
                continue
            patient = patient_key((resource.get("patient") or {}).get("reference"))
            for ident in resource.get("identifier") or []:
                if ident.get("system") == IDENTIFIER_SYSTEM and patient:
                    existing.setdefault(patient, {}).setdefault(str(ident.get("value")), []).append(
                        resource
                    )
    return items, existing
