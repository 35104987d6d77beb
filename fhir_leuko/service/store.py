"""What the CDS service keeps between calls, as an interface: issued cards (with their page),
feedback, snoozes and what they held back.

:class:`CardStore` is the contract. Its SQL is written once
(:class:`~fhir_leuko.service.sqlstore.SqlCardStore`) for two databases: SQLite
(:class:`~fhir_leuko.service.feedback.FeedbackStore`, one file: one machine) and PostgreSQL
(:class:`~fhir_leuko.service.postgres.PostgresCardStore`, shared by several replicas). Any other
backend (Redis) implements the same methods with the same meaning and passes the same contract
tests (``tests/service/test_store.py``, parametrised by backend); nothing else in the service
changes.

What a backend must guarantee:

* **Idempotent writes.** ``record_cards`` ignores a card uuid it already holds;
  ``record_feedback`` stores an entry once however often it is sent (identity: service, card,
  outcome, time, accepted suggestions, reason, comment) and returns how many were new; a snooze is
  created once per new ``overridden`` entry of a known card.
* **Retention.** Issued cards (and their pages, snoozes and held-back records) older than the
  retention are deleted; ``card_page`` never returns a page past its own expiry
  (``page_expires``), nor for a token other than the one issued (compare hashes in constant
  time). Feedback rows are kept.
* **What is stored.** A card's page data holds clinical data (values, dates, drug names, resource
  references) but no patient identifier; the patient appears only as ``subject``, a keyed
  pseudonym (:meth:`CardStore.subject_of`) with a key that stays inside the store. Tokens are
  never stored, only their SHA-256.
* **Time** is always passed in (the service's clock): a backend never reads its own clock for
  expiry or snoozes, so replicas agree and tests can move time.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from .models import FeedbackEntry

__all__ = [
    "CardFinding",
    "CardPage",
    "CardStore",
    "HeldBack",
    "IssuedCard",
    "Snooze",
    "StoredCard",
    "StoredFeedback",
]


@dataclass(frozen=True, slots=True)
class CardFinding:
    """A finding a card showed, as a snooze compares it: worse is a deeper band or a lower value."""

    kind: str
    rank: int
    """The band's place in its grading, shallowest 0."""
    grade: str
    value: float
    snooze_seconds: int
    """How long an override of this card holds this finding back (0: it is never held back)."""


@dataclass(frozen=True, slots=True)
class IssuedCard:
    uuid: str
    indicator: str
    topic: str
    suggestions: tuple[tuple[str, str], ...]
    """``(uuid, label)`` of each suggestion."""
    summary: str = ""
    silent: bool = False
    """Computed and kept but not returned (silent mode)."""
    subject: str = ""
    """The patient's pseudonym (:meth:`CardStore.subject_of`), for snoozes."""
    findings: tuple[CardFinding, ...] = ()
    page: dict[str, Any] | None = None
    """The data of the card's page (``GET /cards/{uuid}``), JSON-ready."""
    token_hash: str = ""
    """SHA-256 (hex) of the page link's token."""
    page_expires: datetime | None = None


@dataclass(frozen=True, slots=True)
class StoredFeedback:
    card: str
    outcome: str
    outcome_timestamp: str
    accepted_suggestions: tuple[str, ...]
    override_code: str | None
    user_comment: str | None
    known_card: bool
    override_display: str | None = None


@dataclass(frozen=True, slots=True)
class StoredCard:
    """A kept card as the review list shows it: never its token."""

    uuid: str
    service_id: str
    issued_at: str
    indicator: str
    topic: str
    summary: str
    silent: bool
    feedback: tuple[str, ...] = ()
    """The outcomes received for it."""
    held_back: int = 0


@dataclass(frozen=True, slots=True)
class HeldBack:
    """A finding not shown because an override of ``card`` snoozed it."""

    card: str
    service_id: str
    hook_instance: str
    at: str
    what: str


@dataclass(frozen=True, slots=True)
class Snooze:
    card: str
    """The overridden card."""
    kind: str
    rank: int
    grade: str
    value: float
    until: str


@dataclass(frozen=True)
class CardPage:
    uuid: str
    service_id: str
    issued_at: str
    expires: str
    page: dict[str, Any]
    feedback: Sequence[StoredFeedback] = field(default_factory=tuple)
    held_back: Sequence[HeldBack] = field(default_factory=tuple)


class CardStore(Protocol):
    """The service's store; see the module docstring for what every backend guarantees."""

    def subject_of(self, patient_id: str) -> str:
        """The pseudonym of a patient id (keyed, stable for this store)."""
        ...

    def record_cards(
        self,
        service_id: str,
        hook_instance: str,
        issued_at: datetime,
        cards: Sequence[IssuedCard],
    ) -> None: ...

    def issued_cards(self) -> list[str]:
        """The uuids of the cards still kept, oldest first."""
        ...

    def record_feedback(
        self,
        service_id: str,
        entries: Iterable[FeedbackEntry],
        *,
        client_iss: str | None,
        received_at: datetime,
    ) -> int:
        """Store feedback (an ``overridden`` entry of a known card snoozes its findings from
        ``received_at``); returns how many entries were new."""
        ...

    def feedback(self, card: str | None = None) -> list[StoredFeedback]: ...

    def snoozes(self, service_id: str, subject: str, now: datetime) -> list[Snooze]:
        """The snoozes of this service and patient still running at ``now``."""
        ...

    def record_held_back(self, held: Sequence[HeldBack]) -> None: ...

    def card_page(self, uuid: str, token: str, now: datetime) -> CardPage | None:
        """The page of a card, if ``token`` is its token and the page has not expired."""
        ...

    def cards(
        self, *, silent_only: bool = False, since: datetime | None = None, limit: int = 1000
    ) -> list[StoredCard]:
        """The kept cards, newest first, for review (never a token)."""
        ...

    def check_writable(self) -> None:
        """Write something small, or raise (``GET /readyz``): the store can take writes."""
        ...

    def close(self) -> None: ...
