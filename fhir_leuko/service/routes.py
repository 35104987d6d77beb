"""The HTTP endpoints of CDS Hooks 2.0: discovery, service calls and feedback.

Every endpoint first checks the JWT against its own URL (built from the configured public base
URL), then does its work in a worker thread under the request deadline. Errors are raised as
:mod:`fhir_leuko.errors` exceptions; :mod:`fhir_leuko.service.app` turns them into HTTP statuses with
an OperationOutcome body, in one place.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import orjson
import pydantic
from fastapi import FastAPI, Request, Response

from ..errors import (
    FhirLeukoError,
    MalformedRequestError,
    PrefetchUnavailableError,
    RequestTooLargeError,
    ServiceError,
    ServiceTimeoutError,
)
from .hooks import CdsEngine
from .metrics import ServiceMetrics
from .models import CardsResponse, DiscoveryResponse, FeedbackRequest, OperationOutcome
from .security import JwtVerifier
from .store import CardStore

__all__ = ["install_routes"]

logger = logging.getLogger("fhir_leuko.service")

_T = TypeVar("_T")

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": OperationOutcome, "description": "Malformed request"},
    401: {"model": OperationOutcome, "description": "Missing or invalid JWT (no detail given)"},
    404: {"model": OperationOutcome, "description": "Unknown service id"},
    413: {"model": OperationOutcome, "description": "Request body too large"},
    500: {"model": OperationOutcome, "description": "Internal error (never an empty card list)"},
    503: {"model": OperationOutcome, "description": "Not answered in time"},
}


def _json(content: Any) -> Response:
    return Response(orjson.dumps(content), media_type="application/json")


def _guarded(work: Callable[[], _T]) -> _T:
    try:
        return work()
    except FhirLeukoError:
        raise
    except Exception:
        # Logged with its traceback for the operators; the client gets a 500 OperationOutcome.
        logger.exception("internal error while answering a CDS Hooks request")
        raise ServiceError("internal error") from None


async def run_with_deadline(seconds: float, work: Callable[[], _T]) -> _T:
    """Run blocking work in a worker thread; past the deadline answer 503 and abandon it."""
    try:
        with anyio.fail_after(seconds):
            return await anyio.to_thread.run_sync(_guarded, work, abandon_on_cancel=True)
    except TimeoutError:
        logger.warning("request not answered within %g s", seconds)
        raise ServiceTimeoutError(f"not answered within {seconds:g} s") from None


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes (before reading it, when declared)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestTooLargeError(f"the request body is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestTooLargeError(f"the request body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _feedback_entries(body: bytes) -> FeedbackRequest:
    try:
        return FeedbackRequest.model_validate_json(body)
    except pydantic.ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        message = str(first["msg"]).removeprefix("Value error, ")
        raise MalformedRequestError(f"invalid feedback: {where}: {message}") from None


def install_routes(
    app: FastAPI,
    *,
    engine: CdsEngine,
    verifier: JwtVerifier,
    store: CardStore,
    public_base_url: str,
    max_body_bytes: int,
    timeout: float,
    clock: Callable[[], datetime],
    metrics: ServiceMetrics,
) -> None:
    """Add the CDS Hooks endpoints to ``app``."""
    root = f"{public_base_url}/cds-services"
    hook_body = {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/HookRequest"}}
            },
        }
    }
    feedback_body = {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/FeedbackRequest"}}
            },
        }
    }

    @app.get(
        "/cds-services",
        tags=["CDS Hooks"],
        summary="Discovery: the services, their hooks and prefetch templates",
        response_class=Response,
        responses={200: {"model": DiscoveryResponse, "description": "The services"}, **_ERRORS},
    )
    async def discovery(request: Request) -> Response:
        authorization = request.headers.get("authorization")

        def work() -> dict[str, Any]:
            verifier.verify(authorization, root)
            return engine.discovery()

        return _json(await run_with_deadline(timeout, work))

    @app.post(
        "/cds-services/{service_id}",
        tags=["CDS Hooks"],
        summary="Call a service (patient-view, order-select, order-sign)",
        response_class=Response,
        openapi_extra=hook_body,
        responses={
            200: {"model": CardsResponse, "description": "Cards (possibly none)"},
            412: {
                "model": OperationOutcome,
                "description": "Required prefetch data unavailable; the OperationOutcome names "
                "each missing key",
            },
            **_ERRORS,
        },
    )
    async def call_service(service_id: str, request: Request) -> Response:
        authorization = request.headers.get("authorization")
        body = await read_body(request, max_body_bytes)

        def work() -> dict[str, Any]:
            caller = verifier.verify(authorization, f"{root}/{service_id}")
            try:
                answer = engine.call(service_id, body, caller)
            except PrefetchUnavailableError as exc:
                metrics.prefetch_unavailable(sorted(exc.missing))
                raise
            metrics.cards_returned(service_id, answer["cards"])
            return answer

        return _json(await run_with_deadline(timeout, work))

    @app.post(
        "/cds-services/{service_id}/feedback",
        tags=["CDS Hooks"],
        summary="Feedback on cards: accepted or overridden (idempotent)",
        response_class=Response,
        openapi_extra=feedback_body,
        responses={200: {"description": "Stored (a repeated entry is stored once)"}, **_ERRORS},
    )
    async def feedback(service_id: str, request: Request) -> Response:
        authorization = request.headers.get("authorization")
        body = await read_body(request, max_body_bytes)

        def work() -> None:
            caller = verifier.verify(authorization, f"{root}/{service_id}/feedback")
            engine.service(service_id)
            entries = _feedback_entries(body)
            new = store.record_feedback(
                service_id, entries.feedback, client_iss=caller.iss, received_at=clock()
            )
            logger.info(
                "%s feedback: %d entries, %d new, iss=%s jti=%s",
                service_id,
                len(entries.feedback),
                new,
                caller.iss,
                caller.jti,
            )

        await run_with_deadline(timeout, work)
        return Response(status_code=200)
