"""The coordinator of normalising: one pass over the input, then each room finishes in order.

:meth:`Normaliser.feed` (or :meth:`Normaliser.feed_lines`, for NDJSON) hands every resource to its
room as it is read: lab Observations to :class:`~.results.LabResults` (built at once: the hot path),
DiagnosticReports to :class:`~.reports.Reports`, medication records to
:class:`~.medications.Medications`, Conditions and Flags to :class:`~.conditions.Conditions`, every
other resource to the :class:`~.identity.Identity` index. :meth:`Normaliser.run` then links reports
to their results, places each result in its patient's record and group, derives missing absolute
counts, and makes exposures, causes and flags, now that every reference can be resolved. Nothing is
read twice, and no room adds a call per Observation to the loop.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from operator import attrgetter

from ..fhirjson import (
    Bundle,
    Condition,
    DiagnosticReport,
    Flag,
    MalformedResourceError,
    MedicationRequest,
    MedicationStatement,
    Observation,
    Origin,
    Patient,
    Resource,
    Sourced,
    bundle_entries,
    decode_resource,
    malformed_document,
)
from ..knowledge import Knowledge
from ..model import LabResult, Problem
from .conditions import Conditions
from .dataset import Dataset, Problems
from .derivation import derive
from .identity import Identity
from .medications import Medications
from .reports import Reports
from .results import LabResults

__all__ = ["Normaliser", "normalise"]


class Normaliser:
    """Normalising, step by step: :meth:`feed` (or :meth:`feed_lines`) resources as they are read,
    then :meth:`run` once for the :class:`Dataset`. :func:`normalise` does both; the file reader
    (``bulkread``) drives it directly to decode NDJSON lines in one loop."""

    def __init__(self, knowledge: Knowledge) -> None:
        self.knowledge = knowledge
        self.data = Dataset()
        self.problems = Problems(self.data.problems)
        self.identity = Identity()
        self.labs = LabResults(knowledge, self.data, self.problems)
        self.reports = Reports(self.labs, self.problems)
        self.medications = Medications(knowledge, self.identity, self.problems)
        self.conditions = Conditions(knowledge, self.identity, self.problems)
        # Bound once: these run once per Observation.
        self.add_observation = self.labs.add
        self.observation_urls = self.labs.observation_urls
        self.observations = 0
        """Observations with an id (counted apart from ``data.counts``: see :meth:`add`)."""

    # -- one pass: every resource to its room, as it is read -------------------------------------

    @contextmanager
    def collecting(self) -> Iterator[None]:
        """No cyclic garbage collection while this builds millions of small, long-lived, acyclic
        objects: the collector would rescan them over and over (a third of the run time of a
        1M-Observation export, benchmarks/README.md). Reference counting still frees the rest."""
        enabled = gc.isenabled()
        gc.disable()
        try:
            yield
        finally:
            if enabled:
                gc.enable()

    def feed(self, items: Iterable[Sourced | Problem]) -> None:
        add = self.add
        problems = self.data.problems
        for item in items:
            if type(item) is Problem:
                problems.append(item)
            else:
                add(*item)  # type: ignore[misc]

    def feed_lines(self, lines: Iterable[bytes], source: str, first: int = 1) -> None:
        """Decode and add the resources of NDJSON lines numbered from ``first``, from ``source``.

        What :func:`fhir_leuko.files.reader.read_file` and :meth:`feed` do for NDJSON, in one loop:
        this runs once per line of a bulk export.
        """
        self.problems.lines_source = source
        add_observation = self.add_observation
        number = first - 1
        for line in lines:
            number += 1
            if not line or line.isspace():
                continue
            try:
                resource = decode_resource(line)
            except MalformedResourceError as exc:
                # (a Bundle too deep because of some entries still gives the others)
                self.feed(malformed_document(exc, line, source, f"line {number}"))
                continue
            if resource is None:
                continue
            rid = resource.id
            if type(resource) is Observation and rid:
                self.observations += 1
                add_observation(resource, f"Observation/{rid}", number)
            elif type(resource) is Bundle:
                self.feed(bundle_entries(resource, source, f"line {number}"))
            else:
                self.add(resource, Origin(source, f"line {number}"))

    def add(self, resource: Resource, origin: Origin) -> None:
        rid = resource.id
        if type(resource) is Observation and rid:
            # The common case of a bulk export, kept short: it runs once per Observation.
            self.observations += 1
            key = f"Observation/{rid}"
            if origin.full_url and origin.full_url != key:
                self.observation_urls[origin.full_url] = key
            self.add_observation(resource, key, origin)
            return
        rtype = type(resource).__name__
        self.data.counts[rtype] += 1
        # Without id or fullUrl the key names the file and position: positions alone ("entry[0]",
        # "line 3", "" for a single resource) repeat across files and would merge resources.
        if rid:
            key = f"{rtype}/{rid}"
        else:
            key = origin.full_url or f"{rtype}@{origin.source}:{origin.position}"
        if isinstance(resource, Observation):
            # Observations are not kept in the index (a million of them would be): only their key,
            # under the fullUrl a DiagnosticReport may use to point at them.
            if origin.full_url and origin.full_url != key:
                self.observation_urls[origin.full_url] = key
            self.add_observation(resource, key, origin)
            return
        index = self.identity.index
        if origin.full_url:
            index[origin.full_url] = resource
        if rid:
            index[key] = resource
        if isinstance(resource, DiagnosticReport):
            self.reports.add(resource, key, origin)
        elif isinstance(resource, MedicationRequest | MedicationStatement):
            self.medications.add(resource, key, origin)
        elif isinstance(resource, Patient):
            self.identity.patients.append((resource, key))
        elif isinstance(resource, Condition):
            self.conditions.add_condition(resource, key, origin)
        elif isinstance(resource, Flag):
            self.conditions.add_flag(resource, key, origin)

    # -- then each room finishes, in order --------------------------------------------------------

    def run(self) -> Dataset:
        self.reports.link()
        self.identity.forget_reports()
        data = self.data
        data.counts["Observation"] += self.observations
        self.observations = 0
        self.labs.finish_pending()
        results = list(self.labs.results.values())
        self.labs.results.clear()
        self.labs.versions.clear()
        data.counts["results:used"] += len(results)
        self.place(results)
        del results
        for record in data.patients.values():
            if record.results:
                record.results.extend(derive(record.results, data.counts))
        self.identity.birth_dates(data)
        self.medications.finish(data)
        self.conditions.finish(data)
        # By time; results of one time keep the order they were read in (evaluate never depends
        # on that order: its ties are broken explicitly).
        by_time = attrgetter("effective")
        for record in data.patients.values():
            record.results.sort(key=by_time)
            record.exposures.sort(key=lambda e: e.key)
            record.conditions.sort(key=lambda c: (c.key, c.cause_id))
        return data

    def place(self, results: list[LabResult]) -> None:
        """Each result into its patient's record, and into a group.

        Now that every Patient is read, subjects resolve to patient keys; results without a
        specimen or report are grouped by time (clinical.md §4.5: same specimen or time).
        """
        patient_key = self.identity.patient_key
        patient_of = self.data.patient
        time_groups: dict[datetime, str] = {}
        for result in results:
            who = patient_key(result.patient) or result.patient
            result.patient = who
            if not result.group:
                known = time_groups.get(result.effective)
                if known is None:
                    known = time_groups[result.effective] = f"time:{result.effective.isoformat()}"
                result.group = known
            patient_of(who).results.append(result)


def normalise(items: Iterable[Sourced | Problem], knowledge: Knowledge) -> Dataset:
    """Normalise resources (and pass through reader problems) into a :class:`Dataset`.

    ``items`` is what :func:`fhir_leuko.files.reader.read_paths` yields, or ``(resource, Origin)``
    pairs built by another edge (a FHIR server search, a CDS Hooks prefetch).
    """
    normaliser = Normaliser(knowledge)
    with normaliser.collecting():
        normaliser.feed(items)
        return normaliser.run()
