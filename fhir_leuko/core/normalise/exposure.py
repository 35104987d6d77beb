"""Whether a medication record exposed the patient to its drug, and over which period: one place.

Four record types can say a patient took a drug. Each is read by the same rules, here and nowhere
else (issue 13 §1-§2); ``normalise`` calls :func:`exposure_of` for every record that names a known
drug, and the drug window of a profile (``settings.drug_window_days``) applies after the ``end``
returned, for every type alike.

=========================  ===================================================  =======================
record                     start / end                                          an exposure unless
=========================  ===================================================  =======================
MedicationStatement        start: ``effectiveDateTime``, else                   status ``not-taken``,
                           ``effectivePeriod.start``, else ``dateAsserted``;    ``entered-in-error``,
                           end: ``effectivePeriod.end`` (open without one)      ``intended``
MedicationRequest          start: the earliest dosage schedule start            status ``cancelled``,
                           (``dosageInstruction.timing.repeat.boundsPeriod``    ``entered-in-error``,
                           ``.start``), else ``authoredOn``, else               ``draft``; intent
                           ``dispenseRequest.validityPeriod.start``; end: the   ``proposal``, ``plan``,
                           latest schedule end (open without one). A schedule   ``option``;
                           that starts after a count means the drug was not     ``doNotPerform``
                           yet taken, whenever the order was written.
MedicationAdministration   ``effectiveDateTime`` (start = end), or              status ``not-done``,
                           ``effectivePeriod`` (open while ``in-progress``      ``entered-in-error``
                           without an end)
MedicationDispense         start: ``whenHandedOver``; end: start +              any status but
                           ``daysSupply``, else + ``quantity`` ÷ (dose ×        ``completed``
                           doses a day) of its one dosage instruction, else
                           the hand-over day only (start = end); the detail
                           says which
=========================  ===================================================  =======================

A statement or request whose status says it ``completed`` or ``stopped`` without an end date is
known active on its start day only (``ended_on_status``). An administration that was ``stopped`` or
put ``on-hold`` was partly given, and an ``unknown`` one may have been: they count, as a statement
of ``unknown`` status does (a drug a patient was given is never dropped without a word); the detail
names the status. A dispense that is not ``completed`` was never handed over (R4
MedicationDispense status: ``preparation``, ``in-progress`` = ready for pick-up, ``cancelled``,
``on-hold``, ``declined``, ``stopped``, ``entered-in-error``, ``unknown``).

Sources: R4 MedicationStatement, MedicationRequest, MedicationAdministration and MedicationDispense
(https://hl7.org/fhir/R4/medicationdispense.html: ``daysSupply`` "Amount of medication expressed as
a timing amount", ``whenHandedOver`` "The time the dispensed product was provided to the patient").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from ..fhirjson import (
    DispenseDosage,
    DoseAndRate,
    MedicationAdministration,
    MedicationDispense,
    MedicationRecord,
    MedicationRequest,
    MedicationStatement,
    Quantity,
)
from ..fhirtime import parse_fhir_datetime, shift
from ..model import quoted

__all__ = [
    "ADMINISTRATION_STATUSES",
    "DISPENSE_STATUSES",
    "REQUEST_INTENTS",
    "REQUEST_STATUSES",
    "STATEMENT_STATUSES",
    "Exposure",
    "NotExposed",
    "exposure_of",
]

# R4 value sets (required bindings), by record type.
# https://hl7.org/fhir/R4/valueset-medication-statement-status.html
STATEMENT_STATUSES = frozenset(
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
# https://hl7.org/fhir/R4/valueset-medicationrequest-status.html
REQUEST_STATUSES = frozenset(
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
# https://hl7.org/fhir/R4/valueset-medicationrequest-intent.html
REQUEST_INTENTS = frozenset(
    {
        "proposal",
        "plan",
        "order",
        "original-order",
        "reflex-order",
        "filler-order",
        "instance-order",
        "option",
    }
)
# https://hl7.org/fhir/R4/valueset-medication-admin-status.html
ADMINISTRATION_STATUSES = frozenset(
    {"in-progress", "not-done", "on-hold", "completed", "entered-in-error", "stopped", "unknown"}
)
# https://hl7.org/fhir/R4/valueset-medicationdispense-status.html
DISPENSE_STATUSES = frozenset(
    {
        "preparation",
        "in-progress",
        "cancelled",
        "on-hold",
        "completed",
        "entered-in-error",
        "stopped",
        "declined",
        "unknown",
    }
)

# Never an exposure: not taken, recorded in error, cancelled before it started, or not yet real
# (an unsigned draft order, or a statement that the drug is only intended).
_NO_EXPOSURE = frozenset({"not-taken", "entered-in-error", "cancelled", "draft", "intended"})
_ENDED = frozenset({"completed", "stopped"})
# A proposal is not a prescription, a plan is an intention, an option is one choice of a
# RequestGroup: none says the drug was ordered for the patient (R4 RequestIntent).
_NOT_AN_ORDER = frozenset({"proposal", "plan", "option"})
_GIVEN = frozenset({"completed", "in-progress"})

# A supply longer than this is a data error, not a treatment; it is read as this long (and the
# date arithmetic stays inside the calendar).
_MAX_SUPPLY_DAYS = 3660.0

# UCUM time units (R4 Timing.repeat.periodUnit and the usual daysSupply codes), in days.
_DAYS_PER_UNIT = {
    "s": 1 / 86400,
    "min": 1 / 1440,
    "h": 1 / 24,
    "d": 1.0,
    "day": 1.0,
    "days": 1.0,
    "wk": 7.0,
    "week": 7.0,
    "weeks": 7.0,
    "mo": 30.0,
    "month": 30.0,
    "months": 30.0,
    "a": 365.0,
}


@dataclass(frozen=True, slots=True)
class Exposure:
    """When a record says the drug was taken. ``end`` is ``None`` while open-ended."""

    start: datetime | None
    end: datetime | None
    ended_on_status: bool = False
    """Status says it stopped/completed, with no end date: only its start is known to be active."""
    event: str = ""
    """For an administration or a dispense: what happened, and for a dispense how its supply is
    known (``given 2026-11-12``; ``dispensed 2026-11-01, 28 days' supply (daysSupply) to 2026-11-29``)."""


@dataclass(frozen=True, slots=True)
class NotExposed:
    """The record names a drug but says it was not taken. ``problem`` is true when that is because
    the record is invalid (then ``reason`` is reported as an input problem)."""

    reason: str
    problem: bool = False


def exposure_of(record: MedicationRecord) -> Exposure | NotExposed:
    """Whether and when ``record`` exposed its patient (the table in this module's docstring)."""
    if isinstance(record, MedicationAdministration):
        return _administration(record)
    if isinstance(record, MedicationDispense):
        return _dispense(record)
    rtype = type(record).__name__
    is_request = isinstance(record, MedicationRequest)
    status = record.status
    if status not in (REQUEST_STATUSES if is_request else STATEMENT_STATUSES):
        return NotExposed(f"invalid {rtype}.status {status!r}", problem=True)
    if status in _NO_EXPOSURE:
        return NotExposed(f"status {status}")
    if isinstance(record, MedicationRequest):
        intent = record.intent
        if intent is not None and intent not in REQUEST_INTENTS:
            return NotExposed(f"invalid MedicationRequest.intent {intent!r}", problem=True)
        if intent in _NOT_AN_ORDER:
            return NotExposed(f"intent {intent}")
        if record.doNotPerform:
            return NotExposed("doNotPerform")
        start, end = _request_period(record)
    else:
        start, end = _statement_period(record)
    ended_on_status = status in _ENDED and end is None
    return Exposure(start, start if ended_on_status else end, ended_on_status)


def _statement_period(med: MedicationStatement) -> tuple[datetime | None, datetime | None]:
    period = med.effectivePeriod
    start = parse_fhir_datetime(med.effectiveDateTime) or parse_fhir_datetime(
        period.start if period else None
    )
    end = parse_fhir_datetime(period.end) if period and period.end else None
    return start or parse_fhir_datetime(med.dateAsserted), end


def _request_period(med: MedicationRequest) -> tuple[datetime | None, datetime | None]:
    bounds = [
        d.timing.repeat.boundsPeriod
        for d in med.dosageInstruction
        if d.timing and d.timing.repeat and d.timing.repeat.boundsPeriod
    ]
    # The schedule says when taking starts; authoredOn only when the order was written.
    scheduled = [t for t in (parse_fhir_datetime(p.start) for p in bounds) if t]
    start = min(scheduled, default=None) or parse_fhir_datetime(med.authoredOn)
    if start is None and med.dispenseRequest and med.dispenseRequest.validityPeriod:
        start = parse_fhir_datetime(med.dispenseRequest.validityPeriod.start)
    ends = [t for t in (parse_fhir_datetime(p.end) for p in bounds) if t]
    return start, max(ends, default=None)


def _administration(med: MedicationAdministration) -> Exposure | NotExposed:
    status = med.status
    if status not in ADMINISTRATION_STATUSES:
        return NotExposed(f"invalid MedicationAdministration.status {status!r}", problem=True)
    if status in ("not-done", "entered-in-error"):
        return NotExposed(f"status {status}")
    period = med.effectivePeriod
    if med.effectiveDateTime:
        start = end = parse_fhir_datetime(med.effectiveDateTime)
        if start is None:
            return NotExposed(
                f"invalid effectiveDateTime {med.effectiveDateTime!r}: when it was given is "
                "unknown",
                problem=True,
            )
    elif period is not None and (period.start or period.end):
        start = parse_fhir_datetime(period.start or period.end)
        end = parse_fhir_datetime(period.end) if period.end else None
        if start is None or (period.end and end is None):
            return NotExposed("invalid effectivePeriod: when it was given is unknown", problem=True)
        if end is None and status != "in-progress":
            end = start  # a period left open by a record that is not running: its start is known
    else:
        return NotExposed("no effective[x]: when it was given is unknown", problem=True)
    day = start.date().isoformat()
    if end is None:
        event = f"given from {day}"
    elif end.date() != start.date():
        event = f"given {day} to {end.date().isoformat()}"
    else:
        event = f"given {day}"
    if status not in _GIVEN:
        event += f" (status {status})"
    return Exposure(start, end, event=event)


def _dispense(med: MedicationDispense) -> Exposure | NotExposed:
    status = med.status
    if status not in DISPENSE_STATUSES:
        return NotExposed(f"invalid MedicationDispense.status {status!r}", problem=True)
    if status != "completed":
        return NotExposed(f"status {status} (not handed over)")
    start = parse_fhir_datetime(med.whenHandedOver)
    if start is None:
        what = "invalid" if med.whenHandedOver else "no"
        return NotExposed(
            f"{what} whenHandedOver: when the patient got it is unknown (a completed dispense "
            "needs it)",
            problem=True,
        )
    days, how = _supply_days(med)
    day = start.date().isoformat()
    if days is None:
        return Exposure(
            start,
            start,
            event=f"dispensed {day}, supply length {how}, counted as taken that day only",
        )
    end = shift(start, timedelta(days=days))
    return Exposure(
        start,
        end,
        event=f"dispensed {day}, {_days(days)} supply ({how}) to {end.date().isoformat()}",
    )


def _days(n: int) -> str:
    return f"{n} day's" if n == 1 else f"{n} days'"


def _unit(quantity: Quantity) -> str:
    return quoted((quantity.code or quantity.unit or "").strip(), 40)


def _same_unit(a: Quantity, b: Quantity) -> bool:
    """Whether two quantities are in one unit: the UCUM codes when both have one, else the texts
    (``{tbl}`` and ``{tbl}``, ``tablet`` and ``Tablet``); never a conversion (mg vs tablets)."""
    if a.code and b.code:
        return a.code.strip() == b.code.strip()
    return bool(_unit(a)) and _unit(a).casefold() == _unit(b).casefold()


def _fmt(value: float) -> str:
    return f"{value:g}"


def _supply_days(med: MedicationDispense) -> tuple[int | None, str]:
    """How many days the supply lasts, and how that is known (or why it is not)."""
    supply = med.daysSupply
    if supply is not None and supply.value is not None and supply.value > 0:
        unit = _unit(supply)
        per = _DAYS_PER_UNIT.get(unit, _DAYS_PER_UNIT.get(unit.lower())) if unit else 1.0
        if per is not None:
            days = max(1, round(min(supply.value * per, _MAX_SUPPLY_DAYS)))
            shown = "daysSupply" if per == 1.0 else f"daysSupply {_fmt(supply.value)} {unit}"
            return days, shown
        not_from_supply = f"daysSupply unit {unit!r} not understood"
    else:
        not_from_supply = "no daysSupply"
    quantity = med.quantity
    if quantity is None or quantity.value is None or quantity.value <= 0:
        return None, f"not recorded ({not_from_supply}, no quantity)"
    dosages = med.dosageInstruction
    if len(dosages) != 1:
        many = "no dosage instruction" if not dosages else "several dosage instructions"
        return None, f"not recorded ({not_from_supply}; {many})"
    per_day = _per_day(dosages[0])
    if per_day is None:
        return None, f"not recorded ({not_from_supply}; no dose and frequency)"
    dose, times = per_day
    if not _same_unit(quantity, dose) or dose.value is None or dose.value <= 0:
        return None, (
            f"not known ({not_from_supply}; quantity in {_unit(quantity) or 'no unit'}, "
            f"dose in {_unit(dose) or 'no unit'})"
        )
    days = max(1, math.floor(min(quantity.value / (dose.value * times), _MAX_SUPPLY_DAYS)))
    unit = quoted(quantity.unit, 40) if quantity.unit else _unit(quantity)
    return days, (
        f"quantity {_fmt(quantity.value)} {unit} at {_fmt(dose.value * times)} {unit} a day"
    )


def _per_day(dosage: DispenseDosage) -> tuple[Quantity, float] | None:
    """The dose and how many times a day it is taken, when the instruction says both."""
    rates = dosage.doseAndRate
    first: DoseAndRate | None = rates if isinstance(rates, DoseAndRate) else next(iter(rates), None)
    dose = first.doseQuantity if first is not None else None
    repeat = dosage.timing.repeat if dosage.timing else None
    if dose is None or repeat is None or not repeat.periodUnit:
        return None
    if repeat.period is None or repeat.period <= 0 or (repeat.frequency or 1) <= 0:
        return None
    period_days = _DAYS_PER_UNIT.get(repeat.periodUnit)
    if period_days is None:
        return None
    return dose, (repeat.frequency or 1) / (repeat.period * period_days)
