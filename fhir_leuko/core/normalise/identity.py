"""Which resource a reference names, and which patient a subject reference is.

The input's resources other than Observations and DiagnosticReports (their rooms link them) are
indexed by fullUrl and by ``Type/id``; a reference resolves by fullUrl, ``Type/id``, or the last
two segments of an absolute or versioned URL (``…/Patient/1/_history/2``). A subject resolves to
the key of its patient's record: ``Patient/id`` when the Patient (or the reference) says so,
otherwise the reference as given (a ``urn:uuid`` of a transaction Bundle), qualified by its source
when the run reads several (:mod:`.sources`). Patient resources give the record its birth date,
sex and death.

Patient identity (issue 13 §4), always within one source:

* **A contained subject** (``"subject": {"reference": "#p1"}`` and a Patient in ``contained``) is its
  container's patient: ``#p1`` of one resource and ``#p1`` of another are not the same reference.
  It is matched by identifier (system and value) to the Patient of the source that has it; else,
  when it has an identifier, the patient is keyed ``Patient?identifier=<system>|<value>`` (the same
  person in every resource that carries that identifier; the DetectedIssue's ``patient`` is then a
  logical reference by that identifier, which any server resolves); a contained Patient without any
  identifier cannot be named outside its container (R4: contained resources are not referenced
  from outside), so its resources are named as problems, never evaluated, never merged.
* **A subject given only by identifier** (``"subject": {"identifier": {…}}``) is the Patient of the
  source with that identifier, or a problem (none, or several).
* **Patient.link** ``replaced-by`` (and ``replaces``, its other side): the retired record's
  resources count for the surviving one, and only the survivor is a patient (gets alerts); chains
  are followed, a cycle or two survivors is a problem and nothing is merged. ``seealso`` and
  ``refer`` link records that stay separate (R4 Patient.link.type).
"""

from __future__ import annotations

from datetime import timedelta
from operator import attrgetter

import msgspec

from ..fhirjson import (
    MalformedResourceError,
    Patient,
    Reference,
    Resource,
    decode_resource,
)
from ..fhirtime import parse_fhir_date, parse_fhir_datetime
from ..model import PATIENT_IDENTIFIER_KEY, PatientRecord, quoted
from .dataset import Dataset, Problems, Where

__all__ = ["IDENTIFIER_KEY", "Identity", "special_subject"]

IDENTIFIER_KEY = PATIENT_IDENTIFIER_KEY
_BY_IDENTIFIER = "identifier:"
_EFFECTIVE = attrgetter("effective")


def special_subject(subject: str) -> bool:
    """Whether a subject text needs the identity to resolve it (contained, or by identifier)."""
    return "#" in subject or subject.startswith(_BY_IDENTIFIER)


class Identity:
    """The resource index and the patient keys of one source (:mod:`.sources`)."""

    def __init__(self) -> None:
        self.index: dict[str, Resource] = {}
        """Resources other than Observations, by ``Type/id`` and by fullUrl."""
        self.patient_keys: dict[str, str | None] = {}
        self.patients: list[tuple[Patient, str, Where]] = []
        self.prefix = ""
        """Put before every patient key when the run reads several sources (``<source>|``)."""
        self.contained: dict[str, Patient | None] = {}
        """Contained subjects by ``<container>#id``: the contained Patient (``None``: none)."""
        self.by_identifier: dict[tuple[str, str], list[str]] = {}
        self.survivors: dict[str, str] = {}
        """Patient.link: the key of a retired record → the key of the record that replaced it."""
        self.why: dict[str, str] = {}
        """Why a subject resolves to no patient, by subject text."""

    def absorb(self, other: Identity) -> None:
        """Take in the resources read into another part of the same source."""
        for key, resource in other.index.items():
            self.index.setdefault(key, resource)
        self.patients.extend(other.patients)
        for key, patient in other.contained.items():
            self.contained.setdefault(key, patient)

    def resolve(self, reference: str | None) -> Resource | None:
        """A (non-Observation) resource of the input by reference: fullUrl, ``Type/id``, or the
        last two segments of an absolute or versioned URL. Contained ``#id`` is resolved by the
        container's owner (see :meth:`Medications.concepts`)."""
        if not reference or reference.startswith("#"):
            return None
        found = self.index.get(reference)
        if found is not None:
            return found
        parts = reference.split("/_history/")[0].rstrip("/").split("/")
        if len(parts) >= 2:
            return self.index.get(f"{parts[-2]}/{parts[-1]}")
        return None

    # -- subjects as read ------------------------------------------------------------------------

    def subject_of(
        self, subject: Reference | None, container: str, contained: list[msgspec.Raw]
    ) -> str | None:
        """The text of a subject, resolved later by :meth:`patient_key`: the reference as given;
        a contained Patient (``#p1``) as ``<container>#p1`` (its Patient kept); a subject given
        only by identifier as ``identifier:<system>|<value>``; ``None`` without any."""
        if subject is None:
            return None
        reference = subject.reference
        if reference is None:
            ident = subject.identifier
            if ident is None or not (ident.value or "").strip():
                return None
            return f"{_BY_IDENTIFIER}{(ident.system or '').strip()}|{(ident.value or '').strip()}"
        if not reference.startswith("#"):
            return reference
        owner = container.split("#", 1)[0]  # a resource contained in a report: the report's
        key = f"{owner}{reference}"
        if key not in self.contained:
            self.contained[key] = _contained_patient(contained, reference[1:])
        return key

    # -- once everything of the source is read ----------------------------------------------------

    def prepare(self, problems: Problems) -> None:
        """Index the Patients by identifier and follow ``Patient.link``, before any subject is
        resolved (:meth:`Normaliser.finish`)."""
        for patient, key, _where in self.patients:
            if patient.id or not key.startswith("Patient@"):
                for ident in patient.identifier:
                    if ident.system and ident.value:
                        keys = self.by_identifier.setdefault(
                            (ident.system.strip(), ident.value.strip()), []
                        )
                        if key not in keys:
                            keys.append(key)
        replaced: dict[str, set[str]] = {}
        origin_of: dict[str, Where] = {}
        for patient, key, where in self.patients:
            for link in patient.link:
                other = self._plain_key(link.other.reference if link.other else None)
                if other is None or other == key:
                    continue
                if link.type == "replaced-by":
                    replaced.setdefault(key, set()).add(other)
                    origin_of.setdefault(key, where)
                elif link.type == "replaces":
                    replaced.setdefault(other, set()).add(key)
                    origin_of.setdefault(other, where)
        for retired, by in sorted(replaced.items()):
            if len(by) > 1:
                problems.report(
                    origin_of[retired],
                    retired,
                    "Patient.link: replaced by several records ("
                    + ", ".join(sorted(by))
                    + "); not merged",
                    "identity",
                )
                continue
            survivor, seen = next(iter(by)), {retired}
            while survivor in replaced and len(replaced[survivor]) == 1 and survivor not in seen:
                seen.add(survivor)
                survivor = next(iter(replaced[survivor]))
            if survivor in seen:
                problems.report(
                    origin_of[retired],
                    retired,
                    "Patient.link: replaced-by links form a cycle; not merged",
                    "identity",
                )
                continue
            self.survivors[retired] = survivor

    def _plain_key(self, reference: str | None) -> str | None:
        """The local key of a reference to a Patient (no source prefix, no link followed)."""
        if not reference or reference.startswith("#"):
            return None
        target = self.resolve(reference)
        if isinstance(target, Patient) and target.id:
            return f"Patient/{target.id}"
        parts = reference.split("/_history/")[0].rstrip("/").split("/")
        if len(parts) >= 2 and parts[-2] == "Patient":
            return f"Patient/{parts[-1]}"
        return reference

    def patient_key(self, reference: str | None) -> str | None:
        """The key of the patient a subject text names; ``None`` when it names none (then
        :attr:`why` says why, unless there was no subject at all)."""
        if not reference:
            return None
        # Called once per result after every resource is in (run): the answer per reference
        # cannot change any more, and results share few subjects.
        if reference in self.patient_keys:
            return self.patient_keys[reference]
        key = self._patient_key(reference)
        self.patient_keys[reference] = key
        return key

    def _patient_key(self, reference: str) -> str | None:
        if reference.startswith(_BY_IDENTIFIER):
            system, _, value = reference[len(_BY_IDENTIFIER) :].partition("|")
            local = self._by_identifier(system, value, reference)
        elif "#" in reference:
            local = self._contained_key(reference)
        else:
            local = self._plain_key(reference)
        if local is None:
            return None
        local = self.survivors.get(local, local)
        return f"{self.prefix}{local}"

    def _by_identifier(self, system: str, value: str, subject: str) -> str | None:
        keys = self.by_identifier.get((system, value), [])
        # Several records of one person linked by replaced-by are one patient.
        survivors = sorted({self.survivors.get(k, k) for k in keys})
        if len(survivors) == 1:
            return survivors[0]
        shown = quoted(f"{system}|{value}")
        self.why[subject] = (
            f"its subject is given by identifier {shown}, and no Patient of this source has it"
            if not keys
            else f"its subject is given by identifier {shown}, which several Patients of this "
            f"source have ({', '.join(survivors)})"
        )
        return None

    def _contained_key(self, subject: str) -> str | None:
        patient = self.contained.get(subject)
        local_id = subject.split("#", 1)[1]
        if patient is None:
            self.why[subject] = f"its subject #{quoted(local_id)} is no contained Patient"
            return None
        idents = [
            (i.system.strip(), i.value.strip()) for i in patient.identifier if i.system and i.value
        ]
        for system, value in idents:
            survivors = sorted(
                {self.survivors.get(k, k) for k in self.by_identifier.get((system, value), [])}
            )
            if len(survivors) == 1:
                return survivors[0]
        if idents:
            system, value = idents[0]
            return f"{IDENTIFIER_KEY}{system}|{value}"
        self.why[subject] = (
            f"its subject is a contained Patient (#{quoted(local_id)}) without an identifier: no "
            "DetectedIssue could name this patient (a contained resource cannot be referred to "
            "from outside its container), so it is not evaluated"
        )
        return None

    def demographics(self, data: Dataset, problems: Problems) -> None:
        """Birth date, sex (``gender`` male or female: a lab's sex-specific range) and death
        (``deceased[x]``: no new alert, evaluate.is_deceased) of each patient's record; a retired
        record (``Patient.link``) gives none (its survivor's Patient does), a contained Patient
        known by its identifier gives them to that patient. Call it once the results are placed:
        a birth date after one of the patient's results is a problem (below)."""
        for patient, key, where in self.patients:
            # A Patient without id is known by its fullUrl (urn:uuid in transaction Bundles), which
            # is also the key of the results that reference it (see patient_key).
            if (patient.id or not key.startswith("Patient@")) and key not in self.survivors:
                record = data.patient(f"{self.prefix}{key}")
                _describe(record, patient)
                _check_birth(record, key, where, problems)
        for retired, survivor in sorted(self.survivors.items()):
            data.patient(f"{self.prefix}{survivor}").merged_from.append(retired)
        for subject, contained in sorted(self.contained.items()):
            if contained is None:
                continue
            found = self.patient_key(subject)
            if found is not None and found.startswith(f"{self.prefix}{IDENTIFIER_KEY}"):
                known = data.patients.get(found)
                if known is not None:
                    _describe(known, contained)

    def no_patient(self, subject: str | None) -> tuple[str, str]:
        """The problem (reason, kind) of a resource whose subject names no patient."""
        why = self.why.get(subject or "")
        return (why, "identity") if why else ("no subject", "input")

    def merged(self) -> dict[str, str]:
        """Retired record keys → survivor keys (Patient.link), as keys of the dataset."""
        return {f"{self.prefix}{k}": f"{self.prefix}{v}" for k, v in self.survivors.items()}


def _describe(record: PatientRecord, patient: Patient) -> None:
    record.birth_date = parse_fhir_date(patient.birthDate) or record.birth_date
    if patient.gender in ("male", "female"):
        record.sex = patient.gender
    died = parse_fhir_datetime(patient.deceasedDateTime)
    if died is not None:
        record.deceased, record.deceased_at = True, died
    elif patient.deceasedBoolean or patient.deceasedDateTime:
        # deceasedBoolean true, or a date-time that cannot be read: deceased, since when unknown
        # (never a reason to alert).
        record.deceased, record.deceased_at = True, None


def _check_birth(record: PatientRecord, key: str, where: Where, problems: Problems) -> None:
    """A birth date after one of the patient's own results is wrong data (a far-future
    ``birthDate`` such as 9999-12-31, a typo): the age is unknown, not "a child" (which would
    switch the pediatric limits on), and the Patient is named as a problem. The result's
    date is not quoted: the problem line names the Patient and the reason only. One day of
    slack: ``birthDate`` is a local date and a result's date is in its own offset, so a newborn's
    first count may carry the previous calendar day."""
    birth = record.birth_date
    if birth is None or not record.results:
        return
    # `effective` is in UTC: the earliest instant's date is the earliest date.
    if min(map(_EFFECTIVE, record.results)).date() < birth - timedelta(days=1):
        record.birth_date = None
        problems.report(
            where, key, "birthDate is after one of the patient's lab results: age treated as unknown"
        )


def _contained_patient(contained: list[msgspec.Raw], local_id: str) -> Patient | None:
    for raw in contained:
        try:
            inner = decode_resource(raw)
        except MalformedResourceError:
            continue
        if isinstance(inner, Patient) and inner.id == local_id:
            return inner
    return None
