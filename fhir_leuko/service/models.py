"""CDS Hooks 2.0 objects: what the service reads, and the documented shapes of what it answers.

Requests are read with msgspec (the ``Wire*`` structs): the envelope and the hook context are
checked, the FHIR data inside ``prefetch`` and ``draftOrders`` is kept as raw JSON bytes and decoded
leniently by :mod:`fhir_leuko.core.fhirjson`, so the hot path never builds Python objects for 200
Observations only to serialise them again. Unknown members are ignored everywhere (CDS Hooks 2.0
and the sandbox send extensions and non-strict R4).

The pydantic models document the same shapes in the OpenAPI document (``/openapi.json``); the
responses the service builds are checked against them in the tests (``extra="forbid"``).
Spec: https://cds-hooks.hl7.org/2.0/ (source HL7/cds-hooks tag v2.0.1).
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec
import pydantic

__all__ = [
    "Action",
    "Card",
    "CardsResponse",
    "Coding",
    "DiscoveryResponse",
    "FeedbackEntry",
    "FeedbackRequest",
    "HookRequest",
    "Link",
    "OperationOutcome",
    "ServiceDescription",
    "Source",
    "Suggestion",
    "WireContext",
    "WireFhirAuthorization",
    "WireRequest",
]

# --- requests, as read on the hot path ---------------------------------------------------------


class WireFhirAuthorization(msgspec.Struct):
    """``fhirAuthorization`` (CDS Hooks 2.0 §Passing the Access Token). ``access_token`` is never
    logged, stored or echoed; ``__repr__`` hides it."""

    access_token: str
    token_type: str
    expires_in: int | None = None
    scope: str | None = None
    subject: str | None = None
    patient: str | None = None

    def __repr__(self) -> str:
        return f"WireFhirAuthorization(token_type={self.token_type!r}, patient={self.patient!r})"


class WireRequest(msgspec.Struct):
    """The body of ``POST /cds-services/{id}`` (CDS Hooks 2.0 §Calling a CDS Service)."""

    hook: str
    hookInstance: str
    context: msgspec.Raw
    fhirServer: str | None = None
    fhirAuthorization: WireFhirAuthorization | None = None
    prefetch: dict[str, msgspec.Raw] | None = None


class WireContext(msgspec.Struct):
    """The members of the patient-view, order-select and order-sign contexts the service reads
    (hook library 1.0.1). ``draftOrders`` stays raw: it is decoded leniently."""

    patientId: str | None = None
    userId: str | None = None
    encounterId: str | None = None
    selections: list[str] | None = None
    draftOrders: msgspec.Raw = msgspec.Raw()
    """Empty when absent (msgspec.Raw cannot be part of a union)."""


# --- documented shapes (OpenAPI) ------------------------------------------------------------------


class _Model(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")


class Coding(_Model):
    """CDS Hooks' Coding: ``system`` and ``code`` required; ``display`` required in
    ``overrideReasons`` (CDS Hooks 2.0 §Coding)."""

    system: str
    code: str
    display: str | None = None


class Source(_Model):
    """Where a card's guidance comes from (§Source)."""

    label: str
    url: str | None = None
    icon: str | None = None
    topic: Coding | None = None


class Action(_Model):
    """A suggested change (§Action): ``create`` carries ``resource``; ``delete`` uses
    ``resourceId`` (a relative reference)."""

    type: Literal["create", "update", "delete"]
    description: str
    resource: dict[str, Any] | None = None
    resourceId: str | None = None


class Suggestion(_Model):
    """A set of actions the user may accept together (§Suggestion)."""

    label: str
    uuid: str | None = None
    isRecommended: bool | None = None
    actions: list[Action] | None = None


class Link(_Model):
    """A link shown on a card (§Link); fhir-leuko only sends ``absolute`` links."""

    label: str
    url: str
    type: Literal["absolute", "smart"]
    appContext: str | None = None
    autolaunchable: bool | None = None


class Card(_Model):
    """One card (§Card Attributes). Every fhir-leuko card has a ``uuid`` (for feedback)."""

    uuid: str | None = None
    summary: str = pydantic.Field(max_length=139)
    detail: str | None = None
    indicator: Literal["info", "warning", "critical"]
    source: Source
    suggestions: list[Suggestion] | None = None
    selectionBehavior: Literal["at-most-one", "any"] | None = None
    overrideReasons: list[Coding] | None = None
    links: list[Link] | None = None


class CardsResponse(_Model):
    """The answer to a hook call: ``cards`` (possibly empty)."""

    cards: list[Card]
    systemActions: list[Action] | None = None


class ServiceDescription(_Model):
    """One service of the discovery response (§Discovery)."""

    hook: str
    title: str | None = None
    description: str
    id: str
    prefetch: dict[str, str] | None = None
    usageRequirements: str | None = None


class DiscoveryResponse(_Model):
    services: list[ServiceDescription]


class OperationOutcomeIssue(_Model):
    severity: Literal["fatal", "error", "warning", "information"]
    code: str
    details: dict[str, str] | None = None
    diagnostics: str | None = None
    expression: list[str] | None = None


class OperationOutcome(_Model):
    """The body of every error response (CDS Hooks 3.0 ballot: SHOULD; harmless in 2.0)."""

    resourceType: Literal["OperationOutcome"]
    issue: list[OperationOutcomeIssue]


class FhirAuthorization(pydantic.BaseModel):
    access_token: str
    token_type: Literal["Bearer"]
    expires_in: int
    scope: str
    subject: str
    patient: str | None = None


class HookRequest(pydantic.BaseModel):
    """The body of a hook call, as documented (the service reads it leniently, see module doc)."""

    hook: str
    hookInstance: str
    fhirServer: str | None = None
    fhirAuthorization: FhirAuthorization | None = None
    context: dict[str, Any]
    prefetch: dict[str, Any] | None = None


# --- feedback -------------------------------------------------------------------------------------


class FeedbackCoding(pydantic.BaseModel):
    """A reason as clients send it: the sandbox omits ``display`` (cds-hooks.md §2.1)."""

    model_config = pydantic.ConfigDict(extra="ignore")

    system: str | None = None
    code: str
    display: str | None = None


class AcceptedSuggestion(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="ignore")

    id: str = pydantic.Field(min_length=1)


class OverrideReason(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="ignore")

    reason: FeedbackCoding | None = None
    userComment: str | None = None

    @pydantic.model_validator(mode="after")
    def _cds_fb_3(self) -> OverrideReason:
        if self.reason is None and not self.userComment:
            raise ValueError(
                "cds-fb-3: an overrideReason must contain a reason, a userComment, or both"
            )
        return self


class FeedbackEntry(pydantic.BaseModel):
    """One feedback item (CDS Hooks 2.0 §Feedback; invariants cds-fb-1..3)."""

    model_config = pydantic.ConfigDict(extra="ignore")

    card: str = pydantic.Field(min_length=1)
    outcome: Literal["accepted", "overridden"]
    acceptedSuggestions: list[AcceptedSuggestion] | None = None
    overrideReason: OverrideReason | None = None
    outcomeTimestamp: pydantic.AwareDatetime

    @pydantic.model_validator(mode="after")
    def _cds_fb_2(self) -> FeedbackEntry:
        if self.outcome == "accepted" and not self.acceptedSuggestions:
            raise ValueError("cds-fb-2: outcome 'accepted' needs acceptedSuggestions")
        return self


class FeedbackRequest(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="ignore")

    feedback: list[FeedbackEntry] = pydantic.Field(min_length=1)
