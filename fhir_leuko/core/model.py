"""The data the rule core works on: normalised lab results, drug exposures, patients, findings.

These are plain, immutable-by-convention value objects with no I/O. ``normalise`` builds them from
FHIR resources; ``evaluate`` turns them into :class:`Finding` objects; the edges turn findings into
DetectedIssues or CDS Hooks cards.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from datetime import date, datetime

import msgspec

__all__ = [
    "FINDING_ANALYTE",
    "PATIENT_IDENTIFIER_KEY",
    "QUOTE_LIMIT",
    "UNREADABLE_FILE",
    "Analyte",
    "ConditionMatch",
    "DrugExposure",
    "DrugHit",
    "Finding",
    "FindingKind",
    "Form",
    "ImplicatedDrug",
    "LabResult",
    "LowerLimit",
    "Measure",
    "PatientRecord",
    "Problem",
    "UnusedResult",
    "local_key",
    "patient_reference",
    "quoted",
    "reading_order",
    "source_reference",
]

UNREADABLE_FILE = "cannot read file"
"""How the reason of a problem that lost a whole file (or the rest of it) begins: the summary of a
run that found nothing counts them, so that "no Observation in the input" is never said of input
that could not be read."""

QUOTE_LIMIT = 200
"""The most characters of one piece of input text (a medication's or condition's text, an id, a
unit) that any output text quotes: DetectedIssue.detail, card markdown, problem lines."""


def quoted(text: str, limit: int = QUOTE_LIMIT) -> str:
    """Input text as output text may quote it: whole when short, else its first ``limit``
    characters and a note that it was cut (a 50 MB medication text stays in the input)."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… [cut: {len(text):,} characters in the input]"


class Analyte(enum.StrEnum):
    """A white-cell quantity. Counts are held in 10*9/L, fractions as 0..1."""

    WBC = "wbc"
    NEUTROPHILS = "neutrophils"
    LYMPHOCYTES = "lymphocytes"
    MONOCYTES = "monocytes"
    EOSINOPHILS = "eosinophils"
    BASOPHILS = "basophils"

    @property
    def label(self) -> str:
        return _ANALYTE_LABELS[self]


_ANALYTE_LABELS = {
    Analyte.WBC: "white blood cell count",
    Analyte.NEUTROPHILS: "absolute neutrophil count",
    Analyte.LYMPHOCYTES: "absolute lymphocyte count",
    Analyte.MONOCYTES: "absolute monocyte count",
    Analyte.EOSINOPHILS: "absolute eosinophil count",
    Analyte.BASOPHILS: "absolute basophil count",
}


class Measure(enum.StrEnum):
    """LOINC property of a code: NCnc (#/volume) or NFr (fraction of leukocytes)."""

    COUNT = "count"
    FRACTION = "fraction"


class Form(enum.StrEnum):
    """Neutrophil form a code reports. Bands are only ever added to segmented values."""

    TOTAL = "total"
    SEGMENTED = "segmented"
    BAND = "band"


class FindingKind(enum.StrEnum):
    """The finding codes of fhir-leuko's own CodeSystem (one DetectedIssue per patient and kind)."""

    LEUKOPENIA = "leukopenia"
    NEUTROPENIA = "neutropenia"
    LYMPHOPENIA = "lymphopenia"
    MONOCYTOPENIA = "monocytopenia"
    EOSINOPENIA = "eosinopenia"
    BASOPENIA = "basopenia"


FINDING_ANALYTE: dict[FindingKind, Analyte] = {
    FindingKind.LEUKOPENIA: Analyte.WBC,
    FindingKind.NEUTROPENIA: Analyte.NEUTROPHILS,
    FindingKind.LYMPHOPENIA: Analyte.LYMPHOCYTES,
    FindingKind.MONOCYTOPENIA: Analyte.MONOCYTES,
    FindingKind.EOSINOPENIA: Analyte.EOSINOPHILS,
    FindingKind.BASOPENIA: Analyte.BASOPHILS,
}


@dataclass(frozen=True, slots=True)
class Problem:
    """One input problem: where it is, which resource, and why. Never contains patient data."""

    source: str
    reason: str
    resource: str = ""
    position: str = ""
    kind: str = "input"

    def __str__(self) -> str:
        # Reasons quote the input (a valueString, a unit, an id): each part is capped.
        where = f"{self.source}:{self.position}" if self.position else self.source
        what = f" {quoted(self.resource)}:" if self.resource else ""
        return f"{quoted(where)}:{what} {quoted(self.reason, 2 * QUOTE_LIMIT)}"


_NUMBERS = re.compile(r"\d+")


def reading_order(problem: Problem) -> tuple[str, tuple[int, ...], str, str, str, str]:
    """A sort key for problems: file by file, each file's in the order of its lines or entries
    (``line 9`` before ``line 10``), then by resource and reason: the order a reader checks
    them in, and one that does not depend on which step of the run found each problem (a
    sharded run finds them shard by shard: files/shards.py)."""
    place = tuple(map(int, _NUMBERS.findall(problem.position)))
    return (
        problem.source, place, problem.position, problem.resource, problem.reason, problem.kind
    )


class LabResult(msgspec.Struct, gc=False):
    """One usable white-cell value of one patient, measured or derived.

    A msgspec Struct, not a dataclass: one is built per lab Observation (millions in a bulk
    export), and a Struct is built in C (a million with these fields: 0.06 s, against 0.15 s for
    the slots dataclass it was). It refers to no object that could refer back to it (strings,
    numbers, enums, a tuple of strings), so the cyclic garbage collector need not track it.

    ``value`` is in 10*9/L for counts and 0..1 for fractions. ``comparator`` is kept from the
    Quantity: ``"<"`` means the true value is below ``value`` and is graded so.
    """

    key: str
    """``Observation/id`` (or the fullUrl) of the measured result; for a derived one, a synthetic key."""
    patient: str
    analyte: Analyte
    measure: Measure
    form: Form
    loinc: str
    value: float
    comparator: str | None
    reported: str
    """The value and unit as reported, e.g. ``0.9 10*9/L`` or ``< 100 /uL``."""
    effective: datetime
    effective_text: str
    """The time as the input gave it (shown to people; ``effective`` is the same in UTC)."""
    status: str
    group: str
    """The patient's specimen, report or time this value belongs to: only values of one group are
    combined (``specimen:<ref>``, the DiagnosticReport or panel key, or ``time:<iso time>``)."""
    ref_low: float | None = None
    """The lab's lower reference limit, converted like ``value``."""
    corrected: bool = False
    sources: tuple[str, ...] = ()
    """For a derived value: the Observations it was computed from."""
    derivation: str = ""
    """For a derived value: how, e.g. ``WBC 2.0 10*9/L x neutrophils 30 %``."""
    ref_source: str = ""
    """Which of several ``referenceRange`` entries gave ``ref_low``, e.g. ``for female, age 18-65 a``
    (empty for the usual single range)."""
    ref_note: str = ""
    """Why the lab's range was not used although the Observation has one (none applies to this
    patient, or it is text that is not a plain "low-high unit"); empty otherwise."""
    report: str = ""
    """The DiagnosticReport (or panel) that lists this value, if any (``group`` may be a
    specimen instead): values of one report are one blood count."""
    version: str = ""
    """The version of the Observation it was read from (``meta.versionId``, else ``@`` and
    ``meta.lastUpdated``; empty for none, and for a derived value): when one Observation is read
    twice, the later version counts (normalise)."""
    matched: str = ""
    """For a derived value whose parts share no specimen or report: how they were matched (the
    same collection time), for the explanation."""

    @property
    def derived(self) -> bool:
        return bool(self.sources)

    @property
    def evidence(self) -> tuple[str, ...]:
        """The Observations this value rests on."""
        return self.sources or (self.key,)


@dataclass(frozen=True, slots=True)
class UnusedResult:
    """A lab Observation of a white-cell analyte that normalising could not use (its status never
    counts, or an input problem of the same ``key`` says why), kept with its patient so
    ``fhir-leuko explain`` can list it."""

    key: str
    analyte: Analyte
    status: str | None
    effective_text: str | None


@dataclass(frozen=True, slots=True)
class DrugHit:
    """One known drug found in a medication record (an entry of knowledge/drugs.toml)."""

    drug_id: str
    label: str
    groups: tuple[str, ...]
    effects: frozenset[str]
    via: str
    """How it matched: ``RxNorm 2626``, ``ATC L01CD02``, ``name 'docetaxel'``."""


@dataclass(frozen=True, slots=True)
class DrugExposure:
    """A medication record naming a drug fhir-leuko knows: a MedicationStatement, a
    MedicationRequest, a MedicationAdministration or a MedicationDispense."""

    key: str
    """``MedicationRequest/id``, ``MedicationStatement/id`` …"""
    patient: str
    drugs: tuple[DrugHit, ...]
    """The known drugs the record names."""
    names: tuple[str, ...]
    """How the record names the drug (display or text), for the explanation."""
    status: str
    start: datetime | None
    end: datetime | None
    """Last day known active; ``None`` while open-ended."""
    ended_on_status: bool = False
    """Status says it stopped/completed, with no end date: only its start is known to be active."""
    record_type: str = ""
    """The resource type of the record (``MedicationAdministration`` …)."""
    event: str = ""
    """For an administration or a dispense, what happened and how its period is known, e.g.
    ``given 2026-11-12`` or ``dispensed 2026-11-01, 28 days' supply (daysSupply) to 2026-11-29``;
    the explanation of an implicated drug starts with it."""


@dataclass(frozen=True, slots=True)
class ConditionMatch:
    """A Condition on record that can contribute to a low count."""

    key: str
    patient: str
    cause_id: str
    label: str
    text: str
    onset: datetime | None
    abatement: datetime | None


@dataclass(slots=True)
class PatientRecord:
    """Everything the rule core knows about one patient."""

    key: str
    """``Patient/id`` when known, otherwise the subject reference as given; qualified by its
    source (``<source>|Patient/id``) when the input holds several sources."""
    birth_date: date | None = None
    sex: str | None = None
    """``Patient.gender`` when ``male`` or ``female`` (chooses a lab's sex-specific range)."""
    deceased: bool = False
    """``Patient.deceasedBoolean`` true, or a ``deceasedDateTime`` (see ``deceased_at``)."""
    deceased_at: datetime | None = None
    """``Patient.deceasedDateTime``: the patient is deceased from then on."""
    results: list[LabResult] = field(default_factory=list)
    exposures: list[DrugExposure] = field(default_factory=list)
    conditions: list[ConditionMatch] = field(default_factory=list)
    flags: set[str] = field(default_factory=set)
    flag_sources: dict[str, str] = field(default_factory=dict)
    merged_from: list[str] = field(default_factory=list)
    """Patient.link: the retired records (``Patient/…``, as the source wrote them) whose resources
    count for this patient."""
    flag_notes: dict[str, str] = field(default_factory=dict)
    """Flags the input records but that do not apply (a Condition not confirmed), by flag id:
    what to say about them in the explanation."""
    source: str = ""
    """The source of this patient's resources when the input holds several (a server base, or the
    directory or file read), else ``""``: see :func:`source_reference`."""

    @property
    def reference(self) -> str:
        """The patient's reference as its source writes it (``key`` without the source)."""
        return local_key(self.key, self.source)


@dataclass(frozen=True, slots=True)
class LowerLimit:
    """The lower limit a value was compared with, and where it came from."""

    value: float | None
    source: str
    note: str = ""
    """Why the laboratory's range was not used although the result has one."""


@dataclass(frozen=True, slots=True)
class ImplicatedDrug:
    exposure: DrugExposure
    drug_labels: tuple[str, ...]
    relation: str
    """``active`` or ``stopped N days before``."""


@dataclass(frozen=True, slots=True)
class Finding:
    """One finding of one patient, as decided by one profile rule."""

    patient: str
    kind: FindingKind
    result: LabResult
    grade: str
    grade_label: str
    grading_name: str
    grading_version: str
    severity: str
    lower_limit: LowerLimit
    term: str
    """The clinical wording, e.g. ``severe neutropenia (agranulocytosis range)``."""
    recommendation: str
    profile_id: str
    profile_url: str
    profile_version: str
    profile_title: str
    evidence_codes: tuple[tuple[str, str], ...]
    """SNOMED CT ``(code, display)`` pairs for ``DetectedIssue.evidence.code``."""
    implicated: tuple[ImplicatedDrug, ...]
    conditions: tuple[ConditionMatch, ...]
    trend: tuple[LabResult, ...]
    """Recent values of the same analyte, oldest first, including ``result``."""
    flags: tuple[str, ...] = ()
    merged_from: tuple[str, ...] = ()
    """Patient.link: retired records whose resources count for this patient."""
    source: str = ""
    """The patient's source when the input holds several (:attr:`PatientRecord.source`)."""
    alternatives: tuple[LabResult, ...] = ()
    """Other valid counts of the analyte at ``result``'s time with other values: the lower one
    is graded (``result``), these are named."""
    flag_notes: tuple[str, ...] = ()
    """Flags the profile uses that the input records but that do not apply (e.g. a BEN Condition
    that is only provisional), with why: named in the explanation."""


PATIENT_IDENTIFIER_KEY = "Patient?identifier="
"""The key of a patient known only by an identifier (a contained Patient that no Patient resource
of its source carries): ``Patient?identifier=<system>|<value>``; its DetectedIssue refers to the
patient by that identifier (normalise/identity.py)."""


def patient_reference(key: str) -> dict[str, object]:
    """The FHIR Reference of a patient key (a local key: :func:`local_key`): ``{"reference":
    "Patient/1"}``, or by identifier for a patient known only by one."""
    if key.startswith(PATIENT_IDENTIFIER_KEY):
        system, _, value = key[len(PATIENT_IDENTIFIER_KEY) :].partition("|")
        identifier = {"system": system, "value": value} if system else {"value": value}
        return {"type": "Patient", "identifier": identifier}
    return {"reference": key}


def local_key(key: str, source: str) -> str:
    """A key as its source wrote it: without the ``<source>|`` that qualifies the keys of a
    patient read from one of several sources."""
    return key[len(source) + 1 :] if source and key.startswith(f"{source}|") else key


def source_reference(source: str, reference: str) -> str:
    """A reference to a resource of ``source`` for someone reading output made from several
    sources: absolute (``https://ehr.example.org/fhir/Patient/1``) when the source is a server,
    as the source wrote it otherwise (a file's ``Patient/1``: the explanation names the file)."""
    if (
        source.startswith(("http://", "https://"))
        and reference.count("/") == 1
        and not reference.startswith(("urn:", "#"))
    ):
        return f"{source}/{reference}"
    return reference
