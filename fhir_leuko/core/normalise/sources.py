"""Sources: a resource's identity includes where it comes from.

``Observation/1`` or ``Patient/1`` names a resource only within the server or export it comes
from: two servers, or two exports, may both have a ``Patient/1``, and they are two people. So
every resource belongs to a *source*, and references resolve within it: a DiagnosticReport's
``result``, a panel's ``hasMember``, a medication record's Medication and every subject name
resources of their own source only. Each source has its own rooms (:class:`Source`: the index,
the lab results, the reports, the medication records, the conditions and flags).

Which source (the edge says what it read, :attr:`~fhir_leuko.core.fhirjson.Origin.input`):

* An edge that reads one source (a FHIR server's searches, a CDS Hooks prefetch) leaves
  ``Origin.input`` ``None``: everything is one source, whatever the fullUrls say.
* Files: each path given is an input (a directory, or a file given alone). A Bundle entry whose
  ``fullUrl`` is a RESTful URL belongs to that server (its base, e.g.
  ``https://ehr.example.org/fhir``), whichever input holds it. A resource without such a fullUrl
  (an NDJSON line, a single resource, a ``urn:uuid:`` entry) belongs to its input's server when
  the input holds entries of exactly one server base (an export folder of one server's Bundles and
  NDJSON), else to the input itself.
* The same resource read twice in one source (overlapping exports) is one resource: the newer
  version counts (:mod:`.results`).

Keys: within a run that reads one source, a patient's key is ``Patient/1`` as before, so the
output of a single source never depends on where it was read. When a run reads several sources,
each patient key is qualified by its source (``<source>|Patient/1``) and the record says which
source it is (:attr:`~fhir_leuko.core.model.PatientRecord.source`), so two sources' patients are
never merged and their DetectedIssue ids differ (``detectedissue.issue_id``). The keys of results,
exposures and conditions stay as the source wrote them: they live inside their patient's record.
"""

from __future__ import annotations

from ..fhirjson import Origin, server_base
from ..knowledge import Knowledge
from .conditions import Conditions
from .dataset import Dataset, Problems
from .identity import Identity
from .medications import Medications
from .reports import Reports
from .results import LabResults

__all__ = ["Source", "Sources"]

ShardKey = tuple[str | None, str | None]
"""(input, server base) of the resources read into one :class:`Source` before run()."""


class Source:
    """The rooms of one source: what is read from it, resolved within it."""

    def __init__(self, knowledge: Knowledge, data: Dataset, problems: Problems) -> None:
        self.label = ""
        self.identity = Identity()
        self.labs = LabResults(knowledge, data, problems, self.identity)
        self.reports = Reports(self.labs, problems)
        self.medications = Medications(knowledge, self.identity, problems)
        self.conditions = Conditions(knowledge, self.identity, problems)
        self.observations = 0
        """Observations with an id (counted apart from ``data.counts``, once per run)."""

    def absorb(self, other: Source) -> None:
        """Take in what was read into ``other``: the same source, found to be so only once
        everything was read (an input's NDJSON and its one server's Bundles)."""
        self.identity.absorb(other.identity)
        self.labs.absorb(other.labs)
        self.reports.reports.extend(other.reports.reports)
        self.medications.records.extend(other.medications.records)
        self.conditions.conditions.extend(other.conditions.conditions)
        self.conditions.flags.extend(other.conditions.flags)
        self.observations += other.observations


class Sources:
    """The sources of one normalising run, as resources are read into them."""

    def __init__(self, knowledge: Knowledge, data: Dataset, problems: Problems) -> None:
        self.knowledge = knowledge
        self.data = data
        self.problems = problems
        self.shards: dict[ShardKey, Source] = {}

    def shard(self, input: str | None, base: str | None) -> Source:
        key = (input, base if input is not None else None)
        found = self.shards.get(key)
        if found is None:
            found = self.shards[key] = Source(self.knowledge, self.data, self.problems)
        return found

    def of(self, origin: Origin) -> Source:
        """The source a resource read at ``origin`` is read into."""
        input = origin.input
        if input is None:
            return self.shard(None, None)
        return self.shard(input, server_base(origin.full_url) if origin.full_url else None)

    def resolved(self) -> dict[str, Source]:
        """Every source, by its name (a server base, an input, or ``""`` for the one source of an
        edge that reads one), once everything is read: the resources of an input without a server
        base join that input's server when it has exactly one."""
        bases: dict[str, set[str]] = {}
        for input, base in self.shards:
            if input is not None and base is not None:
                bases.setdefault(input, set()).add(base)
        named: dict[str, list[Source]] = {}
        # In key order, so merging (and which copy of a resource read twice is kept on a tie)
        # does not depend on the order the edge read things in.
        for (input, base), shard in sorted(self.shards.items(), key=_shard_order):
            if input is None:
                label = ""
            elif base is not None:
                label = base
            else:
                own = bases.get(input, set())
                label = next(iter(own)) if len(own) == 1 else input
            named.setdefault(label, []).append(shard)
        out: dict[str, Source] = {}
        for label in sorted(named):
            first, *rest = named[label]
            for other in rest:
                first.absorb(other)
            first.label = label
            out[label] = first
        self.shards.clear()
        return out


def _shard_order(item: tuple[ShardKey, Source]) -> tuple[str, str]:
    (input, base), _shard = item
    return (input or "", base or "")
