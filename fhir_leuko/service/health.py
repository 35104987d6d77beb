"""Probes for load balancers and Kubernetes: ``GET /healthz`` (liveness) and ``GET /readyz``
(readiness). Neither needs a JWT, and neither says anything about the configuration: the body is
``{"status": "ok"}``, ``{"status": "ready"}`` or ``{"status": "not ready"}``; why it is not ready is
in the service log (a warning, once per change).

* liveness: the process answers HTTP. It checks nothing else on purpose: a restart does not cure
  an unreachable JWKS endpoint, and a liveness probe that fails for outside reasons restarts every
  replica at once.
* readiness: the configuration was loaded (the app exists), the store of issued cards and feedback
  takes a write, and every configured client's JWK Set has usable keys (cached keys count: the
  cache keeps them through a JWKS outage, so tokens can still be verified). With JWT checking
  disabled (tests only) the JWK Sets are not needed.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import orjson
from fastapi import FastAPI, Response

__all__ = ["Readiness", "WritableStore", "install_health"]

logger = logging.getLogger("fhir_leuko.service")


class WritableStore(Protocol):
    def check_writable(self) -> None:
        """Write something small; raise if the store cannot be written."""


class KeySets(Protocol):
    def usable(self, location: str) -> bool:
        """Whether the JWK Set at ``location`` has usable keys (cached or freshly loaded)."""


class Readiness:
    """The readiness checks, each named for the log only."""

    def __init__(self, store: WritableStore, jwks: KeySets, locations: Sequence[str]) -> None:
        self._store = store
        self._jwks = jwks
        self._locations = tuple(locations)
        self._last: tuple[str, ...] = ()

    def failures(self) -> tuple[str, ...]:
        """What is not ready (empty when ready). Blocking: run it in a worker thread."""
        failed: list[str] = []
        try:
            self._store.check_writable()
        except Exception as exc:  # any failure of the store means not ready, never a 500
            failed.append(f"the card and feedback store cannot be written ({type(exc).__name__})")
        for location in self._locations:
            if not self._jwks.usable(location):
                failed.append(f"no usable key in the JWK Set {location}")
        result = tuple(failed)
        if result != self._last:
            if result:
                logger.warning("not ready: %s", "; ".join(result))
            else:
                logger.info("ready")
            self._last = result
        return result


def _status(status: str, code: int) -> Response:
    return Response(
        orjson.dumps({"status": status}),
        status_code=code,
        media_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


def install_health(
    app: FastAPI,
    readiness: Readiness,
    run: Callable[[Callable[[], tuple[str, ...]]], Awaitable[tuple[str, ...]]],
) -> None:
    """Add ``/healthz`` and ``/readyz``; ``run`` runs the blocking checks under a deadline."""

    @app.get("/healthz", tags=["Operations"], summary="Liveness: the process answers (no JWT)")
    async def healthz() -> Response:
        return _status("ok", 200)

    @app.get(
        "/readyz",
        tags=["Operations"],
        summary="Readiness: store writable, client key sets loadable (no JWT, no detail)",
    )
    async def readyz() -> Response:
        try:
            failed = await run(readiness.failures)
        except Exception:  # a timeout or anything else: not ready, and no detail
            logger.warning("not ready: the readiness checks did not finish")
            return _status("not ready", 503)
        return _status("not ready", 503) if failed else _status("ready", 200)
