"""The ``fhir-leuko`` command: subcommands register themselves; errors become exit codes here only.

The CLI is the one part of fhir-leuko that sees everything: it wires the rule core
(:mod:`fhir_leuko.core`) to the file readers (:mod:`fhir_leuko.files`), the job
(:mod:`fhir_leuko.job`) and the service (:mod:`fhir_leuko.service`, imported only by ``serve``, as
it needs the ``service`` extra). Nothing else imports it but ``python -m fhir_leuko``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from .._version import __version__
from ..errors import ExitCode, FhirLeukoError
from . import evaluate, profiles, serve
from . import run as run_job  # `run` is also the console-script function below

__all__ = ["build_parser", "main"]

_DESCRIPTION = """\
fhir-leuko finds low white-cell counts (leukopenia, neutropenia, lymphopenia and the other
subtypes) in FHIR R4 lab data, links them to drugs known to cause them, and writes one
explainable DetectedIssue per patient and finding.
"""

_EPILOG = """\
exit codes:
  0  all input was read cleanly
  1  some input had problems; everything valid was still evaluated and written
  2  a usage or configuration error; nothing was evaluated

Run 'fhir-leuko COMMAND --help' for the options and examples of each command.
"""

# Each module adds one subcommand with `register(subparsers)`; its handler returns an exit code.
_COMMANDS = [evaluate, profiles, run_job, serve]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fhir-leuko",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fhir-leuko {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output on stderr (-vv: debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in _COMMANDS:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="fhir-leuko: %(levelname)s: %(message)s")
    try:
        code: int = args.handler(args)
    except FhirLeukoError as exc:
        print(f"fhir-leuko: error: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        print("fhir-leuko: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return int(ExitCode.OK)
    return code


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
