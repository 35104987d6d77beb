"""FHIR date and time values, ages and the short durations used in profiles.

FHIR ``date``/``dateTime`` may be partial (``2011``, ``2011-03``, ``2011-03-04``) and a ``dateTime``
with a time SHALL carry a zone (https://hl7.org/fhir/R4/datatypes.html#dateTime). fhir-leuko turns
every value into an aware UTC ``datetime``: a partial value means the *start* of the period it
names, and a value with a time but no zone (not valid FHIR, seen in the wild) is taken as UTC.

**The edges of the calendar.** Python's ``datetime`` holds years 1 to 9999, and FHIR allows exactly
those years in any zone, so ``0001-01-01T00:00:00+01:00`` or ``9999-12-31T23:59:59-01:00`` name
instants that do not exist in UTC. This module is the one place where that is decided, for every
date element read and every computation on them:

* a value whose UTC instant is outside years 1-9999 is *invalid*, like any other invalid date
  (:func:`to_utc`, used by :func:`parse_fhir_datetime`): the caller reports it or, for an optional
  element such as a period end, treats it as absent;
* a window reaching past the calendar (a lookback from year 1, an age of 18 years for someone born
  in 9999) stops at its edge (:func:`shift`, :func:`age_reached`): nobody is ever old enough to
  need a date after 9999-12-31;
* ``--as-of`` and ``--since`` must lie in :data:`AS_OF_RANGE` (:func:`parse_as_of`); anything else is
  a typo, and would make windows reach past the calendar.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta

__all__ = [
    "AS_OF_RANGE",
    "EARLIEST",
    "LATEST",
    "age_in_days",
    "format_instant",
    "parse_as_of",
    "parse_duration",
    "parse_fhir_date",
    "parse_fhir_datetime",
    "shift",
    "to_utc",
    "years_between",
]

_YEAR = re.compile(r"^(\d{4})$")
_YEAR_MONTH = re.compile(r"^(\d{4})-(\d{2})$")
_fromiso = datetime.fromisoformat

EARLIEST = datetime.min.replace(tzinfo=UTC)
"""The first instant a ``datetime`` holds (0001-01-01T00:00:00Z)."""
LATEST = datetime.max.replace(tzinfo=UTC)
"""The last instant a ``datetime`` holds (9999-12-31T23:59:59.999999Z)."""
AS_OF_RANGE = (datetime(1900, 1, 1, tzinfo=UTC), datetime(9000, 1, 1, tzinfo=UTC))
"""The ``--as-of``/``--since`` values accepted: from 1900-01-01 up to (not including) 9000-01-01,
UTC. Lab data from before 1900 does not exist, and either bound leaves centuries of room for any
lookback, trend window or age computed from it."""


def to_utc(moment: datetime) -> datetime | None:
    """``moment`` in UTC (a naive one is taken as UTC); ``None`` when that instant is outside the
    years 1-9999 (e.g. ``0001-01-01T00:00:00+01:00``), which no ``datetime`` can hold."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        return None


def shift(moment: datetime, delta: timedelta) -> datetime:
    """``moment + delta``, stopped at the edges of the calendar (:data:`EARLIEST`,
    :data:`LATEST`) instead of raising ``OverflowError``: a lookback of 30 days from 0001-01-02
    starts at 0001-01-01."""
    try:
        return moment + delta
    except OverflowError:
        return LATEST if delta > timedelta(0) else EARLIEST


def parse_fhir_datetime(value: str | None) -> datetime | None:
    """Parse a FHIR ``date``/``dateTime``/``instant``; ``None`` when absent or invalid (an instant
    outside the years 1-9999 in UTC included, see :func:`to_utc`)."""
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
    return to_utc(parsed)


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
    """Parse an ``--as-of`` (or ``--since``) value.

    A bare date means the *end* of that day in UTC, so ``--as-of 2011-03-04`` includes results taken
    on the 4th. A date-time without a zone is UTC. The instant must lie in :data:`AS_OF_RANGE`.

    Raises:
        ValueError: empty, not an ISO 8601 date or date-time, or outside :data:`AS_OF_RANGE`; the
            message says which.
    """
    text = value.strip()
    if not text:
        raise ValueError("empty: give an ISO 8601 date or date-time, or leave the option out")
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            day = date.fromisoformat(text)
            moment: datetime | None = datetime(day.year, day.month, day.day, 23, 59, 59, tzinfo=UTC)
        else:
            moment = to_utc(_fromiso(text.replace("z", "Z")))
    except ValueError:
        raise ValueError(
            "not an ISO 8601 date or date-time (e.g. 2024-05-01 or 2024-05-01T08:00:00Z)"
        ) from None
    low, high = AS_OF_RANGE
    if moment is None or not low <= moment < high:
        raise ValueError(
            f"outside the supported range {low.date().isoformat()} to "
            f"{(high - timedelta(days=1)).date().isoformat()} (UTC)"
        )
    return moment


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


def _add_months(day: date, months: int) -> date | None:
    """``day`` plus ``months`` calendar months; ``None`` when that is after 9999-12-31."""
    month_index = day.month - 1 + months
    year = day.year + month_index // 12
    month = month_index % 12 + 1
    if year > date.max.year:
        return None
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
    reached = _add_months(birth, months)
    # An age reached only after 9999-12-31 (a birthDate in the far future) is never reached.
    return reached is not None and on >= reached


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
