"""The one line that says why an evaluation found nothing, from :class:`~fhir_leuko.core.decision.Silence`."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import timedelta

from ..core.decision import NotUsed, Outcome, Silence
from ..core.model import UNREADABLE_FILE, Problem

__all__ = ["silence_line"]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _lookback(silence: Silence) -> str:
    days = silence.lookbacks
    if not days:
        return "lookback"
    if len(days) == 1:
        return f"{days[0]}-day lookback"
    return f"{days[0]}- to {days[-1]}-day lookback"


def silence_line(
    silence: Silence, counts: Counter[str], problems: Sequence[Problem] = ()
) -> str:
    """Why nothing was found, in one line, with what to try; and, when files could not be read
    (whole or in part), that what they hold was not evaluated: never "nothing is low" alone."""
    unread = len({p.source for p in problems if p.reason.startswith(UNREADABLE_FILE)})
    if not unread:
        return _why(silence, counts)
    files = _plural(unread, "input file")
    if silence.with_results == 0 and not counts.get("Observation", 0):
        # Not "no Observation in the input": what could not be read may hold them.
        return f"no Observation was read, and {files} could not be read: see the input problems"
    held = "what it holds" if unread == 1 else "what they hold"
    return f"{_why(silence, counts)}; and {files} could not be read: {held} was not evaluated"


def _why(silence: Silence, counts: Counter[str]) -> str:
    if silence.with_results == 0:
        observations = counts.get("Observation", 0)
        if not observations:
            return (
                "no Observation in the input (fhir-leuko reads LOINC-coded WBC and differentials)"
            )
        return (
            f"none of the {observations} Observations is a usable white-cell result (LOINC-coded "
            "WBC or differential with a value and unit): see the input problems above"
        )
    as_of = silence.as_of
    outcomes = silence.outcomes
    evaluated = outcomes[Outcome.NOT_LOW]
    if evaluated:
        line = (
            f"{_plural(evaluated, 'patient')} had a result that counted, and none was below "
            "its lower limit"
        )
        left = outcomes[Outcome.NO_RESULT]
        if left:
            line += f"; {_plural(left, 'other patient')} had none within the {_lookback(silence)}"
        return line + ": 'fhir-leuko explain PATIENT PATH...' shows why for one patient"
    latest, earliest = silence.latest, silence.earliest
    if outcomes[Outcome.NO_RESULT] and latest is not None and earliest is not None:
        if as_of is None:
            return (
                "no result counted for any patient as of their own latest result "
                f"({_statuses(silence)}): 'fhir-leuko explain PATIENT PATH...' shows why"
            )
        if silence.not_used[NotUsed.STATUS] and not (
            silence.not_used[NotUsed.BEFORE_LOOKBACK] or silence.not_used[NotUsed.AFTER_AS_OF]
        ):
            return f"the results within the {_lookback(silence)} do not count: {_statuses(silence)}"
        if latest < as_of:
            after = (latest + timedelta(days=1)).date().isoformat()
            return (
                f"no lab result within the {_lookback(silence)} before as-of "
                f"{as_of.date().isoformat()}; the latest is from {latest.date().isoformat()}: "
                f"try --as-of {after} or --as-of latest"
            )
        if earliest > as_of:
            return (
                f"every lab result is after as-of {as_of.date().isoformat()} (the earliest is from "
                f"{earliest.date().isoformat()}): try --as-of latest"
            )
        return (
            f"no lab result within the {_lookback(silence)} before as-of "
            f"{as_of.date().isoformat()} (results from {earliest.date().isoformat()} to "
            f"{latest.date().isoformat()}): try --as-of latest"
        )
    if outcomes[Outcome.DECEASED]:
        return f"{_plural(outcomes[Outcome.DECEASED], 'patient')} recorded as deceased: no alert"
    return (
        "no profile in force applies to these patients (age, flags or drugs): "
        "'fhir-leuko profiles list' shows them, 'fhir-leuko explain PATIENT PATH...' why"
    )


def _statuses(silence: Silence) -> str:
    if not silence.statuses:
        return "none within the lookback"
    shown = ", ".join(f"{n} {status}" for status, n in silence.statuses.most_common())
    return f"status not accepted by the profiles ({shown})"
