"""Medication records into drug exposures: MedicationRequest and MedicationStatement.

A record names its drug by ``medicationCodeableConcept``, or by ``medicationReference`` to a
contained Medication or one of the input (its code and ingredients); the knowledge matches RxNorm,
ATC and names (knowledge/drugs.toml). The status says whether the drug was taken at all (never: not
taken, in error, cancelled, draft, intended) and whether it has ended; :func:`_exposure_period`
says when. A new kind of medication record gets its statuses, its drug and its period here.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from ..fhirjson import (
    CodeableConcept,
    MalformedResourceError,
    Medication,
    MedicationRequest,
    MedicationStatement,
    Origin,
    Resource,
    Sourced,
    decode_resource,
)
from ..fhirtime import parse_fhir_datetime
from ..knowledge import Knowledge
from ..model import DrugExposure, DrugHit
from .concepts import codings, texts
from .dataset import Dataset, Problems
from .identity import Identity

__all__ = ["Medications", "drugs_of"]

# R4 MedicationStatement.status: https://hl7.org/fhir/R4/valueset-medication-statement-status.html
_STATEMENT_STATUSES = frozenset(
    {
        "active",
        "completed",
        "entered-in-error",
        "intended",
        "stopped",
        "on-hold",
        "unknown",
        "not-taken",
    }
)
# R4 MedicationRequest.status: https://hl7.org/fhir/R4/valueset-medicationrequest-status.html
_REQUEST_STATUSES = frozenset(
    {
        "active",
        "on-hold",
        "cancelled",
        "completed",
        "entered-in-error",
        "stopped",
        "draft",
        "unknown",
    }
)
# Never an exposure: not taken, recorded in error, cancelled before it started, or not yet real
# (an unsigned draft order, or a statement that the drug is only intended).
_NO_EXPOSURE = frozenset({"not-taken", "entered-in-error", "cancelled", "draft", "intended"})
_ENDED = frozenset({"completed", "stopped"})


class Medications:
    """The medication records read, made into drug exposures once every resource is in."""

    def __init__(self, knowledge: Knowledge, identity: Identity, problems: Problems) -> None:
        self.knowledge = knowledge
        self.identity = identity
        self.problems = problems
        self.records: list[tuple[MedicationRequest | MedicationStatement, str, Origin]] = []

    def add(self, med: MedicationRequest | MedicationStatement, key: str, origin: Origin) -> None:
        self.records.append((med, key, origin))

    def finish(self, data: Dataset) -> None:
        for med, key, origin in self.records:
            exposure = self.exposure(med, key, origin)
            if exposure is not None:
                data.patient(exposure.patient).exposures.append(exposure)

    def concepts(
        self, med: MedicationRequest | MedicationStatement
    ) -> tuple[list[CodeableConcept | None], list[str]]:
        """The concepts that name a record's drug, and the texts of references that name it."""
        concepts: list[CodeableConcept | None] = [med.medicationCodeableConcept]
        extra_texts: list[str] = []
        ref = med.medicationReference
        if ref is not None:
            if ref.display:
                extra_texts.append(ref.display)
            target: Resource | None = None
            if ref.reference and ref.reference.startswith("#"):
                for raw in med.contained:
                    try:
                        inner = decode_resource(raw)
                    except MalformedResourceError:
                        continue
                    if isinstance(inner, Medication) and f"#{inner.id}" == ref.reference:
                        target = inner
                        break
            else:
                target = self.identity.resolve(ref.reference)
            if isinstance(target, Medication):
                concepts.append(target.code)
                for ingredient in target.ingredient:
                    concepts.append(ingredient.itemCodeableConcept)
                    if ingredient.itemReference and ingredient.itemReference.display:
                        extra_texts.append(ingredient.itemReference.display)
        return concepts, extra_texts

    def exposure(
        self, med: MedicationRequest | MedicationStatement, key: str, origin: Origin
    ) -> DrugExposure | None:
        is_request = isinstance(med, MedicationRequest)
        statuses = _REQUEST_STATUSES if is_request else _STATEMENT_STATUSES
        status = med.status
        if status not in statuses:
            self.problems.report(
                origin, key, f"invalid {type(med).__name__}.status {status!r}", "status"
            )
            return None
        if status in _NO_EXPOSURE:
            return None
        if isinstance(med, MedicationRequest) and med.doNotPerform:
            return None
        concepts, extra = self.concepts(med)
        hits = self.knowledge.match_drugs(codings(concepts), [*texts(concepts), *extra])
        if not hits:
            return None
        patient = self.identity.patient_key(med.subject.reference if med.subject else None)
        if patient is None:
            self.problems.report(origin, key, "no subject")
            return None
        start, end = _exposure_period(med)
        ended_on_status = status in _ENDED and end is None
        if ended_on_status:
            end = start
        names = tuple(dict.fromkeys([*texts(concepts), *extra])) or tuple(h.label for h in hits)
        return DrugExposure(
            key=key,
            patient=patient,
            drugs=tuple(hits),
            names=names,
            status=status or "unknown",
            start=start,
            end=end,
            ended_on_status=ended_on_status,
        )


def _exposure_period(
    med: MedicationRequest | MedicationStatement,
) -> tuple[datetime | None, datetime | None]:
    """When a medication record says the drug was taken: ``(start, end)``, ``end`` None if open.

    MedicationRequest: start = authoredOn (else the dosage bounds or validity start), end = the
    latest dosage ``boundsPeriod.end`` (the validity period is for dispensing, not for taking).
    MedicationStatement: effective[x] (a bare date-time marks the start), else dateAsserted.
    """
    if isinstance(med, MedicationRequest):
        bounds = [
            d.timing.repeat.boundsPeriod
            for d in med.dosageInstruction
            if d.timing and d.timing.repeat and d.timing.repeat.boundsPeriod
        ]
        starts = [p.start for p in bounds]
        if med.dispenseRequest and med.dispenseRequest.validityPeriod:
            starts.append(med.dispenseRequest.validityPeriod.start)
        start = parse_fhir_datetime(med.authoredOn) or next(
            (t for t in map(parse_fhir_datetime, starts) if t), None
        )
        ends = [t for t in (parse_fhir_datetime(p.end) for p in bounds) if t]
        return start, max(ends, default=None)
    period = med.effectivePeriod
    start = parse_fhir_datetime(med.effectiveDateTime) or parse_fhir_datetime(
        period.start if period else None
    )
    end = parse_fhir_datetime(period.end) if period and period.end else None
    return start or parse_fhir_datetime(med.dateAsserted), end


def drugs_of(
    medication: MedicationRequest | MedicationStatement,
    knowledge: Knowledge,
    related: Iterable[Sourced] = (),
) -> tuple[list[DrugHit], tuple[str, ...]]:
    """The known drugs a medication record names, and how it names them; whatever its status.

    For a record :func:`normalise` does not treat as an exposure, e.g. a draft order in a CDS Hooks
    ``draftOrders`` Bundle. The medication is resolved as :func:`normalise` resolves it: the
    ``medicationCodeableConcept``, a contained Medication, or a ``medicationReference`` to one of
    ``related`` (by ``Type/id`` or fullUrl). A record without a medication yet names no drug.
    """
    identity = Identity()
    for resource, origin in related:
        if resource.id:
            identity.index[f"{type(resource).__name__}/{resource.id}"] = resource
        if origin.full_url:
            identity.index[origin.full_url] = resource
    concepts, extra = Medications(knowledge, identity, Problems([])).concepts(medication)
    names = [*texts(concepts), *extra]
    hits = knowledge.match_drugs(codings(concepts), names)
    return hits, tuple(dict.fromkeys(names)) or tuple(h.label for h in hits)
