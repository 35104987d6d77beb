"""DiagnosticReports and panels: what they pass down to the lab results they list.

An Observation without its own subject or time inherits them from the DiagnosticReport that lists
it in ``result``, or from the panel Observation that lists it in ``hasMember`` (nested panels too),
as in the HL7 R4 CBC example (Bundle 101). Every listed result also takes the report (or panel) as
its group when it has no specimen: values of one group are one blood count (derivation). Contained
Observations of a report are read here and handed to :class:`~.results.LabResults`.

A report that was withdrawn (status ``entered-in-error``) or ``cancelled`` takes its results with
it: they do not count, whatever their own status (the lab retracted the whole report), and each is
named as a problem. This wins over another report that lists the same result: a count the lab has
retracted once is never graded (issue 13 §5).
"""

from __future__ import annotations

from ..fhirjson import (
    DiagnosticReport,
    MalformedResourceError,
    Observation,
    Origin,
    Reference,
    decode_resource,
)
from ..model import UnusedResult
from .dataset import Problems
from .results import LabResults, Panel, Pending, effective_text

__all__ = ["Reports"]

# R4 DiagnosticReportStatus: the report, and so every result in it, does not stand.
_WITHDRAWN = {"entered-in-error": "withdrawn (entered-in-error)", "cancelled": "cancelled"}


class Reports:
    """The DiagnosticReports read, and the linking of their results once everything is in."""

    def __init__(self, labs: LabResults, problems: Problems) -> None:
        self.labs = labs
        self.problems = problems
        self.reports: list[tuple[DiagnosticReport, str, Origin]] = []

    def add(self, report: DiagnosticReport, key: str, origin: Origin) -> None:
        self.reports.append((report, key, origin))
        for raw in report.contained:
            self.add_contained(raw, key, origin)

    def add_contained(self, raw: bytes, container: str, origin: Origin) -> None:
        try:
            inner = decode_resource(raw)
        except MalformedResourceError as exc:
            self.problems.report(origin, container, f"contained resource {exc.label}: {exc.reason}")
            return
        if isinstance(inner, Observation) and inner.id:
            self.labs.add(inner, f"{container}#{inner.id}", origin)

    def link(self) -> None:
        """Drop the results of withdrawn reports, then pass each report's and panel's subject,
        time and group to the results it lists."""
        kept: list[tuple[DiagnosticReport, str, Origin]] = []
        for report, key, origin in sorted(self.reports, key=lambda item: item[1]):
            if report.status in _WITHDRAWN:
                subject = self.labs.identity.subject_of(report.subject, key, report.contained)
                why = _WITHDRAWN[report.status]
                self.withdraw(report.result, key, key, why, origin, subject, {key})
            else:
                kept.append((report, key, origin))
        for report, key, _origin in kept:
            effective = effective_text(
                report.effectiveDateTime, report.effectivePeriod, report.issued
            )
            subject = self.labs.identity.subject_of(report.subject, key, report.contained)
            self.link_members(report.result, key, subject, effective, key, {key})
        for panel in sorted(self.labs.panels.values(), key=lambda p: p.key):
            self.link_members(
                panel.members,
                panel.key,
                panel.subject,
                panel.effective_text,
                panel.key,
                {panel.key},
            )
        # Nothing resolves a DiagnosticReport after this: let them go before the results are built.
        self.reports.clear()

    def withdraw(
        self,
        members: list[Reference],
        container: str,
        report: str,
        why: str,
        origin: Origin,
        subject: str | None,
        seen: set[str],
    ) -> None:
        """Take the results a withdrawn report lists (through its panels too) out of the count."""
        labs = self.labs
        for member in members:
            reference = member.reference
            if not reference:
                continue
            target = labs.results.get(reference) or labs.find(reference, container)
            if target is None:
                continue
            if isinstance(target, Panel):
                if target.key not in seen:
                    seen.add(target.key)
                    self.withdraw(target.members, target.key, report, why, origin, subject, seen)
                continue
            labs.set_aside(
                target.key, target.obs.status if isinstance(target, Pending) else target.status
            )
            # Kept with its patient as a result that could not be used (fhir-leuko explain).
            if isinstance(target, Pending):
                unused = UnusedResult(
                    target.key, target.info.analyte, target.obs.status, target.effective_text
                )
                who = target.subject or subject
            else:
                unused = UnusedResult(
                    target.key, target.analyte, target.status, target.effective_text
                )
                who = target.patient
            if who is not None:
                labs.unused[target.key] = (who, unused)
            self.problems.report(
                origin,
                target.key,
                f"not counted: {report}, which lists it, is {why}",
                "withdrawn",
            )

    def link_members(
        self,
        members: list[Reference],
        container: str,
        subject: str | None,
        effective_text: str | None,
        group: str,
        seen: set[str],
    ) -> None:
        results = self.labs.results
        find = self.labs.find
        for member in members:
            reference = member.reference
            if not reference:
                continue
            # Usually the reference is the key of a result already built: the group is all it
            # needs from its report (a million times for a million Observations).
            built = results.get(reference)
            if built is not None:
                if not built.group:
                    built.group = group
                if not built.report:
                    built.report = group
                continue
            target = find(reference, container)
            if target is None:
                continue
            if isinstance(target, Panel):
                if target.key in seen:
                    continue  # hasMember cycles exist in the wild; follow each panel once
                seen.add(target.key)
                self.link_members(
                    target.members,
                    target.key,
                    target.subject or subject,
                    target.effective_text or effective_text,
                    group,
                    seen,
                )
                continue
            if isinstance(target, Pending):
                if target.subject is None:
                    target.subject = subject
                if target.effective_text is None:
                    target.effective_text = effective_text
            if not target.group:
                target.group = group
            if not target.report:
                target.report = group
