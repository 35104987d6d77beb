"""FHIR date and time values, ages and the short durations used in profiles.

FHIR ``date``/``dateTime`` may be partial (``2011``, ``2011-03``, ``2011-03-04``) and a ``dateTime``
with a time SHALL carry a zone (https://hl7.org/fhir/R4/datatypes.html#dateTime). fhir-leuko turns
every value into an aware UTC ``datetime``: a partial value means the *start* of the period it
names, and a value with a time but no zone (not valid FHIR, seen in the wild) is taken as UTC.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta

__all__ = [
    "age_in_days",
    "format_instant",
    "parse_as_of",
    "parse_duration",
    "parse_fhir_date",
    "parse_fhir_datetime",
    "years_between",
]

_YEAR = re.compile(r"^(\d{4})$")
_YEAR_MONTH = re.compile(r"^(\d{4})-(\d{2})$")
_fromiso = datetime.fromisoformat


def parse_fhir_datetime(value: str | None) -> datetime | None:
    """Parse a FHIR ``date``/``dateTime``/``instant``; ``None`` when absent or invalid."""
    if not value:
        return None
    try:
        parsed = _fromiso(value)
    except ValueError:
        match = _YEAR_MONTH.match(value)
        try:
            if match:
                return datetime(int(match[1]), int(match[2]), 1, tzinfo=UTC)
            match = _YEAR.match(value)
            if match:
                return datetime(int(match[1]), 1, 1, tzinfo=UTC)
        except ValueError:
            return None
        return None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def parse_fhir_date(value: str | None) -> date | None:
    """The calendar date of a FHIR ``date``/``dateTime`` (a partial date takes its first day)."""
    if not value:
        return None
    if len(value) >= 10 and "T" not in value:
        try:
            return date.fromisoformat(value[:10])
        except ValueError:
            return None
    parsed = parse_fhir_datetime(value)
    return parsed.date() if parsed else None


def parse_as_of(value: str) -> datetime:
    """Parse the ``--as-of`` value.

    A bare date means the *end* of that day in UTC, so ``--as-of 2011-03-04`` includes results taken
    on the 4th. A date-time without a zone is UTC.

    Raises:
        ValueError: not an ISO 8601 date or date-time.
    """
    text = value.strip()
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        day = date.fromisoformat(text)
        return datetime(day.year, day.month, day.day, 23, 59, 59, tzinfo=UTC)
    parsed = _fromiso(text.replace("z", "Z"))
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def format_instant(moment: datetime) -> str:
    """A FHIR ``instant``/``dateTime`` string in UTC, second precision unless sub-second."""
    moment = moment.astimezone(UTC)
    if moment.microsecond:
        return moment.isoformat().replace("+00:00", "Z")
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


_DURATION = re.compile(r"^\s*(\d+)\s*(d|w|mo|y)\s*$")


def parse_duration(text: str) -> tuple[int, str]:
    """Parse a profile age such as ``7d``, ``2w``, ``6mo`` or ``18y`` into ``(count, unit)``.

    Raises:
        ValueError: the text is not of that form.
    """
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"{text!r} is not an age like '7d', '2w', '6mo' or '18y'")
    return int(match[1]), match[2]


def _add_months(day: date, months: int) -> date:
    month_index = day.month - 1 + months
    year = day.year + month_index // 12
    month = month_index % 12 + 1
    # A birthday on the 29th-31st falls on the last day of a shorter month.
    for candidate in (day.day, 30, 29, 28):
        try:
            return date(year, month, min(day.day, candidate))
        except ValueError:
            continue
    raise AssertionError("unreachable")  # pragma: no cover


def age_reached(birth: date, on: date, duration: tuple[int, str]) -> bool:
    """Whether someone born on ``birth`` is at least ``duration`` old on ``on`` (calendar rules)."""
    count, unit = duration
    if unit == "d":
        return (on - birth).days >= count
    if unit == "w":
        return (on - birth).days >= 7 * count
    months = count if unit == "mo" else 12 * count
    return on >= _add_months(birth, months)


def age_in_days(birth: date, on: date) -> int:
    """Whole days of age."""
    return (on - birth).days


def years_between(birth: date, on: date) -> int:
    """Completed years of age on ``on``."""
    years = on.year - birth.year
    if (on.month, on.day) < (birth.month, birth.day):
        years -= 1
    return years


def days(n: float) -> timedelta:
    """A ``timedelta`` of ``n`` days (profiles state windows in days)."""
    return timedelta(days=n)
