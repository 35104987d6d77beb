"""``fhir-leuko explain PATIENT``: one patient's results and the evaluator's decisions, as text.

Everything shown comes from the decisions :func:`fhir_leuko.core.evaluate.evaluate` traced
(:mod:`fhir_leuko.core.decision`), the patient's record, the results normalising could not use and
the input problems; this module only words them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from ..core.decision import Decision, NotUsed, Outcome
from ..core.explain import UNIT, explain, format_count, reference_of, value_text
from ..core.fhirtime import format_instant, shift
from ..core.model import LabResult, Measure, PatientRecord, Problem, UnusedResult
from ..core.profiles import Band

__all__ = ["PatientExplanation", "explain_text"]


@dataclass(frozen=True)
class PatientExplanation:
    """What ``explain`` shows for one patient: all of it from the core."""

    record: PatientRecord
    as_of: datetime | None
    """``None``: ``--as-of latest`` and the patient has no result."""
    latest: bool
    decisions: Sequence[Decision]
    unused: Sequence[UnusedResult]
    problems: Sequence[Problem]
    """Input problems of this patient's resources (matched by resource key)."""
    profiles: Sequence[tuple[str, str]]
    """``(id, version)`` of every profile in force."""


_WHY = {
    NotUsed.PART: "a part: counts only through a derived total",
    NotUsed.STATUS: "status {status} is not accepted by {profile}",
    NotUsed.BEFORE_LOOKBACK: "before the {lookback}-day lookback",
    NotUsed.AFTER_AS_OF: "after as-of",
    NotUsed.SUPERSEDED: "superseded by the result that counted",
}


def _shown(result: LabResult) -> str:
    if result.measure is Measure.COUNT:
        return value_text(result)
    return f"{result.reported} (fraction)"


def _source(result: LabResult) -> str:
    if result.derived:
        return f"derived: {result.derivation}"
    return reference_of(result.key)


def _band_text(bands: Sequence[Band], limit: float | None) -> str:
    parts: list[str] = []
    for band in bands:
        if band.below == "lower-limit":
            edge = f"< {format_count(limit)}" if limit is not None else "< the lower limit"
        else:
            edge = f"< {format_count(band.below)}"
        parts.append(f"{band.grade} {edge}")
    return "; ".join(parts)


def _decision_lines(decision: Decision) -> list[str]:
    kind = decision.kind.value
    outcome = decision.outcome
    if outcome is Outcome.NO_PROFILE:
        lines = [f"{kind}: no profile in force decides for this patient"]
        lines += [
            f"  passed over {s.profile_id} {s.profile_version}: {s.reason}"
            for s in decision.skipped
        ]
        return lines
    if outcome is Outcome.DECEASED:
        return [f"{kind}: no alert: the patient is recorded as deceased at as-of"]
    finding = decision.finding
    if finding is not None:
        head = (
            f"{kind}: FINDING: {finding.term}, {finding.grade_label}, {finding.severity} severity"
        )
    elif outcome is Outcome.NOT_LOW:
        head = f"{kind}: no finding: the result that counted is not low"
    else:
        head = f"{kind}: no finding: no result counted"
    lines = [head]
    lines.append(
        f"  decided by {decision.profile_title} [{decision.profile_id} {decision.profile_version}]"
    )
    lines += [
        f"  passed over {s.profile_id} {s.profile_version}: {s.reason}" for s in decision.skipped
    ]
    if decision.lookback is not None:
        start = shift(decision.as_of, -decision.lookback)
        lines.append(
            f"  counts: the latest {', '.join(decision.statuses)} result from "
            f"{format_instant(start)} to {format_instant(decision.as_of)} "
            f"({decision.lookback.days}-day lookback)"
        )
    if decision.uses:
        lines.append("  results:")
        for use in decision.uses:
            result = use.result
            if use.reason is None:
                why = "COUNTED"
            else:
                why = _WHY[use.reason].format(
                    status=result.status,
                    profile=decision.profile_id,
                    lookback=decision.lookback.days if decision.lookback else "?",
                )
            lines.append(
                f"    {result.effective_text:<25} {_shown(result):<20} {result.status:<11} "
                f"{_source(result)}: {why}"
            )
    limit = decision.lower_limit
    if limit is not None and finding is None:
        if limit.value is not None:
            lines.append(f"  lower limit: {format_count(limit.value)} {UNIT}, from {limit.source}")
        else:
            lines.append(f"  lower limit: none ({limit.source})")
    if decision.bands and decision.result is not None:
        lines.append(
            f"  grading {decision.grading_name} ({decision.grading_version}): "
            f"{_band_text(decision.bands, limit.value if limit else None)} {UNIT}"
        )
    if finding is not None:
        lines += [f"  {line}" for line in explain(finding).lines()[1:]]
    elif outcome is Outcome.NOT_LOW and decision.result is not None:
        lines.append(
            f"  {value_text(decision.result)} on {decision.result.effective_text} is in no band"
        )
    return lines


def explain_text(data: PatientExplanation) -> str:
    """The whole explanation of one patient, as lines of text."""
    record = data.record
    when = ("as of their latest result" if data.latest else "as of") + (
        f" {format_instant(data.as_of)}" if data.as_of else ": no result"
    )
    born = (
        f", born {record.birth_date.isoformat()}" if record.birth_date else ", birth date unknown"
    )
    lines = [f"{record.key} {when}{born}"]
    lines.append(
        "profiles in force: " + (", ".join(f"{i} {v}" for i, v in data.profiles) or "none")
    )
    lines.append("")
    findings = [d.finding for d in data.decisions if d.finding is not None]
    none_read: list[str] = []
    for decision in data.decisions:
        if decision.outcome is Outcome.NO_RESULT and not decision.uses:
            none_read.append(f"{decision.kind.value} ({decision.profile_id})")
            continue
        lines.extend(_decision_lines(decision))
        lines.append("")
    if none_read:
        lines.append(f"no result of the analyte read, nothing to decide: {', '.join(none_read)}")
        lines.append("")
    if data.unused:
        reasons: dict[str, list[str]] = {}
        for problem in data.problems:
            reasons.setdefault(problem.resource, []).append(problem.reason)
        lines.append("read but not usable (normalising):")
        for unused in data.unused:
            why = "; ".join(reasons.get(unused.key, [])) or (
                f"status {unused.status or '(none)'}: never counts"
            )
            lines.append(
                f"    {unused.effective_text or 'no time':<25} {unused.analyte.value:<12} "
                f"{unused.key}: {why}"
            )
        lines.append("")
    if not data.decisions and data.as_of is None:
        lines.append("decision: nothing to evaluate: no white-cell result of this patient was read")
    elif findings:
        listed = "; ".join(f"{f.kind.value} ({f.grade_label}, {f.severity})" for f in findings)
        lines.append(
            f"decision: {len(findings)} finding{'s' if len(findings) != 1 else ''}: {listed}"
        )
    else:
        lines.append("decision: no finding (each kind above says why)")
    return "\n".join(lines) + "\n"
