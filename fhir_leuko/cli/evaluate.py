"""``fhir-leuko evaluate``: FHIR files on disk in, DetectedIssues out."""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
from pathlib import Path

from tqdm import tqdm

from ..core.normalise import Dataset
from ..core.pipeline import Evaluation, evaluate_dataset
from ..errors import ExitCode, exit_code_table
from ..fhir.exportstate import check_exports
from ..files.bulkread import normalise_files
from ..files.reader import STDIN, Progress, input_files
from ..present.silence import silence_line
from .fastexit import keep_until_exit
from .formats import add_format_option, chosen_format, render
from .options import add_as_of, add_profile_options, as_of_or_latest, profiles_from
from .output import check_output, write_output
from .scale import (
    SCALE_HELP,
    SHARD_BYTES,
    add_scale_options,
    evaluate_in_shards,
    scale_settings,
)

__all__ = ["register"]

_HELP = "evaluate FHIR files (Bundles, resources, NDJSON, .ndjson.gz, directories)"

_EPILOG = """\
input:
  Bundles of any type (searchset, collection, transaction, batch), single resources, NDJSON
  (also .ndjson.gz, as a Bulk Data export writes it) and directories of these, read recursively
  (links to directories followed, each directory once; hidden files and directories skipped).
  Observations (LOINC-coded WBC and differential), Patients (age), MedicationStatements and
  MedicationRequests with their Medications, DiagnosticReports (result, hasMember) and Conditions
  are read; references resolve within the input (relative, urn:uuid fullUrl, contained #id).
  - reads standard input (one JSON document or NDJSON, also gzipped); FIFOs and devices are read
  like files.
  Data compressed otherwise (Observation.ndjson.zst, .bz2, .xz, .zip, …) is named as a problem,
  never skipped: decompress it, or gzip it.

sources:
  Each PATH is a source of its own (a directory, or a file; the NDJSON files of one Bulk Data
  export given one by one are that export), and a Bundle entry whose fullUrl is a server's URL
  belongs to that server: Patient/1 of two sources are two people, and references resolve within
  their source. --same-source reads everything as one source (overlapping exports of one server).
  The order of the PATHs never changes the output. Two PATHs holding exports of the same server
  (fhir-leuko export) are two sources too: a warning says so (--same-source reads them as one).
  A directory that 'fhir-leuko export' did not finish (kill -9, network, --max-wait) is refused
  (exit 2): its patients in the files not downloaded would get no finding and no word. Run the
  export again to finish it, or name its files to evaluate only them.

output:
  On a terminal, a table: one row per finding (patient, finding and grade, severity, value, date,
  trend, implicated drug, profile), most severe first; --format csv gives the same columns.
  Otherwise (a pipe, --output FILE) one DetectedIssue per patient and finding kind as NDJSON, or
  a transaction Bundle of conditional creates (--format bundle) ready to POST to a FHIR server's
  base URL. The same input and --as-of always give byte-identical output. A summary (findings by
  kind and severity; when nothing is found, why) and one line per
  input problem (file, resource, reason) go to stderr. --output FILE replaces a regular file
  atomically (a new file gets the umask's mode, a replaced one keeps its mode), writes a device or
  pipe in place and follows a symlink to its target; --output - is stdout.

examples:
  fhir-leuko evaluate examples/ward examples/bulk-export --as-of 2026-11-20   # in a checkout
  fhir-leuko evaluate export/ --as-of latest --format csv --output findings.csv
  fhir-leuko evaluate export/ --as-of 2024-05-01 --output issues.ndjson
  fhir-leuko evaluate Observation.ndjson.gz MedicationRequest.ndjson.gz Patient.ndjson.gz
  fhir-leuko evaluate bundle.json --format bundle --output tx.json
  zcat Observation.ndjson.gz | fhir-leuko evaluate - --output -
  fhir-leuko evaluate data/ --profile clozapine --profiles /etc/fhir-leuko/profiles

""" + exit_code_table(
    (ExitCode.OK, ExitCode.INPUT_PROBLEMS, ExitCode.USAGE, ExitCode.INCOMPLETE, ExitCode.INTERNAL),
    "stopped by signal N (130 Ctrl-C)",
)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "evaluate",
        help=_HELP,
        description=f"Evaluate FHIR R4 data on disk and write DetectedIssues ({_HELP}).",
        epilog=f"{_EPILOG}\n{SCALE_HELP}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "paths",
        metavar="PATH",
        nargs="+",
        type=Path,
        help="files or directories; - reads standard input (a JSON document or NDJSON, also gzipped)",
    )
    add_as_of(parser, latest=True)
    add_profile_options(parser)
    parser.add_argument(
        "--output",
        "-o",
        metavar="FILE",
        help="write here instead of stdout (- is stdout; a regular file is replaced atomically, a "
        "device or pipe written in place, a symlink's target written)",
    )
    add_format_option(parser)
    parser.add_argument(
        "--same-source",
        action="store_true",
        help="read all PATHs as one source (the same Type/id anywhere is the same resource)",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar even on a terminal"
    )
    add_scale_options(parser)
    parser.set_defaults(handler=run)


def _summary(result: Evaluation, files: int) -> list[str]:
    counts = result.counts
    kinds = ", ".join(
        f"{counts[k]} {k}"
        for k in (
            "Observation",
            "DiagnosticReport",
            "Patient",
            "MedicationRequest",
            "MedicationStatement",
            "MedicationAdministration",
            "MedicationDispense",
            "Medication",
            "Condition",
            "Flag",
        )
        if counts[k]
    )
    lines = [
        f"read {files} file{'s' if files != 1 else ''}: {kinds or 'no resources fhir-leuko reads'}",
        f"lab results used: {counts['results:used']} measured, {counts['results:derived']} derived; "
        f"patients evaluated: {result.patients}"
        + (
            f" ({counts['patients:deceased']} deceased: no alert)"
            if counts["patients:deceased"]
            else ""
        ),
    ]
    # What was read and deliberately not counted (README, "What is checked on input"): named in
    # aggregate, so nothing is left out without a word.
    ignored = [
        f"{counts[k]} {k.removeprefix('results:ignored-')}"
        for k in sorted(counts)
        if k.startswith("results:ignored-") and counts[k]
    ]
    if counts["results:superseded"]:
        ignored.append(f"{counts['results:superseded']} older version")
    medications = [
        f"{counts[k]} {word}"
        for k, word in (
            ("medications:not-an-exposure", "not taken"),
            ("medications:no-known-drug", "naming no drug fhir-leuko knows"),
        )
        if counts[k]
    ]
    if ignored or medications:
        parts = ([f"lab results {', '.join(ignored)}"] if ignored else []) + (
            [f"medication records {', '.join(medications)}"] if medications else []
        )
        lines.append(f"not counted: {'; '.join(parts)}")
    by = result.summary()
    if by:
        parts = [f"{kind} {sev} {n}" for (kind, sev), n in sorted(by.items())]
        lines.append(f"findings: {len(result.findings)} ({'; '.join(parts)})")
    else:
        lines.append("findings: 0")
        if result.silence is not None:
            lines.append(f"why: {silence_line(result.silence, result.counts, result.problems)}")
    lines.append(f"input problems: {len(result.problems)}")
    return lines


def run(args: argparse.Namespace) -> int:
    # A batch that builds millions of long-lived objects and then exits: the cyclic garbage
    # collector would only rescan them again and again (normalise.Normaliser.collecting).
    gc.disable()
    as_of = as_of_or_latest(args)
    check_output(args.output)  # before the work: a directory or a missing one is exit 2 at once
    knowledge, profiles = profiles_from(args)
    files = input_files(args.paths, same_source=args.same_source)
    export_problems = check_exports(args.paths, same_source=args.same_source)
    show = sys.stderr.isatty() and not args.no_progress
    total = sum(f.stat().st_size for f, _input in files if f != STDIN)
    scale = scale_settings(args)
    sharded: tuple[Evaluation, Dataset] | None = None
    with contextlib.ExitStack() as bars:
        bar = bars.enter_context(
            tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                disable=not show,
                desc="reading",
                leave=False,
            )
        )
        progress = bar.update if show else None

        def shards_bar(count: int) -> Progress:
            # The input is routed: a bar of its own counts the shards, the longer phase.
            bar.close()
            shards = tqdm(total=count, unit="shard", desc="evaluating", leave=False)
            return bars.enter_context(shards).update

        if scale.shards or (scale.shards is None and total >= SHARD_BYTES):
            # Bounded memory: partition by patient on disk, evaluate shard by shard (files/shards.py).
            html = chosen_format(args, sys.stdout.isatty()) == "html"  # needs the records
            sharded = evaluate_in_shards(
                files, total, scale, args, as_of, progress, html, shards_bar if show else None
            )
        elif scale.shards is None and ((args.workers or 0) > 1 or args.dask_scheduler):
            # Workers asked for on the command line, none used: say so (not when they come from
            # the configuration, which serves large and small runs alike).
            print(
                f"fhir-leuko: note: {total / 1e6:,.0f} MB of input is under the "
                f"{SHARD_BYTES >> 20} MB that makes a shard: evaluated in memory in this process, "
                "without the workers (--shards N uses them anyway)",
                file=sys.stderr,
            )
        if sharded is None:
            # Progress counts decompressed bytes for .gz input, so the bar may run past its total.
            dataset = normalise_files(files, knowledge, progress=progress)
    if sharded is None:
        result = evaluate_dataset(dataset, profiles, as_of=as_of)
    else:  # the records of the patients with findings: all that the formats show
        result, dataset = sharded
    result.problems[:0] = export_problems  # before the input's: the export's own first
    fmt = chosen_format(args, sys.stdout.isatty())
    data = render(fmt, result, dataset=dataset, profiles=profiles, inputs=args.paths)
    write_output(args.output, data)
    for problem in result.problems:
        print(f"problem: {problem}", file=sys.stderr)
    for line in _summary(result, len(files)):
        print(f"fhir-leuko: {line}", file=sys.stderr)
    keep_until_exit(dataset, result)  # not freed one by one at the end (cli/fastexit.py)
    return int(ExitCode.INPUT_PROBLEMS if result.problems else ExitCode.OK)
