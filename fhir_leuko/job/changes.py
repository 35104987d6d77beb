"""Which patients a pass looks at: change detection and the patients of a full pass.

Incremental (the default): ``Observation`` (the mapped LOINC codes), ``DiagnosticReport`` and the
medication records (``MedicationRequest``, ``MedicationStatement``, ``MedicationAdministration``,
``MedicationDispense``) with ``_lastUpdated=gt<watermark - overlap>``,
sorted by ``_lastUpdated`` (and ``_id``), walked in windows at a (lastUpdated, id) cursor
(:class:`ChangeWalk`, :mod:`fhir_leuko.job.walk`); resource versions already handled inside the
overlap (``seen``) are skipped, so an unchanged server costs one request per resource type. A
:class:`Batch` groups the changes by patient and says where the watermark may move once the
patients before it are handled. A full pass takes every patient with a lab result (or a lab
report) in the lookback, checked against the server's count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from ..core.fhirjson import DiagnosticReport as DiagnosticReportStruct
from ..core.fhirjson import (
    MedicationAdministration,
    MedicationDispense,
    MedicationRequest,
    MedicationStatement,
    Observation,
    iter_document,
)
from ..core.fhirtime import format_instant, parse_fhir_datetime
from ..core.model import Problem
from .patients import patient_key

if TYPE_CHECKING:
    from .runner import Job, PassReport

__all__ = ["CHANGE_TYPES", "Batch", "Change", "ChangeWalk", "full_patients"]

CHANGE_TYPES = (
    "Observation",
    "DiagnosticReport",
    "MedicationRequest",
    "MedicationStatement",
    "MedicationAdministration",
    "MedicationDispense",
)
"""Resource types whose changes make a patient's evaluation stale: lab results, the reports that
carry (or withdraw) them, and every medication record that can expose the patient to a drug.
(Patients, Conditions and Flags change what an evaluation says only with one of these.)"""

_FLOOR = datetime.min.replace(tzinfo=UTC)

Checkpoint = Callable[[list[str], list[tuple[str, str]], list[str]], None]
"""Called after each group with the patients done, failed, and not yet handled."""
Commit = Callable[
    [list[str], list[tuple[str, str]], str | None, Iterable[tuple[str, str | None]]], None
]
"""Records done and failed patients, the watermark and the resource versions handled."""


@dataclass
class Change:
    resource: str
    last_updated: str | None
    patient: str


@dataclass
class Batch:
    """The changes of one batch, by patient, and where the watermark may move."""

    by_patient: dict[str, list[Change]]
    earliest: dict[str, tuple[datetime, str]]
    """Each patient's earliest change: (time, the server's text of it)."""
    end: str | None
    """The watermark once every patient of the batch is handled."""

    @classmethod
    def of(cls, changes: list[Change], capped: list[str], server_start: str | None) -> Batch:
        by_patient: dict[str, list[Change]] = {}
        earliest: dict[str, tuple[datetime, str]] = {}
        latest: tuple[datetime, str] | None = None
        for change in changes:
            by_patient.setdefault(change.patient, []).append(change)
            moment = parse_fhir_datetime(change.last_updated)
            if moment is None or not change.last_updated:
                continue
            mark = (moment, change.last_updated)
            if change.patient not in earliest or mark < earliest[change.patient]:
                earliest[change.patient] = mark
            if latest is None or mark > latest:
                latest = mark
        if capped:
            # A type stopped at max_changes: its later changes are not seen yet.
            end: str | None = min(capped, key=lambda t: parse_fhir_datetime(t) or _FLOOR)
        else:
            start = parse_fhir_datetime(server_start)
            marks = [m for m in (latest, (start, server_start) if start else None) if m]
            end = max(marks)[1] if marks else None
        return cls(by_patient, {p: m for p, m in earliest.items()}, end)

    def order(self, pending: list[str]) -> list[str]:
        """The patients to handle: those pending from an earlier pass first, then by change."""
        return sorted(
            set(self.by_patient) | set(pending),
            key=lambda p: (_FLOOR if p in pending else self.earliest.get(p, _FLOOR), p),
        )

    def checkpointer(self, commit: Commit) -> Checkpoint:
        def checkpoint(done: list[str], failed: list[tuple[str, str]], rest: list[str]) -> None:
            # Every change before the earliest change of a patient not yet handled is handled.
            waiting = [self.earliest[p] for p in rest if p in self.earliest]
            mark = min(waiting)[1] if waiting else self.end
            handled = [
                (c.resource, c.last_updated)
                for p in [*done, *(f for f, _ in failed)]
                for c in self.by_patient.get(p, [])
            ]
            commit(done, failed, mark, handled)

        return checkpoint


def full_patients(job: Job, report: PassReport, as_of: datetime) -> list[str]:
    """Every patient with a mapped lab result (or a lab report) in the lookback.

    Each search is walked in windows sorted by ``_lastUpdated`` (never by deep offsets) and checked
    against the server's count (:class:`~fhir_leuko.job.walk.Walker`): a scan that cannot be
    complete is a :class:`~fhir_leuko.errors.PagingError`, never a silent success."""
    start = format_instant(as_of - job.lookback)
    end = format_instant(as_of)
    page_size = str(job.options.page_size)
    found: dict[str, None] = {}
    searches: list[tuple[str, list[tuple[str, str]]]] = [
        (
            "Observation",
            [
                (job.code_param, job.codes),
                ("date", f"ge{start}"),
                ("date", f"le{end}"),
                ("_elements", "subject,meta"),
                ("_count", page_size),
            ],
        ),
        (
            "DiagnosticReport",
            [
                ("date", f"ge{start}"),
                ("date", f"le{end}"),
                ("_elements", "subject,meta"),
                ("_count", page_size),
            ],
        ),
    ]
    for rtype, params in searches:
        for page in job.walker.pages(rtype, params, count=True):
            for item in iter_document(page, f"{rtype} search"):
                if isinstance(item, Problem):
                    continue
                resource = item[0]
                subject = getattr(resource, "subject", None)
                key = patient_key(subject.reference if subject else None)
                if key:
                    found[key] = None
                    report.changes[rtype] += 1
    return sorted(found)


class ChangeWalk:
    """The changed lab/medication resources since ``since - overlap`` not yet handled (``seen``),
    in batches.

    Each change type is one walk (:class:`~fhir_leuko.job.walk.Walker`, sorted by
    ``_lastUpdated``, in windows at its cursor); a batch takes up to about ``max_changes``
    resources of each type and the next batch continues the same walks where they stopped, so the
    walk always advances, however many changes share one instant or one overlap window.
    """

    def __init__(self, job: Job, report: PassReport, since: str, seen: set[tuple[str, str]]):
        self.job = job
        self.report = report
        self.seen = seen
        moment = parse_fhir_datetime(since)
        assert moment is not None
        start = format_instant(moment - job.options.overlap)
        self.walks: dict[str, Iterator[bytes]] = {}
        for rtype in CHANGE_TYPES:
            params = [(job.code_param, job.codes)] if rtype == "Observation" else []
            params.append(("_count", str(job.options.page_size)))
            self.walks[rtype] = job.walker.pages(rtype, params, after=start)

    def batch(self) -> tuple[list[Change], list[str]]:
        """The next batch of changes, and the last ``lastUpdated`` read of each type whose walk
        is not finished (its later changes come in the next batch)."""
        out: list[Change] = []
        capped: list[str] = []
        for rtype, pages in list(self.walks.items()):
            count = 0
            last: str | None = None
            finished = True
            for page in pages:
                for item in iter_document(page, f"{rtype} changes"):
                    if isinstance(item, Problem):
                        self.report.problems.append(item)
                        continue
                    resource = item[0]
                    if not isinstance(
                        resource,
                        Observation
                        | DiagnosticReportStruct
                        | MedicationRequest
                        | MedicationStatement
                        | MedicationAdministration
                        | MedicationDispense,
                    ):
                        continue
                    count += 1
                    updated = resource.meta.lastUpdated if resource.meta else None
                    last = updated or last
                    key = f"{rtype}/{resource.id}"
                    if updated and (key, updated) in self.seen:
                        continue
                    subject = resource.subject.reference if resource.subject else None
                    patient = patient_key(subject)
                    if patient is None:
                        continue  # no Patient subject (e.g. a result listed by its report)
                    self.report.changes[rtype] += 1
                    out.append(Change(key, updated, patient))
                if count >= self.job.options.max_changes:
                    finished = False  # the walk waits, suspended, for the next batch
                    break
            if finished:
                del self.walks[rtype]
            elif last:
                capped.append(last)
        return out, capped

    @property
    def finished(self) -> bool:
        return not self.walks

    def all(self) -> list[Change]:
        """Every change (all batches at once)."""
        out: list[Change] = []
        while not self.finished:
            out.extend(self.batch()[0])
        return out
