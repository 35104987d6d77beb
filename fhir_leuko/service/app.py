"""The application factory of the CDS Hooks service, and the one place errors become HTTP.

``create_app(settings)`` wires the boundaries (knowledge and profiles, the FHIR fetcher, the JWKS
HTTP session, the feedback store, the clock), all injectable, and returns a FastAPI app that
``fhir-leuko serve`` runs with uvicorn. Error responses are OperationOutcomes; a JWT failure is a
401 that says nothing about why (CDS Hooks best practices), an internal error or a timeout is a
5xx, never an empty card list.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import orjson
import requests
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException

from .._version import __version__
from ..core.knowledge import Knowledge
from ..core.profiles import ProfileSet
from ..errors import (
    AuthenticationError,
    FhirLeukoError,
    MalformedRequestError,
    PrefetchUnavailableError,
    ProfileError,
    RequestTooLargeError,
    ServiceTimeoutError,
    UnknownServiceError,
    UsageError,
)
from ..files.documents import load_knowledge, load_profiles
from .feedback import FeedbackStore
from .fetch import FhirClientFetcher, FhirFetcher
from .health import Readiness, install_health
from .hooks import SERVICES, CdsEngine
from .metrics import CountingFetcher, MetricsMiddleware, ServiceMetrics, install_metrics_route
from .models import FeedbackRequest, HookRequest
from .pages import TokenScrubber, install_card_pages
from .replay import ReplayStore, SqliteReplayCache
from .routes import install_routes, run_with_deadline
from .security import JwksCache, JwtVerifier, ReplayCache, keys_from_jwks
from .settings import ServiceSettings, database_url
from .store import CardStore

__all__ = ["create_app", "error_response"]

logger = logging.getLogger("fhir_leuko.service")

FHIR_JSON = "application/fhir+json"

# The one mapping of the exception tree to HTTP (DEVELOPERS.md, style 4). First match wins.
_HTTP: tuple[tuple[type[FhirLeukoError], int, str], ...] = (
    (AuthenticationError, 401, "login"),
    (MalformedRequestError, 400, "invalid"),
    (UnknownServiceError, 404, "not-found"),
    (RequestTooLargeError, 413, "too-costly"),
    (PrefetchUnavailableError, 412, "incomplete"),
    (ServiceTimeoutError, 503, "timeout"),
)


def _outcome(issues: list[dict[str, Any]]) -> bytes:
    return orjson.dumps({"resourceType": "OperationOutcome", "issue": issues})


def error_response(exc: FhirLeukoError) -> Response:
    """The HTTP response for an error: its status and an OperationOutcome."""
    status, code = 500, "exception"
    for cls, http_status, issue_code in _HTTP:
        if isinstance(exc, cls):
            status, code = http_status, issue_code
            break
    headers: dict[str, str] = {}
    if isinstance(exc, AuthenticationError):
        # The same body for every JWT failure: the reason is in the service log only.
        issues = [
            {"severity": "error", "code": code, "details": {"text": "Authentication required"}}
        ]
        headers["WWW-Authenticate"] = "Bearer"
    elif isinstance(exc, PrefetchUnavailableError):
        issues = [
            {
                "severity": "error",
                "code": code,
                "details": {"text": f"Required data unavailable: prefetch key '{key}'"},
                "diagnostics": f"CDS Hooks prefetch key '{key}': {reason}.",
            }
            for key, reason in sorted(exc.missing.items())
        ]
    elif status == 500:
        issues = [
            {
                "severity": "fatal",
                "code": code,
                "details": {"text": "Internal error: no decision support could be given"},
            }
        ]
    else:
        issues = [{"severity": "error", "code": code, "details": {"text": str(exc)}}]
    return Response(_outcome(issues), status_code=status, media_type=FHIR_JSON, headers=headers)


async def _on_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, FhirLeukoError)
    return error_response(exc)


async def _on_http_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    code = {404: "not-found", 405: "not-supported"}.get(exc.status_code, "processing")
    issues = [{"severity": "error", "code": code, "details": {"text": str(exc.detail)}}]
    return Response(
        _outcome(issues),
        status_code=exc.status_code,
        media_type=FHIR_JSON,
        headers=dict(exc.headers or {}),
    )


async def _on_validation_error(_request: Request, exc: Exception) -> Response:
    return error_response(MalformedRequestError(f"invalid request: {exc}"))


def _check_card_urls(profiles: ProfileSet) -> None:
    for loaded in profiles.loaded:
        url = loaded.profile.card.source_url
        if url and (urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc):
            raise ProfileError(
                str(loaded.path), "card.source_url", f"{url!r} is not an absolute http(s) URL"
            )


def _check_key_files(settings: ServiceSettings) -> None:
    """Fail at start-up, not at the first request, when a client's JWKS file is unusable."""
    for client in settings.clients:
        if client.jwks_file is None:
            continue
        try:
            document = orjson.loads(client.jwks_file.read_bytes())
        except (OSError, orjson.JSONDecodeError) as exc:
            raise UsageError(
                f"{client.jwks_file}: cannot read the JWK Set of {client.iss}: {exc}"
            ) from None
        if not keys_from_jwks(document):
            raise UsageError(
                f"{client.jwks_file}: no ES384 (EC P-384) or RS384 (RSA >= 2048) signing key with "
                f"a kid for {client.iss}"
            )


def create_app(
    settings: ServiceSettings,
    *,
    knowledge: Knowledge | None = None,
    profiles: ProfileSet | None = None,
    fetcher: FhirFetcher | None = None,
    jwks_session: requests.Session | None = None,
    clock: Callable[[], datetime] | None = None,
) -> FastAPI:
    """The CDS Hooks service as a FastAPI (ASGI) app.

    Args:
        settings: see :mod:`fhir_leuko.service.settings`.
        knowledge, profiles: default: the shipped ones plus ``settings.profiles``.
        fetcher: how the client's FHIR server is read (default :class:`FhirClientFetcher`).
        jwks_session: HTTP session for JWK Sets (default: a new ``requests.Session``).
        clock: the time of each call, as-of of its evaluation (default: now, UTC).

    Raises:
        ProfileError: a profile or knowledge file is invalid.
        UsageError: the feedback database cannot be opened, or a JWKS file is unusable.
    """
    knowledge = knowledge or load_knowledge()
    if profiles is None:
        profiles = load_profiles(knowledge, settings.profiles)
        if settings.profile_ids:
            profiles = profiles.select(settings.profile_ids)
    _check_card_urls(profiles)
    _check_key_files(settings)
    now = clock or _clock(settings)
    days = settings.issued_card_retention_days
    store, replay, close_stores = _stores(settings, timedelta(days=days) if days else None)
    metrics = ServiceMetrics({s.id: s.hook for s in SERVICES})
    token = _metrics_token(settings)
    executor = ThreadPoolExecutor(
        max_workers=settings.fetch_workers, thread_name_prefix="fhir-leuko-fetch"
    )
    engine = CdsEngine(
        settings,
        knowledge,
        profiles,
        fetcher=CountingFetcher(
            fetcher
            or FhirClientFetcher(
                timeout=settings.fetch_timeout_seconds, max_pages=settings.fetch_max_pages
            ),
            metrics,
        ),
        store=store,
        executor=executor,
        clock=now,
    )
    jwks = JwksCache(
        session=jwks_session,
        cache_seconds=settings.jwks_cache_seconds,
        refetch_seconds=settings.jwks_refetch_seconds,
        timeout=settings.jwks_timeout_seconds,
    )
    verifier = JwtVerifier(
        settings,
        jwks=jwks,
        clock=lambda: now().timestamp(),
        on_reject=metrics.jwt_rejected,
        replay=replay,
    )
    if settings.testing.disable_jwt:
        logger.warning("JWT checking is DISABLED ([service.testing] disable_jwt): tests only")

    scrubber = TokenScrubber()

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # After the server has configured its logging: card page tokens never reach a log line.
        access = logging.getLogger("uvicorn.access")
        access.addFilter(scrubber)
        # /metrics on a port of its own, when configured (not on the service's port then).
        side = metrics.serve(settings.metrics_host, settings.metrics_port, token) if (
            settings.metrics and settings.metrics_port is not None
        ) else None
        yield
        if side is not None:
            side.shutdown()
            side.server_close()
        access.removeFilter(scrubber)
        executor.shutdown(wait=False, cancel_futures=True)
        close_stores()

    app = FastAPI(
        title="fhir-leuko CDS Hooks service",
        version=__version__,
        description="CDS Hooks 2.0 services for low white-cell counts: patient-view, "
        "order-select, order-sign, and feedback. See docs/cds-hooks.md.",
        openapi_url="/openapi.json" if settings.openapi or settings.docs else None,
        docs_url="/docs" if settings.docs else None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.engine = engine
    app.state.store = store
    app.state.metrics = metrics
    app.add_exception_handler(FhirLeukoError, _on_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    install_health(
        app,
        Readiness(store, jwks, verifier.key_locations()),
        lambda work: run_with_deadline(settings.request_timeout_seconds, work),
    )
    install_routes(
        app,
        engine=engine,
        verifier=verifier,
        store=store,
        public_base_url=settings.public_base_url or "",
        max_body_bytes=settings.max_body_bytes,
        timeout=settings.request_timeout_seconds,
        clock=now,
        metrics=metrics,
    )
    if settings.metrics and settings.metrics_port is None:
        install_metrics_route(app, metrics, token)
    if settings.cors_origins:
        # CDS Hooks clients in a browser (the sandbox, web EHRs) need CORS; the preflight must
        # allow Authorization and Content-Type (cds-hooks.md §1.7). No cookies are used.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
            max_age=600,
        )
    install_card_pages(
        app,
        store=store,
        timeout=settings.request_timeout_seconds,
        clock=now,
        reasons={r.code: r.display for r in settings.override_reasons},
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    _install_openapi(app)
    return app


def _stores(
    settings: ServiceSettings, retention: timedelta | None
) -> tuple[CardStore, ReplayStore, Callable[[], None]]:
    """The card and feedback store and the JWT replay cache that every process of the
    deployment shares: the SQLite file of ``feedback_database`` (one machine), or PostgreSQL
    (``store = "postgresql"``, several replicas; service/postgres.py); and how to close them."""
    if settings.store == "postgresql":
        from .postgres import PostgresCardStore, PostgresReplayCache, connect_pool

        pool = connect_pool(database_url(settings))
        return PostgresCardStore(pool, retention=retention), PostgresReplayCache(pool), pool.close
    cards = FeedbackStore(settings.feedback_database, retention=retention)
    replay: ReplayStore
    if settings.testing.disable_jwt:
        replay = ReplayCache()  # no token is checked: nothing to share

        def close() -> None:
            cards.close()

        return cards, replay, close
    local = SqliteReplayCache(settings.feedback_database)

    def close_both() -> None:
        cards.close()
        local.close()

    return cards, local, close_both


def _metrics_token(settings: ServiceSettings) -> str | None:
    """The bearer token /metrics needs, read from ``metrics_token_file`` at start-up."""
    if settings.metrics_token_file is None:
        return None
    try:
        token = settings.metrics_token_file.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise UsageError(
            f"{settings.metrics_token_file}: cannot read the metrics token: {exc.strerror}"
        ) from None
    if len(token) < 16:
        raise UsageError(f"{settings.metrics_token_file}: the metrics token is shorter than 16 characters")
    return token


def _clock(settings: ServiceSettings) -> Callable[[], datetime]:
    """The time each call is evaluated as of: now (UTC), or ``[service.testing] as_of``."""
    fixed = settings.testing.as_of
    if fixed is not None:
        logger.warning("every call is evaluated as of %s ([service.testing] as_of)", fixed)
        return lambda: fixed
    return lambda: datetime.now(UTC)


def _install_openapi(app: FastAPI) -> None:
    """The OpenAPI document, with the request-body schemas the routes refer to (they read bytes)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            _, defs = models_json_schema(
                [(HookRequest, "validation"), (FeedbackRequest, "validation")],
                ref_template="#/components/schemas/{model}",
            )
            schema.setdefault("components", {}).setdefault("schemas", {}).update(
                defs.get("$defs", {})
            )
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
