"""A strict production FHIR server for the tests: a loopback proxy in front of sekmet-fhir.

sekmet (the real test server) is lenient where production servers are strict
(``../shared/knowledge/fhir-servers.md``). :class:`StrictProxy` sits in front of it on 127.0.0.1 and
answers searches the way a PostgreSQL-backed production server does:

* **Offset cap**: ``_offset`` above ``offset_cap`` is ``400 Search offset exceeds maximum (got N,
  max M)``.
* **No order without** ``_sort``: every page of an unsorted search is cut from a fresh random
  permutation of the whole result (a database without ``ORDER BY``), paged by ``_offset``, so an
  unsorted walk misses some resources and repeats others, silently.
* **With** ``_sort``: a stable order (sekmet sorts, its insertion order breaks ties) paged by an
  opaque cursor (``_page_token``, keyset on the last id of the page): no offset, no cap.
  ``sorted_paging="offset"`` pages sorted searches by ``_offset`` too (a server whose cap then
  also applies to sorted walks), and ``ignore_sort=True`` is a server that ignores ``_sort``.
* ``_count`` is capped at ``count_cap`` (default page size ``default_count``).
* ``Bundle.total`` only with ``_total=accurate``; ``_summary=count`` answers the total alone.
* Test knobs: ``delay`` seconds before each search page (SIGTERM tests), ``unavailable`` (every
  search a 503 with ``Retry-After: 30``), ``lose`` a set of resource ids a broken server leaves out
  of its pages although it counts them (completeness tests), ``metadata_patch`` to change the
  CapabilityStatement. Every request is logged in ``requests``.

Everything else (reads, writes, transactions, ``metadata``) is passed through to sekmet, with
sekmet's base URL rewritten to the proxy's in bodies and headers.

The HTTP side is Starlette under uvicorn in a daemon thread of the test process, forwarding with an
``httpx.AsyncClient`` (all three already in the project's ``service``/``test`` extras): the proxy
forwards while it waits on sekmet and sleeps ``delay`` without holding a thread per request.

Example::

    with StrictProxy(sekmet.base_url, offset_cap=50, count_cap=20) as fhir:
        FhirClient(fhir.base_url).search("Observation", {"_sort": "_lastUpdated"})
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fhir_leuko.testing.sekmet import free_port

__all__ = ["StrictProxy"]

FHIR_JSON = "application/fhir+json"
_CONTROL = frozenset({"_count", "_offset", "_sort", "_total", "_summary", "_page_token"})
_TYPE = re.compile(r"^[A-Z][A-Za-z]+$")
# Response headers not passed on (the proxy's own server sets them, or they name sekmet).
_HOP = frozenset(
    {"content-length", "transfer-encoding", "connection", "date", "server", "content-encoding"}
)


@dataclass
class Settings:
    offset_cap: int = 50
    count_cap: int = 20
    default_count: int = 20
    sorted_paging: Literal["cursor", "offset"] = "cursor"
    ignore_sort: bool = False
    delay: float = 0.0
    lose: set[str] = field(default_factory=set)
    """Resource ids the server leaves out of search pages (but still counts)."""
    metadata_patch: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    unavailable: bool = False
    """Every search answers 503 with ``Retry-After: 30`` (maintenance)."""
    seed: int = 8


def _outcome(status: int, code: str, text: str) -> Response:
    body = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": text}],
    }
    return Response(json.dumps(body), status_code=status, media_type=FHIR_JSON)


def _token(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def _untoken(text: str) -> dict[str, Any]:
    padded = text + "=" * (-len(text) % 4)
    data: dict[str, Any] = json.loads(base64.urlsafe_b64decode(padded))
    return data


class StrictProxy:
    """A production-like FHIR server for tests, in front of ``upstream`` (see the module doc)."""

    def __init__(self, upstream: str, **settings: Any) -> None:
        self.upstream = upstream.rstrip("/")
        self.upstream_path = urlsplit(self.upstream).path  # "/fhir"
        self.settings = Settings(**settings)
        self.port = free_port()
        self.requests: list[tuple[str, str, list[tuple[str, str]]]] = []
        """(method, path below the base, query) of every request received."""
        self._pages = 0
        self._client: httpx.AsyncClient | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.upstream_path}"

    def configure(self, **settings: Any) -> StrictProxy:
        """Replace the settings (defaults for the ones not given) and forget logged requests."""
        self.settings = Settings(**settings)
        self.requests.clear()
        return self

    def searches(self, rtype: str | None = None) -> list[list[tuple[str, str]]]:
        """The query of each search page requested (of one type, or all)."""
        return [
            q
            for m, p, q in self.requests
            if m == "GET" and _TYPE.match(p) and p != "metadata" and rtype in (None, p)
        ]

    def start(self) -> StrictProxy:
        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            self._client = httpx.AsyncClient(timeout=60)
            try:
                yield
            finally:
                await self._client.aclose()

        base = self.upstream_path
        methods = ["GET", "POST", "PUT", "DELETE", "PATCH"]
        app = Starlette(
            routes=[
                Route(base, self._handle, methods=methods),
                Route(base + "/{path:path}", self._handle, methods=methods),
            ],
            lifespan=lifespan,
        )
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the strict proxy did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=15)

    def __enter__(self) -> StrictProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- handling -------------------------------------------------------------------------------

    async def _handle(self, request: Request) -> Response:
        path = request.path_params.get("path", "").strip("/")
        query = parse_qsl(request.url.query, keep_blank_values=True)
        self.requests.append((request.method, path, query))
        if request.method == "GET" and _TYPE.match(path) and path != "metadata":
            return await self._search(request, path, query)
        return await self._forward(request, path)

    def _rewrite(self, data: bytes) -> bytes:
        return data.replace(self.upstream.encode(), self.base_url.encode())

    async def _forward(self, request: Request, path: str) -> Response:
        assert self._client is not None
        headers = {
            k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")
        }
        url = f"{self.upstream}/{path}" if path else self.upstream
        answer = await self._client.request(
            request.method,
            url,
            params=request.url.query or None,
            content=await request.body(),
            headers=headers,
        )
        body = answer.content
        if path == "metadata" and answer.status_code == 200 and self.settings.metadata_patch:
            body = json.dumps(self.settings.metadata_patch(json.loads(body))).encode()
        out = {
            k: self._rewrite(v.encode()).decode()
            for k, v in answer.headers.items()
            if k.lower() not in _HOP
        }
        return Response(self._rewrite(body), status_code=answer.status_code, headers=out)

    async def _collect(
        self, request: Request, rtype: str, params: list[tuple[str, str]]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | Response:
        """Every match (in sekmet's order) and every included entry of a search."""
        assert self._client is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("prefer", "accept")}
        matches: list[dict[str, Any]] = []
        included: dict[str, dict[str, Any]] = {}
        url: str | None = f"{self.upstream}/{rtype}?" + urlencode([*params, ("_count", "1000")])
        while url:
            answer = await self._client.get(url, headers=headers)
            if answer.status_code != 200:
                return Response(
                    self._rewrite(answer.content),
                    status_code=answer.status_code,
                    media_type=FHIR_JSON,
                )
            page = answer.json()
            for entry in page.get("entry") or []:
                mode = (entry.get("search") or {}).get("mode", "match")
                resource = entry.get("resource") or {}
                if mode == "match":
                    matches.append(entry)
                elif mode == "include":
                    included[f"{resource.get('resourceType')}/{resource.get('id')}"] = entry
            url = next((k["url"] for k in page.get("link", []) if k["relation"] == "next"), None)
        return matches, list(included.values())

    async def _search(self, request: Request, rtype: str, query: list[tuple[str, str]]) -> Response:
        s = self.settings
        if s.delay:
            await asyncio.sleep(s.delay)
        if s.unavailable:
            response = _outcome(503, "transient", "down for maintenance")
            response.headers["Retry-After"] = "30"
            return response
        token = next((v for k, v in query if k == "_page_token"), None)
        cursor: dict[str, Any] = {}
        if token:
            cursor = _untoken(token)
            query = [(k, v) for k, v in cursor["query"]]
        first = {k: v for k, v in reversed(query)}  # the first value of each name
        try:
            offset = int(first.get("_offset", "0") or 0)
            count = min(int(first.get("_count", s.default_count)), s.count_cap)
        except ValueError:
            return _outcome(400, "invalid", "_count and _offset must be integers")
        if offset > s.offset_cap:
            return _outcome(
                400,
                "too-costly",
                f"Search offset exceeds maximum (got {offset}, max {s.offset_cap})",
            )
        sort = ",".join(v for k, v in query if k == "_sort")
        sorted_ = bool(sort) and not s.ignore_sort
        filters = [(k, v) for k, v in query if k not in _CONTROL]
        upstream = filters + ([("_sort", sort)] if sorted_ else [])
        if first.get("_summary") == "count":
            collected = await self._collect(request, rtype, filters)
            if isinstance(collected, Response):
                return collected
            body = {"resourceType": "Bundle", "type": "searchset", "total": len(collected[0])}
            return Response(json.dumps(body), media_type=FHIR_JSON)
        collected = await self._collect(request, rtype, upstream)
        if isinstance(collected, Response):
            return collected
        matches, included = collected
        kept = [(k, v) for k, v in query if k not in ("_offset", "_page_token")]
        next_url: str | None = None
        if sorted_ and s.sorted_paging == "cursor":
            start = int(cursor.get("pos", 0))
            after = cursor.get("after")
            if after is not None:
                ids = [str((e.get("resource") or {}).get("id")) for e in matches]
                with contextlib.suppress(ValueError):
                    start = ids.index(after) + 1
            page = matches[start : start + count]
            if start + count < len(matches) and page:
                last = str(page[-1]["resource"]["id"])
                state = {"query": kept, "after": last, "pos": start + count}
                next_url = f"{self.base_url}/{rtype}?" + urlencode({"_page_token": _token(state)})
        else:
            order = list(matches)
            if not sorted_:
                self._pages += 1
                random.Random(s.seed * 1_000_003 + self._pages).shuffle(order)
            page = order[offset : offset + count]
            if offset + count < len(order):
                next_url = f"{self.base_url}/{rtype}?" + urlencode(
                    [*kept, ("_offset", str(offset + count))]
                )
        if s.lose:
            page = [e for e in page if (e.get("resource") or {}).get("id") not in s.lose]
        text = json.dumps([e.get("resource") for e in page])
        includes = [
            e
            for e in included
            if f'"{e["resource"]["resourceType"]}/{e["resource"]["id"]}"' in text
        ]
        self_url = f"{self.base_url}/{rtype}?" + urlencode(query)
        bundle: dict[str, Any] = {
            "resourceType": "Bundle",
            "type": "searchset",
            "link": [{"relation": "self", "url": self_url}],
            "entry": page + includes,
        }
        if next_url:
            bundle["link"].append({"relation": "next", "url": next_url})
        if first.get("_total") == "accurate":
            bundle["total"] = len(matches)
        return Response(self._rewrite(json.dumps(bundle).encode()), media_type=FHIR_JSON)
