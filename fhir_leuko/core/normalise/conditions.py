"""Conditions and Flags: contributing causes and patient flags.

A Condition that is not refuted or in error (nor over without an abatement date) names the
contributing causes its codes and texts match (knowledge/conditions.toml: HIV, cancers, …), with
its onset and abatement; a coding the knowledge lists as a flag (e.g. benign ethnic neutropenia)
sets that flag on the patient while the Condition is not resolved or inactive, and only when it is
confirmed (no ``verificationStatus``, or ``confirmed``): a flag changes the thresholds (the BEN
table), so an ``unconfirmed``, ``provisional``, ``differential`` or ``refuted`` Condition does not
set it, and is noted for the explanation instead (issue 7 §4). An active Flag with such a coding
sets it too. Each flag keeps the resource that set it, for the explanation.
"""

from __future__ import annotations

from ..fhirjson import Condition, Flag, Origin
from ..fhirtime import parse_fhir_datetime
from ..knowledge import Knowledge
from ..model import ConditionMatch, quoted
from .concepts import codings, texts
from .dataset import Dataset, Problems
from .identity import Identity

__all__ = ["Conditions"]


class Conditions:
    """The Conditions and Flags read, applied to the patients' records once every resource is in."""

    def __init__(self, knowledge: Knowledge, identity: Identity, problems: Problems) -> None:
        self.knowledge = knowledge
        self.identity = identity
        self.problems = problems
        self.conditions: list[tuple[Condition, str, Origin]] = []
        self.flags: list[tuple[Flag, str, Origin]] = []

    def add_condition(self, condition: Condition, key: str, origin: Origin) -> None:
        self.conditions.append((condition, key, origin))

    def add_flag(self, flag: Flag, key: str, origin: Origin) -> None:
        self.flags.append((flag, key, origin))

    def finish(self, data: Dataset) -> None:
        for condition, key, origin in self.conditions:
            self.finish_condition(data, condition, key, origin)
        for flag, key, origin in self.flags:
            self.finish_flag(data, flag, key, origin)

    def finish_condition(
        self, data: Dataset, condition: Condition, key: str, origin: Origin
    ) -> None:
        verification = {
            c.code
            for c in (condition.verificationStatus.coding if condition.verificationStatus else [])
        }
        if "entered-in-error" in verification:
            return
        clinical = {
            c.code for c in (condition.clinicalStatus.coding if condition.clinicalStatus else [])
        }
        if "refuted" in verification:
            self.note_flags(data, condition, key, "refuted")
            return
        abatement = parse_fhir_datetime(condition.abatementDateTime)
        if clinical & {"resolved", "inactive"} and abatement is None:
            return  # over, and we do not know since when: not a current cause
        subject = self.identity.subject_of(condition.subject, key, condition.contained)
        patient = self.identity.patient_key(subject)
        if patient is None:
            self.problems.report(origin, key, *self.identity.no_patient(subject))
            return
        concepts = [condition.code]
        confirmed = not verification or "confirmed" in verification
        for system, code in codings(concepts):
            flag = self.knowledge.flag_for(system, code)
            if flag is not None and not clinical & {"resolved", "inactive"}:
                record = data.patient(patient)
                if confirmed:
                    record.flags.add(flag.id)
                    record.flag_sources[flag.id] = key
                else:
                    status = ", ".join(sorted(c for c in verification if c))
                    record.flag_notes[flag.id] = (
                        f"{flag.label} ({key}: verificationStatus {quoted(status)})"
                    )
        named = list(texts(concepts))
        onset = parse_fhir_datetime(
            condition.onsetDateTime
            or (condition.onsetPeriod.start if condition.onsetPeriod else None)
        )
        for cause in self.knowledge.match_causes(codings(concepts), named):
            data.patient(patient).conditions.append(
                ConditionMatch(
                    key=key,
                    patient=patient,
                    cause_id=cause.id,
                    label=cause.label,
                    text=named[0] if named else cause.label,
                    onset=onset,
                    abatement=abatement,
                )
            )

    def note_flags(self, data: Dataset, condition: Condition, key: str, status: str) -> None:
        """A Condition that states a flag but is not one to act on: noted for the explanation."""
        patient = self.identity.patient_key(
            condition.subject.reference if condition.subject else None
        )
        if patient is None:
            return
        for system, code in codings([condition.code]):
            flag = self.knowledge.flag_for(system, code)
            if flag is not None:
                data.patient(patient).flag_notes[flag.id] = (
                    f"{flag.label} ({key}: verificationStatus {status})"
                )

    def finish_flag(self, data: Dataset, flag: Flag, key: str, origin: Origin) -> None:
        if flag.status != "active":
            return
        subject = self.identity.subject_of(flag.subject, key, flag.contained)
        patient = self.identity.patient_key(subject)
        if patient is None:
            self.problems.report(origin, key, *self.identity.no_patient(subject))
            return
        for system, code in codings([flag.code]):
            entry = self.knowledge.flag_for(system, code)
            if entry is not None:
                record = data.patient(patient)
                record.flags.add(entry.id)
                record.flag_sources[entry.id] = key
