"""``fhir-leuko export``: a FHIR Bulk Data ``$export`` into a directory that ``evaluate`` reads."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from ..core.fhirtime import format_instant
from ..core.knowledge import Knowledge
from ..errors import ExitCode, UsageError
from ..fhir.bulk import EXPORT_TYPES, BulkExport, ExportRequest, ExportResult, observation_filter
from ..files.documents import load_knowledge
from ..job.config import load_job_config
from .options import parse_instant
from .run import (
    _CONFIG_EPILOG,
    _test_pause_hook,
    add_connection_options,
    build_client,
    connection_flags,
)

__all__ = ["register", "type_filters"]

_HELP = "download a FHIR Bulk Data $export (what the profiles read) into a directory"

_EPILOG = f"""\
what it does:
  Kicks off $export (FHIR Bulk Data Access, STU 2) at system level (default), Patient level or
  for a Group, with _type = {",".join(EXPORT_TYPES)},
  _typeFilter = Observation?code=<the mapped LOINC codes> (dropped, with a note, when the
  server refuses it) and _since when given; polls the status URL (Retry-After, X-Progress);
  downloads every file (with the access token when the server requires it) and verifies it;
  reports the server's error files by resource; deletes the job on the server when done.
  The directory is what 'fhir-leuko evaluate DIR' reads, once the export is complete (until then
  evaluate refuses it: the patients in the files not downloaded would get no word).

resuming:
  The export's progress is kept in DIR/.fhir-leuko/export.json. Run the same command again after
  an interruption (kill -9, network failure, --max-wait reached): it goes on polling or
  downloading the missing files without a new export, as long as the server keeps the job.
  A new export needs a directory without files evaluate reads (exit 2 otherwise: they would be
  read as part of the export); one holding another server's or request's export is refused too.

examples:
  fhir-leuko export --server https://ehr.example.org/fhir --output-dir export/
  fhir-leuko export --server URL --output-dir export/ --auth smart-backend \\
      --client-id fhir-leuko --private-key-file key.pem --key-id 2026-11 --scope 'system/*.read'
  fhir-leuko export --server URL --output-dir ward/ --level group --group icu-2026
  fhir-leuko export --server URL --output-dir delta/ --since 2026-11-20T00:00:00Z
  fhir-leuko export --config /etc/fhir-leuko/job.toml --output-dir export/ && \\
      fhir-leuko evaluate export/ --output issues.ndjson

exit codes:
  0      every file was downloaded and verified, and the server reported no errors
  1      the server's error files reported some resources (each printed); the rest is downloaded
  2      a usage or configuration error (bad option, missing or refused credentials, a directory
         holding another export)
  3      the export is not complete: the server failed it or stayed unavailable, --max-wait
         passed, or the directory cannot be written (run the same command again to resume)
  70     an unexpected error (a bug): one line names it, -vv shows the traceback
  128+N  stopped by signal N (run the same command again to resume)

{_CONFIG_EPILOG}"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "export",
        help=_HELP,
        description=f"fhir-leuko export: {_HELP}.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_connection_options(parser)
    what = parser.add_argument_group("what to export")
    what.add_argument(
        "--output-dir", metavar="DIR", type=Path, required=True, help="where the files go"
    )
    what.add_argument(
        "--level",
        choices=("system", "patient", "group"),
        default="system",
        help="system (default: [base]/$export), patient (Patient/$export) or group",
    )
    what.add_argument("--group", metavar="ID", help="the Group id, with --level group")
    what.add_argument(
        "--since", metavar="INSTANT", help="only resources changed since (ISO 8601; _since)"
    )
    what.add_argument(
        "--no-type-filter",
        action="store_true",
        help="do not send _typeFilter (every Observation, not only the mapped LOINC codes)",
    )
    what.add_argument(
        "--max-wait",
        metavar="SECONDS",
        type=float,
        default=24 * 3600.0,
        help="stop polling after this long (default 86400; run again to go on waiting)",
    )
    what.add_argument(
        "--no-progress", action="store_true", help="no progress display even on a terminal"
    )
    parser.set_defaults(handler=run)


def type_filters(knowledge: Knowledge) -> tuple[str, ...]:
    """The ``_typeFilter`` of an export: Observations of the mapped LOINC codes."""
    return (observation_filter(knowledge),)


def report(result: ExportResult) -> int:
    """Print what an export gave (stderr); the exit code."""
    counts = result.counts()
    kinds = ", ".join(f"{n} {t}" for t, n in sorted(counts.items())) or "no resources"
    print(
        f"fhir-leuko: export: {len(result.files)} files in {result.directory}: {kinds}; "
        f"transactionTime {result.transaction_time}; {result.requests} requests",
        file=sys.stderr,
    )
    for note in result.notes:
        print(f"fhir-leuko: note: {note}", file=sys.stderr)
    for error in result.server_errors:
        print(f"fhir-leuko: server error file: {error}", file=sys.stderr)
    return int(ExitCode.INPUT_PROBLEMS if result.server_errors else ExitCode.OK)


def run(args: argparse.Namespace) -> int:
    if args.output_dir.exists() and not args.output_dir.is_dir():
        raise UsageError(f"--output-dir {args.output_dir}: not a directory")
    config = load_job_config(connection_flags(args), args.config)
    since = format_instant(parse_instant("--since", args.since)) if args.since else None
    filters = () if args.no_type_filter else type_filters(load_knowledge())
    request = ExportRequest(
        level=args.level, group=args.group, since=since, type_filters=filters
    )
    show = sys.stderr.isatty() and not args.no_progress
    client = build_client(config)
    with client, tqdm(
        unit="B", unit_scale=True, disable=not show, desc="downloading", leave=False
    ) as bar:

        def status(text: str) -> None:
            if show:
                bar.set_description_str(text[:60])
            else:
                print(f"fhir-leuko: {text}", file=sys.stderr)

        export = BulkExport(
            client,
            args.output_dir,
            request,
            on_status=status,
            progress=bar.update if show else None,
            checkpoint=_test_pause_hook(),
            max_wait=args.max_wait,
        )
        result = export.run()
    return report(result)
