"""Lab Observations into lab results: the hot path of normalising.

Each mapped Observation (LOINC code -> analyte, knowledge/loinc.toml) is checked and built into a
:class:`~fhir_leuko.core.model.LabResult` as it is read: status (R4 ObservationStatus), value
(``dataAbsentReason``, comparator), unit (the UCUM ``code`` first, then the ``unit`` text; count
codes need count units, fraction codes fraction units), plausibility for the declared unit, and the
low end of the normal reference range. Of an Observation read twice in one source only one
version counts, whatever the reading order (:func:`supersedes`): the higher numeric
``meta.versionId``, else the later ``meta.lastUpdated``, else the status that replaces the other
(``amended``/``corrected`` replace ``final``, which replaces ``preliminary``; ``entered-in-error``
withdraws any); on a full tie the first read is kept. An Observation still missing its subject or
time waits (:class:`Pending`) for the DiagnosticReport or panel that lists it (:mod:`.reports`); a
panel Observation (``hasMember``, no mapped code) is kept as a :class:`Panel` for the same reason.
Component Observations belong here. The usual single reference range is read here; several
ranges, or one with conditions or given as text, wait in :attr:`LabResults.ranges` for the
patient's sex and birth date (:mod:`.ranges` chooses).

:meth:`LabResults.add` and :meth:`LabResults.make_result` run once per Observation of a bulk
export (millions of times): they stay lean, and what they need is on ``self``, not looked up.
"""

from __future__ import annotations

from datetime import datetime

from ..fhirjson import (
    CodedOnly,
    Component,
    Meta,
    Observation,
    Origin,
    Period,
    Quantity,
    Reference,
)
from ..fhirtime import parse_fhir_datetime
from ..knowledge import (
    LOINC_SYSTEM,
    LOINC_SYSTEMS,
    CodeInfo,
    Knowledge,
    UnitTable,
    normalise_system,
)
from ..model import LabResult, Measure, UnusedResult
from .dataset import Dataset, Problems, Where
from .identity import Identity, special_subject
from .ranges import PendingRanges

__all__ = [
    "OBSERVATION_STATUSES",
    "LabResults",
    "Panel",
    "Pending",
    "effective_text",
    "format_number",
    "supersedes",
    "version_of",
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
_KEPT = {status: status for status in _KEPT_STATUSES}
"""Each status that counts, as one shared string (a result keeps its status: one string less per
result of a bulk export)."""
_COMPARATORS = frozenset({"<", "<=", ">=", ">"})
# Which status replaces which when two versions of one Observation carry no version metadata that
# tells them apart: R4 Observation.status definitions (amended/corrected: "Subsequent to being
# final, the observation has been modified"; entered-in-error: "should not have existed").
_STATUS_RANK = {
    "registered": 0,
    "preliminary": 1,
    "final": 2,
    "amended": 3,
    "corrected": 3,
    "cancelled": 3,
    "entered-in-error": 4,
}


def version_of(meta: Meta | None) -> str:
    """What :func:`supersedes` compares of a version, kept small (one per Observation read): a
    numeric ``versionId`` as it is, else ``@`` + ``lastUpdated``, else ``""``."""
    if meta is None:
        return ""
    version = meta.versionId
    if version and version.isdigit():
        return version
    return f"@{meta.lastUpdated}" if meta.lastUpdated else ""


def supersedes(new: str, new_status: str | None, old: str, old_status: str | None) -> bool:
    """Whether a version of an Observation (:func:`version_of`) replaces the version kept of it:
    the higher numeric ``versionId``, else the later ``lastUpdated`` (as instants), else the
    status that replaces the other. A full tie keeps the version already kept, so the choice never
    depends on which of two equal versions happens to be read last."""
    if new and old and new != old:
        if new[0] != "@" and old[0] != "@":
            return int(new) > int(old)
        if new[0] == "@" and old[0] == "@":
            new_time, old_time = parse_fhir_datetime(new[1:]), parse_fhir_datetime(old[1:])
            if new_time is not None and old_time is not None and new_time != old_time:
                return new_time > old_time
    return _STATUS_RANK.get(new_status or "", 0) > _STATUS_RANK.get(old_status or "", 0)


class Pending:
    """A mapped lab Observation still missing its subject or its time.

    The DiagnosticReport that lists it (``result``) or its panel (``hasMember``) may supply them
    once everything is read, as in the HL7 R4 CBC example (Bundle 101). Most results carry both and
    are built at once, without this detour.
    """

    __slots__ = (
        "effective_text",
        "group",
        "info",
        "key",
        "obs",
        "origin",
        "part",
        "report",
        "subject",
    )

    def __init__(
        self,
        obs: Observation,
        key: str,
        info: CodeInfo,
        origin: Origin,
        subject: str | None,
        effective_text: str | None,
        part: Component | None = None,
    ) -> None:
        self.obs = obs
        self.key = key
        self.info = info
        self.origin = origin
        self.subject = subject
        self.effective_text = effective_text
        self.group = ""
        self.report = ""
        self.part = part


class Panel:
    """A panel Observation (no mapped code, ``hasMember``): what it passes to its members."""

    __slots__ = ("effective_text", "key", "members", "subject")

    def __init__(
        self, key: str, subject: str | None, effective_text: str | None, members: list[Reference]
    ) -> None:
        self.key = key
        self.subject = subject
        self.effective_text = effective_text
        self.members = members


def effective_text(
    date_time: str | None, period: Period | None, instant: str | None = None
) -> str | None:
    """The time a result describes: effective[x] (a period's start), else ``issued``."""
    if date_time:
        return date_time
    if period is not None and (period.start or period.end):
        return period.start or period.end
    return instant


def _loinc_info(code: CodedOnly | None, table: dict[str, CodeInfo]) -> CodeInfo | None:
    """The analyte of a code written as LOINC writes it (the fast path: once per Observation)."""
    if code is None:
        return None
    for coding in code.coding:
        if coding.system == LOINC_SYSTEM and coding.code:
            info = table.get(coding.code)
            if info is not None:
                return info
    return None


def near_loinc(code: CodedOnly, table: dict[str, CodeInfo]) -> tuple[CodeInfo | None, str | None]:
    """An analyte's LOINC code not written as :func:`_loinc_info` reads it: ``(info, None)`` when
    what differs is safe to normalise (LOINC's OID ``urn:oid:2.16.840.1.113883.6.1`` as the system,
    whitespace around the code or system, the case of the system's scheme and host), ``(None,
    reason)`` when an analyte's code comes with another system or none (reported, never guessed),
    ``(None, None)`` when nothing here is an analyte's code, or the concept is LOINC-coded as
    something else. Only codes of the analyte table are looked at, so an Observation of anything
    else (vital signs …) costs a dictionary lookup per coding."""
    candidate = None
    for coding in code.coding:
        raw = coding.code
        if not raw:
            continue
        info = table.get(raw.strip())
        if info is None:
            continue
        if coding.system is not None and normalise_system(coding.system) in LOINC_SYSTEMS:
            return info, None
        if candidate is None:
            candidate = (info, coding.system, raw)
    if candidate is None:
        return None, None
    for coding in code.coding:
        if coding.system is not None and normalise_system(coding.system) in LOINC_SYSTEMS:
            return None, None  # LOINC says it is something else; the other coding is not LOINC
    info, system, raw = candidate
    written = f"system {system!r}" if system is not None else "no system"
    return None, (
        f"code {raw!r} ({info.analyte.value}) comes with {written}, not LOINC's {LOINC_SYSTEM} "
        "(or its OID): not read as LOINC; the system is never guessed"
    )


def format_number(value: float) -> str:
    """A value as a lab reports it: at most 6 decimals, no trailing zeros, no exponent."""
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
    value = format_number(quantity.value) if quantity.value is not None else "?"
    return f"{comparator}{value} {unit}".strip()


def _unit_problem(quantity: Quantity, info: CodeInfo) -> str:
    kind = "count" if info.measure is Measure.COUNT else "fraction"
    shown = quantity.code or quantity.unit
    if shown:
        return f"unit {shown!r} is not a known {kind} unit for LOINC {info.code}"
    return f"no unit for LOINC {info.code} (a {kind}); the unit is never guessed"


class LabResults:
    """The lab Observations read so far, by key: results built, results waiting, panels."""

    def __init__(
        self,
        knowledge: Knowledge,
        data: Dataset,
        problems: Problems,
        identity: Identity | None = None,
    ) -> None:
        self.loinc = knowledge.loinc
        self.count_units = knowledge.count_units
        self.fraction_units = knowledge.fraction_units
        self.limits = {a: (p.max, p.min_nonzero) for a, p in knowledge.plausible.items()}
        self.counts = data.counts
        self.problems = problems
        self.results: dict[str, LabResult] = {}
        """Results by key, built as they are read; ``patient`` holds the subject reference and
        ``group`` the specimen (or "") until :meth:`Normaliser.run` resolves both."""
        self.pending: dict[str, Pending] = {}
        self.versions: dict[str, str] = {}
        """The version kept (:func:`version_of`) of each mapped Observation that has no result
        (pending or dropped); a result carries its own (:attr:`LabResult.version`). One
        million-entry dict less to fill: a third of the dict work per Observation."""
        self.admitted = 0
        """How many distinct mapped Observations were read (:meth:`account`)."""
        self.dropped: dict[str, str | None] = {}
        """The status of a version kept that gave no result (reported, or a status that does not
        count), for :func:`supersedes` when another version turns up."""
        self.unused: dict[str, tuple[str, UnusedResult]] = {}
        """``(subject reference, result)`` of each mapped Observation kept that could not be used
        (``fhir-leuko explain`` lists them with their patient)."""
        self.panels: dict[str, Panel] = {}
        self.observation_urls: dict[str, str] = {}
        """Observation keys by the fullUrl a DiagnosticReport may use to point at them."""
        self.ranges: dict[str, PendingRanges] = {}
        """The reference ranges of results whose range depends on the patient (by key)."""
        self.identity = identity if identity is not None else Identity()
        self.subject_origins: dict[str, Where] = {}
        """Where results with a contained or identifier-only subject were read (a subject that
        names no patient is reported there)."""
        self.reported_texts: dict[tuple[str | None, str | None], dict[float, str]] = {}
        self.times: dict[str, tuple[str, datetime | None]] = {}
        self.last_time: tuple[str, datetime | None] = ("", None)
        self.last_subject = ""
        self.accepted: dict[
            tuple[str | None, str | None, str], dict[float, tuple[float, str, float, UnitTable]]
        ] = {}
        """By (unit code, unit text, LOINC code): each value that passed :meth:`check_value`, with
        its conversion, text, factor and unit table."""
        self.scaled_values: dict[tuple[float, float], float] = {}
        self.lows: dict[float, float] = {}
        """:meth:`scaled` for factor 1 (a range in the value's own unit: the usual case)."""
        self.subjects: dict[str, str] = {}

    def add(self, obs: Observation, key: str, origin: Where) -> None:
        # _loinc_info, inlined (once per Observation)
        info = None
        code = obs.code
        if code is not None:
            for coding in code.coding:
                if coding.system == LOINC_SYSTEM and coding.code:
                    info = self.loinc.get(coding.code)
                    if info is not None:
                        break
        if info is None:
            # Not as LOINC writes an analyte: almost (near_loinc), a CBC in components, a panel.
            code = obs.code
            if code is not None and code.coding:
                info, reason = near_loinc(code, self.loinc)
                if reason is not None:
                    self.problems.report(origin, key, reason, "code")
            members = obs.hasMember
            if obs.component:
                members = [*members, *self.add_components(obs, key, origin)]
            if info is None:
                if members:
                    self.panels[key] = Panel(
                        key,
                        self.identity.subject_of(obs.subject, key, obs.contained),
                        effective_text(
                            obs.effectiveDateTime, obs.effectivePeriod, obs.effectiveInstant
                        ),
                        members,
                    )
                return
        self.admit(obs, key, info, origin, None)

    def add_components(self, obs: Observation, key: str, origin: Where) -> list[Reference]:
        """The components of an Observation that carry an analyte's code, each a result of the
        Observation's subject, time and status (``<key>#component[i]``); references to them, so
        that a report listing the Observation reaches them as it reaches a panel's members."""
        refs: list[Reference] = []
        for index, part in enumerate(obs.component):
            part_key = f"{key}#component[{index}]"
            info = _loinc_info(part.code, self.loinc)
            if info is None and part.code is not None and part.code.coding:
                info, reason = near_loinc(part.code, self.loinc)
                if reason is not None:
                    self.problems.report(origin, part_key, reason, "code")
            if info is None:
                continue
            self.admit(obs, part_key, info, origin, part)
            refs.append(Reference(reference=part_key))
        return refs

    def admit(
        self, obs: Observation, key: str, info: CodeInfo, origin: Where, part: Component | None
    ) -> None:
        """One mapped result (an Observation's value or a component's) in: the version that
        counts, then built at once, or waiting for its report's subject or time."""
        meta = obs.meta
        if meta is None:  # version_of(meta), inlined: this runs once per Observation
            version = ""
        else:
            version = meta.versionId or ""
            if not version.isdigit():
                version = f"@{meta.lastUpdated}" if meta.lastUpdated else ""
        found = self.results.get(key)  # kept_version(key), inlined: once per Observation
        kept = found.version if found is not None else self.versions.get(key)
        if kept is None:
            self.admitted += 1
        else:
            # The same Observation read twice: one version counts (supersedes).
            self.counts["results:superseded"] += 1
            if not supersedes(version, obs.status, kept, self.kept_status(key)):
                return
            self.forget(key)
        subject_ref = obs.subject
        subject = subject_ref.reference if subject_ref is not None else None
        if subject:
            # One string per patient, not per result: results share few subjects, and a patient's
            # results mostly come one after another (the last one is tried first, as for times).
            if subject == self.last_subject:
                subject = self.last_subject
            else:
                subject = self.last_subject = self.subjects.setdefault(subject, subject)
        if not subject or subject[0] == "#":
            # Rare: a contained Patient, or a subject given only by identifier (.identity).
            subject = self.identity.subject_of(subject_ref, key, obs.contained)
            if subject is not None:
                self.subject_origins[key] = origin
        text = obs.effectiveDateTime or effective_text(
            None, obs.effectivePeriod, obs.effectiveInstant
        )
        if subject is None or text is None:
            self.pending[key] = Pending(
                obs, key, info, self.problems.origin_of(origin), subject, text, part
            )
            self.versions[key] = version
            return
        result = self.make_result(obs, key, info, origin, subject, text, part)
        if result is not None:
            result.version = version
            self.results[key] = result
        else:
            self.versions[key] = version
            self.dropped[key] = obs.status
            self.unused[key] = (subject, UnusedResult(key, info.analyte, obs.status, text))

    def kept_version(self, key: str) -> str | None:
        """The version kept of an Observation, ``None`` when none was read."""
        result = self.results.get(key)
        if result is not None:
            return result.version
        return self.versions.get(key)

    def kept_status(self, key: str) -> str | None:
        """The status of the version kept of an Observation."""
        result = self.results.get(key)
        if result is not None:
            return result.status
        pending = self.pending.get(key)
        return pending.obs.status if pending is not None else self.dropped.get(key)

    def forget(self, key: str) -> None:
        """Drop the version kept of an Observation (a newer one replaces it)."""
        self.results.pop(key, None)
        self.versions.pop(key, None)
        self.pending.pop(key, None)
        self.dropped.pop(key, None)
        self.unused.pop(key, None)
        self.ranges.pop(key, None)

    def set_aside(self, key: str, status: str | None) -> None:
        """Take a result out of the count for a reason reported where it is decided (its report
        was withdrawn): it no longer counts, and it is accounted for (:meth:`account`)."""
        version = self.kept_version(key)
        self.forget(key)
        self.versions[key] = version or ""
        self.dropped[key] = status

    def absorb(self, other: LabResults) -> None:
        """Take in the Observations read into another part of the same source (:mod:`.sources`);
        an Observation read in both counts once, as if both were read here (:func:`supersedes`)."""
        kept = [(key, result.version) for key, result in other.results.items()]
        kept += [(key, v) for key, v in other.versions.items() if key not in other.results]
        for key, version in kept:
            mine = self.kept_version(key)
            if mine is None:
                self.admitted += 1
            else:
                self.counts["results:superseded"] += 1
                if not supersedes(version, other.kept_status(key), mine, self.kept_status(key)):
                    continue
            self.forget(key)
            if key in other.results:
                self.results[key] = other.results[key]
                if key in other.ranges:
                    self.ranges[key] = other.ranges[key]
            elif key in other.pending:
                self.versions[key] = version
                self.pending[key] = other.pending[key]
            else:
                self.versions[key] = version
                self.dropped[key] = other.dropped.get(key)
                if key in other.unused:
                    self.unused[key] = other.unused[key]
        for key, panel in other.panels.items():
            self.panels.setdefault(key, panel)
        for url, key in other.observation_urls.items():
            self.observation_urls.setdefault(url, key)

    def find(self, reference: str, container: str) -> LabResult | Pending | Panel | None:
        """The mapped lab or panel Observation a ``result``/``hasMember`` reference points at."""
        if reference.startswith("#"):
            key = f"{container}{reference}"
        else:
            key = self.observation_urls.get(reference, reference)
            if key not in self.results and key not in self.versions and key not in self.panels:
                parts = reference.split("/_history/")[0].rstrip("/").split("/")
                if len(parts) < 2 or parts[-2] != "Observation":
                    return None
                key = f"Observation/{parts[-1]}"
        return self.results.get(key) or self.pending.get(key) or self.panels.get(key)

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
        part: Component | None = None,
    ) -> LabResult | None:
        """Check one mapped Observation (or its component ``part``: the value, its unit and range
        are the component's) and build its result, or report why it cannot count.

        This runs once per lab Observation of a bulk export (millions of times): keep it lean.
        """
        status = _KEPT.get(obs.status)  # type: ignore[arg-type]
        if status is None:
            self.status_dropped(obs, key, origin)
            return None
        # The results of one CBC share their time: parse each distinct text once, and keep one
        # copy of it for all of them. They are mostly read one after another, so the last time
        # is tried first (a short compare, where the dict of every time read is a memory miss).
        timed = self.last_time
        if timed[0] != effective_text:
            found = self.times.get(effective_text)
            if found is None:
                found = self.times[effective_text] = (
                    effective_text,
                    parse_fhir_datetime(effective_text),
                )
            timed = self.last_time = found
        effective_text, effective = timed
        if effective is None:
            self.problems.report(origin, key, f"invalid effective time {effective_text!r}")
            return None
        value = obs if part is None else part
        quantity = value.valueQuantity
        if value.dataAbsentReason is not None:
            absent = value.dataAbsentReason
            reason = next((c.code for c in absent.coding if c.code), absent.text or "?")
            self.problems.report(origin, key, f"no value: dataAbsentReason {reason!r}", "value")
            return None
        if quantity is None or quantity.value is None:
            detail = f" (valueString {value.valueString!r})" if value.valueString else ""
            self.problems.report(origin, key, f"no numeric valueQuantity{detail}", "value")
            return None
        comparator = quantity.comparator
        number = quantity.value
        # Lab values repeat (two decimals, a handful of units): a value already accepted for this
        # unit and code passed every check of check_value, and its conversion and text are known.
        hit = accepted = None
        if comparator is None and number:  # (0.0 and -0.0 would share an entry)
            accepted_key = (quantity.code, quantity.unit, info.code)
            accepted = self.accepted.get(accepted_key)
            if accepted is not None:
                hit = accepted.get(number)
        if hit is not None:
            converted, reported, factor, table = hit
        else:
            checked = self.check_value(quantity, info, origin, key)
            if checked is None:
                return None
            converted, factor, table = checked
            reported = self.reported(quantity)
            if comparator is None and number:
                if accepted is None:
                    accepted = self.accepted[accepted_key] = {}
                if len(accepted) < 1 << 14:
                    accepted[number] = (converted, reported, factor, table)
        ref_low = None
        ranges = value.referenceRange
        if ranges:
            # The usual case, at once: one range, no conditions, a low end in the value's unit (or
            # none), normal (a range without a type is a normal one). Anything else waits for the
            # patient (.ranges).
            entry = ranges[0]
            low = entry.low
            if (
                len(ranges) == 1
                and not entry.appliesTo
                and entry.age is None
                and low is not None
                and low.value is not None
                and (
                    (low.code == quantity.code and low.unit == quantity.unit)
                    or not (low.code or low.unit)
                )
            ):
                if entry.type is None or any(c.code == "normal" for c in entry.type.coding):
                    # The usual low end, in the value's own unit, tried first (scaled, inlined).
                    ref_low = self.lows.get(low.value) if factor == 1.0 else None
                    if ref_low is None:
                        ref_low = self.scaled(low.value, factor)
            elif len(ranges) > 1 or low is not None or entry.text or entry.appliesTo:
                self.ranges[key] = PendingRanges(
                    ranges, quantity.code, quantity.unit, factor, table
                )
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
            reported,
            effective,
            effective_text,
            status,
            f"specimen:{specimen.reference}" if specimen is not None and specimen.reference else "",
            ref_low,
            info.corrected,
        )

    def scaled(self, value: float, factor: float) -> float:
        """``round(value * factor, 9)`` (a range's low end in the value's unit; factor 1 needs no
        rounding), once per value: one float shared by the results that have it."""
        if factor == 1.0:
            found = self.lows.get(value)
            if found is None:
                found = value
                if value and len(self.lows) < 1 << 14:
                    self.lows[value] = value
            return found
        key = (value, factor)
        found = self.scaled_values.get(key)
        if found is None:
            found = round(value * factor, 9)
            if value and len(self.scaled_values) < 1 << 14:
                self.scaled_values[key] = found
        return found

    def check_value(
        self, quantity: Quantity, info: CodeInfo, origin: Where, key: str
    ) -> tuple[float, float, UnitTable] | None:
        """The comparator, unit and plausibility checks of a value (:meth:`make_result`): the
        value converted, the unit's factor and table, or ``None`` once the problem is reported."""
        comparator = quantity.comparator
        if comparator is not None and comparator not in _COMPARATORS:
            self.problems.report(origin, key, f"invalid comparator {comparator!r}", "value")
            return None
        number = quantity.value
        assert number is not None
        is_count = info.measure is Measure.COUNT
        table = self.count_units if is_count else self.fraction_units
        factor = table.factor(quantity.code, quantity.unit)
        if factor is None:
            if not is_count and info.unitless and not quantity.code and not quantity.unit:
                factor = 1.0
            else:
                self.problems.report(origin, key, _unit_problem(quantity, info), "unit")
                return None
        # Rounded to 9 decimals so a unit conversion never moves a value across a band edge by
        # float noise (1100 /uL is 1.1, not 1.1000000000000001); factor 1 needs no rounding.
        converted = number if factor == 1.0 else round(number * factor, 9)
        if is_count:
            limit_max, limit_min = self.limits[info.analyte]
            if converted < 0 or converted > limit_max or 0 < converted < limit_min:
                self.problems.report(
                    origin,
                    key,
                    f"implausible {info.analyte.value} count {_reported(quantity)} for its "
                    "declared unit (not graded; check the unit)",
                    "implausible",
                )
                return None
        elif not 0 <= converted <= 1:
            self.problems.report(
                origin,
                key,
                f"implausible fraction {_reported(quantity)} for LOINC {info.code} (not graded)",
                "implausible",
            )
            return None
        return converted, factor, table

    def status_dropped(self, obs: Observation, key: str, origin: Where) -> None:
        """Count an Observation whose status does not count, or report an invalid status."""
        status = obs.status
        if status in OBSERVATION_STATUSES:
            self.counts[f"results:ignored-{status}"] += 1
        else:
            self.problems.report(origin, key, f"invalid Observation.status {status!r}", "status")

    def finish_pending(self) -> None:
        """Build the results that waited for their report's subject or time (after linking)."""
        for pending in self.pending.values():
            self.dropped[pending.key] = pending.obs.status
            if pending.obs.status not in _KEPT_STATUSES:
                self.status_dropped(pending.obs, pending.key, pending.origin)
                self._unused(pending)
                continue
            if pending.subject is None:
                self.problems.report(
                    pending.origin,
                    pending.key,
                    "no subject (and no DiagnosticReport that names one)",
                )
                continue
            if pending.effective_text is None:
                self.problems.report(
                    pending.origin,
                    pending.key,
                    "no effective time (nor one from its DiagnosticReport)",
                )
                self._unused(pending)
                continue
            result = self.make_result(
                pending.obs,
                pending.key,
                pending.info,
                pending.origin,
                pending.subject,
                pending.effective_text,
                pending.part,
            )
            if result is not None:
                del self.dropped[pending.key]
                result.version = self.versions[pending.key]
                if not result.group:
                    result.group = pending.group
                result.report = pending.report
                self.results[pending.key] = result
                if special_subject(pending.subject):
                    self.subject_origins[pending.key] = pending.origin
            else:
                self._unused(pending)
        self.pending.clear()

    def _unused(self, pending: Pending) -> None:
        if pending.subject is not None:
            unused = UnusedResult(
                pending.key, pending.info.analyte, pending.obs.status, pending.effective_text
            )
            self.unused[pending.key] = (pending.subject, unused)

    def account(self) -> None:
        """Every mapped Observation read either gives a result or was reported or counted as not
        counting (a status that never counts, an older version): the one place that guarantees
        it, whatever a future check forgets. One that did neither is named here (issue 7 §3)."""
        results, dropped = self.results, self.dropped
        if len(results) + len(dropped) == self.admitted:
            return  # the usual case: every key is in exactly one of them
        lost = [k for k in self.versions if k not in results and k not in dropped]
        for key in lost:
            self.problems.report(
                Origin("(input)"), key, "read but neither used nor reported (please report)"
            )
        missing = self.admitted - len(results) - len(dropped) - len(lost)
        if missing > 0:  # keys kept only by their result, and the result lost since
            self.problems.report(
                Origin("(input)"),
                f"{missing} lab Observation(s)",
                "read but neither used nor reported (please report)",
            )
