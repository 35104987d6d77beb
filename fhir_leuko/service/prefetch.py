"""Prefetch templates, and what each prefetch key the client sent is worth (CDS Hooks 2.0 §Prefetch).

The templates stay inside the spec's recommended query subset: an instance read, and type searches
with a reference parameter (``patient``), token parameters with equality (``code``, ``status``),
``_count`` and ``_sort`` (R4 ``_sort=-date``, not the DSTU2-era ``sort:desc``). They use only the
``{{context.patientId}}`` token, which every hook fhir-leuko serves marks "Prefetch Token: Yes".
The Observation codes are every LOINC code of knowledge/loinc.toml, so the template follows the
knowledge file, and they carry no system: a token without a system matches LOINC written under its
OID (``urn:oid:2.16.840.1.113883.6.1``) or a differently spelt system too, as labs send it; the rule
core then counts LOINC and names the rest (issue 7 §3; the scheduled job searches the same way).

Each key is handled according to what the client sent:

====================  ==========================================================================
the key is            the service
====================  ==========================================================================
absent                fetches it from ``fhirServer`` with ``fhirAuthorization``, if that server is
                      configured for the authenticated client; otherwise it is unavailable
``null``              no data (the client looked and found nothing)
an OperationOutcome   missing: fetched as if absent (also a Bundle carrying an error outcome)
a Bundle with a       the next pages are fetched with the token (only under ``fhirServer``);
``next`` link         without a usable token the data is incomplete, so the key is missing
====================  ==========================================================================

A required key that stays unavailable makes the call fail with 412 and an OperationOutcome naming
it (:class:`~fhir_leuko.errors.PrefetchUnavailableError`); an optional one is named on the card as
not checked.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Iterable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import msgspec

from ..core.fhirjson import Sourced, decode_json, iter_document
from ..core.knowledge import Knowledge
from ..core.model import Problem
from ..errors import FhirFetchError, PrefetchUnavailableError
from .fetch import FhirFetcher, under_base

__all__ = [
    "PrefetchKey",
    "Resolution",
    "ServerAccess",
    "fill_template",
    "prefetch_keys",
    "resolve_prefetch",
    "server_access",
]

logger = logging.getLogger("fhir_leuko.service.prefetch")

PATIENT_TOKEN = "{{context.patientId}}"  # noqa: S105 (a prefetch token, not a password)


@dataclass(frozen=True, slots=True)
class PrefetchKey:
    name: str
    template: str
    required: bool
    """Required data: without it the service answers 412 rather than risk a silent miss."""
    what: str
    """What the key holds, in words, for "not checked" notes on cards."""


def prefetch_keys(knowledge: Knowledge) -> tuple[PrefetchKey, ...]:
    """The prefetch keys of every fhir-leuko service.

    Required: the Patient (age decides between the adult and pediatric limits) and the lab results.
    Optional: medication records (they name implicated drugs and select the clozapine tables; without
    them the general tables apply, which are never less strict), Conditions (contributing causes)
    and Flags (the explicit BEN flag; without it the stricter general table applies).

    The medication keys ask only for the statuses that can be an exposure (``normalise``): requests
    and statements as before; administrations unless ``not-done`` or ``entered-in-error``;
    dispenses ``completed`` (handed over). Administrations and dispenses come newest first.
    ``withdrawnReports`` are the patient's DiagnosticReports that were withdrawn
    (``entered-in-error``) or ``cancelled``: the results they list do not count, whatever their own
    status. Together the keys cover every type of :data:`fhir_leuko.core.fhirjson.INPUT_TYPES` but
    ``Medication`` (a prefetch has no ``_include``; a medication is read from the record's code, a
    contained Medication or the reference's display).
    """
    codes = ",".join(knowledge.loinc)
    patient = PATIENT_TOKEN
    return (
        PrefetchKey("patient", f"Patient/{patient}", True, "the patient's birth date"),
        PrefetchKey(
            "observations",
            f"Observation?patient={patient}&code={codes}&_sort=-date&_count=200",
            True,
            "white-cell lab results",
        ),
        PrefetchKey(
            "medicationRequests",
            f"MedicationRequest?patient={patient}&status=active,on-hold,stopped,completed,unknown"
            "&_count=100",
            False,
            "medication requests",
        ),
        PrefetchKey(
            "medicationStatements",
            f"MedicationStatement?patient={patient}"
            "&status=active,on-hold,stopped,completed,unknown&_count=100",
            False,
            "medication statements",
        ),
        PrefetchKey(
            "medicationAdministrations",
            f"MedicationAdministration?patient={patient}"
            "&status=in-progress,on-hold,completed,stopped,unknown&_sort=-effective-time&_count=100",
            False,
            "medication administrations",
        ),
        PrefetchKey(
            "medicationDispenses",
            f"MedicationDispense?patient={patient}&status=completed&_sort=-whenhandedover"
            "&_count=100",
            False,
            "medication dispenses",
        ),
        PrefetchKey(
            "withdrawnReports",
            f"DiagnosticReport?patient={patient}&status=entered-in-error,cancelled&_count=50",
            False,
            "withdrawn lab reports",
        ),
        PrefetchKey("conditions", f"Condition?patient={patient}&_count=100", False, "conditions"),
        PrefetchKey("flags", f"Flag?patient={patient}&_count=50", False, "patient flags (BEN)"),
    )


def fill_template(template: str, patient_id: str) -> str:
    """A template with its ``{{context.patientId}}`` token filled (the id is a checked FHIR id)."""
    return template.replace(PATIENT_TOKEN, patient_id)


@dataclass(frozen=True, slots=True)
class ServerAccess:
    """The client's FHIR server and the token to call it with (never printed: see ``__repr__``)."""

    base: str
    token: str = field(repr=False)


@dataclass(slots=True)
class Resolution:
    """The FHIR data of one call, from prefetch and fetches."""

    items: list[Sourced | Problem] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)
    """Optional keys that could not be had, and why."""
    fetched: list[str] = field(default_factory=list)


# --- what a prefetch value is ----------------------------------------------------------------


class _Issue(msgspec.Struct):
    severity: str | None = None


class _PeekResource(msgspec.Struct):
    resourceType: str | None = None
    issue: list[_Issue] = []


class _PeekEntry(msgspec.Struct):
    resource: _PeekResource | None = None


class _Link(msgspec.Struct):
    relation: str | None = None
    url: str | None = None


class _Top(msgspec.Struct):
    """What a value is, read without building its entries (msgspec skips unknown members)."""

    resourceType: str | None = None
    link: list[_Link] = []


class _Entries(msgspec.Struct):
    entry: list[_PeekEntry] = []


_TOP = msgspec.json.Decoder(_Top)
_ENTRIES = msgspec.json.Decoder(_Entries)


def _is_error_outcome(resource: _PeekResource | None) -> bool:
    if resource is None or resource.resourceType != "OperationOutcome":
        return False
    # A searchset may carry warnings (search.mode "outcome") next to good data; only an error
    # or fatal issue means the data is not what the template asked for.
    return not resource.issue or any(i.severity in ("error", "fatal") for i in resource.issue)


@dataclass(slots=True)
class _Value:
    pages: list[bytes]
    missing: str = ""
    """Why the value does not count (then the key is fetched, or unavailable)."""
    next_url: str | None = None


def _classify(raw: bytes) -> _Value:
    if raw.strip() == b"null":
        return _Value([])
    try:
        top = decode_json(_TOP, raw)
    except msgspec.MsgspecError:
        return _Value([], missing="the client sent something that is not a FHIR resource")
    if top.resourceType == "OperationOutcome":
        return _Value([], missing="the client sent an OperationOutcome instead of the data")
    if top.resourceType == "Bundle":
        # Entries are looked at only when an OperationOutcome is in there at all (hot path).
        if b"OperationOutcome" in raw and any(
            _is_error_outcome(e.resource) for e in decode_json(_ENTRIES, raw).entry
        ):
            return _Value([], missing="the client's Bundle carries an error OperationOutcome")
        following = next((k.url for k in top.link if k.relation == "next" and k.url), None)
        if following is not None:
            return _Value([raw], next_url=following)
    return _Value([raw])


def _https_or_allowed(url: str, allow_http: bool) -> bool:
    scheme = urlsplit(url).scheme
    return scheme == "https" or (allow_http and scheme == "http")


def _fetch_key(
    fetcher: FhirFetcher, access: ServerAccess, key: PrefetchKey, patient_id: str
) -> list[bytes]:
    query = fill_template(key.template, patient_id)
    if "?" not in query:
        page = fetcher.read(access.base, query, token=access.token)
        return [page] if page is not None else []
    return list(fetcher.pages(access.base, query, token=access.token))


def _follow(fetcher: FhirFetcher, access: ServerAccess, value: _Value) -> list[bytes]:
    assert value.next_url is not None
    if not under_base(value.next_url, access.base):
        raise FhirFetchError("the Bundle's next link is not on fhirServer: not followed")
    return [*value.pages, *fetcher.pages(access.base, value.next_url, token=access.token)]


def resolve_prefetch(
    keys: Iterable[PrefetchKey],
    prefetch: dict[str, msgspec.Raw] | None,
    patient_id: str,
    access: ServerAccess | None,
    no_access_reason: str,
    fetcher: FhirFetcher,
    executor: Executor,
) -> Resolution:
    """The data of every key: the client's prefetch where it counts, fetched where it does not.

    Raises:
        PrefetchUnavailableError: a required key could not be had (HTTP 412).
    """
    given = prefetch or {}
    out = Resolution()
    pages_by_key: dict[str, list[bytes]] = {}
    to_fetch: dict[str, Future[list[bytes]]] = {}
    reasons: dict[str, str] = {}
    key_list = list(keys)
    for key in key_list:
        raw = given.get(key.name)
        if raw is None:
            value = _Value([], missing="absent from the prefetch")
        else:
            value = _classify(bytes(raw))
        if not value.missing and value.next_url is None:
            pages_by_key[key.name] = value.pages
            continue
        if access is None:
            if value.next_url is not None:
                reasons[key.name] = (
                    f"the prefetched Bundle is incomplete (it has a next link) and {no_access_reason}"
                )
            else:
                reasons[key.name] = f"{value.missing}, and {no_access_reason}"
            continue
        if value.next_url is not None:
            to_fetch[key.name] = executor.submit(
                contextvars.copy_context().run,  # the call's log scope (patients as pseudonyms)
                _follow_or_fetch,
                fetcher,
                access,
                key,
                value,
                patient_id,
            )
        else:
            to_fetch[key.name] = executor.submit(
                contextvars.copy_context().run, _fetch_key, fetcher, access, key, patient_id
            )
    for name, future in to_fetch.items():
        try:
            pages_by_key[name] = future.result()
            out.fetched.append(name)
        except FhirFetchError as exc:
            reasons[name] = f"fetching it from fhirServer failed: {exc}"
    required = {k.name: reasons[k.name] for k in key_list if k.required and k.name in reasons}
    if required:
        raise PrefetchUnavailableError(required)
    out.unavailable = {k.name: reasons[k.name] for k in key_list if k.name in reasons}
    for key in key_list:
        for index, page in enumerate(pages_by_key.get(key.name, [])):
            source = (
                f"prefetch {key.name}" if index == 0 else f"prefetch {key.name} page {index + 1}"
            )
            out.items.extend(iter_document(page, source))
    return out


def _follow_or_fetch(
    fetcher: FhirFetcher,
    access: ServerAccess,
    key: PrefetchKey,
    value: _Value,
    patient_id: str,
) -> list[bytes]:
    """The rest of a paged prefetch; if its next link cannot be followed, the whole query."""
    try:
        return _follow(fetcher, access, value)
    except FhirFetchError as exc:
        logger.info("prefetch %s: %s; fetching the whole query instead", key.name, exc)
        return _fetch_key(fetcher, access, key, patient_id)


def server_access(
    fhir_server: str | None,
    token: str | None,
    expires_in: int | None,
    allowed: Iterable[str],
    allow_http: bool,
) -> tuple[ServerAccess | None, str]:
    """Whether the service may call the client's FHIR server, and if not, why (for 412 texts).

    A ``fhirServer`` that is not configured for the authenticated client is never contacted: it
    could be anyone's, and the token would leak there (cds-hooks.md §1.7).
    """
    if token is None:
        return None, "no fhirAuthorization was sent to fetch it"
    server = (fhir_server or "").rstrip("/")
    if not server or server not in set(allowed):
        return None, "fhirServer is not one configured for this client (not contacted)"
    if not _https_or_allowed(server, allow_http):
        return None, "fhirServer does not use https (not contacted)"
    if expires_in is not None and expires_in <= 0:
        return None, "the fhirAuthorization token has already expired"
    return ServerAccess(server, token), ""
