"""Which resource a reference names, and which patient a subject reference is.

The input's resources other than Observations are indexed by fullUrl and by ``Type/id``; a reference
resolves by fullUrl, ``Type/id``, or the last two segments of an absolute or versioned URL
(``…/Patient/1/_history/2``). A subject resolves to the key of its patient's record: ``Patient/id``
when the Patient (or the reference) says so, otherwise the reference as given (a ``urn:uuid`` of a
transaction Bundle), qualified by its source when the run reads several (:mod:`.sources`).
Patient resources give the record its birth date, sex and death. Contained patients and
``Patient.link`` belong here.
"""

from __future__ import annotations

from ..fhirjson import DiagnosticReport, Patient, Resource
from ..fhirtime import parse_fhir_date, parse_fhir_datetime
from .dataset import Dataset

__all__ = ["Identity"]


class Identity:
    """The resource index and the patient keys of one source (:mod:`.sources`)."""

    def __init__(self) -> None:
        self.index: dict[str, Resource] = {}
        """Resources other than Observations, by ``Type/id`` and by fullUrl."""
        self.patient_keys: dict[str, str] = {}
        self.patients: list[tuple[Patient, str]] = []
        self.prefix = ""
        """Put before every patient key when the run reads several sources (``<source>|``)."""

    def absorb(self, other: Identity) -> None:
        """Take in the resources read into another part of the same source."""
        for key, resource in other.index.items():
            self.index.setdefault(key, resource)
        self.patients.extend(other.patients)

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

    def patient_key(self, reference: str | None) -> str | None:
        if not reference:
            return None
        # Called once per result after every resource is in (run): the answer per reference
        # cannot change any more, and results share few subjects.
        known = self.patient_keys.get(reference)
        if known is not None:
            return known
        key = self._patient_key(reference)
        self.patient_keys[reference] = key
        return key

    def _patient_key(self, reference: str) -> str:
        target = self.resolve(reference)
        if isinstance(target, Patient) and target.id:
            return f"{self.prefix}Patient/{target.id}"
        parts = reference.split("/_history/")[0].rstrip("/").split("/")
        if len(parts) >= 2 and parts[-2] == "Patient":
            return f"{self.prefix}Patient/{parts[-1]}"
        return f"{self.prefix}{reference}"

    def forget_reports(self) -> None:
        """Drop the DiagnosticReports once linked: nothing resolves one after that."""
        self.index = {k: v for k, v in self.index.items() if not isinstance(v, DiagnosticReport)}

    def demographics(self, data: Dataset) -> None:
        """Birth date, sex (``gender`` male or female: a lab's sex-specific range) and death
        (``deceased[x]``: no new alert, evaluate.is_deceased) of each patient's record."""
        for patient, key in self.patients:
            # A Patient without id is known by its fullUrl (urn:uuid in transaction Bundles), which
            # is also the key of the results that reference it (see patient_key).
            if patient.id or not key.startswith("Patient@"):
                record = data.patient(f"{self.prefix}{key}")
                record.birth_date = parse_fhir_date(patient.birthDate) or record.birth_date
                if patient.gender in ("male", "female"):
                    record.sex = patient.gender
                died = parse_fhir_datetime(patient.deceasedDateTime)
                if died is not None:
                    record.deceased, record.deceased_at = True, died
                elif patient.deceasedBoolean or patient.deceasedDateTime:
                    # deceasedBoolean true, or a date-time that cannot be read: deceased, since
                    # when unknown (never a reason to alert).
                    record.deceased, record.deceased_at = True, None
