"""Medication records into drug exposures: MedicationStatement, MedicationRequest,
MedicationAdministration and MedicationDispense.

A record names its drug by ``medicationCodeableConcept``, or by ``medicationReference`` to a
contained Medication or one of the input (its code and ingredients); the knowledge matches RxNorm,
ATC and names (knowledge/drugs.toml). Whether the record is an exposure at all (statuses, intents,
``doNotPerform``) and over which period is decided in one place, :func:`.exposure.exposure_of`. A new
kind of medication record gets its drug here and its statuses and period there.

Every record ends in exactly one outcome, counted in ``Dataset.counts`` (``medications:<outcome>``):
an ``exposure``; ``not-an-exposure`` (its status, intent or ``doNotPerform`` says the drug was not
taken); ``no-known-drug`` (its drug is read and is none of knowledge/drugs.toml); or a ``problem``
named with the record: an invalid status or intent, no subject, or a drug that cannot be read (no
medication[x], a reference to a Medication not in its source, a malformed contained Medication).
Where a malformed contained Medication's valid parts (its texts, its well-formed codings) still
name a drug, the drug is recognised, and the problem says so (issue 7 §3). A new kind of record
returns the same outcomes from :meth:`Medications.exposure`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson

from ..fhirjson import (
    CodeableConcept,
    Coding,
    MalformedResourceError,
    Medication,
    MedicationRecord,
    Origin,
    Resource,
    Sourced,
    Unread,
    decode_resource,
)
from ..knowledge import Knowledge
from ..model import DrugExposure, DrugHit, quoted
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
            exposure = self.exposure(med, key, origin)
            if isinstance(exposure, DrugExposure):
                data.patient(exposure.patient).exposures.append(exposure)
                data.counts["medications:exposure"] += 1
            else:
                data.counts[f"medications:{exposure}"] += 1

    def concepts(
        self, med: MedicationRecord, unread: list[str] | None = None
    ) -> tuple[list[CodeableConcept | None], list[str]]:
        """The concepts that name a record's drug, and the texts of references that name it.

        ``unread`` collects why part of it could not be read (a Medication not in the source, a
        malformed contained Medication, whose valid parts are still read)."""
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
                    except MalformedResourceError as exc:
                        salvaged = _salvage(bytes(raw), ref.reference)
                        if salvaged is not None:
                            concepts.extend(salvaged)
                            if unread is not None:
                                unread.append(
                                    f"contained Medication {ref.reference} is {exc.reason}"
                                )
                        continue
                    if isinstance(inner, Medication) and f"#{inner.id}" == ref.reference:
                        target = inner
                        break
                else:
                    if unread is not None and not unread:
                        unread.append(f"no contained Medication {ref.reference}")
            else:
                target = self.identity.resolve(ref.reference)
                if target is None and unread is not None:
                    unread.append(
                        f"its Medication {quoted(ref.reference or '(no reference)')!r} is not "
                        "in its source"
                    )
            if isinstance(target, Medication):
                concepts.append(target.code)
                for ingredient in target.ingredient:
                    concepts.append(ingredient.itemCodeableConcept)
                    if ingredient.itemReference and ingredient.itemReference.display:
                        extra_texts.append(ingredient.itemReference.display)
        elif med.medicationCodeableConcept is None and unread is not None:
            unread.append("it has no medication[x]")
        return concepts, extra_texts

    def exposure(self, med: MedicationRecord, key: str, origin: Origin) -> DrugExposure | str:
        """The record's exposure, or the outcome that says why it is none (module docstring);
        every ``problem`` is reported here."""
        found = exposure_of(med)
        if isinstance(found, NotExposed) and found.problem:
            # An invalid status or intent, or an administration or dispense that cannot be placed
            # in time: named, whatever drug it is for.
            self.problems.report(origin, key, found.reason, "status")
            return "problem"
        if isinstance(found, NotExposed):
            # The record says the drug was not taken (not-taken, a proposal, not handed over …):
            # whatever its drug, nothing to read.
            return "not-an-exposure"
        unread: list[str] = []
        concepts, extra = self.concepts(med, unread)
        names = [*texts(concepts), *extra]
        found_codes = list(codings(concepts))
        hits = self.knowledge.match_drugs(found_codes, names)
        if unread:
            if hits:
                labels = ", ".join(dict.fromkeys(h.label for h in hits))
                read = f"its drug is recognised from what is valid: {labels}"
            elif names or any(code for _system, code in found_codes):
                read = "what is valid names no drug fhir-leuko knows"
            else:
                read = "its drug is unknown"
            self.problems.report(origin, key, f"{'; '.join(unread)}: {read}", "medication")
            if not hits:
                return "problem"
        if not hits:
            return "no-known-drug"
        subject = self.identity.subject_of(med.subject, key, med.contained)
        patient = self.identity.patient_key(subject)
        if patient is None:
            self.problems.report(origin, key, *self.identity.no_patient(subject))
            return "problem"
        return DrugExposure(
            key=key,
            patient=patient,
            drugs=tuple(hits),
            names=tuple(dict.fromkeys(names)) or tuple(h.label for h in hits),
            status=med.status or "unknown",
            start=found.start,
            end=found.end,
            ended_on_status=found.ended_on_status,
            record_type=type(med).__name__,
            event=found.event,
        )


def _salvage(raw: bytes, reference: str) -> list[CodeableConcept | None] | None:
    """The valid parts of a contained Medication that failed to decode, if it is the one
    ``reference`` names: its code's and ingredients' texts and well-formed codings."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or f"#{obj.get('id')}" != reference:
        return None
    parts: list[Any] = [obj.get("code")]
    ingredients = obj.get("ingredient")
    if isinstance(ingredients, list):
        parts += [i.get("itemCodeableConcept") for i in ingredients if isinstance(i, dict)]
    return [_lenient_concept(part) for part in parts if isinstance(part, dict)]


def _lenient_concept(obj: dict[str, Any]) -> CodeableConcept:
    def text(value: Any) -> str | None:
        return value if isinstance(value, str) else None

    codings = obj.get("coding")
    return CodeableConcept(
        coding=[
            Coding(
                system=text(c.get("system")),
                code=text(c.get("code")),
                display=text(c.get("display")),
            )
            for c in (codings if isinstance(codings, list) else [])
            if isinstance(c, dict)
        ],
        text=text(obj.get("text")),
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
        if isinstance(resource, Unread):
            continue
        if resource.id:
            identity.index[f"{type(resource).__name__}/{resource.id}"] = resource
        if origin.full_url:
            identity.index[origin.full_url] = resource
    concepts, extra = Medications(knowledge, identity, Problems([])).concepts(medication)
    names = [*texts(concepts), *extra]
    hits = knowledge.match_drugs(codings(concepts), names)
    return hits, tuple(dict.fromkeys(names)) or tuple(h.label for h in hits)
