"""The three CDS services on the rule core: patient-view, order-select and order-sign.

A call is: check the request (``hook``, ``hookInstance``, ``context``; ``fhirAuthorization`` needs
``fhirServer`` and must be for ``context.patientId``), get the data (prefetch, else the client's FHIR
server, else 412), normalise, evaluate with the profiles as of the call's time, and build cards.
The service adds no rule of its own: findings come from :func:`fhir_leuko.core.evaluate.evaluate`,
the monitoring an order needs from the profiles' ``[[monitoring]]``, drugs from the knowledge files.

patient-view
    One card condensing the patient's findings, or no card.
order-select / order-sign
    For each draft MedicationRequest (order-select: the ``selections``; order-sign: all) for a drug
    known to cause a low count: a card when the patient's latest counts are low for what the drug
    causes, or when a profile's monitoring is missing or too old (clozapine: no ANC in 7 days).
    A draft order without a medication yet, or for any other drug, gets no card, and needs no data.

A deceased patient (``Patient.deceased[x]``) gets no card from any hook.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import msgspec

from ..core.decision import Decision
from ..core.evaluate import evaluate, is_deceased, latest_result, profile_applies
from ..core.explain import value_text
from ..core.fhirjson import MedicationRequest, Sourced, decode_json, iter_document
from ..core.fhirtime import format_instant
from ..core.knowledge import Knowledge
from ..core.model import FINDING_ANALYTE, Analyte, Finding, FindingKind, PatientRecord, Problem
from ..core.normalise import drugs_of, normalise
from ..core.profiles import ProfileSet
from ..errors import MalformedRequestError, UnknownServiceError, UsageError
from ..fhir.privacy import enter_patients_scope
from ..present.rows import grade_short
from ..present.trend import SHORT, trend_data
from .cards import CardContext, DraftOrder, MonitoringGap, order_card, patient_card
from .fetch import FhirFetcher
from .models import WireContext, WireRequest
from .prefetch import PrefetchKey, Resolution, prefetch_keys, resolve_prefetch, server_access
from .security import Caller
from .settings import ServiceSettings
from .store import CardStore, HeldBack, IssuedCard, Snooze

__all__ = ["SERVICES", "CdsEngine", "ServiceDefinition"]

logger = logging.getLogger("fhir_leuko.service")


@dataclass(frozen=True, slots=True)
class ServiceDefinition:
    id: str
    hook: str
    title: str
    description: str


SERVICES: tuple[ServiceDefinition, ...] = (
    ServiceDefinition(
        "leuko-patient-view",
        "patient-view",
        "Low white-cell counts (fhir-leuko)",
        "When a chart is opened: one card if the patient's latest white-cell counts are low "
        "(leukopenia, neutropenia including the agranulocytosis range, lymphopenia, monocytopenia, "
        "eosinopenia, basopenia), with values, dates, trend, grade, the limit and its source, the "
        "drugs known to cause it, and what to do.",
    ),
    ServiceDefinition(
        "leuko-order-select",
        "order-select",
        "Ordering a drug that lowers white counts (fhir-leuko)",
        "When a drug known to cause leukopenia or neutropenia (clozapine, chemotherapy, "
        "immunosuppressants, ...) is selected: a card if the patient's latest counts are low, or "
        "missing or too old for the drug's monitoring (clozapine: an ANC within 7 days).",
    ),
    ServiceDefinition(
        "leuko-order-sign",
        "order-sign",
        "Signing a drug that lowers white counts (fhir-leuko)",
        "When orders are signed: as order-select, and with severe neutropenia a suggestion to "
        "remove the draft order.",
    ),
)

USAGE = (
    "Authenticate with a JWT signed with ES384 or RS384 by a client configured in the service. "
    "Prefetch 'patient' and 'observations' (required), and the medication, condition and flag "
    "keys (optional); a key the client does not send is fetched from fhirServer only with "
    "fhirAuthorization and only if that server is configured for the client, otherwise the call "
    "answers 412."
)

# FHIR R4 id: https://hl7.org/fhir/R4/datatypes.html#id. Checked before an id is put in a URL.
_FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_KIND_OF: dict[Analyte, FindingKind] = {a: k for k, a in FINDING_ANALYTE.items()}
_NOT_A_DRAFT = frozenset({"entered-in-error", "cancelled"})
_PROBLEMS_SHOWN = 3
_REQUEST = msgspec.json.Decoder(WireRequest)
_CONTEXT = msgspec.json.Decoder(WireContext)


def _decode_request(body: bytes) -> tuple[WireRequest, WireContext]:
    try:
        request = decode_json(_REQUEST, body)
    except msgspec.ValidationError as exc:
        raise MalformedRequestError(f"invalid CDS Hooks request: {exc}") from None
    except msgspec.DecodeError:
        raise MalformedRequestError("the request body is not valid JSON") from None
    if not request.hook or not request.hookInstance:
        raise MalformedRequestError("hook and hookInstance must not be empty")
    if len(request.hookInstance) > 256:
        raise MalformedRequestError("hookInstance is too long")
    try:
        context = decode_json(_CONTEXT, request.context)
    except msgspec.ValidationError as exc:
        raise MalformedRequestError(f"invalid context: {exc}") from None
    except msgspec.DecodeError:
        raise MalformedRequestError("the context is not valid JSON") from None
    return request, context


def _patient_id(context: WireContext) -> str:
    value = context.patientId
    if value is None:
        raise MalformedRequestError("context.patientId is required")
    value = value.removeprefix("Patient/")
    if not _FHIR_ID.match(value):
        raise MalformedRequestError("context.patientId is not a FHIR id")
    return value


@dataclass
class _Call:
    """One hook call: its service, instance, time and the patient's pseudonym; what it held back."""

    service: ServiceDefinition
    hook_instance: str
    as_of: datetime
    subject: str
    held: list[HeldBack] = field(default_factory=list)


def _snooze_for(finding: Finding, snoozes: list[Snooze]) -> Snooze | None:
    """The latest running snooze of this finding's kind."""
    found = [s for s in snoozes if s.kind == finding.kind.value]
    return found[-1] if found else None


def _worse(finding: Finding, rank: int, snooze: Snooze) -> bool:
    """A deeper band, or a lower value, than the finding that was overridden."""
    return rank > snooze.rank or finding.result.value < snooze.value


class CdsEngine:
    """Answers discovery and hook calls. Thread-safe: calls run in worker threads."""

    def __init__(
        self,
        settings: ServiceSettings,
        knowledge: Knowledge,
        profiles: ProfileSet,
        *,
        fetcher: FhirFetcher,
        store: CardStore,
        executor: Executor,
        clock: Callable[[], datetime],
    ) -> None:
        self.settings = settings
        self.knowledge = knowledge
        self.profiles = profiles
        self.fetcher = fetcher
        self.store = store
        self.executor = executor
        self.clock = clock
        self.keys: tuple[PrefetchKey, ...] = prefetch_keys(knowledge)
        self.services = {s.id: s for s in SERVICES}
        unknown = sorted(set(settings.silent_services) - set(self.services))
        if unknown:
            raise UsageError(
                f"[service] silent_services: no service {', '.join(map(repr, unknown))} "
                f"(the services: {', '.join(self.services)})"
            )
        self.silent = frozenset(settings.silent_services)
        self.snooze_seconds = {
            p.id: round(
                3600
                * (
                    p.card.snooze_after_override_hours
                    if p.card.snooze_after_override_hours is not None
                    else settings.snooze_after_override_hours
                )
            )
            for p in profiles.profiles
        }
        self.snoozing = any(self.snooze_seconds.values())
        self._discovery = {
            "services": [
                {
                    "hook": s.hook,
                    "title": s.title,
                    "description": s.description,
                    "id": s.id,
                    "prefetch": {k.name: k.template for k in self.keys},
                    "usageRequirements": USAGE,
                }
                for s in SERVICES
            ]
        }

    def discovery(self) -> dict[str, Any]:
        return self._discovery

    def service(self, service_id: str) -> ServiceDefinition:
        """
        Raises:
            UnknownServiceError: no service with this id (HTTP 404).
        """
        found = self.services.get(service_id)
        if found is None:
            raise UnknownServiceError(f"no CDS service '{service_id}' (see GET /cds-services)")
        return found

    # -- a hook call -------------------------------------------------------------------------------

    def call(self, service_id: str, body: bytes, caller: Caller) -> dict[str, Any]:
        """The response to ``POST /cds-services/{service_id}``.

        Raises:
            UnknownServiceError, MalformedRequestError, PrefetchUnavailableError: 404, 400, 412.
        """
        started = time.perf_counter()
        service = self.service(service_id)
        request, context = _decode_request(body)
        if request.hook != service.hook:
            raise MalformedRequestError(
                f"hook '{request.hook}' does not match service '{service.id}' ({service.hook})"
            )
        patient_id = _patient_id(context)
        # From here on every log line names this patient by a pseudonym (also in what the call's
        # error handler logs: each call runs in a context of its own, routes.run_with_deadline).
        enter_patients_scope(request.fhirServer or "", [patient_id])
        authorization = request.fhirAuthorization
        token: str | None = None
        expires_in: int | None = None
        if authorization is not None:
            if not request.fhirServer:
                raise MalformedRequestError("fhirAuthorization requires fhirServer (cds-r-1)")
            if authorization.token_type.lower() != "bearer":
                raise MalformedRequestError("fhirAuthorization.token_type must be Bearer")
            if authorization.patient is not None and (
                authorization.patient.removeprefix("Patient/") != patient_id
            ):
                raise MalformedRequestError(
                    "fhirAuthorization.patient does not match context.patientId"
                )
            token, expires_in = authorization.access_token, authorization.expires_in
        access, why = server_access(
            request.fhirServer,
            token,
            expires_in,
            caller.fhir_servers,
            self.settings.testing.allow_http,
        )
        as_of = self.clock()

        def resolve() -> Resolution:
            return resolve_prefetch(
                self.keys, request.prefetch, patient_id, access, why, self.fetcher, self.executor
            )

        fetched: list[str] = []
        call = _Call(service, request.hookInstance, as_of, self.store.subject_of(patient_id))
        if service.hook == "patient-view":
            cards = self._patient_view(resolve, patient_id, context, call, fetched)
        else:
            cards = self._orders(
                resolve, patient_id, context, call, fetched, signing=service.hook == "order-sign"
            )
        self.store.record_cards(service.id, request.hookInstance, as_of, [c[1] for c in cards])
        self.store.record_held_back(call.held)
        silent = service.id in self.silent
        logger.info(
            "%s hookInstance=%s iss=%s tenant=%s jti=%s cards=%d%s held_back=%d fetched=%s %.1f ms",
            service.id,
            request.hookInstance,
            caller.iss,
            caller.tenant,
            caller.jti,
            len(cards),
            " (silent: not returned)" if silent else "",
            len(call.held),
            ",".join(fetched) or "-",
            (time.perf_counter() - started) * 1000,
        )
        if silent:
            for _card, issued in cards:
                logger.info(
                    "%s silent card %s indicator=%s topic=%s",
                    service.id,
                    issued.uuid,
                    issued.indicator,
                    issued.topic,
                )
            return {"cards": []}
        return {"cards": [c[0] for c in cards]}

    def _record(
        self, resolution: Resolution, patient_id: str
    ) -> tuple[PatientRecord, list[Problem]]:
        dataset = normalise(resolution.items, self.knowledge)
        # A chart replaced by another record (Patient.link replaced-by): its data counts for the
        # surviving record, which is the patient the cards are about.
        key = dataset.merged.get(f"Patient/{patient_id}", f"Patient/{patient_id}")
        record = dataset.patients.get(key) or PatientRecord(key)
        for problem in dataset.problems:
            logger.info("input problem: %s", problem)
        return record, dataset.problems

    def _context(
        self,
        patient_id: str,
        context: WireContext,
        call: _Call,
        resolution: Resolution,
        problems: list[Problem],
        decisions: list[Decision],
        findings: list[Finding],
    ) -> CardContext:
        labels = {k.name: k.what for k in self.keys}
        not_checked = {labels[name]: reason for name, reason in resolution.unavailable.items()}
        shown = [f"{p.resource or p.source}: {p.reason}" for p in problems[:_PROBLEMS_SHOWN]]
        if len(problems) > _PROBLEMS_SHOWN:
            shown.append(f"and {len(problems) - _PROBLEMS_SHOWN} more")
        settings = self.settings
        days = settings.card_page_days
        if settings.issued_card_retention_days:
            days = min(days, settings.issued_card_retention_days)
        ranks: dict[FindingKind, int] = {}
        for decision in decisions:
            if decision.finding is not None:
                grades = [b.grade for b in decision.bands]
                ranks[decision.kind] = grades.index(decision.finding.grade)
        return CardContext(
            profiles=self.profiles,
            as_of=call.as_of,
            patient_id=patient_id,
            documentation_url=self.settings.documentation_url,
            override_reasons=self.settings.override_reasons,
            cbc_order=self.settings.cbc_order,
            encounter_id=context.encounterId
            if context.encounterId and _FHIR_ID.match(context.encounterId)
            else None,
            user_id=context.userId,
            not_checked=not_checked,
            problems=tuple(shown),
            page_base=settings.public_base_url if days else None,
            page_expires=call.as_of + timedelta(days=days) if days else None,
            subject=call.subject,
            ranks=ranks,
            snooze_seconds=self.snooze_seconds,
            trend=trend_data(decisions, findings) if days and settings.public_base_url else None,
            silent=call.service.id in self.silent,
        )

    def _unsnoozed(self, findings: list[Finding], ctx: CardContext, call: _Call) -> list[Finding]:
        """The findings not held back by a snooze (an override of an earlier card of this service
        for this patient, still running, and the finding not worse); the others are recorded with
        the overridden card."""
        if not self.snoozing:
            return findings  # no snooze is configured anywhere: nothing to look up
        snoozes = self.store.snoozes(call.service.id, call.subject, call.as_of)
        if not snoozes:
            return findings
        shown: list[Finding] = []
        for finding in findings:
            snooze = _snooze_for(finding, snoozes)
            if snooze is None or _worse(finding, ctx.ranks.get(finding.kind, 0), snooze):
                shown.append(finding)
                continue
            result = finding.result
            call.held.append(
                HeldBack(
                    card=snooze.card,
                    service_id=call.service.id,
                    hook_instance=call.hook_instance,
                    at=format_instant(call.as_of),
                    what=f"{grade_short(finding)}, {finding.severity} severity: "
                    f"{SHORT[result.analyte]} {value_text(result)} on {result.effective_text[:10]} "
                    f"(snoozed until {snooze.until})",
                )
            )
        return shown

    def _patient_view(
        self,
        resolve: Callable[[], Resolution],
        patient_id: str,
        context: WireContext,
        call: _Call,
        fetched: list[str],
    ) -> list[tuple[dict[str, Any], IssuedCard]]:
        resolution = resolve()
        fetched.extend(resolution.fetched)
        record, problems = self._record(resolution, patient_id)
        decisions: list[Decision] = []
        findings = evaluate(record, self.profiles, as_of=call.as_of, trace=decisions)
        ctx = self._context(patient_id, context, call, resolution, problems, decisions, findings)
        card = patient_card(self._unsnoozed(findings, ctx, call), ctx)
        return [card] if card is not None else []

    def _drafts(self, context: WireContext, *, signing: bool) -> list[DraftOrder]:
        """Draft MedicationRequests for drugs known to lower white counts."""
        raw = bytes(context.draftOrders)
        if not raw.strip() or raw.strip() == b"null":
            return []
        sourced: list[Sourced] = []
        for item in iter_document(raw, "context.draftOrders"):
            if isinstance(item, Problem):
                logger.info("draft order not read: %s", item)
            else:
                sourced.append(item)
        selected = set(context.selections or []) if not signing else set()
        drafts: list[DraftOrder] = []
        for resource, origin in sourced:
            if not isinstance(resource, MedicationRequest):
                continue
            reference = f"MedicationRequest/{resource.id}" if resource.id else None
            if selected and reference not in selected and origin.full_url not in selected:
                continue
            if resource.status in _NOT_A_DRAFT or resource.doNotPerform:
                continue
            hits, names = drugs_of(resource, self.knowledge, sourced)
            risky = tuple(h for h in hits if h.effects)
            if risky:
                drafts.append(DraftOrder(reference, names, risky))
        return drafts

    def _gaps(
        self, order: DraftOrder, record: PatientRecord, as_of: datetime
    ) -> list[MonitoringGap]:
        gaps: list[MonitoringGap] = []
        seen: set[tuple[str, str]] = set()
        for profile in self.profiles.profiles:
            if not profile_applies(profile, record, as_of):
                continue
            statuses = profile.settings.statuses
            for monitoring in profile.monitoring:
                wanted = set(monitoring.drugs)
                hit = next(
                    (h for h in order.hits if h.drug_id in wanted or wanted.intersection(h.groups)),
                    None,
                )
                if hit is None or (monitoring.analyte.value, hit.drug_id) in seen:
                    continue
                seen.add((monitoring.analyte.value, hit.drug_id))
                kind = _KIND_OF[monitoring.analyte]
                recent = latest_result(
                    record,
                    kind,
                    as_of=as_of,
                    lookback=timedelta(days=monitoring.max_age_days),
                    statuses=statuses,
                )
                if recent is not None:
                    continue
                last = latest_result(
                    record,
                    kind,
                    as_of=as_of,
                    lookback=timedelta(days=profile.settings.trend_days),
                    statuses=statuses,
                )
                gaps.append(MonitoringGap(profile, monitoring, hit.label, last))
        return gaps

    def _orders(
        self,
        resolve: Callable[[], Resolution],
        patient_id: str,
        context: WireContext,
        call: _Call,
        fetched: list[str],
        *,
        signing: bool,
    ) -> list[tuple[dict[str, Any], IssuedCard]]:
        drafts = self._drafts(context, signing=signing)
        if not drafts:
            return []  # nothing ordered that lowers white counts: no data needed, nothing to say
        resolution = resolve()
        fetched.extend(resolution.fetched)
        record, problems = self._record(resolution, patient_id)
        decisions: list[Decision] = []
        as_of = call.as_of
        if is_deceased(record, as_of):
            return []  # no alert for a deceased patient (issue 13 §5; docs/cds-hooks.md)
        findings = evaluate(record, self.profiles, as_of=as_of, trace=decisions)
        ctx = self._context(patient_id, context, call, resolution, problems, decisions, findings)
        shown = self._unsnoozed(findings, ctx, call)
        cards: list[tuple[dict[str, Any], IssuedCard]] = []
        for order in drafts:
            relevant = [f for f in shown if f.kind.value in order.effects]
            card = order_card(
                order, relevant, self._gaps(order, record, as_of), ctx, signing=signing
            )
            if card is not None:
                cards.append(card)
        return cards
