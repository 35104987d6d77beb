"""The ``fhir-leuko`` command: subcommands register themselves; errors become exit codes here only.

The CLI is the one part of fhir-leuko that sees everything: it wires the rule core
(:mod:`fhir_leuko.core`) to the file readers (:mod:`fhir_leuko.files`), the job
(:mod:`fhir_leuko.job`) and the service (:mod:`fhir_leuko.service`, imported only by ``serve``, as
it needs the ``service`` extra). Nothing else imports it but ``python -m fhir_leuko``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Sequence

from .._version import __version__
from ..core.model import quoted
from ..errors import ExitCode, FhirLeukoError, exit_code_table
from ..fhir.privacy import install_log_scrubbing, scrub_patients
from . import fastexit

__all__ = ["build_parser", "main"]

_DESCRIPTION = """\
fhir-leuko finds low white-cell counts (leukopenia, neutropenia, lymphopenia and the other
subtypes) in FHIR R4 lab data, links them to drugs known to cause them, and writes one
explainable DetectedIssue per patient and finding.
"""

_EPILOG = (
    exit_code_table(tuple(ExitCode), "stopped by signal N (130 Ctrl-C, 143 SIGTERM)")
    + """
The numbers are stable: a code keeps its meaning, and a retired number is never reused.
Run 'fhir-leuko COMMAND --help' for the options, examples and exit codes of each command.
"""
)

# Each module adds its subcommands with `register(subparsers)`; its handler returns an exit code.
# Only the module of the command given is imported: the others bring the job's, the server's and
# the service's libraries (0.1 s of start-up that `evaluate` does not need). `--help`, and a
# command that is not one of these, import them all.
_COMMANDS = {
    "evaluate": "evaluate",
    "explain": "explain",
    "export": "export",
    "profiles": "profiles",
    "run": "run",
    "watch": "run",
    "serve": "serve",
    "cards": "cards",
    "state": "state",
}


def _command_of(argv: Sequence[str]) -> str | None:
    """The command named in ``argv`` (the first word that is not an option; the options before
    it take no value), or ``None`` when help is asked for first or the word is no command."""
    for word in argv:
        if word in ("-h", "--help"):
            return None
        if not word.startswith("-"):
            return word if word in _COMMANDS else None
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line's parser: every command, or only ``command`` (and what its module adds)."""
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
    names = [_COMMANDS[command]] if command in _COMMANDS else list(_COMMANDS.values())
    for name in dict.fromkeys(names):
        importlib.import_module(f"{__name__}.{name}").register(sub)
    for subcommand in sub.choices.values():
        # Also after the command (fhir-leuko run -vv): given there, it counts instead.
        subcommand.add_argument(
            "-v",
            "--verbose",
            action="count",
            default=argparse.SUPPRESS,
            help="more log output on stderr (-vv: debug, and the traceback of an unexpected error)",
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code.

    This is the command's edge: every error becomes one line on stderr and an exit code here, and
    nowhere else (fhir_leuko.errors.ExitCode).
    """
    fastexit.release()
    words = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command_of(words))
    args = parser.parse_args(words)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="fhir-leuko: %(levelname)s: %(message)s")
    install_log_scrubbing()  # patients as pseudonyms in every log line, whatever logs it
    try:
        code: int = args.handler(args)
    except FhirLeukoError as exc:
        print(f"fhir-leuko: error: {_for_stderr(args, str(exc))}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt as exc:
        # Ctrl-C (130), or SIGTERM where a command unwinds on it (cli/scale.py: 143).
        signum = int(getattr(exc, "signum", 2))
        print("fhir-leuko: interrupted" if signum == 2 else "fhir-leuko: stopped", file=sys.stderr)
        return 128 + signum
    except BrokenPipeError:
        _quiet_stdout()
        return int(ExitCode.OK)
    except Exception as exc:  # the one catch-all: no traceback reaches a user unless asked for
        return _unexpected(args, exc)
    return code


def _unexpected(args: argparse.Namespace, exc: Exception) -> int:
    """An error nobody planned for (a bug): one line naming the command and the error; the
    traceback with -vv. The text is capped (it may quote input) and, for the job and the service,
    goes through the same log scrubbing as their logs."""
    what = " ".join(str(x) for x in (args.command, getattr(args, "action", None)) if x)
    if args.verbose >= 2:
        traceback.print_exception(exc, file=sys.stderr)
    detail = _for_stderr(args, quoted(str(exc).replace("\n", " ")))
    message = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    print(
        f"fhir-leuko: error: {what}: unexpected error ({message}); this is a bug: "
        "run again with -vv for the traceback and report it",
        file=sys.stderr,
    )
    return int(ExitCode.INTERNAL)


_SERVER_COMMANDS = frozenset({"run", "watch", "serve", "export"})


def _for_stderr(args: argparse.Namespace, text: str) -> str:
    """An error line of a command that talks to a FHIR server: patients as pseudonyms, as in its
    logs (a file path of ``evaluate`` is left as it was given)."""
    return scrub_patients(text) if args.command in _SERVER_COMMANDS else text


def _quiet_stdout() -> None:
    """The reader of stdout went away (``| head``): point stdout at /dev/null so that Python's
    final flush does not print a BrokenPipeError of its own."""
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def run() -> None:
    """Console-script entry point."""
    code = main()
    if fastexit.holding():
        fastexit.leave(code, _quiet_stdout)
    sys.exit(code)
