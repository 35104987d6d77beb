"""What evaluating one patient's record gave the job: its findings, or why it could not be used.

A pass evaluates a patient in its own process (``run``) or on a worker (``run --bulk`` with
``[scale]`` workers, :mod:`.bulkshards`); either way the planner and the writer take a
:class:`Verdict`, so the same record gives the same writes wherever it was evaluated.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime

from ..core.evaluate import evaluate
from ..core.model import Finding, PatientRecord, quoted
from ..core.profiles import ProfileSet

__all__ = ["Verdict", "judge", "unusable"]

log = logging.getLogger(__name__)


@dataclass
class Verdict:
    record: PatientRecord
    """The record evaluated (a worker sends only what planning reads: see :mod:`.bulkshards`)."""
    findings: list[Finding] = field(default_factory=list)
    failure: str | None = None
    """Why the record could not be evaluated: the patient fails alone, named with it."""


def judge(record: PatientRecord, profiles: ProfileSet, as_of: datetime) -> Verdict:
    """Evaluate one record; anything the core raises fails this patient only."""
    try:
        return Verdict(record, evaluate(record, profiles, as_of=as_of))
    except Exception as exc:  # a record the core cannot evaluate fails alone
        return Verdict(record, failure=unusable("its record", exc))


def unusable(what: str, exc: Exception) -> str:
    """Why a patient failed on an error nobody planned for: one line naming it (capped: it may
    quote input), its traceback in the debug log (-vv)."""
    log.debug("%s could not be used", what, exc_info=exc)
    detail = quoted(str(exc).replace("\n", " "))
    return f"{what} could not be used ({type(exc).__name__}{': ' + detail if detail else ''})"
