"""Reading from a CDS client's FHIR server with the ``fhirAuthorization`` token it handed us.

Used only for prefetch keys the client did not satisfy (CDS Hooks 2.0 §Prefetch: "It is the CDS
Service's responsibility to … programmatically retrieve any additional necessary data"), and only
against a ``fhirServer`` configured for the authenticated client (the caller checks that). The
boundary is the small :class:`FhirFetcher` protocol, injected into the app, so a test or a site can
swap the HTTP stack; :class:`FhirClientFetcher` (on the scheduled job's
:class:`~fhir_leuko.fhir.client.FhirClient`) is the default.

Safety rules kept here, whatever the caller does: every URL fetched, including ``next`` links, must
lie under the server's base URL (the token never leaves for another host); redirects are not
followed; each call has a timeout; paging stops after ``max_pages``. The token is sent in the
``Authorization`` header only and never appears in an error message or a log line.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol
from urllib.parse import parse_qsl

import msgspec
import requests
import requests.auth

from ..core.fhirjson import decode_json
from ..errors import FhirError, FhirFetchError, FhirTemporaryError
from ..fhir.client import FhirClient, RetryPolicy

__all__ = ["FhirClientFetcher", "FhirFetcher", "next_link", "under_base"]


class FhirFetcher(Protocol):
    """What the service needs from a FHIR client: one read, and a search followed page by page."""

    def read(self, base: str, path: str, *, token: str) -> bytes | None:
        """``GET {base}/{path}`` (e.g. ``Patient/123``): the resource's JSON, or ``None`` when the
        server says it does not exist (404, 410).

        Raises:
            FhirFetchError: any other failure.
        """
        ...

    def pages(self, base: str, url: str, *, token: str) -> Iterator[bytes]:
        """The searchset pages of ``url`` (``Observation?patient=…`` relative to ``base``, or an
        absolute URL under ``base``, e.g. a ``next`` link), following ``link[next]``.

        Raises:
            FhirFetchError: a page failed, a ``next`` link leaves ``base``, or too many pages.
        """
        ...


def under_base(url: str, base: str) -> bool:
    """Whether ``url`` lies under the FHIR base URL ``base`` (same scheme, host, port and path)."""
    root = base.rstrip("/") + "/"
    return url.startswith(root)


class _Link(msgspec.Struct):
    relation: str | None = None
    url: str | None = None


class _Links(msgspec.Struct):
    link: list[_Link] = []


_LINKS = msgspec.json.Decoder(_Links)


def next_link(page: bytes) -> str | None:
    """The ``next`` link of a searchset page (``None`` at the last page)."""
    try:
        links = decode_json(_LINKS, page).link
    except msgspec.MsgspecError:
        return None
    return next((link.url for link in links if link.relation == "next" and link.url), None)


class _Bearer(requests.auth.AuthBase):
    """The client's ``fhirAuthorization`` token as a bearer header (hidden from ``repr``)."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request

    def __repr__(self) -> str:
        return "_Bearer(***)"


def _fetch_error(exc: FhirError) -> FhirFetchError:
    # FhirError messages name URLs, which name the patient: keep them out of answers and logs.
    if exc.status is not None:
        return FhirFetchError(f"the FHIR server answered HTTP {exc.status}", "http")
    if isinstance(exc, FhirTemporaryError):
        return FhirFetchError(
            "the FHIR server did not answer in time (timeout or connection error)", "timeout"
        )
    return FhirFetchError(f"the FHIR server's answer could not be used ({type(exc).__name__})")


class FhirClientFetcher:
    """:class:`FhirFetcher` over :class:`fhir_leuko.fhir.client.FhirClient` (the scheduled job's
    client), sharing one ``requests.Session`` (connection reuse) and a short retry budget: a hook
    call has about 500 ms in all (CDS Hooks 2.0 §Providing FHIR Resources), so one quick retry of a
    429/503 at most."""

    def __init__(
        self,
        session: requests.Session | None = None,
        *,
        timeout: float = 5.0,
        max_pages: int = 20,
        retry: RetryPolicy | None = None,
    ) -> None:
        self._session = session or requests.Session()
        self._timeout = timeout
        self._max_pages = max_pages
        self._retry = retry or RetryPolicy(max_attempts=2, base=0.1, max_delay=0.5, max_total=1.0)

    def _client(self, base: str, token: str) -> FhirClient:
        return FhirClient(
            base,
            auth=_Bearer(token),
            session=self._session,
            timeout=self._timeout,
            retry=self._retry,
            max_pages=self._max_pages,
        )

    def read(self, base: str, path: str, *, token: str) -> bytes | None:
        try:
            response = self._client(base, token).request("GET", path)
        except FhirError as exc:
            if exc.status in (404, 410):
                return None
            raise _fetch_error(exc) from None
        return response.content

    def pages(self, base: str, url: str, *, token: str) -> Iterator[bytes]:
        if url.startswith(("http://", "https://")):
            if not under_base(url, base):
                raise FhirFetchError(
                    "a next link leads outside the FHIR server: not followed", "refused"
                )
            path, params = url, []
        else:
            path, _, query = url.partition("?")
            params = parse_qsl(query, keep_blank_values=True)
        try:
            yield from self._client(base, token).search(path, params)
        except FhirError as exc:
            raise _fetch_error(exc) from None
