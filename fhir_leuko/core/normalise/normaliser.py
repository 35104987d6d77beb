"""The coordinator of normalising: one pass over the input, then each room finishes in order.

:meth:`Normaliser.feed` (or :meth:`Normaliser.feed_lines`, for NDJSON) hands every resource to its
room as it is read: lab Observations to :class:`~.results.LabResults` (built at once: the hot path),
DiagnosticReports to :class:`~.reports.Reports`, medication records to
:class:`~.medications.Medications`, Conditions and Flags to :class:`~.conditions.Conditions`, every
other resource to the :class:`~.identity.Identity` index; each room of the resource's source
(:mod:`.sources`: references resolve within their source). :meth:`Normaliser.run` then, source by
source, links reports to their results, places each result in its patient's record and group,
derives missing absolute counts, and makes exposures, causes and flags, now that every reference
can be resolved. Nothing is read twice, and no room adds a call per Observation to the loop.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from itertools import count
from operator import attrgetter

import msgspec

from ..fhirjson import (
    RESOURCE_DECODER,
    Bundle,
    Condition,
    DiagnosticReport,
    Flag,
    MalformedResourceError,
    MedicationAdministration,
    MedicationDispense,
    MedicationRequest,
    MedicationStatement,
    Observation,
    Origin,
    Patient,
    Resource,
    Sourced,
    Unread,
    bundle_entries,
    decode_any,
    malformed_document,
)
from ..knowledge import Knowledge
from ..model import LabResult, Problem, reading_order
from .dataset import Dataset, Problems
from .derivation import derive
from .ranges import choose_range
from .sources import Source, Sources
from .unread import UnreadResources

__all__ = ["Normaliser", "normalise"]


class Normaliser:
    """Normalising, step by step: :meth:`feed` (or :meth:`feed_lines`) resources as they are read,
    then :meth:`run` once for the :class:`Dataset`. :func:`normalise` does both; the file reader
    (``bulkread``) drives it directly to decode NDJSON lines in one loop."""

    def __init__(self, knowledge: Knowledge) -> None:
        self.knowledge = knowledge
        self.data = Dataset()
        self.problems = Problems(self.data.problems)
        self.sources = Sources(knowledge, self.data, self.problems)
        self.unread = UnreadResources(knowledge, self.problems)

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

    def feed_lines(
        self, lines: Iterable[bytes], source: str, first: int = 1, *, input: str | None = None
    ) -> None:
        """Decode and add the resources of NDJSON lines numbered from ``first``, from ``source``
        (a file of ``input``, see :attr:`~fhir_leuko.core.fhirjson.Origin.input`).

        What :func:`fhir_leuko.files.reader.read_file` and :meth:`feed` do for NDJSON, in one loop:
        this runs once per line of a bulk export.
        """
        self.feed_numbered(zip(count(first), lines), source, input=input)

    def feed_numbered(
        self, numbered: Iterable[tuple[int, bytes]], source: str, *, input: str | None = None
    ) -> None:
        """:meth:`feed_lines` for lines that are not consecutive: ``(line number, line)`` pairs of
        ``source`` (the lines of one file that a shard holds, ``files/shards.py``)."""
        self.problems.lines_source = source
        # Bound once: these run once per Observation. NDJSON lines carry no fullUrl, so all of
        # them go to the input's own part of its source.
        into = self.sources.shard(input, None)
        add_observation = into.labs.add
        decode = RESOURCE_DECODER.decode
        observations = 0
        resource: Resource | Unread | None
        for number, line in numbered:
            if not line or line.isspace():
                continue
            try:
                try:
                    resource = decode(line)
                except (msgspec.DecodeError, RecursionError):
                    # An unknown resource type, invalid or deep JSON: decode_any says which.
                    resource = decode_any(line)
            except MalformedResourceError as exc:
                # (a Bundle too deep because of some entries still gives the others)
                self.feed(malformed_document(exc, line, source, f"line {number}", input))
                continue
            if resource is None:
                continue
            rid = resource.id
            if type(resource) is Observation and rid:
                observations += 1
                add_observation(resource, f"Observation/{rid}", number)
            elif type(resource) is Bundle:
                self.feed(bundle_entries(resource, source, f"line {number}", input))
            else:
                self.add(resource, Origin(source, f"line {number}", None, input))
        into.observations += observations

    def add(self, resource: Resource | Unread, origin: Origin) -> None:
        if isinstance(resource, Unread):
            self.unread.look(resource, origin)
            return
        into = self.sources.of(origin)
        rid = resource.id
        if type(resource) is Observation and rid:
            # The common case of a bulk export, kept short: it runs once per Observation.
            into.observations += 1
            key = f"Observation/{rid}"
            if origin.full_url and origin.full_url != key:
                into.labs.observation_urls[origin.full_url] = key
            into.labs.add(resource, key, origin)
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
                into.labs.observation_urls[origin.full_url] = key
            into.labs.add(resource, key, origin)
            return
        if isinstance(resource, DiagnosticReport):
            # Not indexed either: nothing resolves a reference to a report (its room links it).
            into.reports.add(resource, key, origin)
            return
        index = into.identity.index
        if origin.full_url:
            index[origin.full_url] = resource
        if rid:
            index[key] = resource
        if isinstance(
            resource,
            MedicationRequest | MedicationStatement | MedicationAdministration | MedicationDispense,
        ):
            into.medications.add(resource, key, origin)
        elif isinstance(resource, Patient):
            into.identity.patients.append((resource, key, origin))
        elif isinstance(resource, Condition):
            into.conditions.add_condition(resource, key, origin)
        elif isinstance(resource, Flag):
            into.conditions.add_flag(resource, key, origin)

    # -- then each room finishes, in order, source by source --------------------------------------

    def run(self) -> Dataset:
        data = self.data
        for name in ("Observation", "results:used"):
            data.counts.setdefault(name, 0)  # present even when nothing was read
        sources = self.sources.resolved()
        several = len(sources) > 1
        for label, source in sources.items():
            if several:
                source.identity.prefix = f"{label}|"
            first = len(data.patients)
            self.finish(source)
            if several:
                for record in list(data.patients.values())[first:]:
                    record.source = label
        # By time; results of one time keep the order they were read in (evaluate never depends
        # on that order: its ties are broken explicitly).
        by_time = attrgetter("effective")
        for record in data.patients.values():
            record.results.sort(key=by_time)
            record.exposures.sort(key=lambda e: e.key)
            record.conditions.sort(key=lambda c: (c.key, c.cause_id))
        data.problems.sort(key=reading_order)
        return data

    def finish(self, source: Source) -> None:
        """The rooms of one source finish, in order, into the dataset."""
        data = self.data
        source.reports.link()
        data.counts["Observation"] += source.observations
        labs = source.labs
        labs.finish_pending()
        labs.account()
        results = list(labs.results.values())
        labs.results.clear()
        labs.versions.clear()
        first = len(data.patients)
        source.identity.prepare(self.problems)
        results = self.place(source, results)
        data.counts["results:used"] += len(results)
        del results
        patient_key = source.identity.patient_key
        for subject, unused in labs.unused.values():
            data.unused.setdefault(patient_key(subject) or subject, []).append(unused)
        labs.unused.clear()
        for record in list(data.patients.values())[first:]:
            if record.results:
                record.results.extend(derive(record.results, data.counts))
        source.identity.demographics(data, self.problems)
        data.merged.update(source.identity.merged())
        self.choose_ranges(source, first)
        source.medications.finish(data)
        source.conditions.finish(data)

    def choose_ranges(self, source: Source, first: int) -> None:
        """The lab's reference range of the results that have several (or conditional, or text)
        ranges, now that each patient's sex and birth date are known (:mod:`.ranges`); the
        records of this source are those made from ``first`` on."""
        pending = source.labs.ranges
        if not pending:
            return
        for record in list(self.data.patients.values())[first:]:
            for result in record.results:
                ranges = pending.get(result.key)
                if ranges is not None:
                    choose_range(result, ranges, record)
        pending.clear()

    def place(self, source: Source, results: list[LabResult]) -> list[LabResult]:
        """Each result into its patient's record, and into a group; the results placed.

        Now that every Patient is read, subjects resolve to patient keys; results without a
        specimen or report are grouped by time (clinical.md §4.5: same specimen or time). A
        subject that names no patient (a contained Patient without identifier, an identifier no
        Patient has: :mod:`.identity`) is a problem, and its result is not placed.
        """
        identity = source.identity
        patient_key = identity.patient_key
        patient_of = self.data.patient
        time_groups: dict[datetime, str] = {}
        placed: list[LabResult] = []
        # A patient's results mostly come one after another: the last record is tried first.
        subject, who, record = "", "", None
        for result in results:
            if result.patient is not subject:
                subject = result.patient
                key = patient_key(subject)
                who, record = (key, patient_of(key)) if key is not None else ("", None)
            if record is None:
                origin = source.labs.subject_origins.get(result.key)
                self.problems.report(
                    origin if origin is not None else Origin(source.label or "input"),
                    result.key,
                    *identity.no_patient(result.patient),
                )
                continue
            placed.append(result)
            result.patient = who
            if not result.group:
                known = time_groups.get(result.effective)
                if known is None:
                    known = time_groups[result.effective] = f"time:{result.effective.isoformat()}"
                result.group = known
            record.results.append(result)
        return placed


def normalise(items: Iterable[Sourced | Problem], knowledge: Knowledge) -> Dataset:
    """Normalise resources (and pass through reader problems) into a :class:`Dataset`.

    ``items`` is what :func:`fhir_leuko.files.reader.read_paths` yields, or ``(resource, Origin)``
    pairs built by another edge (a FHIR server search, a CDS Hooks prefetch).
    """
    normaliser = Normaliser(knowledge)
    with normaliser.collecting():
        normaliser.feed(items)
        return normaliser.run()
