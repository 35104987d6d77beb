"""The evaluator's decisions as data: what it looked at for each finding kind, and why.

:func:`fhir_leuko.core.evaluate.evaluate` fills these when it is given a ``trace`` list; nothing
here decides anything. They answer "why did this patient get (no) alert?" (``fhir-leuko explain``),
"why was nothing found?" (one line after ``fhir-leuko evaluate``), and give the report's plots their
limits and grade bands, all from the one set of rules in :mod:`.evaluate`.

A result the normaliser could not use at all (an unknown unit, a status that never counts, no
value) never reaches the evaluator: :class:`~fhir_leuko.core.model.UnusedResult` in the dataset
says which, and the input problem of the same resource says why.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from .model import Finding, FindingKind, LabResult, LowerLimit, PatientRecord
from .profiles import Band

__all__ = [
    "Decision",
    "NotUsed",
    "Outcome",
    "ProfileSkip",
    "ResultUse",
    "Silence",
    "latest_result_time",
    "silence_of",
]


class Outcome(enum.StrEnum):
    """How the decision for one finding kind ended."""

    FINDING = "finding"
    """A result counted and fell in a band."""
    NOT_LOW = "not-low"
    """A result counted and was not low enough for any band."""
    NO_RESULT = "no-result"
    """A profile decided, but no result of the analyte counted (none in the lookback, or none
    with an accepted status)."""
    NO_PROFILE = "no-profile"
    """No profile in force has a rule for this kind that applies to this patient."""
    DECEASED = "deceased"
    """The patient is recorded as deceased at ``as_of``: no alert."""


class NotUsed(enum.StrEnum):
    """Why a result of the analyte was not the one that counted."""

    PART = "part"
    """A fraction, or a segmented or band-form count: it enters only through a derived total."""
    STATUS = "status"
    """Its status is not one the profile accepts (e.g. ``preliminary``)."""
    BEFORE_LOOKBACK = "before-lookback"
    """Taken before the lookback window."""
    AFTER_AS_OF = "after-as-of"
    """Taken after ``as_of``."""
    SUPERSEDED = "superseded"
    """Usable, but a later result (or at the same time a measured or corrected one) counted."""


@dataclass(frozen=True, slots=True)
class ResultUse:
    """One result of the analyte, and whether it counted (``reason`` is ``None`` when it did)."""

    result: LabResult
    reason: NotUsed | None


@dataclass(frozen=True, slots=True)
class ProfileSkip:
    """A profile passed over for a kind before one decided, and why."""

    profile_id: str
    profile_version: str
    reason: str


@dataclass(frozen=True, slots=True)
class Decision:
    """The evaluator's decision for one patient and one finding kind."""

    kind: FindingKind
    outcome: Outcome
    as_of: datetime
    skipped: tuple[ProfileSkip, ...] = ()
    profile_id: str = ""
    profile_version: str = ""
    profile_title: str = ""
    lookback: timedelta | None = None
    statuses: tuple[str, ...] = ()
    result: LabResult | None = None
    """The result that counted."""
    uses: tuple[ResultUse, ...] = ()
    """Every total absolute count (and part) of the analyte the record holds, oldest first."""
    lower_limit: LowerLimit | None = None
    grading_name: str = ""
    grading_version: str = ""
    bands: tuple[Band, ...] = ()
    """The grading's bands, shallowest first (as the profile lists them)."""
    finding: Finding | None = None


def latest_result_time(record: PatientRecord) -> datetime | None:
    """The time of the patient's latest white-cell result (``--as-of latest``), or ``None``."""
    return max((r.effective for r in record.results), default=None)


@dataclass
class Silence:
    """Why an evaluation found nothing, in numbers (``fhir-leuko evaluate``'s one line)."""

    patients: int = 0
    with_results: int = 0
    """Patients with at least one white-cell result."""
    outcomes: Counter[Outcome] = field(default_factory=Counter)
    """Per patient, the best outcome over its finding kinds (not-low beats no-result ...)."""
    not_used: Counter[NotUsed] = field(default_factory=Counter)
    """Why results of the decided kinds did not count, over all patients."""
    statuses: Counter[str] = field(default_factory=Counter)
    """The statuses of the results left out for their status."""
    earliest: datetime | None = None
    latest: datetime | None = None
    """The first and the last white-cell result of any patient."""
    lookbacks: tuple[int, ...] = ()
    """The lookbacks (days) of the profiles that decided."""
    as_of: datetime | None = None
    """The one ``as_of`` (``None`` when each patient had their own: ``--as-of latest``)."""


_OUTCOME_ORDER = (
    Outcome.FINDING,
    Outcome.NOT_LOW,
    Outcome.NO_RESULT,
    Outcome.DECEASED,
    Outcome.NO_PROFILE,
)


def silence_of(
    traced: Iterable[tuple[PatientRecord, Sequence[Decision]]], as_of: datetime | None
) -> Silence:
    """Sum up the decisions of an evaluation (each patient's record and its traced decisions)."""
    out = Silence(as_of=as_of)
    lookbacks: set[int] = set()
    for record, decisions in traced:
        out.patients += 1
        if record.results:
            out.with_results += 1
            # A record's results are sorted by time (normalise).
            first, last = record.results[0].effective, record.results[-1].effective
            out.earliest = first if out.earliest is None else min(out.earliest, first)
            out.latest = last if out.latest is None else max(out.latest, last)
        seen = {d.outcome for d in decisions}
        best = next((o for o in _OUTCOME_ORDER if o in seen), Outcome.NO_PROFILE)
        out.outcomes[best] += 1
        for decision in decisions:
            if decision.lookback is not None:
                lookbacks.add(decision.lookback.days)
            for use in decision.uses:
                if use.reason is not None and use.reason is not NotUsed.PART:
                    out.not_used[use.reason] += 1
                    if use.reason is NotUsed.STATUS:
                        out.statuses[use.result.status] += 1
    out.lookbacks = tuple(sorted(lookbacks))
    return out
