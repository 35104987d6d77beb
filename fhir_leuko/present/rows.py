"""One row per finding: the columns of ``--format table`` and ``--format csv``.

patient | finding | severity | value | date | trend | drug | profile, most severe first.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import astuple, dataclass

from ..core.explain import drug_line, trend_line, value_text
from ..core.model import Finding, FindingKind

__all__ = ["COLUMNS", "SEVERITY_RANK", "Row", "finding_rows", "grade_short", "sort_findings"]

COLUMNS = ("patient", "finding", "severity", "value", "date", "trend", "drug", "profile")

SEVERITY_RANK = {"high": 3, "moderate": 2, "low": 1}

# At equal severity: neutropenia first (the infection risk), then the total count, then the rest.
_KIND_ORDER = {
    kind: index
    for index, kind in enumerate(
        (
            FindingKind.NEUTROPENIA,
            FindingKind.LEUKOPENIA,
            FindingKind.LYMPHOPENIA,
            FindingKind.MONOCYTOPENIA,
            FindingKind.EOSINOPENIA,
            FindingKind.BASOPENIA,
        )
    )
}


@dataclass(frozen=True, slots=True)
class Row:
    patient: str
    finding: str
    severity: str
    value: str
    date: str
    trend: str
    drug: str
    profile: str

    def cells(self) -> tuple[str, ...]:
        return astuple(self)


def sort_findings(findings: Iterable[Finding]) -> list[Finding]:
    """Most severe first; then neutropenia, leukopenia, the others; then by patient and value."""
    return sorted(
        findings,
        key=lambda f: (
            -SEVERITY_RANK.get(f.severity, 0),
            _KIND_ORDER[f.kind],
            f.result.value,
            f.patient,
        ),
    )


def grade_short(finding: Finding) -> str:
    """``neutropenia grade 3`` for a numbered grade, else ``neutropenia (severe)``: the grade as
    the profile names it."""
    kind = finding.kind.value
    return (
        f"{kind} grade {finding.grade}" if finding.grade.isdigit() else f"{kind} ({finding.grade})"
    )


def finding_rows(findings: Iterable[Finding]) -> list[Row]:
    """The rows of these findings, most severe first."""
    rows: list[Row] = []
    for finding in sort_findings(findings):
        result = finding.result
        rows.append(
            Row(
                patient=finding.patient,
                finding=grade_short(finding),
                severity=finding.severity,
                value=value_text(result),
                date=result.effective_text[:10],
                trend=trend_line(finding, compact=True),
                drug=drug_line(finding),
                profile=f"{finding.profile_id} {finding.profile_version}",
            )
        )
    return rows
