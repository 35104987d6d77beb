"""Medication records into drug exposures: MedicationStatement, MedicationRequest,
MedicationAdministration and MedicationDispense.

A record names its drug by ``medicationCodeableConcept``, or by ``medicationReference`` to a
contained Medication or one of the input (its code and ingredients); the knowledge matches RxNorm,
ATC and names (knowledge/drugs.toml). Whether the record is an exposure at all (statuses, intents,
``doNotPerform``) and over which period is decided in one place, :func:`.exposure.exposure_of`. A new
kind of medication record gets its drug here and its statuses and period there.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..fhirjson import (
    CodeableConcept,
    MalformedResourceError,
    Medication,
    MedicationRecord,
    Origin,
    Resource,
    Sourced,
    decode_resource,
)
from ..knowledge import Knowledge
from ..model import DrugExposure, DrugHit
from .concepts import codings, texts
from .dataset import Dataset, Problems
from .exposure import NotExposed, exposure_of
from .identity import Identity

__all__ = ["Medications", "drugs_of"]


class Medications:
    """The medication records read, made into drug exposures once every resource is in."""

    def __init__(self, knowledge: Knowledge, identity: Identity, problems: Problems) -> None:
        self.knowledge = knowledge
        self.identity = identity
        self.problems = problems
        self.records: list[tuple[MedicationRecord, str, Origin]] = []

    def add(self, med: MedicationRecord, key: str, origin: Origin) -> None:
        self.records.append((med, key, origin))

    def finish(self, data: Dataset) -> None:
        for med, key, origin in self.records:
            exposure = self.exposure(med, key, origin, data)
            if exposure is not None:
                data.patient(exposure.patient).exposures.append(exposure)

    def concepts(self, med: MedicationRecord) -> tuple[list[CodeableConcept | None], list[str]]:
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
        self, med: MedicationRecord, key: str, origin: Origin, data: Dataset
    ) -> DrugExposure | None:
        found = exposure_of(med)
        if isinstance(found, NotExposed) and found.problem:
            # An invalid status or intent, or an administration or dispense that cannot be placed
            # in time: named, whatever drug it is for.
            self.problems.report(origin, key, found.reason, "status")
            return None
        concepts, extra = self.concepts(med)
        hits = self.knowledge.match_drugs(codings(concepts), [*texts(concepts), *extra])
        if not hits:
            return None
        if isinstance(found, NotExposed):
            # A known drug the record says was not taken (not-taken, a proposal, not handed over
            # …): counted, so that every medication record is accounted for.
            data.counts["medications:not-exposures"] += 1
            return None
        subject = self.identity.subject_of(med.subject, key, med.contained)
        patient = self.identity.patient_key(subject)
        if patient is None:
            self.problems.report(origin, key, *self.identity.no_patient(subject))
            return None
        names = tuple(dict.fromkeys([*texts(concepts), *extra])) or tuple(h.label for h in hits)
        return DrugExposure(
            key=key,
            patient=patient,
            drugs=tuple(hits),
            names=names,
            status=med.status or "unknown",
            start=found.start,
            end=found.end,
            ended_on_status=found.ended_on_status,
            record_type=type(med).__name__,
            event=found.event,
        )


def drugs_of(
    medication: MedicationRecord,
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
