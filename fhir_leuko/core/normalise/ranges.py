"""The laboratory's reference range that applies to this patient (issue 13 §3).

An Observation's ``referenceRange`` often has several entries: by sex, by age, normal and critical
(https://hl7.org/fhir/R4/observation-definitions.html#Observation.referenceRange). The low end of
the entry that applies to the patient is the lab's lower limit of the result:

1. Only ``normal`` ranges (``type`` absent or ``normal``, referencerange-meaning); a ``treatment``,
   ``therapeutic`` or any other type is never a lower limit of normal.
2. ``appliesTo`` is read for sex only (SNOMED CT 248153007 Male / 248152002 Female, the
   administrative-gender and v3 AdministrativeGender codes, or the text ``male``/``female``)
   against ``Patient.gender``. An entry for anything else (a race, pregnancy, …) is never used:
   fhir-leuko never chooses a limit by race (clinical.md §4.4), and cannot know the rest.
3. ``age`` against the patient's age **on the day of the draw** (not at as-of): an age range in
   whole units includes its upper unit (``5-17 a`` is from the 5th birthday to the day before the
   18th); a fractional one is converted to months or days and ends before its upper bound.
4. Of the entries that apply, the most specific (sex and age, then sex or age, then neither) wins;
   among equals the first listed.
5. An entry given only as ``text`` is used when it is plainly ``low-high unit`` (``4.0-10.0
   10*3/uL``, ``4.5 - 11.0 x10^9/L``; without a unit, the result's own unit); any other text is
   named in the detail, never parsed into nothing.

When no entry applies, the profile's default limit decides, and the detail says why the lab's range
was not used (:attr:`~fhir_leuko.core.model.LabResult.ref_note`). The usual single range without
conditions, in the result's own unit, is read at once while the Observation is read
(:meth:`~.results.LabResults.make_result`); only the others wait here for the patient's sex and
birth date.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date

from ..fhirjson import CodeableConcept, Quantity, Range, ReferenceRange
from ..fhirtime import age_reached
from ..knowledge import UnitTable
from ..model import LabResult, PatientRecord, quoted

__all__ = ["PendingRanges", "choose_range"]

_SNOMED = "http://snomed.info/sct"
_SEX_CODES = {
    (_SNOMED, "248153007"): "male",
    (_SNOMED, "248152002"): "female",
    ("http://hl7.org/fhir/administrative-gender", "male"): "male",
    ("http://hl7.org/fhir/administrative-gender", "female"): "female",
    ("http://terminology.hl7.org/CodeSystem/v3-AdministrativeGender", "M"): "male",
    ("http://terminology.hl7.org/CodeSystem/v3-AdministrativeGender", "F"): "female",
}
_SEX_TEXTS = {"male": "male", "female": "female", "men": "male", "women": "female"}
_PLAIN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:-|–|—|to)\s*(\d+(?:\.\d+)?)\s*(.*?)\s*$")
# UCUM age units (Range.low/high of an age are Quantities, usually `a`, `mo`, `wk`, `d`), as the
# profile age units of fhirtime.age_reached.
_AGE_UNITS = {
    "a": "y",
    "year": "y",
    "years": "y",
    "mo": "mo",
    "month": "mo",
    "months": "mo",
    "wk": "w",
    "week": "w",
    "weeks": "w",
    "d": "d",
    "day": "d",
    "days": "d",
}
_DAYS_IN = {"y": 365.25, "mo": 30.44, "w": 7.0, "d": 1.0}


@dataclass(frozen=True, slots=True)
class _Bound:
    """An age bound: reached on the day someone is ``count`` ``unit`` old."""

    count: int
    unit: str


def _bound(quantity: Quantity | None, upper: bool) -> _Bound | str | None:
    """The age bound of a Range end: ``None`` when absent, a text when it cannot be read.

    An upper bound in whole units includes that whole unit (``17 a`` ends on the day before the
    18th birthday); a fractional one is converted and ends where it says."""
    if quantity is None or quantity.value is None:
        return None
    unit = _AGE_UNITS.get((quantity.code or quantity.unit or "").strip().casefold())
    if unit is None:
        return f"age unit {quoted(quantity.code or quantity.unit or '(none)')!r} not understood"
    value = quantity.value
    if not 0 <= value <= 200 * _DAYS_IN["y"]:  # also inf and nan
        return f"age {quoted(str(value))} not plausible"
    if value == int(value):
        return _Bound(int(value) + (1 if upper else 0), unit)
    if unit == "y" and (value * 12) == int(value * 12):
        return _Bound(int(value * 12), "mo")
    return _Bound(round(value * _DAYS_IN[unit]), "d")


def _sex_of(concept: CodeableConcept) -> str | None:
    for coding in concept.coding:
        sex = _SEX_CODES.get((coding.system or "", (coding.code or "").strip()))
        if sex is not None:
            return sex
    if concept.text and not concept.coding:
        return _SEX_TEXTS.get(concept.text.strip().casefold())
    return None


def _shown(concept: CodeableConcept) -> str:
    coding = next(iter(concept.coding), None)
    text = concept.text or (coding.display if coding else None) or (coding.code if coding else "")
    return repr(quoted(text or "?"))


def _age_text(age: Range) -> str:
    def part(q: Quantity | None) -> str:
        return "" if q is None or q.value is None else f"{q.value:g}"

    unit = next((q.code or q.unit for q in (age.low, age.high) if q is not None), "") or ""
    low, high = part(age.low), part(age.high)
    if low and high:
        return f"age {low}-{high} {unit}"
    return f"age ≥ {low} {unit}" if low else f"age ≤ {high} {unit}"


@dataclass(frozen=True, slots=True)
class _Entry:
    index: int
    low: float | None
    """The low end in the result's internal unit; ``None`` when the entry gives none usable."""
    sex: str | None
    age: tuple[_Bound | None, _Bound | None] | None
    what: str
    """The conditions, as people read them (``for female, age 18-120 a``)."""
    unusable: str = ""
    """Why the entry can never be used (a race; text that is not a plain range; a unit)."""


@dataclass(slots=True)
class PendingRanges:
    """The reference ranges of one result, read once its patient's sex and birth date are known."""

    ranges: list[ReferenceRange]
    unit_code: str | None
    unit_text: str | None
    factor: float
    table: UnitTable


def _low(value: float, factor: float | None) -> float | None:
    if factor is None:
        return None
    return value if factor == 1.0 else round(value * factor, 9)


def _entries(pending: PendingRanges) -> list[_Entry]:
    out: list[_Entry] = []
    for index, entry in enumerate(pending.ranges):
        if entry.type is not None and not any(c.code == "normal" for c in entry.type.coding):
            continue  # a treatment or therapeutic range is no lower limit of normal
        conditions: list[str] = []
        unusable = ""
        sex: str | None = None
        for concept in entry.appliesTo:
            found = _sex_of(concept)
            if found is None:
                unusable = (
                    f"its range for {_shown(concept)} is not used, as ranges are chosen by sex "
                    "and age only, never by race"
                )
            else:
                sex = found
                conditions.append(found)
        age: tuple[_Bound | None, _Bound | None] | None = None
        if entry.age is not None and (entry.age.low or entry.age.high):
            lower, upper = _bound(entry.age.low, False), _bound(entry.age.high, True)
            if isinstance(lower, str) or isinstance(upper, str):
                unusable = unusable or f"its range for {_age_text(entry.age)}: " + str(
                    lower if isinstance(lower, str) else upper
                )
            else:
                age = (lower, upper)
            conditions.append(_age_text(entry.age))
        low: float | None = None
        quantity = entry.low
        as_text = ""
        if quantity is not None and quantity.value is not None:
            if (quantity.code == pending.unit_code and quantity.unit == pending.unit_text) or not (
                quantity.code or quantity.unit
            ):
                low = _low(quantity.value, pending.factor)
            else:
                low = _low(quantity.value, pending.table.factor(quantity.code, quantity.unit))
                if low is None:
                    shown = quantity.code or quantity.unit
                    unusable = (
                        unusable or f"the unit {quoted(shown or '')!r} of its range is not known"
                    )
        elif entry.text:
            low, why = _from_text(entry.text, pending)
            if why:
                unusable = unusable or why
            as_text = f"given as text {quoted(entry.text.strip())!r}"
        else:
            continue  # no low end (only a high one): nothing to compare a low count with
        what = f"for {', '.join(conditions)}" if conditions else ""
        what = f"{what} {as_text}".strip()
        out.append(_Entry(index, low, sex, age, what, unusable))
    return out


def _from_text(text: str, pending: PendingRanges) -> tuple[float | None, str]:
    match = _PLAIN.match(text)
    refused = f"its text {quoted(text.strip())!r} is not a plain 'low-high unit' range"
    if match is None or float(match[1]) >= float(match[2]):
        return None, refused
    unit = match[3]
    factor = pending.factor if not unit else pending.table.factor(None, unit)
    if factor is None:
        return None, f"the unit of its text {quoted(text.strip())!r} is not known"
    return _low(float(match[1]), factor), ""


def _applies(entry: _Entry, sex: str | None, birth: date | None, on: date) -> bool:
    if entry.sex is not None and entry.sex != sex:
        return False
    if entry.age is not None:
        if birth is None:
            return False
        lower, upper = entry.age
        if lower is not None and not age_reached(birth, on, (lower.count, lower.unit)):
            return False
        if upper is not None and age_reached(birth, on, (upper.count, upper.unit)):
            return False
    return True


def _patient_text(record: PatientRecord, on: date) -> str:
    sex = record.sex or "sex not recorded"
    if record.birth_date is None:
        return f"{sex}, no birth date"
    years = (
        on.year
        - record.birth_date.year
        - ((on.month, on.day) < (record.birth_date.month, record.birth_date.day))
    )
    return f"{sex}, {years} years old at the draw"


def choose_range(result: LabResult, pending: PendingRanges, record: PatientRecord) -> None:
    """Set ``result.ref_low`` (and ``ref_source``) from the entry that applies to the patient, or
    ``ref_note`` saying why none could be used."""
    on = result.effective.date()
    entries = _entries(pending)
    usable = [e for e in entries if not e.unusable and e.low is not None]
    applying = [e for e in usable if _applies(e, record.sex, record.birth_date, on)]
    skipped = [e.unusable for e in entries if e.unusable]
    if applying:
        best = max(applying, key=lambda e: ((e.sex is not None) + (e.age is not None), -e.index))
        source = best.what
        if skipped:
            source = f"{source or 'that has no conditions'}; {skipped[0]}"
        if source:
            element = "text" if "given as text" in best.what else "low"
            source = f"{source} (Observation.referenceRange.{element})"
        result.ref_low, result.ref_source = best.low, source
        return
    if not entries:
        return  # no normal range with a low end: as if the lab gave none (nothing to say)
    if skipped and len(skipped) == len(entries):
        result.ref_note = "; ".join(dict.fromkeys(skipped))
        return
    result.ref_note = (
        f"none of its ranges applies to this patient ({_patient_text(record, on)})"
        + (f"; {skipped[0]}" if skipped else "")
    )
