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
from typing import TYPE_CHECKING

import orjson

from ..core.detectedissue import to_ndjson, to_transaction_bundle
from ..core.model import Finding, PatientRecord
from ..core.normalise import Dataset
from ..core.pipeline import Evaluation, trace_patient
from ..core.profiles import ProfileSet
from ..errors import UsageError
from ..present.rows import SEVERITY_RANK, finding_rows, sort_findings
from ..present.table import render_csv, render_table

if TYPE_CHECKING:  # the job's report type only: `evaluate` need not import the job
    from ..job.runner import PassReport

__all__ = [
    "FORMATS",
    "add_format_option",
    "check_report_target",
    "chosen_format",
    "render",
    "write_report",
]

FORMATS = ("table", "csv", "ndjson", "bundle", "html")


def add_format_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default=None,
        help="table (default on a terminal): one row per finding, most severe first; csv: the same "
        "columns; ndjson (default otherwise): one DetectedIssue per line; bundle: a transaction "
        "Bundle; html: one self-contained report with a trend plot per flagged patient",
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
    if fmt == "html":
        return render_html(result, dataset=dataset, profiles=profiles, inputs=inputs)
    return to_ndjson(result.issues)


def render_html(
    result: Evaluation, *, dataset: Dataset, profiles: ProfileSet, inputs: Sequence[Path]
) -> bytes:
    """The HTML report (needs the ``report`` extra: matplotlib and Jinja2)."""
    try:
        from ..present.report import render_report, report_from_evaluation
    except ImportError as exc:
        raise UsageError(
            f"--format html needs the report extra ({exc.name} is missing): "
            "pip install 'fhir-leuko[report]'"
        ) from None
    data = report_from_evaluation(
        result, records=dataset.patients, profiles=profiles, inputs=[str(p) for p in inputs]
    )
    return render_report(data).encode()


def check_report_target(path: Path) -> None:
    """Before a pass: the report's directory exists and the report extra is installed.

    Raises:
        UsageError: it does not, or it is not.
    """
    directory = path.resolve().parent
    if not directory.is_dir():
        raise UsageError(f"--report {path}: directory {directory} does not exist")
    try:
        import jinja2  # noqa: F401
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise UsageError(
            f"--report needs the report extra ({exc.name} is missing): "
            "pip install 'fhir-leuko[report]'"
        ) from None


def write_report(
    path: Path,
    report: PassReport,
    flagged: Sequence[tuple[PatientRecord, Sequence[Finding]]],
    profiles: ProfileSet,
    server: str,
) -> None:
    """``run --report FILE``: the pass's findings as the HTML report, written atomically."""
    from ..present.report import DEFAULT_MAX_PLOTS, PatientPart, ReportInput, render_report
    from ..present.trend import trend_data
    from .output import write_output  # the one output writer of the CLI

    parts: list[PatientPart] = []
    findings: list[Finding] = []
    ordered = sorted(
        flagged,
        key=lambda item: (-max(SEVERITY_RANK.get(f.severity, 0) for f in item[1]), item[0].key),
    )
    for index, (record, found) in enumerate(ordered):
        findings.extend(found)
        plot = None
        if index < DEFAULT_MAX_PLOTS:
            _when, _again, decisions = trace_patient(record, profiles, as_of=report.as_of)
            plot = trend_data(decisions, found)
        parts.append(PatientPart(record.key, report.as_of, sort_findings(found), plot))
    data = ReportInput(
        title="fhir-leuko report (scheduled job)",
        as_of=report.as_of,
        inputs=[f"{server} ({report.mode} pass)"],
        profiles=profiles,
        patients_evaluated=report.patients,
        findings=findings,
        patients=parts,
        problems=report.problems,
        nothing_found="" if findings else "no patient evaluated in this pass has a finding",
        notes=[f"Patients that failed this pass: {len(report.failed)}."] if report.failed else [],
    )
    write_output(str(path), render_report(data).encode())
