"""CDS Hooks cards from the rule core's findings: the same sentences as the DetectedIssues.

Every card carries a ``uuid`` (for feedback), a ``summary`` under 140 characters, an ``indicator``
(``critical`` for high severity, ``warning`` for moderate, ``info`` for low), a ``source`` with label,
url and topic, a short GitHub-flavoured markdown ``detail`` (escaped, so no raw HTML reaches the
client: the value, date and grade that matter, the trend in one line, the drug and the action),
``overrideReasons`` with displays, and absolute links: the documentation, and the card's own page
(``GET /cards/{uuid}?token=...``) with the full explanation of
:func:`fhir_leuko.core.explain.explain` and the trend plot. Suggestions always come with ``selectionBehavior``; every action has a
``description``; a delete names its target with ``resourceId``. Optional members are omitted, never
``null`` or empty (CDS Hooks 2.0 §Use of JSON).

Wording that is not a finding's own explanation comes from the profiles' ``[card]`` and
``[[monitoring]]`` tables; the CBC order and the override reasons from the service settings.
"""

from __future__ import annotations

import re
import secrets
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ..core.detectedissue import FINDING_SYSTEM, build_detected_issue
from ..core.explain import UNIT, drug_line, explain, format_count, reference_of, trend_line
from ..core.fhir_models import check_resource
from ..core.fhirtime import format_instant
from ..core.model import DrugHit, Finding, FindingKind, LabResult, quoted
from ..core.profiles import Monitoring, Profile, ProfileSet
from ..present.rows import grade_short, sort_findings
from ..present.trend import SHORT, TrendData
from .feedback import token_hash
from .settings import CodingSettings
from .store import CardFinding, IssuedCard

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
    page_base: str | None = None
    """The public base URL of the card pages (``{page_base}/cards/{uuid}``); none: no page link."""
    page_expires: datetime | None = None
    subject: str = ""
    """The patient's pseudonym in the store (snoozes)."""
    ranks: dict[FindingKind, int] = field(default_factory=dict)
    """Each finding's band, counted from the shallowest (0), from the evaluator's decisions."""
    snooze_seconds: dict[str, int] = field(default_factory=dict)
    """How long an override snoozes a finding of each profile (by profile id)."""
    trend: TrendData | None = None
    silent: bool = False


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


_ACTION_LIMIT = 200
"""The action on a card: the recommendation's first sentences up to about this many characters
(all of it is on the card's page)."""


def _action(text: str) -> str:
    sentences = re.split(r"(?<=[.;])\s+", text.strip())
    out = sentences[0]
    for sentence in sentences[1:]:
        if len(out) + 1 + len(sentence) > _ACTION_LIMIT:
            return out + " …"
        out += " " + sentence
    return out


def _limit_text(finding: Finding) -> str:
    limit = finding.lower_limit.value
    return f" (lower limit {format_count(limit)})" if limit is not None else ""


def _finding_brief(finding: Finding) -> list[str]:
    """Value, date and grade; the trend in one line; the drug: what a clinician reads first."""
    result = finding.result
    lines = [
        f"**{md_escape(SHORT[result.analyte])} {md_escape(_value(result))}** on "
        f"{md_escape(result.effective_text[:10])}: {md_escape(grade_short(finding))}, "
        f"{md_escape(finding.severity)} severity{md_escape(_limit_text(finding))}",
    ]
    trend = trend_line(finding)
    if trend:
        lines.append(f"Trend: {md_escape(trend)}")
    drugs = drug_line(finding)
    lines.append(
        f"Drug: {md_escape(drugs)}" if drugs else "Drug: none known to cause it was active"
    )
    return lines


def _also(findings: Sequence[Finding]) -> str:
    parts = [f"{grade_short(f)} ({SHORT[f.result.analyte]} {_value(f.result)})" for f in findings]
    return f"Also: {md_escape('; '.join(parts))}" if parts else ""


def _page_section(finding: Finding) -> dict[str, Any]:
    sentences = explain(finding)
    return {"title": sentences.headline, "lines": sentences.lines()[1:]}


def _footer(ctx: CardContext) -> list[str]:
    lines: list[str] = []
    if ctx.not_checked:
        what = ", ".join(sorted(ctx.not_checked))
        lines.append(f"_Not available to this check: {md_escape(what)}._")
    if ctx.problems:
        lines.append(f"_Results not used: {md_escape('; '.join(ctx.problems))}._")
    return lines


def _page_notes(ctx: CardContext) -> list[str]:
    notes = [f"Not available to this check: {what} ({why})." for what, why in
             sorted(ctx.not_checked.items())]  # fmt: skip
    if ctx.problems:
        notes.append(f"Results not used: {'; '.join(ctx.problems)}.")
    return notes


def _source(
    ctx: CardContext, profile_id: str, topic_code: str, topic_display: str
) -> dict[str, Any]:
    profile = ctx.profiles.get(profile_id)
    source: dict[str, Any] = {"label": profile.card.source_label if profile else "fhir-leuko"}
    if profile is not None and profile.card.source_url:
        source["url"] = profile.card.source_url
    source["topic"] = {"system": FINDING_SYSTEM, "code": topic_code, "display": topic_display}
    return source


def _links(
    ctx: CardContext, profile_ids: Iterable[str], page: str | None = None
) -> list[dict[str, Any]]:
    links: list[dict[str, Any]] = []
    if page is not None:
        links.append({"label": "Full explanation and trend plot", "url": page, "type": "absolute"})
    links.append(
        {
            "label": "How fhir-leuko decides (documentation)",
            "url": ctx.documentation_url,
            "type": "absolute",
        }
    )
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


def _page_link(ctx: CardContext, card_uuid: str) -> tuple[str | None, str]:
    """The page URL (with a fresh token) and the token's hash; none without a public base URL."""
    if ctx.page_base is None or ctx.page_expires is None:
        return None, ""
    token = secrets.token_urlsafe(32)
    return f"{ctx.page_base}/cards/{card_uuid}?token={token}", token_hash(token)


def _card_findings(findings: Sequence[Finding], ctx: CardContext) -> tuple[CardFinding, ...]:
    return tuple(
        CardFinding(
            kind=f.kind.value,
            rank=ctx.ranks.get(f.kind, 0),
            grade=f.grade,
            value=f.result.value,
            snooze_seconds=ctx.snooze_seconds.get(f.profile_id, 0),
        )
        for f in findings
    )


def _finish(
    card: dict[str, Any],
    ctx: CardContext,
    topic: str,
    findings: Sequence[Finding],
    page: dict[str, Any],
    profile_ids: Iterable[str],
) -> tuple[dict[str, Any], IssuedCard]:
    url, hashed = _page_link(ctx, card["uuid"])
    card["links"] = _links(ctx, profile_ids, url)
    reasons = _override_reasons(ctx)
    if reasons:
        card["overrideReasons"] = reasons
    suggestions = card.get("suggestions") or []
    page = {
        "summary": card["summary"],
        "indicator": card["indicator"],
        "as_of": format_instant(ctx.as_of),
        **page,
        "notes": _page_notes(ctx),
        "trend": ctx.trend.to_json() if ctx.trend is not None else None,
    }
    issued = IssuedCard(
        uuid=card["uuid"],
        indicator=card["indicator"],
        topic=topic,
        suggestions=tuple((s["uuid"], s["label"]) for s in suggestions),
        summary=card["summary"],
        silent=ctx.silent,
        subject=ctx.subject,
        findings=_card_findings(findings, ctx),
        page=page if url is not None else None,
        token_hash=hashed,
        page_expires=ctx.page_expires if url is not None else None,
    )
    return card, issued


def patient_card(
    findings: Sequence[Finding], ctx: CardContext
) -> tuple[dict[str, Any], IssuedCard] | None:
    """The one patient-view card condensing a patient's findings (``None`` without findings)."""
    if not findings:
        return None
    ordered = sort_findings(findings)  # the table's and the report's order (present.rows)
    top = ordered[0]
    others = [f.kind.value for f in ordered[1:]]
    also = f"; also {', '.join(others)}" if others else ""
    summary = _fit([s + also for s in _finding_short(top)] + _finding_short(top))
    detail = _finding_brief(top)
    if top.recommendation:
        detail.append(f"**Action:** {md_escape(_action(top.recommendation))}")
    also_line = _also(ordered[1:])
    if also_line:
        detail.append(also_line)
    detail.extend(_footer(ctx))
    card: dict[str, Any] = {
        "uuid": str(uuid.uuid4()),
        "summary": summary,
        "detail": "\n\n".join(detail),
        "indicator": indicator_for(top.severity),
        "source": _source(ctx, top.profile_id, top.kind.value, _cap(top.kind.value)),
    }
    page = {"sections": [_page_section(f) for f in ordered]}
    return _finish(card, ctx, top.kind.value, ordered, page, (f.profile_id for f in ordered))


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


def _gap_brief(gap: MonitoringGap, as_of: datetime) -> str:
    m = gap.monitoring
    what = f"No {m.analyte.label} in the last {m.max_age_days} days"
    if gap.last is None:
        last = f"none on record in the last {gap.profile.settings.trend_days} days"
    else:
        days = (as_of.date() - gap.last.effective.date()).days
        last = f"latest {_value(gap.last)} on {gap.last.effective_text[:10]}, {days} days ago"
    return f"**{md_escape(what)}** ({md_escape(last)})"


def _gap_section(gap: MonitoringGap, as_of: datetime) -> dict[str, Any]:
    m = gap.monitoring
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
    return {
        "title": f"{_cap(gap.drug_label)} needs a recent {m.analyte.label}",
        "lines": [
            last,
            m.text,
            f"Source: {m.source}",
            f"Rule: {gap.profile.title} [{gap.profile.id} {gap.profile.version}].",
        ],
    }


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
    ordered = sort_findings(findings)  # the table's and the report's order (present.rows)
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
        f"**{md_escape(drug)}** is being ordered ({md_escape(what + names)}); it can cause "
        f"{md_escape(effects)}."
    ]
    if ordered:
        detail.extend(_finding_brief(ordered[0]))
    detail.extend(_gap_brief(gap, ctx.as_of) for gap in gaps)
    profile_ids = [g.profile.id for g in gaps] + [f.profile_id for f in ordered]
    advice = [
        p.card.order_advice
        for p in (ctx.profiles.get(i) for i in dict.fromkeys(profile_ids))
        if p is not None and p.card.order_advice
    ]
    action = advice[0] if advice else (ordered[0].recommendation if ordered else "")
    if action:
        detail.append(f"**Action:** {md_escape(_action(action))}")
    also_line = _also(ordered[1:])
    if also_line:
        detail.append(also_line)
    detail.extend(_footer(ctx))
    sections = [
        {
            "title": f"{drug} is being ordered",
            "lines": [f"{what}{names}; it is known to cause {effects}."]
            + [f"Advice: {text}" for text in advice],
        }
    ]
    sections += [_gap_section(gap, ctx.as_of) for gap in gaps]
    sections += [_page_section(f) for f in ordered]

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
        "detail": "\n\n".join(detail),
        "indicator": indicator,
        "source": _source(ctx, source_profile, topic_code, topic_display),
        "suggestions": suggestions,
        "selectionBehavior": "any",
    }
    return _finish(card, ctx, topic_code, ordered, {"sections": sections}, profile_ids)
