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

from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson

from ..core.detectedissue import IDENTIFIER_SYSTEM
from ..core.fhirjson import Patient as PatientStruct
from ..core.fhirjson import Sourced, iter_document
from ..core.fhirtime import format_instant
from ..core.model import Problem
from .patients import patient_key

if TYPE_CHECKING:
    from .runner import Job

__all__ = ["Existing", "ExistingView", "fetch"]

_MERGING = frozenset({"replaced-by", "replaces"})
_LINK_ROUNDS = 3

Existing = dict[str, dict[str, list[dict[str, Any]]]]
"""fhir-leuko's DetectedIssues on the server, by patient and by identifier value."""
ExistingView = Mapping[str, dict[str, list[dict[str, Any]]]]
"""What planning reads of them: :data:`Existing`, or a view that reads each patient's when asked
(``run --bulk``: the export's, read from the export's files)."""


def fetch(job: Job, group: list[str], as_of: datetime) -> tuple[list[Sourced | Problem], Existing]:
    """The resources of a group's patients (decoded, for the rule core) and their DetectedIssues.

    Raises:
        FhirError: a search failed (the caller retries patient by patient).
    """
    count = ("_count", str(job.options.page_size))
    patients, linked = _patients(job, group, count)
    everyone = [*group, *linked]
    refs = ",".join(everyone)
    start = format_instant(as_of - job.window)
    end = format_instant(as_of)
    searches: list[tuple[str, list[tuple[str, str]]]] = [
        (
            "Observation",
            [
                ("patient", refs),
                (job.code_param, job.codes),
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
    items: list[Sourced | Problem] = list(patients)
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


def _patients(
    job: Job, group: list[str], count: tuple[str, str]
) -> tuple[list[Sourced | Problem], list[str]]:
    """The group's Patients, and the patients linked to them by ``replaced-by``/``replaces``
    (either side of the link, chains followed a few rounds): a retired record's resources count
    for its survivor (``normalise/identity.py``), so both are fetched together."""
    items: list[Sourced | Problem] = []
    known = set(group)
    linked: list[str] = []
    frontier = list(group)
    for _round in range(_LINK_ROUNDS):
        if not frontier:
            break
        ids = ",".join(p.split("/", 1)[1] for p in frontier)
        found: list[str] = []
        for params in ([("_id", ids), count], [("link", ",".join(frontier)), count]):
            for number, page in enumerate(job.walker.pages("Patient", params), start=1):
                for item in iter_document(page, "Patient search", f"page {number}"):
                    items.append(item)
                    if isinstance(item, Problem) or not isinstance(item[0], PatientStruct):
                        continue
                    patient = item[0]
                    others = [
                        patient_key(link.other.reference if link.other else None)
                        for link in patient.link
                        if link.type in _MERGING
                    ]
                    own = patient_key(f"Patient/{patient.id}") if patient.id else None
                    for key in [own, *others]:
                        if key and key not in known:
                            known.add(key)
                            found.append(key)
        linked.extend(found)
        frontier = found
    return items, linked
