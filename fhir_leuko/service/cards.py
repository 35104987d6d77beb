"""CDS Hooks cards from the rule core's findings: the same sentences as the DetectedIssues.

Every card carries a ``uuid`` (for feedback), a ``summary`` under 140 characters, an ``indicator``
(``critical`` for high severity, ``warning`` for moderate, ``info`` for low), a ``source`` with label,
url and topic, GitHub-flavoured markdown ``detail`` built from
:func:`fhir_leuko.core.explain.explain` (escaped, so no raw HTML reaches the client),
``overrideReasons`` with displays, and absolute links to the documentation. Suggestions always come with ``selectionBehavior``; every action has a
``description``; a delete names its target with ``resourceId``. Optional members are omitted, never
``null`` or empty (CDS Hooks 2.0 §Use of JSON).

Wording that is not a finding's own explanation comes from the profiles' ``[card]`` and
``[[monitoring]]`` tables; the CBC order and the override reasons from the service settings.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ..core.detectedissue import FINDING_SYSTEM, build_detected_issue
from ..core.explain import UNIT, explain, format_count, reference_of
from ..core.fhir_models import check_resource
from ..core.model import DrugHit, Finding, FindingKind, LabResult, quoted
from ..core.profiles import Monitoring, Profile, ProfileSet
from .feedback import IssuedCard
from .settings import CodingSettings

__all__ = [
    "CardContext",
    "DraftOrder",
    "MonitoringGap",
    "indicator_for",
    "md_escape",
    "order_card",
    "patient_card",
]

SUMMARY_LIMIT = 139
"""CDS Hooks 2.0: "One-sentence, <140-character summary"."""

_INDICATOR = {"high": "critical", "moderate": "warning", "low": "info"}
_RANK = {"high": 3, "moderate": 2, "low": 1}
MONITORING_INDICATOR = "warning"
"""A drug ordered without the monitoring its profile asks for (e.g. no ANC in 7 days for
clozapine): worth the prescriber's attention, not an emergency by itself."""

# CommonMark: any ASCII punctuation may be backslash-escaped. These are the ones that could start
# emphasis, links, code, headings, tables, strikethrough, HTML or entities in GFM.
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>#|~&!])")


def md_escape(text: str) -> str:
    """Text as literal GitHub-flavoured markdown (no emphasis, links or raw HTML)."""
    return _MD_SPECIAL.sub(r"\\\1", text.replace("\r", " ").replace("\n", " "))


def indicator_for(severity: str) -> str:
    return _INDICATOR.get(severity, "info")


# Presentation order at equal severity: neutropenia first (the infection risk, and the count drug
# monitoring is about), then the total count, then the other subtypes.
_KIND_ORDER = (
    FindingKind.NEUTROPENIA,
    FindingKind.LEUKOPENIA,
    FindingKind.LYMPHOPENIA,
    FindingKind.MONOCYTOPENIA,
    FindingKind.EOSINOPENIA,
    FindingKind.BASOPENIA,
)


def _sorted(findings: Iterable[Finding]) -> list[Finding]:
    """Most severe first; at equal severity in :data:`_KIND_ORDER`."""
    return sorted(findings, key=lambda f: (-_RANK.get(f.severity, 0), _KIND_ORDER.index(f.kind)))


def _value(result: LabResult) -> str:
    prefix = {"<": "< ", "<=": "≤ ", ">": "> ", ">=": "≥ "}.get(result.comparator or "", "")
    return f"{prefix}{format_count(result.value)} {UNIT}"


def _fit(candidates: Sequence[str]) -> str:
    """The first candidate under the summary limit; else the last one cut with an ellipsis."""
    for text in candidates:
        if len(text) <= SUMMARY_LIMIT:
            return text
    return candidates[-1][: SUMMARY_LIMIT - 1].rstrip() + "…"


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


@dataclass(frozen=True)
class CardContext:
    """What every card of one call needs besides its findings."""

    profiles: ProfileSet
    as_of: datetime
    patient_id: str
    documentation_url: str
    override_reasons: Sequence[CodingSettings]
    cbc_order: CodingSettings
    encounter_id: str | None = None
    user_id: str | None = None
    not_checked: dict[str, str] = field(default_factory=dict)
    """What could not be checked (e.g. ``medication statements``) and why."""
    problems: tuple[str, ...] = ()
    """Input problems (resource and reason, never patient data), shown so nothing fails silently."""


@dataclass(frozen=True)
class DraftOrder:
    """A draft MedicationRequest for a drug known to lower white counts."""

    reference: str | None
    """``MedicationRequest/id`` when the draft has an id."""
    names: tuple[str, ...]
    hits: tuple[DrugHit, ...]

    @property
    def label(self) -> str:
        return ", ".join(dict.fromkeys(h.label for h in self.hits))

    @property
    def effects(self) -> frozenset[str]:
        return frozenset(e for h in self.hits for e in h.effects)


@dataclass(frozen=True)
class MonitoringGap:
    """A monitoring entry of a profile the draft order does not meet."""

    profile: Profile
    monitoring: Monitoring
    drug_label: str
    last: LabResult | None
    """The latest result of the analyte on record (older than ``max_age_days``), if any."""


def _finding_short(finding: Finding) -> list[str]:
    result = finding.result
    when = result.effective_text[:10]
    return [
        f"{_cap(finding.term)}: {_value(result)} on {when}",
        f"{_cap(finding.kind.value)} ({finding.severity} severity): {_value(result)} on {when}",
    ]


def _finding_markdown(finding: Finding) -> list[str]:
    sentences = explain(finding)
    lines = [f"#### {md_escape(sentences.headline)}", ""]
    lines.extend(f"- {md_escape(b)}" for b in sentences.body())
    if sentences.recommendation:
        lines.append(f"- **Recommendation:** {md_escape(sentences.recommendation)}")
    lines.append(f"- {md_escape(sentences.rule)}")
    lines.append("")
    return lines


def _footer(ctx: CardContext) -> list[str]:
    lines: list[str] = []
    if ctx.not_checked:
        what = ", ".join(sorted(ctx.not_checked))
        lines.extend([f"_Not available to this check: {md_escape(what)}._", ""])
    if ctx.problems:
        lines.extend([f"_Results not used: {md_escape('; '.join(ctx.problems))}._", ""])
    return lines


def _source(
    ctx: CardContext, profile_id: str, topic_code: str, topic_display: str
) -> dict[str, Any]:
    profile = ctx.profiles.get(profile_id)
    source: dict[str, Any] = {"label": profile.card.source_label if profile else "fhir-leuko"}
    if profile is not None and profile.card.source_url:
        source["url"] = profile.card.source_url
    source["topic"] = {"system": FINDING_SYSTEM, "code": topic_code, "display": topic_display}
    return source


def _links(ctx: CardContext, profile_ids: Iterable[str]) -> list[dict[str, Any]]:
    links = [
        {
            "label": "How fhir-leuko decides (documentation)",
            "url": ctx.documentation_url,
            "type": "absolute",
        }
    ]
    seen = {ctx.documentation_url}
    for profile_id in dict.fromkeys(profile_ids):
        profile = ctx.profiles.get(profile_id)
        if profile is None or not profile.card.source_url or profile.card.source_url in seen:
            continue
        seen.add(profile.card.source_url)
        links.append(
            {
                "label": f"Rule: {profile.title} ({profile.version})",
                "url": profile.card.source_url,
                "type": "absolute",
            }
        )
    return links


def _override_reasons(ctx: CardContext) -> list[dict[str, str]]:
    return [
        {"system": r.system, "code": r.code, "display": r.display} for r in ctx.override_reasons
    ]


def _finish(
    card: dict[str, Any], ctx: CardContext, topic: str
) -> tuple[dict[str, Any], IssuedCard]:
    reasons = _override_reasons(ctx)
    if reasons:
        card["overrideReasons"] = reasons
    suggestions = card.get("suggestions") or []
    issued = IssuedCard(
        uuid=card["uuid"],
        indicator=card["indicator"],
        topic=topic,
        suggestions=tuple((s["uuid"], s["label"]) for s in suggestions),
    )
    return card, issued


def patient_card(
    findings: Sequence[Finding], ctx: CardContext
) -> tuple[dict[str, Any], IssuedCard] | None:
    """The one patient-view card condensing a patient's findings (``None`` without findings)."""
    if not findings:
        return None
    ordered = _sorted(findings)
    top = ordered[0]
    others = [f.kind.value for f in ordered[1:]]
    also = f"; also {', '.join(others)}" if others else ""
    summary = _fit([s + also for s in _finding_short(top)] + _finding_short(top))
    detail: list[str] = []
    for finding in ordered:
        detail.extend(_finding_markdown(finding))
    detail.extend(_footer(ctx))
    card: dict[str, Any] = {
        "uuid": str(uuid.uuid4()),
        "summary": summary,
        "detail": "\n".join(detail).strip(),
        "indicator": indicator_for(top.severity),
        "source": _source(ctx, top.profile_id, top.kind.value, _cap(top.kind.value)),
        "links": _links(ctx, (f.profile_id for f in ordered)),
    }
    return _finish(card, ctx, top.kind.value)


def _service_request(ctx: CardContext) -> dict[str, Any]:
    order = ctx.cbc_order
    resource: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "status": "draft",
        "intent": "order",
        "code": {
            "coding": [{"system": order.system, "code": order.code, "display": order.display}],
            "text": order.display,
        },
        "subject": {"reference": f"Patient/{ctx.patient_id}"},
    }
    if ctx.encounter_id:
        resource["encounter"] = {"reference": f"Encounter/{ctx.encounter_id}"}
    if ctx.user_id and ctx.user_id.startswith(("Practitioner/", "PractitionerRole/")):
        resource["requester"] = {"reference": ctx.user_id}
    return check_resource(resource)


def _gap_text(gap: MonitoringGap) -> str:
    m = gap.monitoring
    return f"no {m.analyte.label} in the last {m.max_age_days} days"


def _gap_markdown(gap: MonitoringGap, as_of: datetime) -> list[str]:
    m = gap.monitoring
    lines = [
        f"#### {md_escape(_cap(gap.drug_label))} needs a recent {md_escape(m.analyte.label)}",
        "",
    ]
    if gap.last is None:
        last = f"No {m.analyte.label} on record in the last {gap.profile.settings.trend_days} days."
    else:
        days = (as_of.date() - gap.last.effective.date()).days
        source = "derived" if gap.last.derived else quoted(reference_of(gap.last.key))
        last = (
            f"Latest {m.analyte.label}: {_value(gap.last)} on {quoted(gap.last.effective_text)} "
            f"[{source}], "
            f"{days} days before now; the {gap.profile.id} profile asks for one within "
            f"{m.max_age_days} days."
        )
    lines.append(f"- {md_escape(last)}")
    lines.append(f"- {md_escape(m.text)}")
    lines.append(f"- Source: {md_escape(m.source)}")
    lines.append(
        f"- {md_escape(f'Rule: {gap.profile.title} [{gap.profile.id} {gap.profile.version}].')}"
    )
    lines.append("")
    return lines


def order_card(
    order: DraftOrder,
    findings: Sequence[Finding],
    gaps: Sequence[MonitoringGap],
    ctx: CardContext,
    *,
    signing: bool,
) -> tuple[dict[str, Any], IssuedCard] | None:
    """The order-select / order-sign card of one draft order (``None`` when nothing is wrong).

    ``findings`` are the patient's findings of the kinds the drug is known to cause; ``gaps`` the
    monitoring its profiles ask for and the record lacks.
    """
    if not findings and not gaps:
        return None
    ordered = _sorted(findings)
    drug = _cap(order.label)
    if ordered:
        top = ordered[0]
        indicator = indicator_for(top.severity)
        problem = _finding_short(top)
        topic_code, topic_display = top.kind.value, _cap(top.kind.value)
        source_profile = top.profile_id
    else:
        indicator = MONITORING_INDICATOR
        problem = [_gap_text(gaps[0])]
        topic_code = gaps[0].monitoring.analyte.value
        topic_display = f"{_cap(gaps[0].monitoring.analyte.label)} monitoring"
        source_profile = gaps[0].profile.id
    summary = _fit([f"{drug} order: {p}" for p in problem] + problem)

    effects = ", ".join(sorted(order.effects))
    what = quoted(order.reference) if order.reference else "the draft order"
    names = f": {quoted(order.names[0])}" if order.names else ""
    detail = [
        f"**{md_escape(drug)}** is being ordered ({md_escape(what + names)}); it is known to cause "
        f"{md_escape(effects)}.",
        "",
    ]
    for gap in gaps:
        detail.extend(_gap_markdown(gap, ctx.as_of))
    for finding in ordered:
        detail.extend(_finding_markdown(finding))
    profile_ids = [g.profile.id for g in gaps] + [f.profile_id for f in ordered]
    for profile_id in dict.fromkeys(profile_ids):
        profile = ctx.profiles.get(profile_id)
        if profile is not None and profile.card.order_advice:
            detail.extend([f"**Advice:** {md_escape(profile.card.order_advice)}", ""])
    detail.extend(_footer(ctx))

    order_code = ctx.cbc_order
    suggestions: list[dict[str, Any]] = [
        {
            "label": "Order a CBC with differential",
            "uuid": str(uuid.uuid4()),
            "isRecommended": True,
            "actions": [
                {
                    "type": "create",
                    "description": f"Order {order_code.display} ({order_code.code})",
                    "resource": _service_request(ctx),
                }
            ],
        }
    ]
    if ordered:
        suggestions.append(
            {
                "label": "Record the finding in the chart (DetectedIssue)",
                "uuid": str(uuid.uuid4()),
                "actions": [
                    {
                        "type": "create",
                        "description": f"Record a DetectedIssue: {f.term} ({f.severity} severity)",
                        "resource": build_detected_issue(f, identified=ctx.as_of),
                    }
                    for f in ordered
                ],
            }
        )
    severe = any(f.kind.value == "neutropenia" and f.severity == "high" for f in ordered)
    if signing and severe and order.reference:
        suggestions.append(
            {
                "label": f"Remove the {order.label} order",
                "uuid": str(uuid.uuid4()),
                "actions": [
                    {
                        "type": "delete",
                        "description": f"Remove the draft order {order.reference} ({order.label})",
                        "resourceId": order.reference,
                    }
                ],
            }
        )
    card: dict[str, Any] = {
        "uuid": str(uuid.uuid4()),
        "summary": summary,
        "detail": "\n".join(detail).strip(),
        "indicator": indicator,
        "source": _source(ctx, source_profile, topic_code, topic_display),
        "suggestions": suggestions,
        "selectionBehavior": "any",
        "links": _links(ctx, profile_ids),
    }
    return _finish(card, ctx, topic_code)
