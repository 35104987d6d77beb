"""The words of a finding: every alert explains itself (values, units, dates, rule and version, source).

One place builds the sentences; ``detectedissue`` joins them as plain text and the CDS service as
markdown, so the scheduled job and the service always say the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass

from .model import QUOTE_LIMIT, Finding, LabResult, local_key, quoted

__all__ = [
    "Explanation",
    "drug_line",
    "explain",
    "format_count",
    "reference_of",
    "trend_line",
    "value_text",
]

UNIT = "×10⁹/L"


def format_count(value: float) -> str:
    """A count in 10*9/L: at most 3 decimals, at least one (4.0, 0.9, 1.25, 0.007)."""
    text = f"{value:.3f}".rstrip("0")
    if text.endswith(".") and value == 0:
        return "0"
    if text in ("0.", "-0.") and value > 0:
        text = f"{value:.6f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def value_text(result: LabResult, *, unit: bool = True) -> str:
    """A count with its comparator (and unit): ``< 0.1 ×10⁹/L``."""
    prefix = {"<": "< ", "<=": "≤ ", ">": "> ", ">=": "≥ "}.get(result.comparator or "", "")
    return f"{prefix}{format_count(result.value)}" + (f" {UNIT}" if unit else "")


_value = value_text

_SHOWN_IN_LINE = 4
_STEADY = 0.1
"""A change under 10 % of the first value is called steady in the one-line trend."""


def trend_line(finding: Finding, *, compact: bool = False) -> str:
    """The trend in one line, oldest first: ``3.1 → 1.8 → 0.9 ×10⁹/L, falling over 14 days``
    (``compact``: ``3.1 → 1.8 → 0.9 falling``, for a table that shows the unit elsewhere).

    Only the values the finding already holds (``Finding.trend``); empty with a single value.
    """
    trend = finding.trend[-_SHOWN_IN_LINE:]
    if len(trend) < 2:
        return ""
    first, last = trend[0], trend[-1]
    change = last.value - first.value
    if abs(change) <= _STEADY * first.value:
        word = "steady"
    else:
        word = "falling" if change < 0 else "rising"
    days = (last.effective.date() - first.effective.date()).days
    values = " → ".join(value_text(r, unit=False) for r in trend)
    if compact:
        return f"{values} {word}"
    return f"{values} {UNIT}, {word} over {days} day{'s' if days != 1 else ''}"


def drug_line(finding: Finding) -> str:
    """The implicated drugs in a few words: ``clozapine (active)``; empty when none."""
    return "; ".join(f"{', '.join(d.drug_labels)} ({d.relation})" for d in finding.implicated)


def reference_of(key: str) -> str:
    """The FHIR reference for an internal key (a contained Observation is cited by its container)."""
    return key.split("#", 1)[0]


def _cited(key: str) -> str:
    """A resource as a sentence cites it (its reference, capped like any quoted input)."""
    return quoted(reference_of(key))


def _derived_from(result: LabResult) -> str:
    return "derived from " + " and ".join(dict.fromkeys(_cited(k) for k in result.sources))


@dataclass(frozen=True)
class Explanation:
    headline: str
    source: str
    value: str
    derivation: str
    alternatives: str
    limit: str
    flags: str
    trend: str
    drugs: list[str]
    conditions: list[str]
    recommendation: str
    rule: str
    merged: str = ""

    def body(self) -> list[str]:
        """The sentences between the headline and the recommendation: value, derivation, limit,
        trend, drugs, other causes."""
        out = [self.source] if self.source else []
        out.append(self.value)
        if self.merged:
            out.append(self.merged)
        if self.derivation:
            out.append(self.derivation)
        if self.alternatives:
            out.append(self.alternatives)
        out.append(self.limit)
        if self.flags:
            out.append(self.flags)
        if self.trend:
            out.append(self.trend)
        if self.drugs:
            out.append("Possibly implicated: " + "; ".join(self.drugs) + ".")
        else:
            out.append("No drug known to cause it was active in the window before this count.")
        if self.conditions:
            out.append("Other possible causes on record: " + "; ".join(self.conditions) + ".")
        return out

    def lines(self) -> list[str]:
        """Everything, one sentence a line (``DetectedIssue.detail``)."""
        out = [self.headline, *self.body()]
        if self.recommendation:
            out.append(f"Recommendation: {self.recommendation}")
        out.append(self.rule)
        return out


def explain(finding: Finding) -> Explanation:
    """The sentences that explain one finding."""
    result = finding.result
    what = finding.term[:1].upper() + finding.term[1:]
    headline = f"{what}: {finding.grade_label}, {finding.severity} severity."
    # Only when the input held several sources: which one this patient's records come from.
    read_from = (
        f"Source: {quoted(finding.source)} ({_cited(local_key(finding.patient, finding.source))})."
        if finding.source
        else ""
    )
    # Everything taken from the input (texts, ids, units as reported) is quoted(): capped.
    source = "derived" if result.derived else _cited(result.key)
    value = (
        f"Latest {result.analyte.label}: {_value(result)} (reported {quoted(result.reported)}) "
        f"on {quoted(result.effective_text)} [{source}, status {quoted(result.status)}]."
    )
    derivation = ""
    if result.derived:
        # Built from two or three cited results: room for each of them.
        how = quoted(result.derivation, 3 * QUOTE_LIMIT)
        derivation = (
            f"Derived from one blood draw, matched by {quoted(result.matched)}: {how}."
            if result.matched
            else f"Derived from the same specimen: {how}."
        )
    alternatives = ""
    if finding.alternatives:
        others = ", ".join(
            f"{_value(r)} ({_derived_from(r) if r.derived else _cited(r.key)})"
            for r in finding.alternatives
        )
        alternatives = (
            f"Also at this time: {others}; the lower value is graded (a missed low is worse than "
            "a noisy one)."
        )
    flags = ""
    if finding.flag_notes:
        flags = (
            "Not applied: "
            + "; ".join(finding.flag_notes)
            + " (only a confirmed Condition or an active Flag changes the thresholds)."
        )
    limit = finding.lower_limit
    if limit.value is not None:
        limit_text = f"Lower limit used: {format_count(limit.value)} {UNIT}, from {limit.source}."
    else:
        limit_text = (
            f"No lower limit is known for this result ({limit.source}); graded on the "
            f"{finding.grading_name} edges."
        )
    if limit.note:
        limit_text += f" The laboratory's reference range was not used: {quoted(limit.note, 3 * QUOTE_LIMIT)}."
    trend = ""
    if len(finding.trend) > 1:
        trend = (
            "Recent values: "
            + ", ".join(f"{_value(r)} ({quoted(r.effective_text[:10])})" for r in finding.trend)
            + "."
        )
    drugs = [
        f"{', '.join(d.drug_labels)} ({_cited(d.exposure.key)}: "
        f"{quoted(d.exposure.names[0]) if d.exposure.names else d.drug_labels[0]}; "
        f"{quoted(d.relation)})"
        for d in finding.implicated
    ]
    conditions = [f"{c.label} ({quoted(c.text)}, {_cited(c.key)})" for c in finding.conditions]
    rule = (
        f"Rule: {finding.profile_title} [{finding.profile_id} {finding.profile_version}]; "
        f"grading: {finding.grading_name} ({finding.grading_version})."
    )
    return Explanation(
        headline=headline,
        source=read_from,
        value=value,
        derivation=derivation,
        alternatives=alternatives,
        limit=limit_text,
        flags=flags,
        trend=trend,
        drugs=drugs,
        conditions=conditions,
        recommendation=finding.recommendation,
        rule=rule,
        merged=(
            "Also counted: the records of "
            + ", ".join(_cited(k) for k in finding.merged_from)
            + ", replaced by this patient's record (Patient.link)."
            if finding.merged_from
            else ""
        ),
    )
