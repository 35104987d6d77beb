"""Rule profiles: the declarative, versioned files in ``profiles/`` and their grammar.

The grammar is documented field by field in ``profiles/README.md``; the pydantic models below are
its executable form (``extra="forbid"``, so a misspelt key is an error that names file and field).
Thresholds, lookbacks, code lists and wording live in the files, never in ``if`` statements.
:func:`build_profiles` resolves ``extends`` and validates documents already read; finding and
reading the files is an edge's job (:func:`fhir_leuko.files.load_profiles`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic

from ..errors import ProfileError
from .fhirtime import parse_duration
from .knowledge import Knowledge
from .model import Analyte, FindingKind
from .validation import document_errors, validate_document

__all__ = [
    "Band",
    "Grading",
    "LoadedProfile",
    "Profile",
    "ProfileDocuments",
    "ProfileSet",
    "Rule",
    "build_profiles",
    "merge_extends",
]

Source = Annotated[str, pydantic.StringConstraints(strip_whitespace=True, min_length=3)]
Text = Annotated[str, pydantic.StringConstraints(strip_whitespace=True, min_length=1)]
Severity = Literal["low", "moderate", "high"]
OBSERVATION_STATUS = Literal["final", "amended", "corrected", "preliminary"]

ProfileDocuments = dict[str, tuple[dict[str, Any], Path]]
"""Profile documents as read, by profile id, each with the file it was read from (for errors)."""


class _Strict(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _age(value: str) -> str:
    parse_duration(value)
    return value


Age = Annotated[str, pydantic.AfterValidator(_age)]


class SnomedCode(_Strict):
    code: Annotated[str, pydantic.StringConstraints(pattern=r"^\d{6,18}$")]
    display: Text
    source: Source


class AgeLimit(_Strict):
    from_age: Age = pydantic.Field(alias="from")
    to_age: Age | None = pydantic.Field(default=None, alias="to")
    value: float | None = pydantic.Field(default=None, gt=0)
    """``None``: no verified limit for this age band (only numeric grade bands can fire)."""
    source: Source


class LowerLimit(_Strict):
    lab_range: bool = True
    """Use the Observation's ``referenceRange.low`` when it has one."""
    value: float | None = pydantic.Field(default=None, gt=0)
    """Default lower limit in 10*9/L when the lab gives none."""
    by_age: list[AgeLimit] = []
    source: Source

    @pydantic.model_validator(mode="after")
    def _one_default(self) -> LowerLimit:
        if self.value is not None and self.by_age:
            raise ValueError("give either value or by_age, not both")
        return self


class Band(_Strict):
    grade: Text
    label: Text
    below: float | Literal["lower-limit"]
    """The band holds values below this edge (10*9/L), or below the lower limit itself."""
    severity: Severity
    recommendation: str = ""


class Grading(_Strict):
    name: Text
    version: Text
    source: Source
    bands: list[Band] = pydantic.Field(min_length=1)

    @pydantic.model_validator(mode="after")
    def _ordered(self) -> Grading:
        edges: list[float] = []
        for index, band in enumerate(self.bands):
            if band.below == "lower-limit":
                if index != 0:
                    raise ValueError("only the first band may be 'below = \"lower-limit\"'")
                continue
            if edges and band.below >= edges[-1]:
                raise ValueError(
                    f"band {band.grade!r}: edges must strictly decrease (got {band.below} after "
                    f"{edges[-1]})"
                )
            edges.append(float(band.below))
        return self


class Term(_Strict):
    below: float = pydantic.Field(gt=0)
    text: Text
    snomed: SnomedCode | None = None
    source: Source


class Rule(_Strict):
    finding: FindingKind
    grading: Text
    lower_limit: LowerLimit
    term: Text
    """How the text names the finding, e.g. ``neutropenia``."""
    terms: list[Term] = []
    """More specific wording below an edge (the lowest matching one is used)."""
    evidence: SnomedCode | None = None
    recommendation: str = ""
    when_flags: list[str] = []
    unless_flags: list[str] = []
    implicate_drugs: bool = True

    @property
    def analyte(self) -> Analyte:
        from .model import FINDING_ANALYTE

        return FINDING_ANALYTE[self.finding]


class Applies(_Strict):
    min_age: Age | None = None
    max_age: Age | None = None
    """Exclusive: ``max_age = "18y"`` means under 18."""
    age_unknown: bool = True
    """Whether the profile applies to a patient whose age is not known."""
    drugs: list[str] = []
    """Drug or group ids (knowledge/drugs.toml): the profile applies only to a result that one of
    them is implicated in (active at the time, or stopped within the drug window)."""


class Settings(_Strict):
    lookback_days: int = pydantic.Field(gt=0)
    drug_window_days: int = pydantic.Field(ge=0)
    statuses: list[OBSERVATION_STATUS] = ["final", "amended", "corrected"]
    trend_count: int = pydantic.Field(default=5, ge=1)
    trend_days: int = pydantic.Field(default=180, ge=1)
    source: Source


class Monitoring(_Strict):
    """What an order for a drug needs recently on record (used by order-select/order-sign)."""

    drugs: list[str] = pydantic.Field(min_length=1)
    analyte: Analyte
    max_age_days: int = pydantic.Field(gt=0)
    text: Text
    source: Source


class CardText(_Strict):
    """Card wording for the CDS Hooks service."""

    source_label: Text = "fhir-leuko"
    source_url: str = ""
    order_advice: str = ""
    snooze_after_override_hours: float | None = pydantic.Field(default=None, ge=0, le=24 * 365)
    """How long an override of a card holds this profile's findings back (CDS service); unset:
    the service's setting."""


class Profile(_Strict):
    id: Annotated[str, pydantic.StringConstraints(pattern=r"^[a-z0-9][a-z0-9.-]{0,63}$")]
    url: Annotated[str, pydantic.StringConstraints(pattern=r"^(https?|urn):\S+$")]
    version: Annotated[str, pydantic.StringConstraints(pattern=r"^\d+\.\d+\.\d+([-+][\w.]+)?$")]
    title: Text
    status: Literal["active", "draft", "retired"] = "active"
    when: Text
    then: Text
    description: str = ""
    priority: int = 0
    extends: str | None = None
    applies: Applies = Applies()
    settings: Settings
    gradings: dict[str, Grading]
    rules: list[Rule] = pydantic.Field(min_length=1)
    monitoring: list[Monitoring] = []
    card: CardText = CardText()
    references: list[str] = []

    @pydantic.model_validator(mode="after")
    def _rules_consistent(self) -> Profile:
        for index, rule in enumerate(self.rules):
            if rule.grading not in self.gradings:
                raise ValueError(f"rules[{index}]: grading {rule.grading!r} is not defined")
            limit = rule.lower_limit
            if not limit.lab_range and limit.value is None and not limit.by_age:
                grading = self.gradings[rule.grading]
                if grading.bands[0].below == "lower-limit":
                    raise ValueError(
                        f"rules[{index}]: the first band needs a lower limit, but the rule has "
                        "neither lab_range, value nor by_age"
                    )
        return self

    @property
    def canonical(self) -> str:
        """``url|version``, as written in ``DetectedIssue.reference``."""
        return f"{self.url}|{self.version}"


@dataclass(frozen=True)
class LoadedProfile:
    profile: Profile
    path: Path


class ProfileSet:
    """The profiles in force, highest priority first."""

    def __init__(self, profiles: Iterable[LoadedProfile], knowledge: Knowledge) -> None:
        self.knowledge = knowledge
        ordered = sorted(profiles, key=lambda lp: (-lp.profile.priority, lp.profile.id))
        self.loaded: tuple[LoadedProfile, ...] = tuple(ordered)

    @property
    def profiles(self) -> tuple[Profile, ...]:
        return tuple(lp.profile for lp in self.loaded if lp.profile.status == "active")

    def get(self, profile_id: str) -> Profile | None:
        for lp in self.loaded:
            if lp.profile.id == profile_id:
                return lp.profile
        return None

    def select(self, ids: Sequence[str]) -> ProfileSet:
        """Only these profiles (``--profile ID``).

        Raises:
            ProfileError: an id is not loaded.
        """
        known = {lp.profile.id for lp in self.loaded}
        for profile_id in ids:
            if profile_id not in known:
                raise ProfileError(
                    "--profile", profile_id, f"no such profile (loaded: {', '.join(sorted(known))})"
                )
        wanted = set(ids)
        return ProfileSet((lp for lp in self.loaded if lp.profile.id in wanted), self.knowledge)


def _check_against_knowledge(profile: Profile, knowledge: Knowledge, file: str) -> None:
    for error in _knowledge_errors(profile, knowledge, file):
        raise error


def _knowledge_errors(profile: Profile, knowledge: Knowledge, file: str) -> Iterator[ProfileError]:
    """Drug, group and flag ids the profile names that the knowledge files do not define."""
    drug_ids = {d.id for d in knowledge.drugs.drug} | {g.id for g in knowledge.drugs.group}
    flag_ids = {f.id for f in knowledge.conditions.flag}
    for drug in profile.applies.drugs:
        if drug not in drug_ids:
            yield ProfileError(file, "applies.drugs", f"unknown drug or group id {drug!r}")
    for index, item in enumerate(profile.monitoring):
        for drug in item.drugs:
            if drug not in drug_ids:
                yield ProfileError(
                    file, f"monitoring[{index}].drugs", f"unknown drug or group id {drug!r}"
                )
    for index, rule in enumerate(profile.rules):
        for name in ("when_flags", "unless_flags"):
            for flag in getattr(rule, name):
                if flag not in flag_ids:
                    yield ProfileError(file, f"rules[{index}].{name}", f"unknown flag {flag!r}")


_INHERITED = ("applies", "settings", "gradings", "rules", "monitoring", "card", "references")
_MERGED_TABLES = ("applies", "settings", "gradings", "card")


def _rule_key(rule: Any) -> tuple[str, tuple[str, ...]]:
    if not isinstance(rule, dict):
        return ("", ())
    flags = rule.get("when_flags") or []
    return (str(rule.get("finding")), tuple(sorted(str(f) for f in flags)))


def merge_extends(parent: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """The document a profile with ``extends`` stands for (profiles/README.md, "extends").

    The child inherits ``applies``, ``settings``, ``gradings``, ``rules``, ``monitoring``, ``card``
    and ``references``; a table it gives is merged key by key over the parent's, a rule it gives
    replaces the keys it names in the parent's rule for the same finding (and ``when_flags``) or is
    added; everything else (id, url, version, title, when, then …) is the child's own.
    """
    merged: dict[str, Any] = {k: v for k, v in parent.items() if k in _INHERITED}
    for key, value in child.items():
        if key in _MERGED_TABLES and isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        elif key == "rules" and isinstance(value, list) and isinstance(merged.get("rules"), list):
            rules = [dict(r) if isinstance(r, dict) else r for r in merged["rules"]]
            positions = {_rule_key(r): i for i, r in enumerate(rules)}
            for rule in value:
                index = positions.get(_rule_key(rule))
                if index is not None and isinstance(rule, dict):
                    rules[index] = {**rules[index], **rule}
                else:
                    rules.append(rule)
            merged["rules"] = rules
        else:
            merged[key] = value
    return merged


def _resolve(
    profile_id: str,
    documents: ProfileDocuments,
    chain: tuple[str, ...] = (),
) -> dict[str, Any]:
    document, path = documents[profile_id]
    parent_id = document.get("extends")
    if parent_id is None:
        return document
    if not isinstance(parent_id, str) or parent_id not in documents:
        raise ProfileError(str(path), "extends", f"no profile with id {parent_id!r} to extend")
    if parent_id in chain or parent_id == profile_id:
        raise ProfileError(
            str(path), "extends", f"extends cycle: {' -> '.join((*chain, profile_id, parent_id))}"
        )
    return merge_extends(_resolve(parent_id, documents, (*chain, profile_id)), document)


_RULE_FIELD = re.compile(r"^rules\[(\d+)\](.*)$")


def _as_in_file(
    exc: ProfileError, document: dict[str, Any], merged: dict[str, Any]
) -> ProfileError:
    """An error in a merged ``extends`` profile, with the rule index the site's file uses.

    Merging puts a child's rule at its parent's position for that finding, so the merged index
    (``rules[2]``) is not the one a person finds in the file (``rules[0]``).
    """
    match = _RULE_FIELD.match(exc.field)
    rules = merged.get("rules")
    if match is None or not document.get("extends") or not isinstance(rules, list):
        return exc
    index, rest = int(match[1]), match[2]
    if index < len(rules):
        wanted = _rule_key(rules[index])
        for position, rule in enumerate(document.get("rules") or []):
            if _rule_key(rule) == wanted:
                return ProfileError(exc.file, f"rules[{position}]{rest}", exc.reason)
    return ProfileError(
        exc.file, f"rules[{index}]{rest} (inherited from {document['extends']})", exc.reason
    )


def build_profiles(
    documents: ProfileDocuments,
    knowledge: Knowledge,
    only: set[Path] | None = None,
    *,
    every_error: bool = False,
) -> tuple[list[LoadedProfile], list[ProfileError]]:
    """Resolve ``extends``, validate and check each profile document against the knowledge.

    ``only``: build only the profiles read from these files (the others may still be extended).
    Errors are returned, each naming the file and the field: the first of each profile, or with
    ``every_error`` all of them (``fhir-leuko profiles validate``).
    """
    loaded: list[LoadedProfile] = []
    errors: list[ProfileError] = []
    for profile_id in sorted(documents):
        document, path = documents[profile_id]
        if only is not None and path not in only:
            continue
        try:
            merged = _resolve(profile_id, documents)
        except ProfileError as exc:
            errors.append(exc)
            continue
        if every_error:
            profile, found = document_errors(Profile, merged, str(path))
            found = [_as_in_file(e, document, merged) for e in found]
            if profile is not None:
                found.extend(_knowledge_errors(profile, knowledge, str(path)))
            errors.extend(found)
            if profile is not None and not found:
                loaded.append(LoadedProfile(profile, path))
            continue
        try:
            try:
                profile = validate_document(Profile, merged, str(path))
            except ProfileError as exc:
                raise _as_in_file(exc, document, merged) from None
            _check_against_knowledge(profile, knowledge, str(path))
        except ProfileError as exc:
            errors.append(exc)
            continue
        loaded.append(LoadedProfile(profile, path))
    return loaded, errors
