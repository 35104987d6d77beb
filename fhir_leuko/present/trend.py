"""The data of a patient's trend plot, from the evaluator's decisions: plain and JSON-ready.

:func:`trend_data` picks, for each analyte the evaluator decided on, the results it looked at
(their times, values and whether they counted), the lower limit, the grade bands of the profile
that decided, and the implicated drugs' active periods. The report draws it at once
(:mod:`.plot`); the CDS service stores it with the card (:meth:`TrendData.to_json`) and draws it
when the card's page is opened.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from ..core.decision import Decision, NotUsed
from ..core.explain import reference_of
from ..core.fhirtime import format_instant, parse_fhir_datetime
from ..core.model import FINDING_ANALYTE, Analyte, Finding, Form, Measure
from .rows import grade_short

__all__ = ["SHORT", "BandArea", "DrugBar", "Panel", "Point", "TrendData", "trend_data"]

_ORDER = list(Analyte)
SHORT = {
    Analyte.WBC: "WBC",
    Analyte.NEUTROPHILS: "ANC",
    Analyte.LYMPHOCYTES: "Lymphocytes",
    Analyte.MONOCYTES: "Monocytes",
    Analyte.EOSINOPHILS: "Eosinophils",
    Analyte.BASOPHILS: "Basophils",
}
DEFAULT_DAYS = 180
"""How far back a plot reaches when the profile says nothing (its ``trend_days``)."""


@dataclass(frozen=True, slots=True)
class Point:
    at: str
    """ISO 8601 instant (UTC)."""
    value: float
    comparator: str
    state: str
    """``counted`` (the value that counted), ``valid`` (a valid value that did not count: older,
    or before the lookback) or ``not-accepted`` (a status the profile does not accept)."""


@dataclass(frozen=True, slots=True)
class BandArea:
    grade: str
    top: float
    bottom: float
    severity: str


@dataclass(frozen=True, slots=True)
class Panel:
    analyte: str
    title: str
    points: tuple[Point, ...]
    lower_limit: float | None = None
    bands: tuple[BandArea, ...] = ()
    finding: str = ""
    """The finding on this analyte in a few words (``neutropenia, moderate (high)``), if any."""


@dataclass(frozen=True, slots=True)
class DrugBar:
    label: str
    start: str | None
    end: str | None
    """``None``: still active (drawn to the as-of time)."""
    reference: str


@dataclass(frozen=True, slots=True)
class TrendData:
    start: str
    end: str
    panels: tuple[Panel, ...]
    drugs: tuple[DrugBar, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        """As JSON-ready dicts and lists (built by hand: ``dataclasses.asdict`` deep-copies and
        costs milliseconds per card on a busy service)."""
        return {
            "start": self.start,
            "end": self.end,
            "panels": [
                {
                    "analyte": p.analyte,
                    "title": p.title,
                    "points": [
                        {
                            "at": x.at,
                            "value": x.value,
                            "comparator": x.comparator,
                            "state": x.state,
                        }
                        for x in p.points
                    ],
                    "lower_limit": p.lower_limit,
                    "bands": [
                        {"grade": b.grade, "top": b.top, "bottom": b.bottom, "severity": b.severity}
                        for b in p.bands
                    ],
                    "finding": p.finding,
                }
                for p in self.panels
            ],
            "drugs": [
                {"label": d.label, "start": d.start, "end": d.end, "reference": d.reference}
                for d in self.drugs
            ],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrendData:
        panels = tuple(
            Panel(
                analyte=p["analyte"],
                title=p["title"],
                points=tuple(Point(**x) for x in p["points"]),
                lower_limit=p.get("lower_limit"),
                bands=tuple(BandArea(**b) for b in p.get("bands", ())),
                finding=p.get("finding", ""),
            )
            for p in data["panels"]
        )
        drugs = tuple(DrugBar(**d) for d in data.get("drugs", ()))
        return cls(start=data["start"], end=data["end"], panels=panels, drugs=drugs)


def _bands(decision: Decision, limit: float | None) -> tuple[BandArea, ...]:
    edges: list[tuple[str, float, str]] = []
    for band in decision.bands:
        edge = limit if band.below == "lower-limit" else band.below
        if edge is None:
            continue
        edges.append((band.grade, float(edge), band.severity))
    out: list[BandArea] = []
    for index, (grade, top, severity) in enumerate(edges):
        bottom = edges[index + 1][1] if index + 1 < len(edges) else 0.0
        if top > bottom:
            out.append(BandArea(grade, top, bottom, severity))
    return tuple(out)


def _utc(moment: datetime) -> str:
    # Results are held in UTC already (normalise); isoformat is several times cheaper than
    # format_instant's strftime, and this runs per point on every CDS card.
    if moment.utcoffset() == timedelta(0):
        return moment.isoformat()
    return format_instant(moment)


def trend_data(
    decisions: Sequence[Decision], findings: Sequence[Finding], *, days: int = DEFAULT_DAYS
) -> TrendData | None:
    """The plot of one patient's decisions (``None`` when no decision looked at a result).

    Panels: WBC and ANC, and every other analyte with a finding; each with the results the
    evaluator looked at from ``days`` before as-of, the lower limit and the grade bands of the
    profile that decided. Drugs: the implicated exposures of the findings.
    """
    if not decisions:
        return None
    as_of = decisions[0].as_of
    start = as_of - timedelta(days=days)
    found = {f.kind for f in findings}
    panels: list[tuple[int, Panel]] = []
    for decision in decisions:
        analyte = FINDING_ANALYTE[decision.kind]
        if analyte not in (Analyte.WBC, Analyte.NEUTROPHILS) and decision.kind not in found:
            continue
        points: list[Point] = []
        for use in decision.uses:
            result = use.result
            if result.measure is not Measure.COUNT or result.form is not Form.TOTAL:
                continue
            if use.reason is NotUsed.AFTER_AS_OF or result.effective < start:
                continue
            state = (
                "counted"
                if use.reason is None
                else "not-accepted"
                if use.reason is NotUsed.STATUS
                else "valid"
            )
            points.append(
                Point(_utc(result.effective), result.value, result.comparator or "", state)
            )
        if not points:
            continue
        limit = decision.lower_limit.value if decision.lower_limit is not None else None
        finding = decision.finding
        panels.append(
            (
                _ORDER.index(analyte),
                Panel(
                    analyte=analyte.value,
                    title=f"{SHORT[analyte]} ({analyte.label})",
                    points=tuple(points),
                    lower_limit=limit,
                    bands=_bands(decision, limit),
                    finding=f"{grade_short(finding)}, {finding.severity} severity"
                    if finding is not None
                    else "",
                ),
            )
        )
    if not panels:
        return None
    drugs: dict[str, DrugBar] = {}
    for finding in findings:
        for drug in finding.implicated:
            exposure = drug.exposure
            key = exposure.key
            if key in drugs:
                continue
            drugs[key] = DrugBar(
                label=", ".join(drug.drug_labels),
                start=_utc(exposure.start) if exposure.start is not None else None,
                end=_utc(exposure.end) if exposure.end is not None else None,
                reference=reference_of(key),
            )
    return TrendData(
        start=_utc(start),
        end=_utc(as_of),
        panels=tuple(p for _, p in sorted(panels, key=lambda x: x[0])),
        drugs=tuple(drugs[k] for k in sorted(drugs)),
    )


def parse_time(text: str) -> datetime:
    """An instant of :class:`TrendData` back as a datetime."""
    moment = parse_fhir_datetime(text)
    assert moment is not None
    return moment
