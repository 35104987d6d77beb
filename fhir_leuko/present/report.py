"""The HTML report: one self-contained file a clinician opens in any browser, offline.

The run (as-of, inputs, profiles with versions, counts by finding and severity), the findings
most severe first with the full explanation behind each row, one trend plot per flagged patient
(:mod:`.plot`, embedded as an SVG data URI), and the input problems grouped by reason. No script,
no font, style sheet or image from anywhere else: a Content-Security-Policy in the page itself
forbids every fetch. Text from the input (patient ids, drug names) is escaped by Jinja2's
autoescape. Built from the core's findings and decisions only; needs the ``report`` extra.
"""

from __future__ import annotations

import base64
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2

from .._version import __version__
from ..core.explain import explain
from ..core.fhirtime import format_instant
from ..core.model import Finding, PatientRecord, Problem
from ..core.pipeline import AsOf, Evaluation, trace_patient
from ..core.profiles import ProfileSet
from .rows import SEVERITY_RANK, finding_rows, sort_findings
from .silence import silence_line
from .trend import TrendData, trend_data

__all__ = [
    "DEFAULT_MAX_PLOTS",
    "PatientPart",
    "ReportInput",
    "environment",
    "render_report",
    "report_from_evaluation",
    "svg_uri",
]

DEFAULT_MAX_PLOTS = 1000
"""Plots drawn at most (most severe patients first); a plot takes about 0.1-0.3 s."""

_EXAMPLES = 5

_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("fhir_leuko.present", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def environment() -> jinja2.Environment:
    """The templates of the report and the card page (autoescaped)."""
    return _ENV


@dataclass(frozen=True)
class PatientPart:
    """A flagged patient as the report shows it."""

    key: str
    as_of: datetime
    findings: Sequence[Finding]
    plot: TrendData | None


@dataclass(frozen=True)
class ReportInput:
    """Everything one report shows (built by :func:`report_from_evaluation` or by the job)."""

    title: str
    as_of: AsOf | None
    inputs: Sequence[str]
    profiles: ProfileSet
    patients_evaluated: int
    findings: Sequence[Finding]
    patients: Sequence[PatientPart]
    problems: Sequence[Problem]
    nothing_found: str = ""
    notes: Sequence[str] = ()


def report_from_evaluation(
    result: Evaluation,
    *,
    records: dict[str, PatientRecord],
    profiles: ProfileSet,
    inputs: Sequence[str],
    max_plots: int = DEFAULT_MAX_PLOTS,
) -> ReportInput:
    """The report of one ``evaluate``: the flagged patients' decisions are traced again (the
    evaluator's own data, for the plots), most severe first."""
    as_of: AsOf = result.as_of if result.as_of is not None else "latest"
    by_patient: dict[str, list[Finding]] = {}
    for finding in sort_findings(result.findings):
        by_patient.setdefault(finding.patient, []).append(finding)
    parts: list[PatientPart] = []
    for index, (key, findings) in enumerate(by_patient.items()):
        record = records.get(key)
        plot = None
        when = result.as_of_by_patient.get(key) or (as_of if isinstance(as_of, datetime) else None)
        if record is not None and index < max_plots:
            when, _found, decisions = trace_patient(record, profiles, as_of=as_of)
            plot = trend_data(decisions, findings)
        assert when is not None
        parts.append(PatientPart(key, when, findings, plot))
    notes = []
    if len(by_patient) > max_plots:
        notes.append(
            f"Plots are drawn for the {max_plots} most severe of {len(by_patient)} flagged patients."
        )
    return ReportInput(
        title="fhir-leuko report",
        as_of=as_of,
        inputs=inputs,
        profiles=profiles,
        patients_evaluated=result.patients,
        findings=result.findings,
        patients=parts,
        problems=result.problems,
        nothing_found=silence_line(result.silence, result.counts, result.problems) if result.silence else "",
        notes=notes,
    )


def svg_uri(data: TrendData) -> str:
    from .plot import render_svg  # matplotlib: imported when a plot is drawn

    svg = render_svg(data).encode()
    return "data:image/svg+xml;base64," + base64.b64encode(svg).decode("ascii")


def _problem_groups(problems: Sequence[Problem]) -> list[dict[str, Any]]:
    groups: dict[str, list[Problem]] = {}
    for problem in problems:
        groups.setdefault(problem.reason, []).append(problem)
    ordered = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    return [
        {
            "reason": reason,
            "count": len(items),
            "examples": [
                (f"{p.source}:{p.position}" if p.position else p.source)
                + (f" {p.resource}" if p.resource else "")
                for p in items[:_EXAMPLES]
            ],
        }
        for reason, items in ordered
    ]


def render_report(data: ReportInput) -> str:
    """The report as one HTML document (text)."""
    counts = Counter((f.kind.value, f.severity) for f in data.findings)
    by_severity = sorted(counts.items(), key=lambda kv: (-SEVERITY_RANK.get(kv[0][1], 0), kv[0]))
    anchors = {p.key: f"patient-{i + 1}" for i, p in enumerate(data.patients)}
    rows = [
        {
            "row": row,
            "anchor": anchors.get(finding.patient, ""),
            "lines": explain(finding).lines(),
        }
        for row, finding in zip(
            finding_rows(data.findings), sort_findings(data.findings), strict=True
        )
    ]
    patients = [
        {
            "key": part.key,
            "anchor": anchors[part.key],
            "as_of": format_instant(part.as_of),
            "plot": svg_uri(part.plot) if part.plot is not None else "",
            "findings": [
                {"headline": explain(f).headline, "lines": explain(f).lines()[1:]}
                for f in part.findings
            ],
            "severity": part.findings[0].severity,
        }
        for part in data.patients
    ]
    as_of = data.as_of
    template = _ENV.get_template("report.html.j2")
    return template.render(
        title=data.title,
        version=__version__,
        as_of=format_instant(as_of) if isinstance(as_of, datetime) else None,
        inputs=data.inputs,
        profiles=[(p.id, p.version, p.title) for p in data.profiles.profiles],
        patients_evaluated=data.patients_evaluated,
        flagged=len(data.patients),
        total=len(data.findings),
        by_severity=by_severity,
        rows=rows,
        patients=patients,
        problems=_problem_groups(data.problems),
        problem_total=len(data.problems),
        nothing_found=data.nothing_found,
        notes=data.notes,
    )
