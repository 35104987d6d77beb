"""``GET /cards/{uuid}?token=...``: the page behind a card's link.

The card carries a short detail; its link opens the full explanation (limits and their sources,
rule versions, every value), the same trend plot as the HTML report, the feedback received and what
an override held back. The browser that opens it holds no JWT, so the link itself is the key: a
random 256-bit token made when the card is issued, of which the store keeps only the SHA-256, valid
until ``card_page_days`` after the card (at most the issued-card retention). The URL names the
card's uuid and the token, never the patient. Anyone holding the link can open the page until it
expires (docs/cds-hooks.md, "The card page"); an unknown card, a wrong or expired token all get the
same 404. The token is removed from the access log lines.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from datetime import datetime

from fastapi import FastAPI, Response

from ..present.cardpage import CardPageView, render_card_page, render_not_found
from .routes import run_with_deadline
from .store import CardPage, CardStore

__all__ = ["TokenScrubber", "install_card_pages"]

_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Robots-Tag": "noindex",
    "Content-Security-Policy": "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
    "base-uri 'none'; form-action 'none'",
}
_HTML = "text/html; charset=utf-8"
_TOKEN = re.compile(r"([?&]token=)[^&\s\"]*")


class TokenScrubber(logging.Filter):
    """Removes card page tokens from log records (uvicorn's access log names the full path)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(
            isinstance(a, str) and "token=" in a for a in record.args
        ):
            record.args = tuple(
                _TOKEN.sub(r"\1-", a) if isinstance(a, str) else a for a in record.args
            )
        elif isinstance(record.msg, str) and "token=" in record.msg:
            record.msg = _TOKEN.sub(r"\1-", record.msg)
        return True


def _view(page: CardPage, reasons: dict[str, str]) -> CardPageView:
    return CardPageView(
        uuid=page.uuid,
        service_id=page.service_id,
        issued_at=page.issued_at,
        expires=page.expires,
        page=page.page,
        feedback=[
            {
                "outcome": f.outcome,
                "at": f.outcome_timestamp,
                "reason": f.override_display
                or reasons.get(f.override_code or "", "")
                or f.override_code
                or "",
                "comment": f.user_comment or "",
            }
            for f in page.feedback
        ],
        held_back=[{"at": h.at, "what": h.what} for h in page.held_back],
    )


def install_card_pages(
    app: FastAPI,
    *,
    store: CardStore,
    timeout: float,
    clock: Callable[[], datetime],
    reasons: dict[str, str] | None = None,
) -> None:
    """Add ``GET /cards/{uuid}`` to ``app``. ``reasons``: the displays of the override reason
    codes (a client may send a reason's code without its display)."""
    displays = dict(reasons or {})

    @app.get(
        "/cards/{card_uuid}",
        tags=["Card pages"],
        summary="The full explanation and trend plot behind a card's link (token in the link)",
        response_class=Response,
        responses={
            200: {"content": {"text/html": {}}, "description": "The card's page"},
            404: {"content": {"text/html": {}}, "description": "Unknown, wrong or expired link"},
        },
    )
    async def card_page(card_uuid: str, token: str = "") -> Response:
        def work() -> str | None:
            found = store.card_page(card_uuid, token, clock()) if token else None
            return render_card_page(_view(found, displays)) if found is not None else None

        html = await run_with_deadline(timeout, work)
        if html is None:
            return Response(render_not_found(), 404, headers=_HEADERS, media_type=_HTML)
        return Response(html, headers=_HEADERS, media_type=_HTML)
