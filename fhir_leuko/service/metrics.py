"""The service's Prometheus metrics (prometheus-client), served at ``GET /metrics``.

Names and labels (no patient data, no token; every label has a small, fixed set of values: an
unknown service id is counted as ``unknown``, so a client cannot grow the label set):

* ``fhir_leuko_cds_requests_total{service,hook,status}``: requests by service id, hook
  (``patient-view``, ``order-select``, ``order-sign``, ``feedback``, ``discovery``) and HTTP status;
* ``fhir_leuko_cds_request_duration_seconds{service,hook}``: a latency histogram;
* ``fhir_leuko_cds_cards_total{service,indicator}``: cards returned, by indicator;
* ``fhir_leuko_cds_jwt_rejections_total{reason}``: JWTs refused, by reason
  (:data:`fhir_leuko.service.security.REJECTION_REASONS`);
* ``fhir_leuko_cds_prefetch_fetches_total{resource_type,outcome}``: reads and searches sent to a
  client's FHIR server for data the prefetch did not bring (``ok``, ``error``);
* ``fhir_leuko_cds_prefetch_unavailable_total{key}``: required prefetch keys that could not be
  had (each such call is answered 412);
* ``fhir_leuko_cds_fhir_fetch_errors_total{kind}``: failed fetches from a client's FHIR server
  (``timeout``, ``unavailable``, ``http``, ``invalid``, ``refused``);
* ``fhir_leuko_build_info{version}``.

With ``serve --workers N`` each worker process counts its own, and the metrics are gathered across
them through ``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's multiprocess mode), so ``/metrics``
gives the same answer whichever worker serves it.
"""

from __future__ import annotations

import hmac
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from fastapi import FastAPI, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as prometheus_multiprocess

from .._version import __version__
from ..core.fhirjson import INPUT_TYPES
from ..errors import FhirFetchError, ListenError
from .fetch import FhirFetcher

__all__ = ["CountingFetcher", "MetricsMiddleware", "ServiceMetrics", "install_metrics_route"]

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Seconds. A hook with its prefetch answers in milliseconds; one that fetches from the client's
FHIR server in tens to hundreds; the request deadline is 10 s by default."""

_RESOURCE_TYPES = frozenset(INPUT_TYPES)
"""The ``resource_type`` label's values: what a prefetch or fetch can bring (anything else counts
as ``other``, keeping the label bounded)."""


def _multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class ServiceMetrics:
    """The metrics of one app (its own registry: tests create many apps in one process)."""

    def __init__(self, service_ids: dict[str, str]) -> None:
        """``service_ids``: service id → hook, the known services (any other id is ``unknown``)."""
        self._hooks = dict(service_ids)
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.requests = Counter(
            "fhir_leuko_cds_requests",
            "CDS Hooks requests by service, hook and HTTP status",
            ["service", "hook", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "fhir_leuko_cds_request_duration_seconds",
            "Time to answer a CDS Hooks request",
            ["service", "hook"],
            buckets=_BUCKETS,
            registry=registry,
        )
        self.cards = Counter(
            "fhir_leuko_cds_cards",
            "Cards returned, by service and indicator",
            ["service", "indicator"],
            registry=registry,
        )
        self.jwt_rejections = Counter(
            "fhir_leuko_cds_jwt_rejections",
            "JWTs refused (HTTP 401), by reason",
            ["reason"],
            registry=registry,
        )
        self.fetches = Counter(
            "fhir_leuko_cds_prefetch_fetches",
            "Reads and searches sent to a client's FHIR server for data the prefetch lacked",
            ["resource_type", "outcome"],
            registry=registry,
        )
        self.unavailable = Counter(
            "fhir_leuko_cds_prefetch_unavailable",
            "Required prefetch keys that could not be had (the call is answered 412)",
            ["key"],
            registry=registry,
        )
        self.fetch_errors = Counter(
            "fhir_leuko_cds_fhir_fetch_errors",
            "Failed fetches from a client's FHIR server, by kind",
            ["kind"],
            registry=registry,
        )
        info = Gauge(
            "fhir_leuko_build_info",
            "fhir-leuko's version",
            ["version"],
            registry=registry,
            multiprocess_mode="max",
        )
        info.labels(__version__).set(1)

    # -- labels ----------------------------------------------------------------------------------

    def route(self, path: str) -> tuple[str, str] | None:
        """``(service, hook)`` of a request path, or ``None`` for paths that are not counted."""
        if path == "/cds-services":
            return "discovery", "discovery"
        if not path.startswith("/cds-services/"):
            return None
        rest = path[len("/cds-services/") :]
        service_id, _, tail = rest.partition("/")
        hook = self._hooks.get(service_id)
        if hook is None:
            return "unknown", "unknown"
        if tail == "feedback":
            return service_id, "feedback"
        return (service_id, hook) if not tail else ("unknown", "unknown")

    def resource_type(self, path_or_url: str) -> str:
        """The resource type a read (``Patient/1``) or search (``Observation?…``) is for."""
        path = path_or_url.split("?", 1)[0].rstrip("/")
        parts = path.split("/")
        for part in (parts[-1], parts[-2] if len(parts) > 1 else ""):
            if part in _RESOURCE_TYPES:
                return part
        return "other"

    # -- exposition ------------------------------------------------------------------------------

    def serve(self, host: str, port: int, token: str | None) -> ThreadingHTTPServer:
        """``GET /metrics`` on a port of its own (``metrics_port``), in a daemon thread.

        Raises:
            ListenError: the port cannot be bound.
        """
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404)
                    return
                if not _authorized(self.headers.get("Authorization"), token):
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", "Bearer")
                    self.end_headers()
                    return
                body, content_type = metrics.exposition()
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        try:
            server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise ListenError(
                f"metrics_port: cannot listen on {host}:{port}: {exc.strerror or exc}"
            ) from None
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server

    def exposition(self) -> tuple[bytes, str]:
        """The metrics in Prometheus text format, and its content type."""
        if _multiprocess():
            registry = CollectorRegistry()
            prometheus_multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    # -- boundaries ------------------------------------------------------------------------------

    def fetch(self, path_or_url: str) -> _Counted:
        """Count one read or search sent to a client's FHIR server (``with metrics.fetch(url):``)."""
        return _Counted(self, self.resource_type(path_or_url))

    def fetch_error(self, kind: str) -> None:
        self.fetch_errors.labels(kind).inc()

    def jwt_rejected(self, reason: str) -> None:
        self.jwt_rejections.labels(reason).inc()

    def cards_returned(self, service_id: str, cards: list[dict[str, Any]]) -> None:
        for card in cards:
            self.cards.labels(service_id, str(card.get("indicator", "info"))).inc()

    def prefetch_unavailable(self, keys: list[str]) -> None:
        for key in keys:
            self.unavailable.labels(key).inc()


class _Counted:
    def __init__(self, metrics: ServiceMetrics, resource_type: str) -> None:
        self._metrics = metrics
        self._type = resource_type

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        outcome = "ok" if kind is None else "error"
        self._metrics.fetches.labels(self._type, outcome).inc()


class MetricsMiddleware:
    """ASGI middleware counting each CDS request (status, latency) in :class:`ServiceMetrics`."""

    def __init__(self, app: Any, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        labels = self.metrics.route(scope.get("path", "")) if scope["type"] == "http" else None
        if labels is None:
            await self.app(scope, receive, send)
            return
        status = [500]

        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        started = time.perf_counter()
        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.latency.labels(*labels).observe(time.perf_counter() - started)
            self.metrics.requests.labels(*labels, str(status[0])).inc()


class CountingFetcher:
    """A :class:`~fhir_leuko.service.fetch.FhirFetcher` that counts what it fetches and its errors."""

    def __init__(self, fetcher: FhirFetcher, metrics: ServiceMetrics) -> None:
        self._fetcher = fetcher
        self._metrics = metrics

    def read(self, base: str, path: str, *, token: str) -> bytes | None:
        try:
            with self._metrics.fetch(path):
                return self._fetcher.read(base, path, token=token)
        except FhirFetchError as exc:
            self._metrics.fetch_error(exc.kind)
            raise

    def pages(self, base: str, url: str, *, token: str) -> Iterator[bytes]:
        try:
            with self._metrics.fetch(url):
                yield from self._fetcher.pages(base, url, token=token)
        except FhirFetchError as exc:
            self._metrics.fetch_error(exc.kind)
            raise


def _authorized(authorization: str | None, token: str | None) -> bool:
    if token is None:
        return True
    scheme, _, given = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def install_metrics_route(app: FastAPI, metrics: ServiceMetrics, token: str | None) -> None:
    """``GET /metrics`` on the service's own port (no JWT; a bearer token if configured)."""

    @app.get(
        "/metrics",
        tags=["Operations"],
        summary="Prometheus metrics (no patient data; a bearer token if metrics_token_file is set)",
        response_class=Response,
    )
    async def prometheus_metrics(request: Request) -> Response:
        if not _authorized(request.headers.get("authorization"), token):
            return Response(status_code=401, headers={"WWW-Authenticate": "Bearer"})
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type.split(";")[0], headers={"Content-Type": content_type})
