"""The page behind a card's link (``GET /cards/{uuid}?token=...`` of the CDS service): the full
explanation, the same trend plot as the report, the feedback received and what an override held
back. Self-contained like the report (no script, no fetch); input text is escaped by Jinja2."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .._version import __version__
from .report import environment, svg_uri
from .trend import TrendData

__all__ = ["CardPageView", "render_card_page", "render_not_found"]


@dataclass(frozen=True)
class CardPageView:
    """What the page shows; the service fills it from its store."""

    uuid: str
    service_id: str
    issued_at: str
    expires: str
    page: dict[str, Any]
    """As stored with the card: summary, indicator, as_of, sections, notes, trend."""
    feedback: Sequence[dict[str, str]] = ()
    """outcome, at, reason, comment."""
    held_back: Sequence[dict[str, str]] = ()
    """at, what."""


def render_card_page(view: CardPageView) -> str:
    page = view.page
    trend = page.get("trend")
    plot = svg_uri(TrendData.from_json(trend)) if trend else ""
    return (
        environment()
        .get_template("card.html.j2")
        .render(
            version=__version__,
            uuid=view.uuid,
            service_id=view.service_id,
            issued_at=view.issued_at,
            expires=view.expires,
            summary=page.get("summary", ""),
            indicator=page.get("indicator", "info"),
            as_of=page.get("as_of", ""),
            sections=page.get("sections", []),
            notes=page.get("notes", []),
            plot=plot,
            feedback=view.feedback,
            held_back=view.held_back,
        )
    )


def render_not_found() -> str:
    return environment().get_template("card-gone.html.j2").render(version=__version__)
