"""A small, careful FHIR R4 REST client on ``requests.Session`` (used by the scheduled job and the
CDS service's prefetch fallback).

Public API (stable)::

    client = FhirClient(
        "https://ehr.example.org/fhir",
        auth=None,              # a requests AuthBase, e.g. from fhir_leuko.job.build_auth(...)
        session=None,           # an injected requests.Session (tests, connection pooling)
        timeout=(10.0, 60.0),   # (connect, read) seconds, on every request
        verify=True,            # TLS verification; or the path of a CA bundle
        retry=RetryPolicy(),    # 429/502/503/504/connection errors: backoff, jitter, Retry-After
        headers=None,           # extra headers on every request (e.g. {"Prefer": "handling=strict"})
        sleep=time.sleep, clock=time.monotonic, wall_clock=time.time,
    )
    for page in client.search("Observation", {"patient": "Patient/1", "code": "..."}):
        ...                     # raw searchset Bundle bytes, page by page (follows link[next])
    client.read("Patient", "1") -> dict
    client.create(resource, if_none_exist="identifier=sys|v") -> WriteResult
    client.update(resource, if_match='W/"3"') -> WriteResult
    client.transaction(bundle) -> dict          # the transaction-response Bundle
    client.capabilities() -> dict               # GET metadata (cached)
    client.supports("transaction") -> bool      # a system interaction listed in metadata
    client.search_params("Observation")         # search parameters metadata lists (or None)
    client.requests_sent                        # HTTP requests sent, retries included

Behaviour, from what real servers do (``../shared/knowledge/fhir-servers.md``):

* **Paging** follows ``link[next]`` verbatim and never reads ``Bundle.total``. A next link that
  repeats, a page identical to the previous one, or a next link to another origin (which would
  receive our credentials) is a :class:`~fhir_leuko.errors.FhirFatalError`.
* **Retries**: 429, 502, 503, 504, connection errors and timeouts are retried with exponential
  backoff and jitter, honouring ``Retry-After`` (seconds, or an HTTP-date measured against the
  response's own ``Date`` header so client clock skew does not matter), within a bounded total
  time per request (:class:`RetryPolicy`). A POST that is not idempotent (no ``If-None-Exist``)
  is retried only when the server certainly did not process it (429, 503, connect errors).
* **401**: when ``auth`` has an ``invalidate()`` method (the OAuth2 auths of
  :mod:`fhir_leuko.fhir.auth`), the token is dropped and the request retried once with a new one; a
  second 401 is an :class:`~fhir_leuko.errors.AuthError`.
* **Errors** carry the OperationOutcome text (``issue.diagnostics`` / ``details.text``) and the URL
  without its query string. Logs name the method, resource type and status only: never search
  parameters (they name patients), bodies or credentials.
"""

from __future__ import annotations

import contextlib
import email.utils
import logging
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any
from urllib.parse import urlsplit

import msgspec
import orjson
import requests

from .._version import __version__
from ..core.fhirjson import decode_json
from ..errors import AuthError, FhirConflictError, FhirError, FhirFatalError, FhirTemporaryError
from .privacy import scrub_server_text

__all__ = [
    "FHIR_JSON",
    "FhirClient",
    "RetryPolicy",
    "WriteResult",
    "operation_outcome_text",
]

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
_RETRY_STATUSES = frozenset({429, 502, 503, 504})
# A non-idempotent POST is retried only when the server says it did not process it.
_NOT_PROCESSED = frozenset({429, 503})


@dataclass(frozen=True)
class RetryPolicy:
    """How long and how often a request is retried.

    Waits grow as ``base * 2**n`` (capped at ``max_delay``) with "equal jitter" (half fixed, half
    random) so that many clients do not retry in step; a ``Retry-After`` header replaces the
    computed wait. No request spends more than ``max_total`` seconds waiting in total: when the
    next wait would pass it, the request fails as :class:`FhirTemporaryError`.
    """

    max_attempts: int = 6
    base: float = 0.5
    max_delay: float = 30.0
    max_total: float = 120.0
    statuses: frozenset[int] = field(default=_RETRY_STATUSES)

    def backoff(self, attempt: int, rng: Callable[[], float]) -> float:
        delay = min(self.max_delay, self.base * 2.0**attempt)
        return float(delay / 2 + rng() * delay / 2)


@dataclass(frozen=True)
class WriteResult:
    """What a create or update did."""

    status: int
    """HTTP status: 201 created, 200 updated or (conditional create) already there."""
    id: str | None
    version: str | None
    """``meta.versionId`` or the ETag's version."""
    resource: dict[str, Any] | None
    """The body the server returned, if any (``Prefer: return=minimal`` gives none)."""
    location: str | None = None

    @property
    def created(self) -> bool:
        return self.status == 201


class _Link(msgspec.Struct):
    relation: str | None = None
    url: str | None = None


class _Entry(msgspec.Struct):
    fullUrl: str | None = None


class _Page(msgspec.Struct):
    resourceType: str | None = None
    type: str | None = None
    link: list[_Link] = []
    entry: list[_Entry] = []


_PAGE = msgspec.json.Decoder(_Page)


def operation_outcome_text(body: bytes, limit: int = 500) -> str:
    """What an OperationOutcome body says, fit for logs: each issue's severity and code, and its
    diagnostics (or details.text) scrubbed of anything it may quote (values, names, dates, ids;
    :func:`fhir_leuko.fhir.privacy.scrub_server_text`). ``''`` when the body is something else."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return ""
    if not isinstance(data, dict):
        return ""
    if data.get("resourceType") != "OperationOutcome":
        # OAuth2 token endpoints answer {"error": ..., "error_description": ...} (RFC 6749 §5.2).
        if isinstance(data.get("error"), str):
            desc = data.get("error_description")
            error = scrub_server_text(data["error"])
            return f"{error}: {scrub_server_text(desc)}"[:limit] if isinstance(desc, str) else error
        return ""
    parts: list[str] = []
    for issue in data.get("issue") or []:
        if not isinstance(issue, dict):
            continue
        details = issue.get("details")
        text = issue.get("diagnostics") or (
            details.get("text") if isinstance(details, dict) else None
        )
        head = "/".join(
            scrub_server_text(x) for x in (issue.get("severity"), issue.get("code")) if isinstance(x, str)
        )
        parts.append(f"{head}: {scrub_server_text(text)}" if isinstance(text, str) and text else head)
    return "; ".join(p for p in parts if p)[:limit]


def _strip_query(url: str) -> str:
    return url.split("?", 1)[0]


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


def _version_of(etag: str | None, resource: Mapping[str, Any] | None) -> str | None:
    if resource is not None:
        meta = resource.get("meta")
        if isinstance(meta, dict) and isinstance(meta.get("versionId"), str):
            return str(meta["versionId"])
    if etag:
        return etag.removeprefix("W/").strip('"') or None
    return None


class FhirClient:
    """A FHIR R4 REST client (see the module docstring for the API and behaviour)."""

    def __init__(
        self,
        base_url: str,
        *,
        auth: requests.auth.AuthBase | None = None,
        session: requests.Session | None = None,
        timeout: float | tuple[float, float] = (10.0, 60.0),
        verify: bool | str = True,
        retry: RetryPolicy | None = None,
        headers: Mapping[str, str] | None = None,
        sleep: Callable[[float], object] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        rng: Callable[[], float] = random.random,
        max_pages: int = 100_000,
    ) -> None:
        if not base_url.lower().startswith(("http://", "https://")):
            raise ValueError(f"FHIR base URL must be http(s): {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.auth = auth
        self.session = session if session is not None else requests.Session()
        self.timeout = timeout
        self.verify = verify
        self.retry = retry or RetryPolicy()
        self.headers = {
            "Accept": FHIR_JSON,
            "User-Agent": f"fhir-leuko/{__version__}",
            **(headers or {}),
        }
        self.sleep = sleep
        self.clock = clock
        self.wall_clock = wall_clock
        self.rng = rng
        self.max_pages = max_pages
        self.requests_sent = 0
        """HTTP requests sent to the FHIR server, retries included (token requests excluded)."""
        self._capabilities: dict[str, Any] | None = None
        self.last_date: str | None = None
        """The server's clock: the ``Date`` header of the latest response, as a FHIR instant."""

    # -- plumbing -------------------------------------------------------------------------------

    def url(self, path: str) -> str:
        """An absolute URL for a path relative to the base (absolute URLs pass through)."""
        if path.lower().startswith(("http://", "https://")):
            return path
        return f"{self.base_url}/{path.lstrip('/')}"

    def _retry_after(self, response: requests.Response) -> float | None:
        value = response.headers.get("Retry-After")
        if not value:
            return None
        value = value.strip()
        if value.isdigit():
            return float(value)
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        # Measure against the server's own Date header when it sent one: skew-free.
        now: float = self.wall_clock()
        date_header = response.headers.get("Date")
        if date_header:
            with contextlib.suppress(TypeError, ValueError):
                now = email.utils.parsedate_to_datetime(date_header).timestamp()
        return max(0.0, when.timestamp() - now)

    def _note_date(self, response: requests.Response) -> None:
        value = response.headers.get("Date")
        if not value:
            return
        try:
            moment = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return
        if moment.tzinfo is not None:
            self.last_date = moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    def _error(self, response: requests.Response, method: str, url: str) -> FhirError:
        outcome = operation_outcome_text(response.content)
        where = f"{method} {_strip_query(url)}"
        reason = response.reason or ""
        text = f"{where}: HTTP {response.status_code} {reason}".rstrip()
        if outcome:
            text = f"{text}: {outcome}"
        kwargs: dict[str, Any] = {
            "status": response.status_code,
            "url": _strip_query(url),
            "outcome": outcome,
        }
        if response.status_code == 401:
            return AuthError(text, **kwargs)
        if response.status_code == 412:
            return FhirConflictError(text, **kwargs)
        if response.status_code in self.retry.statuses or response.status_code >= 500:
            return FhirTemporaryError(text, **kwargs)
        return FhirFatalError(text, **kwargs)

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str | Sequence[str]] | Sequence[tuple[str, str]] | None = None,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        idempotent: bool | None = None,
        stream: bool = False,
        authenticate: bool = True,
    ) -> requests.Response:
        """Send one request with retries; return the (2xx or 304) response or raise a FhirError.

        ``stream``: the body of a 2xx response is not read yet (a Bulk Data file: the caller
        iterates and closes it). ``authenticate=False`` sends no credentials (a Bulk Data file
        that ``requiresAccessToken: false``, perhaps on another host).
        """
        url = self.url(path)
        all_headers = dict(self.headers)
        if body is not None:
            all_headers["Content-Type"] = FHIR_JSON
        all_headers.update(headers or {})
        if idempotent is None:
            idempotent = method != "POST" or "If-None-Exist" in all_headers
        started = self.clock()
        attempt = 0
        refreshed = False
        short = f"{method} {_strip_query(url).removeprefix(self.base_url) or '/'}"
        while True:
            failure: FhirError
            retry_after: float | None = None
            try:
                self.requests_sent += 1
                response = self.session.request(
                    method,
                    url,
                    params=params,
                    data=body,
                    headers=all_headers,
                    auth=self.auth if authenticate else None,
                    timeout=self.timeout,
                    verify=self.verify,
                    allow_redirects=False,
                    stream=stream,
                )
            except FhirTemporaryError as exc:  # the auth's token request could not get through
                failure = exc
            except AuthError:
                raise
            except requests.exceptions.ConnectTimeout as exc:
                failure = FhirTemporaryError(
                    f"{short}: connect timeout ({exc.__class__.__name__})", url=_strip_query(url)
                )
            except (requests.exceptions.Timeout, requests.exceptions.ConnectionError) as exc:
                failure = FhirTemporaryError(
                    f"{short}: {exc.__class__.__name__} (no response)", url=_strip_query(url)
                )
                if not idempotent:
                    raise failure from None
            except (
                requests.exceptions.ChunkedEncodingError,
                requests.exceptions.ContentDecodingError,
            ) as exc:
                # The answer was cut off mid-body (or its gzip is broken): like a lost connection,
                # retried; but the server did process the request, so a plain POST is not resent.
                # A streamed body belongs to the caller, which resumes it its own way (Range).
                if stream:
                    raise
                failure = FhirTemporaryError(
                    f"{short}: {exc.__class__.__name__} (the response was cut off)",
                    url=_strip_query(url),
                )
                if not idempotent:
                    raise failure from None
            else:
                status = response.status_code
                log.debug("%s -> %s", short, status)
                self._note_date(response)
                if status < 300 or status == 304:
                    return response
                invalidate = getattr(self.auth, "invalidate", None) if authenticate else None
                if status == 401 and not refreshed and callable(invalidate):
                    refreshed = True
                    log.info("%s -> 401: refreshing the access token once", short)
                    invalidate()
                    continue
                failure = self._error(response, method, url)
                if status not in self.retry.statuses or (
                    not idempotent and status not in _NOT_PROCESSED
                ):
                    raise failure
                retry_after = self._retry_after(response)
            attempt += 1
            if attempt >= self.retry.max_attempts:
                raise FhirTemporaryError(
                    f"{failure} (gave up after {attempt} attempts)",
                    status=failure.status,
                    url=failure.url,
                    outcome=failure.outcome,
                )
            delay = (
                retry_after
                if retry_after is not None
                else self.retry.backoff(attempt - 1, self.rng)
            )
            spent = self.clock() - started
            if spent + delay > self.retry.max_total:
                raise FhirTemporaryError(
                    f"{failure} (gave up after {attempt} attempts in {spent:.1f} s; the next wait "
                    f"of {delay:.1f} s would pass the {self.retry.max_total:.0f} s retry budget)",
                    status=failure.status,
                    url=failure.url,
                    outcome=failure.outcome,
                )
            log.warning("%s: %s; retry %d in %.1f s", short, _brief(failure), attempt, delay)
            self.sleep(delay)

    def _json(self, response: requests.Response, what: str) -> dict[str, Any]:
        try:
            data = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            raise FhirFatalError(
                f"{what}: the server's answer is not JSON", status=response.status_code
            ) from None
        if not isinstance(data, dict):
            raise FhirFatalError(f"{what}: the server's answer is not a JSON object")
        return data

    # -- interactions ---------------------------------------------------------------------------

    def capabilities(self) -> dict[str, Any]:
        """The server's CapabilityStatement (``GET metadata``), fetched once."""
        if self._capabilities is None:
            response = self.request("GET", "metadata")
            data = self._json(response, "GET metadata")
            if data.get("resourceType") != "CapabilityStatement":
                raise FhirFatalError(
                    f"GET {self.base_url}/metadata did not return a CapabilityStatement "
                    "(is this the FHIR base URL?)"
                )
            self._capabilities = data
        return self._capabilities

    def supports(self, interaction: str) -> bool:
        """Whether ``metadata`` lists a system-level interaction (``transaction``, ``batch``)."""
        for rest in self.capabilities().get("rest") or []:
            if isinstance(rest, dict) and rest.get("mode", "server") == "server":
                for item in rest.get("interaction") or []:
                    if isinstance(item, dict) and item.get("code") == interaction:
                        return True
        return False

    def search_params(self, resource_type: str) -> frozenset[str] | None:
        """The search parameters ``metadata`` lists for a resource type (with those it lists for
        all types), or ``None`` when it lists none for that type (nothing can be concluded)."""
        names: set[str] = set()
        listed = False
        for rest in self.capabilities().get("rest") or []:
            if not isinstance(rest, dict) or rest.get("mode", "server") != "server":
                continue
            common = [p for p in rest.get("searchParam") or [] if isinstance(p, dict)]
            names.update(str(p.get("name")) for p in common)
            for resource in rest.get("resource") or []:
                if isinstance(resource, dict) and resource.get("type") == resource_type:
                    params = [p for p in resource.get("searchParam") or [] if isinstance(p, dict)]
                    listed = listed or bool(params)
                    names.update(str(p.get("name")) for p in params)
        return frozenset(names) if listed else None

    def search(
        self,
        resource_type: str,
        params: Mapping[str, str | Sequence[str]] | Sequence[tuple[str, str]],
        *,
        headers: Mapping[str, str] | None = None,
    ) -> Iterator[bytes]:
        """Search; yield each searchset page's raw bytes, following ``link[next]`` verbatim.

        Raises:
            FhirFatalError: not a searchset Bundle (a page that is not JSON is asked for twice), a
                repeated/cyclic/foreign next link.
            FhirTemporaryError, AuthError: as :meth:`request`.
        """
        what = f"{resource_type} search"
        response = self.request("GET", resource_type, params=params, headers=headers)
        seen_links: set[str] = set()
        previous: list[str | None] | None = None
        origin = _origin(self.base_url)
        pages = 0
        url: str = resource_type
        query: Mapping[str, str | Sequence[str]] | Sequence[tuple[str, str]] | None = params
        while True:
            pages += 1
            data = response.content
            try:
                page = decode_json(_PAGE, data)
            except (msgspec.DecodeError, msgspec.ValidationError):
                # A page cut short (a proxy, a server that died mid-write) is asked for once more.
                log.warning("%s: page %d is not a FHIR Bundle; asking for it once more", what, pages)
                data = self.request("GET", url, params=query, headers=headers).content
                try:
                    page = decode_json(_PAGE, data)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    raise FhirFatalError(
                        f"{what}: page {pages} is not a FHIR Bundle (twice)"
                    ) from None
            if page.resourceType != "Bundle" or page.type not in ("searchset", None):
                raise FhirFatalError(
                    f"{what}: page {pages} is a {page.resourceType} "
                    f"{page.type or ''}, not a searchset Bundle".replace("  ", " ")
                )
            urls = [e.fullUrl for e in page.entry]
            if previous is not None and urls and urls == previous:
                raise FhirFatalError(
                    f"{what}: page {pages} repeats the previous page (the server ignores paging)"
                )
            previous = urls
            yield data
            next_url = next((link.url for link in page.link if link.relation == "next"), None)
            if not next_url:
                return
            if next_url in seen_links:
                raise FhirFatalError(
                    f"{what}: the server repeated a next link (cycle) at page {pages}"
                )
            seen_links.add(next_url)
            if not next_url.lower().startswith(("http://", "https://")):
                next_url = self.url(next_url)
            if _origin(next_url) != origin:
                raise FhirFatalError(
                    f"{what}: the next link points to another server "
                    f"({_origin(next_url)[1]}); not followed"
                )
            if pages >= self.max_pages:
                raise FhirFatalError(f"{what}: more than {self.max_pages} pages")
            url, query = next_url, None
            response = self.request("GET", next_url, headers=headers)

    def read(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        """``GET [type]/[id]`` as a dict (``meta.versionId`` gives the version for If-Match)."""
        response = self.request("GET", f"{resource_type}/{resource_id}")
        return self._json(response, f"GET {resource_type}")

    def _write_result(self, response: requests.Response, what: str) -> WriteResult:
        resource: dict[str, Any] | None = None
        if response.content.strip():
            resource = self._json(response, what)
            if resource.get("resourceType") == "OperationOutcome":
                resource = None
        location = response.headers.get("Location") or response.headers.get("Content-Location")
        rid = resource.get("id") if resource else None
        if rid is None and location:
            parts = location.split("/_history/")[0].rstrip("/").split("/")
            rid = parts[-1] if parts else None
        return WriteResult(
            status=response.status_code,
            id=rid if isinstance(rid, str) else None,
            version=_version_of(response.headers.get("ETag"), resource),
            resource=resource,
            location=location,
        )

    def create(
        self, resource: Mapping[str, Any], *, if_none_exist: str | None = None
    ) -> WriteResult:
        """``POST [type]``, conditional with ``If-None-Exist`` when given (200 = already there)."""
        rtype = str(resource["resourceType"])
        headers = {"If-None-Exist": if_none_exist} if if_none_exist else {}
        response = self.request("POST", rtype, body=orjson.dumps(resource), headers=headers)
        return self._write_result(response, f"POST {rtype}")

    def update(self, resource: Mapping[str, Any], *, if_match: str | None = None) -> WriteResult:
        """``PUT [type]/[id]``; with ``if_match`` (a version or an ETag) a stale version is a 412
        (:class:`~fhir_leuko.errors.FhirConflictError`)."""
        rtype = str(resource["resourceType"])
        headers: dict[str, str] = {}
        if if_match:
            headers["If-Match"] = if_match if if_match.startswith("W/") else f'W/"{if_match}"'
        response = self.request(
            "PUT", f"{rtype}/{resource['id']}", body=orjson.dumps(resource), headers=headers
        )
        return self._write_result(response, f"PUT {rtype}")

    def transaction(self, bundle: Mapping[str, Any], *, idempotent: bool = False) -> dict[str, Any]:
        """``POST [base]`` a transaction (or batch) Bundle; returns the response Bundle.

        ``idempotent=True`` lets it be retried after a lost response: only say so when every
        entry is conditional (``ifNoneExist``, ``ifMatch``) or a PUT.
        """
        response = self.request("POST", "", body=orjson.dumps(bundle), idempotent=idempotent)
        data = self._json(response, "POST transaction")
        if data.get("resourceType") != "Bundle":
            raise FhirFatalError("POST transaction: the answer is not a Bundle")
        return data

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> FhirClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _brief(error: FhirError) -> str:
    if error.status is not None:
        return f"HTTP {error.status}"
    return str(error).rsplit(": ", 1)[-1]
