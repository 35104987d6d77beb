"""``fhir-leuko profiles list|validate``: what is loaded, and whether a site's files are right."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import ExitCode, UsageError, exit_code_table
from ..files.documents import (
    DOCUMENT_SUFFIXES,
    load_knowledge,
    load_profiles,
    validate_profile_dir,
)

__all__ = ["register"]

_EPILOG = """\
examples:
  fhir-leuko profiles list
  fhir-leuko profiles list --profiles /etc/fhir-leuko/profiles
  fhir-leuko profiles validate /etc/fhir-leuko/profiles
  fhir-leuko profiles validate /etc/fhir-leuko/profiles/adult-local.toml

Profiles are TOML or YAML files; their grammar is documented in profiles/README.md (shipped in the
package as fhir_leuko/profiles/README.md). A site directory adds profiles, or replaces a shipped one
by using its id; a site profile may 'extends' a shipped one and change only what differs.

validate reports every error of every file (each naming the file and the field), and exits 2 when
a file is invalid, or when PATH is missing or a directory that holds no profile file.

""" + exit_code_table(
    (ExitCode.OK, ExitCode.USAGE, ExitCode.INTERNAL), "stopped by signal N (130 Ctrl-C)"
)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "profiles",
        help="list the loaded rule profiles, or validate a directory of site profiles",
        description="List or validate rule profiles.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser(
        "list",
        help="show the profiles in force (id, version, priority, url, file, When/Then)",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    listing.add_argument(
        "--profiles",
        metavar="DIR",
        type=Path,
        action="append",
        default=[],
        help="also load this site directory (repeatable)",
    )
    listing.set_defaults(handler=_list)
    validate = actions.add_parser(
        "validate",
        help="check every profile file in DIR (or one FILE); every error, naming file and field",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    validate.add_argument(
        "path", metavar="DIR|FILE", type=Path, help="a site profile directory, or one profile file"
    )
    validate.set_defaults(handler=_validate)


def _list(args: argparse.Namespace) -> int:
    knowledge = load_knowledge()
    profiles = load_profiles(knowledge, args.profiles)
    for loaded in profiles.loaded:
        p = loaded.profile
        print(f"{p.id} {p.version} [{p.status}, priority {p.priority}] {p.title}")
        print(f"  url:  {p.url}")
        print(f"  file: {loaded.path}")
        if p.extends:
            print(f"  extends: {p.extends}")
        print(f"  when: {p.when}")
        print(f"  then: {p.then}")
    versions = ", ".join(f"{k} {v}" for k, v in knowledge.versions.items())
    print(f"knowledge: {versions}")
    return int(ExitCode.OK)


def _validate(args: argparse.Namespace) -> int:
    path: Path = args.path
    if path.is_file():
        if path.suffix not in DOCUMENT_SUFFIXES:
            raise UsageError(
                f"profiles validate {path}: not a profile file "
                f"({', '.join('*' + s for s in DOCUMENT_SUFFIXES)})"
            )
    elif not path.is_dir():
        raise UsageError(f"profiles validate {path}: not a directory or a profile file")
    elif not any(p.suffix in DOCUMENT_SUFFIXES for p in path.iterdir()):
        # Validating nothing must not look like "all valid" (a typo in a CI script).
        raise UsageError(
            f"profiles validate {path}: no profile files "
            f"({', '.join('*' + s for s in DOCUMENT_SUFFIXES)}) in it"
        )
    knowledge = load_knowledge()
    profiles, errors = validate_profile_dir(path, knowledge)
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    for profile in profiles:
        print(f"ok: {profile.id} {profile.version}")
    if errors:
        files = len({error.file for error in errors})
        print(f"{len(errors)} error(s) in {files} invalid file(s)", file=sys.stderr)
        return int(ExitCode.USAGE)
    return int(ExitCode.OK)
