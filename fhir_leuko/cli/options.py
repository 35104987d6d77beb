"""Options shared by several subcommands: profiles, as-of."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path

from ..core.fhirtime import parse_as_of
from ..core.knowledge import Knowledge
from ..core.pipeline import LATEST, AsOf
from ..core.profiles import ProfileSet
from ..errors import UsageError
from ..files.documents import load_knowledge, load_profiles

__all__ = [
    "add_as_of",
    "add_profile_options",
    "as_of_from",
    "as_of_or_latest",
    "parse_instant",
    "profiles_from",
]


def add_profile_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--profiles",
        metavar="DIR",
        type=Path,
        action="append",
        default=[],
        help="a site directory of profiles that add to or replace the shipped ones (by id); "
        "repeatable",
    )
    parser.add_argument(
        "--profile",
        metavar="ID",
        action="append",
        default=[],
        help="evaluate only this profile (repeatable; default: all active profiles)",
    )


def add_as_of(parser: argparse.ArgumentParser, *, latest: bool = False) -> None:
    parser.add_argument(
        "--as-of",
        metavar="DATETIME",
        help="evaluate as of this time (ISO 8601; a bare date means the end of that day, UTC; "
        "default: now)"
        + (
            "; 'latest': each patient as of their own latest lab result (historical or "
            "research exports)"
            if latest
            else ""
        ),
    )


def parse_instant(flag: str, text: str) -> datetime:
    """An ``--as-of``/``--since`` value (a bare date is the end of that day, UTC).

    Raises:
        UsageError: naming the flag, when the text is empty, not an ISO 8601 date or date-time, or
            outside the supported range (``fhirtime.AS_OF_RANGE``).
    """
    try:
        return parse_as_of(text)
    except ValueError as exc:
        raise UsageError(f"{flag} {text!r}: {exc}") from None


def as_of_from(args: argparse.Namespace) -> datetime:
    # Only an absent option means "now": an empty one (--as-of "") is a mistake, said so.
    if args.as_of is None:
        return datetime.now(UTC).replace(microsecond=0)
    return parse_instant("--as-of", args.as_of)


def as_of_or_latest(args: argparse.Namespace) -> AsOf:
    """``--as-of`` where ``latest`` is allowed (evaluate, explain)."""
    if isinstance(args.as_of, str) and args.as_of.strip().lower() == LATEST:
        return LATEST
    return as_of_from(args)


def profiles_from(args: argparse.Namespace) -> tuple[Knowledge, ProfileSet]:
    knowledge = load_knowledge()
    profile_set = load_profiles(knowledge, args.profiles)
    if args.profile:
        profile_set = profile_set.select(args.profile)
    return knowledge, profile_set
