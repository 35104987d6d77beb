"""Normalise FHIR resources into per-patient lab results, drug exposures, conditions and flags.

Pure: takes decoded resources (with their origin) and the compiled knowledge, returns data and the
problems found; no I/O, no clock. What it checks (fhir.resources would not check coded values):

* LOINC code -> analyte, keyed on the code, never the display (knowledge/loinc.toml).
* Observation.status against the R4 ObservationStatus codes; ``final``, ``amended``, ``corrected``
  and ``preliminary`` results are kept (profiles decide whether ``preliminary`` counts), the rest
  (``registered``, ``cancelled``, ``entered-in-error``, ``unknown``) are ignored.
* The unit: the UCUM ``code`` first, then the ``unit`` text (knowledge/units.toml). A count code needs
  a count unit and a fraction code a fraction unit: a mismatch is reported, never guessed.
* Plausibility for the declared unit (an ANC of 450 "10*3/uL" is reported, not graded).
* ``dataAbsentReason``, missing values, missing subject or time: reported, never a crash.

Observations without their own time or subject inherit them from the DiagnosticReport (``result``)
or panel Observation (``hasMember``) that lists them, as in the HL7 R4 CBC example (Bundle 101).
When a specimen has no absolute count, one is derived from WBC x percentage of the same specimen,
report or time (clozapine prescribing information §5.1; clinical.md §4.5).
"""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from operator import attrgetter

from .fhirjson import (
    Bundle,
    CodeableConcept,
    CodedOnly,
    Condition,
    DiagnosticReport,
    Flag,
    MalformedResourceError,
    Medication,
    MedicationRequest,
    MedicationStatement,
    Observation,
    Origin,
    Patient,
    Period,
    Quantity,
    Reference,
    Resource,
    Sourced,
    bundle_entries,
    decode_resource,
)
from .fhirtime import parse_fhir_date, parse_fhir_datetime
from .knowledge import LOINC_SYSTEM, CodeInfo, Knowledge
from .model import (
    Analyte,
    ConditionMatch,
    DrugExposure,
    DrugHit,
    Form,
    LabResult,
    Measure,
    PatientRecord,
    Problem,
)

__all__ = [
    "OBSERVATION_STATUSES",
    "Dataset",
    "Normaliser",
    "drugs_of",
    "normalise",
]

# R4 ObservationStatus (required binding): https://hl7.org/fhir/R4/valueset-observation-status.html
OBSERVATION_STATUSES = frozenset(
    {
        "registered",
        "preliminary",
        "final",
        "amended",
        "corrected",
        "cancelled",
        "entered-in-error",
        "unknown",
    }
)
_KEPT_STATUSES = frozenset({"final", "amended", "corrected", "preliminary"})
_COMPARATORS = frozenset({"<", "<=", ">=", ">"})

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


_CLINICAL_STATUS = "http://terminology.hl7.org/CodeSystem/condition-clinical"
_VERIFICATION_STATUS = "http://terminology.hl7.org/CodeSystem/condition-ver-status"


Where = Origin | int
"""Where a resource was read: its Origin, or the line number of the NDJSON being fed."""


@dataclass
class Dataset:
    """The normalised input: one record per patient, and every problem found."""

    patients: dict[str, PatientRecord] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    """Resources read by type, and what happened to lab results (``results:used`` …)."""

    def patient(self, key: str) -> PatientRecord:
        record = self.patients.get(key)
        if record is None:
            record = self.patients[key] = PatientRecord(key)
        return record


class _Pending:
    """A mapped lab Observation still missing its subject or its time.

    The DiagnosticReport that lists it (``result``) or its panel (``hasMember``) may supply them
    once everything is read, as in the HL7 R4 CBC example (Bundle 101). Most results carry both and
    are built at once, without this detour.
    """

    __slots__ = ("effective_text", "group", "info", "key", "obs", "origin", "subject")

    def __init__(
        self,
        obs: Observation,
        key: str,
        info: CodeInfo,
        origin: Origin,
        subject: str | None,
        effective_text: str | None,
    ) -> None:
        self.obs = obs
        self.key = key
        self.info = info
        self.origin = origin
        self.subject = subject
        self.effective_text = effective_text
        self.group = ""


@dataclass
class _Panel:
    key: str
    subject: str | None
    effective_text: str | None
    members: list[Reference]


def _effective_text(
    date_time: str | None, period: Period | None, instant: str | None = None
) -> str | None:
    """The time a result describes: effective[x] (a period's start), else ``issued``."""
    if date_time:
        return date_time
    if period is not None and (period.start or period.end):
        return period.start or period.end
    return instant


def _loinc_info(code: CodedOnly | None, table: dict[str, CodeInfo]) -> CodeInfo | None:
    if code is None:
        return None
    for coding in code.coding:
        if coding.system == LOINC_SYSTEM and coding.code:
            info = table.get(coding.code)
            if info is not None:
                return info
    return None


def _codings(concepts: Iterable[CodeableConcept | None]) -> Iterator[tuple[str | None, str | None]]:
    for concept in concepts:
        if concept is not None:
            for coding in concept.coding:
                yield coding.system, coding.code


def _texts(concepts: Iterable[CodeableConcept | None]) -> Iterator[str]:
    for concept in concepts:
        if concept is None:
            continue
        if concept.text:
            yield concept.text
        for coding in concept.coding:
            if coding.display:
                yield coding.display


def _fmt_number(value: float) -> str:
    # Fast path (once per result): repr is the shortest round-trip text, the same as the rounding
    # below whenever it has at most 6 decimals and no exponent.
    text = repr(value)
    if "e" not in text and "n" not in text and len(text) - text.find(".") <= 7:
        text = text.removesuffix(".0")
        return text if text != "-0" else "0"
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return text if text not in ("", "-0") else "0"


def _reported(quantity: Quantity) -> str:
    unit = quantity.code or quantity.unit or ""
    comparator = f"{quantity.comparator} " if quantity.comparator else ""
    value = _fmt_number(quantity.value) if quantity.value is not None else "?"
    return f"{comparator}{value} {unit}".strip()


class Normaliser:
    """Normalising, step by step: :meth:`feed` (or :meth:`feed_lines`) resources as they are read,
    then :meth:`run` once for the :class:`Dataset`. :func:`normalise` does both; the file reader
    (``bulkread``) drives it directly to decode NDJSON lines in one loop."""

    def __init__(self, knowledge: Knowledge) -> None:
        self.knowledge = knowledge
        self.loinc = knowledge.loinc
        self.data = Dataset()
        self.index: dict[str, Resource] = {}
        """Resources other than Observations, by ``Type/id`` and by fullUrl."""
        self.observation_urls: dict[str, str] = {}
        self.patient_keys: dict[str, str] = {}
        self.reported_texts: dict[tuple[str | None, str | None], dict[float, str]] = {}
        self.times: dict[str, tuple[str, datetime | None]] = {}
        self.lines_source = ""
        """The source of the lines :meth:`feed_lines` is reading."""
        self.observations = 0
        """Observations with an id (counted apart from ``data.counts``: see :meth:`add`)."""
        self.count_units = knowledge.count_units
        self.fraction_units = knowledge.fraction_units
        self.limits = {a: (p.max, p.min_nonzero) for a, p in knowledge.plausible.items()}
        self.results: dict[str, LabResult] = {}
        """Results by key, built as they are read; ``patient`` holds the subject reference and
        ``group`` the specimen (or "") until :meth:`run` resolves both."""
        self.pending: dict[str, _Pending] = {}
        self.versions: dict[str, str] = {}
        """``meta.lastUpdated`` of the version kept of each mapped Observation (``""`` if none)."""
        self.panels: dict[str, _Panel] = {}
        self.reports: list[tuple[DiagnosticReport, str, Origin]] = []
        self.medications: list[tuple[MedicationRequest | MedicationStatement, str, Origin]] = []
        self.conditions: list[tuple[Condition, str, Origin]] = []
        self.flags: list[tuple[Flag, str, Origin]] = []
        self.patients: list[tuple[Patient, str]] = []

    # -- pass 1: collect ---------------------------------------------------------------------

    @contextmanager
    def collecting(self) -> Iterator[None]:
        """No cyclic garbage collection while this builds millions of small, long-lived, acyclic
        objects: the collector would rescan them over and over (a third of the run time of a
        1M-Observation export, benchmarks/README.md). Reference counting still frees the rest."""
        enabled = gc.isenabled()
        gc.disable()
        try:
            yield
        finally:
            if enabled:
                gc.enable()

    def feed(self, items: Iterable[Sourced | Problem]) -> None:
        add = self.add
        problems = self.data.problems
        for item in items:
            if type(item) is Problem:
                problems.append(item)
            else:
                add(*item)  # type: ignore[misc]

    def problem(self, origin: Where, key: str, reason: str, kind: str = "input") -> None:
        origin = self.origin_of(origin)
        self.data.problems.append(Problem(origin.source, reason, key, origin.position, kind))

    def origin_of(self, where: Where) -> Origin:
        """The Origin of a resource; :meth:`feed_lines` passes only the line number (an Origin
        per line would cost as much as the rest of reading an Observation)."""
        if isinstance(where, int):
            return Origin(self.lines_source, f"line {where}")
        return where

    def feed_lines(self, lines: Iterable[bytes], source: str, first: int = 1) -> None:
        """Decode and add the resources of NDJSON lines numbered from ``first``, from ``source``.

        What :func:`fhir_leuko.files.reader.read_file` and :meth:`feed` do for NDJSON, in one loop:
        this runs once per line of a bulk export.
        """
        self.lines_source = source
        problems = self.data.problems
        add_observation = self.add_observation
        number = first - 1
        for line in lines:
            number += 1
            if not line or line.isspace():
                continue
            try:
                resource = decode_resource(line)
            except MalformedResourceError as exc:
                problems.append(Problem(source, exc.reason, exc.label, f"line {number}"))
                continue
            if resource is None:
                continue
            rid = resource.id
            if type(resource) is Observation and rid:
                self.observations += 1
                add_observation(resource, f"Observation/{rid}", number)
            elif type(resource) is Bundle:
                self.feed(bundle_entries(resource, source, f"line {number}"))
            else:
                self.add(resource, Origin(source, f"line {number}"))

    def add(self, resource: Resource, origin: Origin) -> None:
        rid = resource.id
        if type(resource) is Observation and rid:
            # The common case of a bulk export, kept short: it runs once per Observation.
            self.observations += 1
            key = f"Observation/{rid}"
            if origin.full_url and origin.full_url != key:
                self.observation_urls[origin.full_url] = key
            self.add_observation(resource, key, origin)
            return
        rtype = type(resource).__name__
        self.data.counts[rtype] += 1
        # Without id or fullUrl the key names the file and position: positions alone ("entry[0]",
        # "line 3", "" for a single resource) repeat across files and would merge resources.
        if rid:
            key = f"{rtype}/{rid}"
        else:
            key = origin.full_url or f"{rtype}@{origin.source}:{origin.position}"
        if isinstance(resource, Observation):
            # Observations are not kept in the index (a million of them would be): only their key,
            # under the fullUrl a DiagnosticReport may use to point at them.
            if origin.full_url and origin.full_url != key:
                self.observation_urls[origin.full_url] = key
            self.add_observation(resource, key, origin)
            return
        if origin.full_url:
            self.index[origin.full_url] = resource
        if rid:
            self.index[key] = resource
        if isinstance(resource, DiagnosticReport):
            self.reports.append((resource, key, origin))
            for raw in resource.contained:
                self.add_contained(raw, key, origin)
        elif isinstance(resource, MedicationRequest | MedicationStatement):
            self.medications.append((resource, key, origin))
        elif isinstance(resource, Patient):
            self.patients.append((resource, key))
        elif isinstance(resource, Condition):
            self.conditions.append((resource, key, origin))
        elif isinstance(resource, Flag):
            self.flags.append((resource, key, origin))

    def add_contained(self, raw: bytes, container: str, origin: Origin) -> None:
        try:
            inner = decode_resource(raw)
        except MalformedResourceError as exc:
            self.problem(origin, container, f"contained resource {exc.label}: {exc.reason}")
            return
        if isinstance(inner, Observation) and inner.id:
            self.add_observation(inner, f"{container}#{inner.id}", origin)

    def add_observation(self, obs: Observation, key: str, origin: Where) -> None:
        info = _loinc_info(obs.code, self.loinc)
        if info is None:
            if obs.hasMember:
                self.panels[key] = _Panel(
                    key,
                    obs.subject.reference if obs.subject else None,
                    _effective_text(
                        obs.effectiveDateTime, obs.effectivePeriod, obs.effectiveInstant
                    ),
                    obs.hasMember,
                )
            return
        meta = obs.meta
        updated = (meta.lastUpdated or "") if meta is not None else ""
        versions = self.versions
        kept = versions.get(key)
        if kept is not None:
            if kept > updated:
                return  # the same Observation read twice: keep the newest version
            self.results.pop(key, None)
            self.pending.pop(key, None)
        versions[key] = updated
        subject = obs.subject.reference if obs.subject is not None else None
        text = obs.effectiveDateTime or _effective_text(
            None, obs.effectivePeriod, obs.effectiveInstant
        )
        if subject is None or text is None:
            self.pending[key] = _Pending(obs, key, info, self.origin_of(origin), subject, text)
            return
        result = self.make_result(obs, key, info, origin, subject, text)
        if result is not None:
            self.results[key] = result

    # -- pass 2: link and finish -------------------------------------------------------------

    def resolve(self, reference: str | None) -> Resource | None:
        """A (non-Observation) resource of the input by reference: fullUrl, ``Type/id``, or the
        last two segments of an absolute or versioned URL. Contained ``#id`` is resolved by the
        container's owner (see :meth:`medication_concepts`)."""
        if not reference or reference.startswith("#"):
            return None
        found = self.index.get(reference)
        if found is not None:
            return found
        parts = reference.split("/_history/")[0].rstrip("/").split("/")
        if len(parts) >= 2:
            return self.index.get(f"{parts[-2]}/{parts[-1]}")
        return None

    def lab_for(self, reference: str, container: str) -> LabResult | _Pending | _Panel | None:
        """The mapped lab or panel Observation a ``result``/``hasMember`` reference points at."""
        if reference.startswith("#"):
            key = f"{container}{reference}"
        else:
            key = self.observation_urls.get(reference, reference)
            if key not in self.versions and key not in self.panels:
                parts = reference.split("/_history/")[0].rstrip("/").split("/")
                if len(parts) < 2 or parts[-2] != "Observation":
                    return None
                key = f"Observation/{parts[-1]}"
        return self.results.get(key) or self.pending.get(key) or self.panels.get(key)

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
            return f"Patient/{target.id}"
        parts = reference.split("/_history/")[0].rstrip("/").split("/")
        if len(parts) >= 2 and parts[-2] == "Patient":
            return f"Patient/{parts[-1]}"
        return reference

    def link_members(
        self,
        members: list[Reference],
        container: str,
        subject: str | None,
        effective_text: str | None,
        group: str,
        seen: set[str],
    ) -> None:
        results = self.results
        for member in members:
            reference = member.reference
            if not reference:
                continue
            # Usually the reference is the key of a result already built: the group is all it
            # needs from its report (a million times for a million Observations).
            target = results.get(reference) or self.lab_for(reference, container)
            if target is None:
                continue
            if isinstance(target, _Panel):
                if target.key in seen:
                    continue  # hasMember cycles exist in the wild; follow each panel once
                seen.add(target.key)
                self.link_members(
                    target.members,
                    target.key,
                    target.subject or subject,
                    target.effective_text or effective_text,
                    group,
                    seen,
                )
                continue
            if isinstance(target, _Pending):
                if target.subject is None:
                    target.subject = subject
                if target.effective_text is None:
                    target.effective_text = effective_text
            if not target.group:
                target.group = group

    def link(self) -> None:
        for report, key, _origin in sorted(self.reports, key=lambda item: item[1]):
            effective = _effective_text(
                report.effectiveDateTime, report.effectivePeriod, report.issued
            )
            subject = report.subject.reference if report.subject else None
            self.link_members(report.result, key, subject, effective, key, {key})
        for panel in sorted(self.panels.values(), key=lambda p: p.key):
            self.link_members(
                panel.members,
                panel.key,
                panel.subject,
                panel.effective_text,
                panel.key,
                {panel.key},
            )

    def reported(self, quantity: Quantity) -> str:
        """``_reported`` for a result that is kept: lab values repeat (two decimals, one unit),
        so the text is built once per distinct value and shared."""
        if quantity.comparator is not None:
            return _reported(quantity)
        by_value = self.reported_texts.get((quantity.code, quantity.unit))
        if by_value is None:
            by_value = self.reported_texts[(quantity.code, quantity.unit)] = {}
        value = quantity.value or 0.0
        text = by_value.get(value)
        if text is None:
            text = _reported(quantity)
            if len(by_value) < 1 << 14:
                by_value[value] = text
        return text

    def make_result(
        self,
        obs: Observation,
        key: str,
        info: CodeInfo,
        origin: Where,
        subject: str,
        effective_text: str,
    ) -> LabResult | None:
        """Check one mapped Observation and build its result, or report why it cannot count.

        This runs once per lab Observation of a bulk export (millions of times): keep it lean.
        """
        status = obs.status
        if status not in _KEPT_STATUSES:
            self.status_dropped(obs, key, origin)
            return None
        timed = self.times.get(effective_text)
        if timed is None:
            # The results of one CBC share their time: parse each distinct text once, and keep
            # one copy of it for all of them.
            timed = self.times[effective_text] = (
                effective_text,
                parse_fhir_datetime(effective_text),
            )
        effective_text, effective = timed
        if effective is None:
            self.problem(origin, key, f"invalid effective time {effective_text!r}")
            return None
        quantity = obs.valueQuantity
        if obs.dataAbsentReason is not None:
            absent = obs.dataAbsentReason
            reason = next((c.code for c in absent.coding if c.code), absent.text or "?")
            self.problem(origin, key, f"no value: dataAbsentReason {reason!r}", "value")
            return None
        if quantity is None or quantity.value is None:
            detail = f" (valueString {obs.valueString!r})" if obs.valueString else ""
            self.problem(origin, key, f"no numeric valueQuantity{detail}", "value")
            return None
        comparator = quantity.comparator
        if comparator is not None and comparator not in _COMPARATORS:
            self.problem(origin, key, f"invalid comparator {comparator!r}", "value")
            return None
        is_count = info.measure is Measure.COUNT
        table = self.count_units if is_count else self.fraction_units
        factor = table.factor(quantity.code, quantity.unit)
        if factor is None:
            if not is_count and info.unitless and not quantity.code and not quantity.unit:
                factor = 1.0
            else:
                self.problem(origin, key, _unit_problem(quantity, info), "unit")
                return None
        # Rounded to 9 decimals so a unit conversion never moves a value across a band edge by
        # float noise (1100 /uL is 1.1, not 1.1000000000000001); factor 1 needs no rounding.
        converted = quantity.value if factor == 1.0 else round(quantity.value * factor, 9)
        if is_count:
            limit_max, limit_min = self.limits[info.analyte]
            if converted < 0 or converted > limit_max or 0 < converted < limit_min:
                self.problem(
                    origin,
                    key,
                    f"implausible {info.analyte.value} count {_reported(quantity)} for its "
                    "declared unit (not graded; check the unit)",
                    "implausible",
                )
                return None
        elif not 0 <= converted <= 1:
            self.problem(
                origin,
                key,
                f"implausible fraction {_reported(quantity)} for LOINC {info.code} (not graded)",
                "implausible",
            )
            return None
        ref_low = None
        for entry in obs.referenceRange:
            # The low end of the first normal range (a range without a type is a normal one).
            low = entry.low
            if low is None or low.value is None:
                continue
            if entry.type is not None and not any(c.code == "normal" for c in entry.type.coding):
                continue
            if (low.code == quantity.code and low.unit == quantity.unit) or not (
                low.code or low.unit
            ):
                low_factor: float | None = factor
            else:
                low_factor = table.factor(low.code, low.unit)
            if low_factor is not None:
                ref_low = low.value if low_factor == 1.0 else round(low.value * low_factor, 9)
            break
        specimen = obs.specimen
        return LabResult(
            key,
            subject,
            info.analyte,
            info.measure,
            info.form,
            info.code,
            converted,
            comparator,
            self.reported(quantity),
            effective,
            effective_text,
            status,
            f"specimen:{specimen.reference}" if specimen is not None and specimen.reference else "",
            ref_low,
            info.corrected,
        )

    def status_dropped(self, obs: Observation, key: str, origin: Where) -> None:
        """Count an Observation whose status does not count, or report an invalid status."""
        status = obs.status
        if status in OBSERVATION_STATUSES:
            self.data.counts[f"results:ignored-{status}"] += 1
        else:
            self.problem(origin, key, f"invalid Observation.status {status!r}", "status")

    def finish_pending(self) -> None:
        """Build the results that waited for their report's subject or time."""
        for pending in self.pending.values():
            if pending.obs.status not in _KEPT_STATUSES:
                self.status_dropped(pending.obs, pending.key, pending.origin)
                continue
            if pending.subject is None:
                self.problem(
                    pending.origin,
                    pending.key,
                    "no subject (and no DiagnosticReport that names one)",
                )
                continue
            if pending.effective_text is None:
                self.problem(
                    pending.origin,
                    pending.key,
                    "no effective time (nor one from its DiagnosticReport)",
                )
                continue
            result = self.make_result(
                pending.obs,
                pending.key,
                pending.info,
                pending.origin,
                pending.subject,
                pending.effective_text,
            )
            if result is not None:
                if not result.group:
                    result.group = pending.group
                self.results[pending.key] = result
        self.pending.clear()

    # -- medications, conditions, flags --------------------------------------------------------

    def medication_concepts(
        self, med: MedicationRequest | MedicationStatement, key: str
    ) -> tuple[list[CodeableConcept | None], list[str]]:
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
                target = self.resolve(ref.reference)
            if isinstance(target, Medication):
                concepts.append(target.code)
                for ingredient in target.ingredient:
                    concepts.append(ingredient.itemCodeableConcept)
                    if ingredient.itemReference and ingredient.itemReference.display:
                        extra_texts.append(ingredient.itemReference.display)
        return concepts, extra_texts

    def finish_medication(
        self, med: MedicationRequest | MedicationStatement, key: str, origin: Origin
    ) -> DrugExposure | None:
        is_request = isinstance(med, MedicationRequest)
        statuses = _REQUEST_STATUSES if is_request else _STATEMENT_STATUSES
        status = med.status
        if status not in statuses:
            self.problem(origin, key, f"invalid {type(med).__name__}.status {status!r}", "status")
            return None
        if status in _NO_EXPOSURE:
            return None
        if isinstance(med, MedicationRequest) and med.doNotPerform:
            return None
        concepts, extra = self.medication_concepts(med, key)
        hits = self.knowledge.match_drugs(_codings(concepts), [*_texts(concepts), *extra])
        if not hits:
            return None
        patient = self.patient_key(med.subject.reference if med.subject else None)
        if patient is None:
            self.problem(origin, key, "no subject")
            return None
        start, end = _exposure_period(med)
        ended_on_status = status in _ENDED and end is None
        if ended_on_status:
            end = start
        names = tuple(dict.fromkeys([*_texts(concepts), *extra])) or tuple(h.label for h in hits)
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

    def finish_condition(self, condition: Condition, key: str, origin: Origin) -> None:
        verification = {
            c.code
            for c in (condition.verificationStatus.coding if condition.verificationStatus else [])
        }
        if verification & {"refuted", "entered-in-error"}:
            return
        clinical = {
            c.code for c in (condition.clinicalStatus.coding if condition.clinicalStatus else [])
        }
        abatement = parse_fhir_datetime(condition.abatementDateTime)
        if clinical & {"resolved", "inactive"} and abatement is None:
            return  # over, and we do not know since when: not a current cause
        patient = self.patient_key(condition.subject.reference if condition.subject else None)
        if patient is None:
            self.problem(origin, key, "no subject")
            return
        concepts = [condition.code]
        for system, code in _codings(concepts):
            flag = self.knowledge.flag_for(system, code)
            if flag is not None and not clinical & {"resolved", "inactive"}:
                record = self.data.patient(patient)
                record.flags.add(flag.id)
                record.flag_sources[flag.id] = key
        texts = list(_texts(concepts))
        onset = parse_fhir_datetime(
            condition.onsetDateTime
            or (condition.onsetPeriod.start if condition.onsetPeriod else None)
        )
        for cause in self.knowledge.match_causes(_codings(concepts), texts):
            self.data.patient(patient).conditions.append(
                ConditionMatch(
                    key=key,
                    patient=patient,
                    cause_id=cause.id,
                    label=cause.label,
                    text=texts[0] if texts else cause.label,
                    onset=onset,
                    abatement=abatement,
                )
            )

    def finish_flag(self, flag: Flag, key: str, origin: Origin) -> None:
        if flag.status != "active":
            return
        patient = self.patient_key(flag.subject.reference if flag.subject else None)
        if patient is None:
            self.problem(origin, key, "no subject")
            return
        for system, code in _codings([flag.code]):
            entry = self.knowledge.flag_for(system, code)
            if entry is not None:
                record = self.data.patient(patient)
                record.flags.add(entry.id)
                record.flag_sources[entry.id] = key

    # -- derivation ------------------------------------------------------------------------------

    def derive(self, results: list[LabResult]) -> list[LabResult]:
        """Absolute counts derived from WBC x fraction where a specimen has no absolute count.

        ``results`` are one patient's, so ``group`` (specimen, report or time) needs no patient.
        """
        by_group: dict[str, list[LabResult]] = {}
        for result in results:
            members = by_group.get(result.group)
            if members is None:
                by_group[result.group] = [result]
            else:
                members.append(result)
        derived: list[LabResult] = []
        count, total = Measure.COUNT, Form.TOTAL
        for group, members in by_group.items():
            counted = {r.analyte for r in members if r.measure is count and r.form is total}
            wanting = {r.analyte for r in members} - counted
            wanting.discard(Analyte.WBC)
            if not wanting:
                continue  # the usual complete differential: every absolute count is there
            wbcs = sorted(
                (r for r in members if r.analyte is Analyte.WBC),
                key=lambda r: (not r.corrected, r.key),
            )
            wbc = wbcs[0] if wbcs else None
            for analyte in Analyte:
                if analyte in wanting:
                    mine = [r for r in members if r.analyte is analyte]
                    made = self.derive_one(analyte, mine, wbc, group)
                    if made is not None:
                        derived.append(made)
        return derived

    def derive_one(
        self, analyte: Analyte, mine: list[LabResult], wbc: LabResult | None, group: str
    ) -> LabResult | None:
        def first(measure: Measure, form: Form) -> LabResult | None:
            found = sorted(
                (r for r in mine if r.measure is measure and r.form is form), key=lambda r: r.key
            )
            return found[0] if found else None

        parts: list[LabResult]
        how: str
        segs_count = first(Measure.COUNT, Form.SEGMENTED)
        if analyte is Analyte.NEUTROPHILS and segs_count is not None:
            band_count = first(Measure.COUNT, Form.BAND)
            parts = [segs_count, *([band_count] if band_count else [])]
            value = sum(p.value for p in parts)
            how = " + ".join(f"{p.reported} ({_form_word(p)}, {p.key})" for p in parts)
        else:
            if wbc is None:
                return None
            total = first(Measure.FRACTION, Form.TOTAL)
            if total is not None:
                fractions = [total]
            else:
                segs = first(Measure.FRACTION, Form.SEGMENTED)
                if segs is None:
                    return None
                bands = first(Measure.FRACTION, Form.BAND)
                # Bands are added to a segmented percentage only: a total percentage already
                # includes them (clozapine PI §5.1; clinical.md §4.5).
                fractions = [segs, *([bands] if bands else [])]
            parts = [wbc, *fractions]
            value = wbc.value * sum(f.value for f in fractions)
            how = f"WBC {wbc.reported} ({wbc.key}) x " + " + ".join(
                f"{f.reported} ({_form_word(f)}, {f.key})" for f in fractions
            )
        if any(p.comparator in (">", ">=") for p in parts):
            return None  # a lower bound times a fraction says nothing about how low it is
        comparator = "<" if any(p.comparator in ("<", "<=") for p in parts) else None
        status = "preliminary" if any(p.status == "preliminary" for p in parts) else "final"
        first_part = parts[0]
        self.data.counts["results:derived"] += 1
        value = round(value, 9)
        return LabResult(
            key=f"derived:{analyte.value}:{'+'.join(p.key for p in parts)}",
            patient=first_part.patient,
            analyte=analyte,
            measure=Measure.COUNT,
            form=Form.TOTAL,
            loinc="",
            value=value,
            comparator=comparator,
            reported=f"{'< ' if comparator else ''}{_fmt_number(value)} 10*9/L (derived)",
            effective=max(p.effective for p in parts),
            effective_text=max(parts, key=lambda p: p.effective).effective_text,
            status=status,
            group=group,
            sources=tuple(p.key for p in parts),
            derivation=how,
        )

    def run(self) -> Dataset:
        self.link()
        # The reports have given their subject, time and grouping to their results; nothing
        # resolves a DiagnosticReport after this, so let them go before the results are built.
        self.reports.clear()
        self.index = {k: v for k, v in self.index.items() if not isinstance(v, DiagnosticReport)}
        data = self.data
        data.counts["Observation"] += self.observations
        self.observations = 0
        self.finish_pending()
        results = list(self.results.values())
        self.results.clear()
        self.versions.clear()
        data.counts["results:used"] += len(results)
        # Now that every Patient is read, subjects resolve to patient keys; results without a
        # specimen or report are grouped by time (clinical.md §4.5: same specimen or time).
        patient_key = self.patient_key
        patient_of = data.patient
        time_groups: dict[datetime, str] = {}
        for result in results:
            who = patient_key(result.patient) or result.patient
            result.patient = who
            if not result.group:
                known = time_groups.get(result.effective)
                if known is None:
                    known = time_groups[result.effective] = f"time:{result.effective.isoformat()}"
                result.group = known
            patient_of(who).results.append(result)
        del results
        for record in data.patients.values():
            if record.results:
                record.results.extend(self.derive(record.results))
        for patient, key in self.patients:
            # A Patient without id is known by its fullUrl (urn:uuid in transaction Bundles), which
            # is also the key of the results that reference it (see patient_key).
            if patient.id or not key.startswith("Patient@"):
                record = data.patient(key)
                record.birth_date = parse_fhir_date(patient.birthDate) or record.birth_date
        for med, key, origin in self.medications:
            exposure = self.finish_medication(med, key, origin)
            if exposure is not None:
                data.patient(exposure.patient).exposures.append(exposure)
        for condition, key, origin in self.conditions:
            self.finish_condition(condition, key, origin)
        for flag, key, origin in self.flags:
            self.finish_flag(flag, key, origin)
        # By time; results of one time keep the order they were read in (evaluate never depends
        # on that order: its ties are broken explicitly).
        by_time = attrgetter("effective")
        for record in data.patients.values():
            record.results.sort(key=by_time)
            record.exposures.sort(key=lambda e: e.key)
            record.conditions.sort(key=lambda c: (c.key, c.cause_id))
        return data


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


def _unit_problem(quantity: Quantity, info: CodeInfo) -> str:
    kind = "count" if info.measure is Measure.COUNT else "fraction"
    shown = quantity.code or quantity.unit
    if shown:
        return f"unit {shown!r} is not a known {kind} unit for LOINC {info.code}"
    return f"no unit for LOINC {info.code} (a {kind}); the unit is never guessed"


def _form_word(result: LabResult) -> str:
    base = result.analyte.value
    if result.form is Form.SEGMENTED:
        return f"segmented {base}"
    if result.form is Form.BAND:
        return f"band {base}"
    return base


def normalise(items: Iterable[Sourced | Problem], knowledge: Knowledge) -> Dataset:
    """Normalise resources (and pass through reader problems) into a :class:`Dataset`.

    ``items`` is what :func:`fhir_leuko.files.reader.read_paths` yields, or ``(resource, Origin)``
    pairs built by another edge (a FHIR server search, a CDS Hooks prefetch).
    """
    normaliser = Normaliser(knowledge)
    with normaliser.collecting():
        normaliser.feed(items)
        return normaliser.run()


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
    normaliser = Normaliser(knowledge)
    for resource, origin in related:
        if resource.id:
            normaliser.index[f"{type(resource).__name__}/{resource.id}"] = resource
        if origin.full_url:
            normaliser.index[origin.full_url] = resource
    concepts, extra = normaliser.medication_concepts(medication, "")
    texts = [*_texts(concepts), *extra]
    hits = knowledge.match_drugs(_codings(concepts), texts)
    return hits, tuple(dict.fromkeys(texts)) or tuple(h.label for h in hits)
