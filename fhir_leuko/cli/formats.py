"""The output formats of ``fhir-leuko evaluate``: which one, and its bytes.

NDJSON and the transaction Bundle are for programs; the table, CSV and the HTML report for people
(built by :mod:`fhir_leuko.present` from the core's findings and decisions). Without ``--format``,
a terminal gets the table and anything else (a pipe, a file) NDJSON, so scripts keep working.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Sequence
from pathlib import Path

import orjson

from ..core.detectedissue import to_ndjson, to_transaction_bundle
from ..core.normalise import Dataset
from ..core.pipeline import Evaluation
from ..core.profiles import ProfileSet
from ..present.rows import finding_rows
from ..present.table import render_csv, render_table

__all__ = ["FORMATS", "add_format_option", "chosen_format", "render"]

FORMATS = ("table", "csv", "ndjson", "bundle")


def add_format_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default=None,
        help="table (default on a terminal): one row per finding, most severe first; csv: the same "
        "columns; ndjson (default otherwise): one DetectedIssue per line; bundle: a transaction "
        "Bundle",
    )


def chosen_format(args: argparse.Namespace, stdout_is_terminal: bool) -> str:
    if args.format:
        return str(args.format)
    to_terminal = args.output is None or str(args.output) == "-"
    return "table" if to_terminal and stdout_is_terminal else "ndjson"


def render(
    fmt: str,
    result: Evaluation,
    *,
    dataset: Dataset,
    profiles: ProfileSet,
    inputs: Sequence[Path],
) -> bytes:
    """The bytes of one evaluation in ``fmt`` (one of :data:`FORMATS`)."""
    if fmt == "bundle":
        return (
            orjson.dumps(to_transaction_bundle(result.issues), option=orjson.OPT_INDENT_2) + b"\n"
        )
    if fmt == "table":
        width = shutil.get_terminal_size((160, 24)).columns
        return render_table(finding_rows(result.findings), width).encode()
    if fmt == "csv":
        return render_csv(finding_rows(result.findings)).encode()
    return to_ndjson(result.issues)
