"""``fhir-leuko cards``: the cards the CDS service kept, for review (silent mode, pilots)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import orjson

from ..errors import UsageError
from .options import parse_instant

__all__ = ["register"]

_HELP = "list the cards the CDS service computed and kept (silent mode review), never their links"

_EPILOG = """\
Reads the service's store (the [service] feedback_database of --config FILE, or --database FILE)
and lists its cards newest first: when, which service, indicator, topic, summary, whether it was
silent (computed and kept, not returned), the feedback received and how often an override held it
back. Never a card page token: the list is for review, not for opening pages.

examples:
  fhir-leuko cards list --config service.toml --silent
  fhir-leuko cards list --database /var/lib/fhir-leuko/cds-feedback.sqlite3 --since 2026-11-01 --format ndjson

exit codes:
  0  listed
  2  a usage error: no such store, bad option
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "cards",
        help=_HELP,
        description=f"fhir-leuko cards: {_HELP}.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="the kept cards, newest first")
    where = listing.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", metavar="FILE", type=Path, help="the service's TOML file")
    where.add_argument("--database", metavar="FILE", type=Path, help="the store's SQLite file")
    listing.add_argument("--silent", action="store_true", help="only silent-mode cards")
    listing.add_argument("--since", metavar="DATETIME", help="issued at or after (ISO 8601)")
    listing.add_argument("--limit", metavar="N", type=int, default=1000, help="at most N (1000)")
    listing.add_argument(
        "--format", choices=("table", "ndjson"), default="table", help="table (default) or ndjson"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    try:
        from ..service.feedback import FeedbackStore
        from ..service.settings import load_settings
    except ImportError as exc:
        raise UsageError(
            f"fhir-leuko cards needs the service extra ({exc.name} is missing): "
            "pip install 'fhir-leuko[service]'"
        ) from None
    if args.database is not None:
        path = args.database
    else:
        path = load_settings(args.config).feedback_database
    if not path.exists():
        raise UsageError(f"{path}: no such store (the service creates it at its first start)")
    since = parse_instant("--since", args.since) if args.since else None
    store = FeedbackStore(path, retention=None)
    try:
        cards = store.cards(silent_only=args.silent, since=since, limit=args.limit)
    finally:
        store.close()
    out = sys.stdout
    if args.format == "ndjson":
        for card in cards:
            out.write(
                orjson.dumps(
                    {
                        "uuid": card.uuid,
                        "service": card.service_id,
                        "issued_at": card.issued_at,
                        "indicator": card.indicator,
                        "topic": card.topic,
                        "summary": card.summary,
                        "silent": card.silent,
                        "feedback": list(card.feedback),
                        "held_back": card.held_back,
                    }
                ).decode()
                + "\n"
            )
        return 0
    for card in cards:
        flags = ["silent" if card.silent else "shown"]
        if card.feedback:
            flags.append("feedback: " + ", ".join(card.feedback))
        if card.held_back:
            flags.append(f"held back {card.held_back}x")
        out.write(
            f"{card.issued_at}  {card.service_id:<19} {card.indicator:<8} {card.topic:<14} "
            f"{card.summary}  [{'; '.join(flags)}]  {card.uuid}\n"
        )
    print(f"fhir-leuko: {len(cards)} card{'s' if len(cards) != 1 else ''}", file=sys.stderr)
    return 0
