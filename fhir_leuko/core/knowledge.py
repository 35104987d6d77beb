"""Knowledge files: LOINC codes, units, drugs, contributing conditions and patient flags.

The files live in ``profiles/knowledge/`` (grammar in ``profiles/README.md``); the models below
are their grammar, and :func:`compile_knowledge` compiles the validated documents into fast lookups.
Reading them is an edge's job (:func:`fhir_leuko.files.load_knowledge`); nothing here does I/O, and
the compiled objects are immutable, so one :class:`Knowledge` can be shared by the scheduled job and
the CDS service.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Annotated, Literal

import pydantic

from .model import Analyte, DrugHit, Form, Measure

__all__ = [
    "ATC_SYSTEMS",
    "KNOWLEDGE_FILES",
    "LOINC_OID",
    "LOINC_SYSTEM",
    "LOINC_SYSTEMS",
    "RXNORM_SYSTEMS",
    "SNOMED_SYSTEM",
    "CodeInfo",
    "ConditionsFile",
    "DrugHit",
    "DrugsFile",
    "Knowledge",
    "LoincFile",
    "UnitsFile",
    "compile_knowledge",
    "normalise_system",
]

LOINC_SYSTEM = "http://loinc.org"
# LOINC's OID, which older HL7 v2-to-FHIR feeds send as the system: HL7 terminology (UTG)
# CodeSystem v3-loinc, url http://loinc.org, identifier urn:oid:2.16.840.1.113883.6.1.
LOINC_OID = "urn:oid:2.16.840.1.113883.6.1"
LOINC_SYSTEMS = frozenset({LOINC_SYSTEM, LOINC_OID})
SNOMED_SYSTEM = "http://snomed.info/sct"
RXNORM_SYSTEMS = frozenset({"http://www.nlm.nih.gov/research/umls/rxnorm"})
# The FHIR-registered ATC system is http://www.whocc.no/atc; some feeds send the https form.
ATC_SYSTEMS = frozenset({"http://www.whocc.no/atc", "https://www.whocc.no/atc"})
# The knowledge documents, by the name of their file (``<name>.toml``) and the argument of
# compile_knowledge that takes them.
KNOWLEDGE_FILES = ("loinc", "units", "drugs", "conditions")

_EFFECT = Literal[
    "leukopenia", "neutropenia", "lymphopenia", "monocytopenia", "eosinopenia", "basopenia"
]


def normalise_system(system: str) -> str:
    """A code system URI with what is safe to normalise normalised: surrounding whitespace, and
    the case of the parts URIs define as case-insensitive (RFC 3986 §6.2.2.1: the scheme and the
    host; RFC 8141 §3.1: the ``urn:`` scheme and the ``oid`` namespace), so ``http://LOINC.org``
    is ``http://loinc.org``. The path is case-sensitive and left as written: ``http://loinc.org/``
    or ``loinc`` are other systems (issue 13 §6)."""
    text = system.strip()
    scheme, sep, rest = text.partition(":")
    if not sep:
        return text
    scheme = scheme.lower()
    if scheme in ("http", "https") and rest.startswith("//"):
        host, slash, path = rest[2:].partition("/")
        return f"{scheme}://{host.lower()}{slash}{path}"
    if scheme == "urn":
        nid, sep2, nss = rest.partition(":")
        return f"urn:{nid.lower()}{sep2}{nss}"
    return f"{scheme}:{rest}"


class _Strict(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)


Source = Annotated[str, pydantic.StringConstraints(strip_whitespace=True, min_length=3)]
"""Every code and number in a knowledge or profile file names its source."""


# --- LOINC ------------------------------------------------------------------------------------


class LoincEntry(_Strict):
    code: str
    analyte: Analyte
    measure: Measure
    form: Form = Form.TOTAL
    corrected: bool = False
    unitless: Literal["decimal"] | None = None
    confidence: Literal["A", "B", "C"]
    display: str
    source: Source


class LoincFile(_Strict):
    version: str
    code: list[LoincEntry]

    @pydantic.model_validator(mode="after")
    def _unique(self) -> LoincFile:
        seen: set[str] = set()
        for entry in self.code:
            if entry.code in seen:
                raise ValueError(f"LOINC code {entry.code} is listed twice")
            if entry.form is not Form.TOTAL and entry.analyte is not Analyte.NEUTROPHILS:
                raise ValueError(f"{entry.code}: only neutrophil codes have a segmented/band form")
            seen.add(entry.code)
        return self


@dataclass(frozen=True, slots=True)
class CodeInfo:
    """What a mapped LOINC code carries."""

    code: str
    analyte: Analyte
    measure: Measure
    form: Form
    corrected: bool
    unitless: bool


# --- units ------------------------------------------------------------------------------------


class Plausible(_Strict):
    max: float = pydantic.Field(gt=0)
    min_nonzero: float = pydantic.Field(ge=0)


class PlausibleTable(_Strict):
    source: Source
    wbc: Plausible
    neutrophils: Plausible
    lymphocytes: Plausible
    monocytes: Plausible
    eosinophils: Plausible
    basophils: Plausible


class UnitsFile(_Strict):
    version: str
    source: Source
    count: dict[str, float]
    fraction: dict[str, float]
    plausible: PlausibleTable


_E_NOTATION = re.compile(r"10(?:e|\((?=\d+\)))(\d+)\)?")


def fold_unit(text: str) -> str:
    """Fold a free-text unit for lenient matching (see the header of units.toml): case, spaces,
    "µ"/"μ"/"mc"/"micro" for micro, "^"/"E"/"(n)" for powers of ten ("x10E3/uL", "10(9)/L"), a
    leading "x", and "cmm" (cubic millimetre) for "mm3"."""
    folded = text.strip().lower().replace(" ", "").replace("µ", "u").replace("μ", "u")
    folded = folded.replace("^", "*").replace("×", "x")
    folded = folded.replace("microl", "ul").replace("mcl", "ul").replace("cmm", "mm3")
    if "10" in folded:
        folded = _E_NOTATION.sub(r"10*\1", folded)
    if folded.startswith("x") and len(folded) > 1 and folded[1].isdigit():
        folded = folded[1:]
    return folded


# Units whose case-folded spelling means something else in UCUM: "G/L" (giga per litre) folds to
# "g/l", which is grams per litre. They match only as written.
_EXACT_ONLY = frozenset({"G/L"})


@dataclass(frozen=True, slots=True)
class UnitTable:
    exact: dict[str, float]
    folded: dict[str, float]
    _memo: dict[tuple[str | None, str | None], float | None] = field(
        default_factory=dict, compare=False, repr=False
    )
    """(code, unit) -> factor: a feed repeats a handful of units millions of times."""

    @classmethod
    def build(cls, table: dict[str, float]) -> UnitTable:
        folded = {fold_unit(k): v for k, v in table.items() if k not in _EXACT_ONLY}
        return cls(dict(table), folded)

    def factor(self, code: str | None, unit: str | None) -> float | None:
        """The factor for a Quantity's UCUM ``code``, falling back to its ``unit`` text."""
        key = (code, unit)
        memo = self._memo
        if key in memo:
            return memo[key]
        factor: float | None = None
        for text in (code, unit):
            if text:
                found = self.exact.get(text)
                if found is None:
                    found = self.folded.get(fold_unit(text))
                if found is not None:
                    factor = found
                    break
        if len(memo) < 4096:  # bounded: free-text units are not a trusted, small set
            memo[key] = factor
        return factor


# --- drugs ------------------------------------------------------------------------------------


class DrugGroup(_Strict):
    id: str
    label: str
    atc_prefixes: list[str] = []
    names: list[str] = []
    effects: list[_EFFECT]
    source: Source


class Drug(_Strict):
    id: str
    label: str
    names: list[str]
    brands: list[str] = []
    rxnorm: list[str] = []
    atc: list[str] = []
    groups: list[str] = []
    effects: list[_EFFECT] = ["leukopenia", "neutropenia"]
    exclude_forms: list[str] = []
    source: Source
    brand_source: str = ""

    @pydantic.model_validator(mode="after")
    def _brands_sourced(self) -> Drug:
        if self.brands and not self.brand_source.strip():
            raise ValueError(f"drug {self.id}: brands need a brand_source")
        return self


class DrugsFile(_Strict):
    version: str
    group: list[DrugGroup]
    drug: list[Drug]

    @pydantic.model_validator(mode="after")
    def _references(self) -> DrugsFile:
        group_ids = {g.id for g in self.group}
        seen: set[str] = set()
        for drug in self.drug:
            if drug.id in seen or drug.id in group_ids:
                raise ValueError(f"drug id {drug.id} is used twice")
            seen.add(drug.id)
            for gid in drug.groups:
                if gid not in group_ids:
                    raise ValueError(f"drug {drug.id}: unknown group {gid!r}")
        return self


def _word_pattern(words: Iterable[str], *, ignore_case: bool) -> re.Pattern[str] | None:
    alternatives = sorted({w for w in words if w}, key=len, reverse=True)
    if not alternatives:
        return None
    body = "|".join(re.escape(w) for w in alternatives)
    # Word boundaries: "fluorouracil" matches "5-fluorouracil" and "infliximab" "infliximab-dyyb",
    # but "interferon" does not match inside "peginterferon".
    return re.compile(rf"(?<!\w)(?:{body})(?!\w)", re.IGNORECASE if ignore_case else 0)


class _DrugMatcher:
    def __init__(self, drugs: DrugsFile) -> None:
        groups = {g.id: g for g in drugs.group}
        self._by_rxnorm: dict[str, DrugHit] = {}
        self._by_atc: dict[str, DrugHit] = {}
        self._by_name: dict[str, DrugHit] = {}
        self._excludes: dict[str, re.Pattern[str] | None] = {}
        self._group_prefixes: list[tuple[str, DrugGroup]] = []
        for drug in drugs.drug:
            effects = frozenset(drug.effects).union(*(groups[g].effects for g in drug.groups))
            for code in drug.rxnorm:
                self._by_rxnorm[code] = DrugHit(
                    drug.id, drug.label, tuple(drug.groups), effects, f"RxNorm {code}"
                )
            for code in drug.atc:
                self._by_atc[code] = DrugHit(
                    drug.id, drug.label, tuple(drug.groups), effects, f"ATC {code}"
                )
            for name in [*drug.names, *drug.brands]:
                self._by_name[name.lower()] = DrugHit(
                    drug.id, drug.label, tuple(drug.groups), effects, f"name '{name}'"
                )
            self._excludes[drug.id] = _word_pattern(drug.exclude_forms, ignore_case=True)
        for group in drugs.group:
            for prefix in group.atc_prefixes:
                self._group_prefixes.append((prefix, group))
            for name in group.names:
                key = name.lower()
                if key not in self._by_name:
                    self._by_name[key] = DrugHit(
                        key, name, (group.id,), frozenset(group.effects), f"name '{name}'"
                    )
        self._group_prefixes.sort(key=lambda item: len(item[0]), reverse=True)
        self._names = _word_pattern(self._by_name, ignore_case=True)
        self._memo: dict[
            tuple[tuple[tuple[str | None, str | None], ...], tuple[str, ...]], tuple[DrugHit, ...]
        ] = {}

    def match(
        self, codings: Iterable[tuple[str | None, str | None]], texts: Iterable[str]
    ) -> list[DrugHit]:
        """Known drugs named by these codings (``(system, code)``) or texts; no duplicates."""
        key = (tuple(codings), tuple(texts))
        found = self._memo.get(key)
        if found is None:
            found = self._match(*key)
            if len(self._memo) < 1 << 14:  # a formulary repeats: the same few thousand records
                self._memo[key] = found
        return list(found)

    def _match(
        self, codings: tuple[tuple[str | None, str | None], ...], texts: tuple[str, ...]
    ) -> tuple[DrugHit, ...]:
        hits: dict[str, DrugHit] = {}
        for system, code in codings:
            if not code or not system:
                continue
            if system not in RXNORM_SYSTEMS and system not in ATC_SYSTEMS:
                system = normalise_system(system)  # " http://WWW.whocc.no/atc" is ATC
            code = code.strip()
            if system in RXNORM_SYSTEMS:
                hit = self._by_rxnorm.get(code)
                if hit:
                    hits.setdefault(hit.drug_id, hit)
            elif system in ATC_SYSTEMS:
                hit = self._by_atc.get(code)
                if hit:
                    hits.setdefault(hit.drug_id, hit)
                    continue
                for prefix, group in self._group_prefixes:
                    if code.startswith(prefix):
                        hits.setdefault(
                            f"atc:{code}",
                            DrugHit(
                                f"atc:{code}",
                                f"{group.label} (ATC {code})",
                                (group.id,),
                                frozenset(group.effects),
                                f"ATC {prefix}",
                            ),
                        )
                        break
        if self._names is not None:
            for text in texts:
                if not text:
                    continue
                for found in self._names.finditer(text):
                    hit = self._by_name[found.group(0).lower()]
                    exclude = self._excludes.get(hit.drug_id)
                    if exclude is not None and exclude.search(text):
                        continue
                    hits.setdefault(hit.drug_id, hit)
        return tuple(hits.values())


# --- conditions and flags ---------------------------------------------------------------------


class CauseEntry(_Strict):
    id: str
    label: str
    snomed: list[str] = []
    names: list[str] = []
    acronyms: list[str] = []
    source: Source


class FlagCode(_Strict):
    system: str
    code: str


class FlagEntry(_Strict):
    id: str
    label: str
    codes: list[FlagCode]
    source: Source


class ConditionsFile(_Strict):
    version: str
    condition: list[CauseEntry]
    flag: list[FlagEntry] = []


class _CauseMatcher:
    def __init__(self, conditions: ConditionsFile) -> None:
        self.by_snomed: dict[str, CauseEntry] = {}
        names: dict[str, CauseEntry] = {}
        acronyms: dict[str, CauseEntry] = {}
        for cause in conditions.condition:
            for code in cause.snomed:
                self.by_snomed[code] = cause
            for name in cause.names:
                names[name.lower()] = cause
            for acronym in cause.acronyms:
                acronyms[acronym] = cause
        self._names = names
        self._acronyms = acronyms
        self._name_pattern = _word_pattern(names, ignore_case=True)
        self._acronym_pattern = _word_pattern(acronyms, ignore_case=False)
        self.flags: dict[tuple[str, str], FlagEntry] = {
            (c.system, c.code): f for f in conditions.flag for c in f.codes
        }

    def match(
        self, codings: Iterable[tuple[str | None, str | None]], texts: Iterable[str]
    ) -> list[CauseEntry]:
        found: dict[str, CauseEntry] = {}
        for system, code in codings:
            if system == SNOMED_SYSTEM and code and code in self.by_snomed:
                cause = self.by_snomed[code]
                found.setdefault(cause.id, cause)
        for text in texts:
            if not text:
                continue
            if self._name_pattern is not None:
                for hit in self._name_pattern.finditer(text):
                    cause = self._names[hit.group(0).lower()]
                    found.setdefault(cause.id, cause)
            if self._acronym_pattern is not None:
                for hit in self._acronym_pattern.finditer(text):
                    cause = self._acronyms[hit.group(0)]
                    found.setdefault(cause.id, cause)
        return list(found.values())


# --- all together -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Knowledge:
    """Compiled knowledge files. Build it with :func:`load_knowledge`."""

    loinc: dict[str, CodeInfo]
    count_units: UnitTable
    fraction_units: UnitTable
    plausible: dict[Analyte, Plausible]
    drugs: DrugsFile
    conditions: ConditionsFile
    versions: dict[str, str]
    _drug_matcher: _DrugMatcher
    _cause_matcher: _CauseMatcher

    def match_drugs(
        self, codings: Iterable[tuple[str | None, str | None]], texts: Iterable[str]
    ) -> list[DrugHit]:
        """Known drugs named by a medication's codings and texts (RxNorm, ATC, names)."""
        return self._drug_matcher.match(codings, texts)

    def match_causes(
        self, codings: Iterable[tuple[str | None, str | None]], texts: Iterable[str]
    ) -> list[CauseEntry]:
        """Contributing causes named by a Condition's codings and texts."""
        return self._cause_matcher.match(codings, texts)

    def flag_for(self, system: str | None, code: str | None) -> FlagEntry | None:
        """The patient flag a coding states, if any."""
        if not system or not code:
            return None
        return self._cause_matcher.flags.get((system, code))

    def drug_label(self, drug_id: str) -> str:
        for drug in self.drugs.drug:
            if drug.id == drug_id:
                return drug.label
        return drug_id


def compile_knowledge(
    *, loinc: LoincFile, units: UnitsFile, drugs: DrugsFile, conditions: ConditionsFile
) -> Knowledge:
    """Compile the four validated knowledge documents into fast lookups.

    The documents are read and validated by an edge (:func:`fhir_leuko.files.load_knowledge` reads
    the shipped ones); each model's ``model_validate`` is the grammar, :data:`KNOWLEDGE_FILES` names
    the file each one is read from.
    """
    codes = {
        e.code: CodeInfo(e.code, e.analyte, e.measure, e.form, e.corrected, e.unitless is not None)
        for e in loinc.code
    }
    plausible = {analyte: getattr(units.plausible, analyte.value) for analyte in Analyte}
    return Knowledge(
        loinc=codes,
        count_units=UnitTable.build(units.count),
        fraction_units=UnitTable.build(units.fraction),
        plausible=plausible,
        drugs=drugs,
        conditions=conditions,
        versions={
            "loinc": loinc.version,
            "units": units.version,
            "drugs": drugs.version,
            "conditions": conditions.version,
        },
        _drug_matcher=_DrugMatcher(drugs),
        _cause_matcher=_CauseMatcher(conditions),
    )
