"""``fhir-leuko run --bulk``: a pass whose patients come from a FHIR Bulk Data export.

* **First pass** against a server (no watermark) or ``--full``: one system-level export of what
  the profiles read (``_type``, ``_typeFilter`` on the mapped LOINC codes) and of fhir-leuko's own
  DetectedIssues. The export is partitioned by patient on disk (:mod:`fhir_leuko.files.shards`:
  bounded memory) and every patient with a result, or with a DetectedIssue of ours, is evaluated
  from it shard by shard, then planned and written in groups by the job's exactly-once writer:
  the same writes as ``run``, without a search per patient.
* **Later passes**: an export with ``_since`` = the watermark minus the overlap holds what changed;
  the patients it names are evaluated as an incremental pass evaluates them (their whole record
  fetched by the job's searches: an incremental export holds only what changed).
* The watermark becomes the export's ``transactionTime`` once every patient is handled; the export
  directory (patient data) is removed then. An interrupted pass (kill -9, SIGTERM, an outage)
  resumes the same export next time (:class:`~fhir_leuko.fhir.bulk.BulkExport`), and the writes
  already made are not made again (the writer's conditional creates and ``If-Match``).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

import msgspec
import orjson

from ..core.fhirjson import INPUT_TYPES
from ..core.fhirtime import format_instant, parse_fhir_datetime
from ..core.model import Problem
from ..errors import InputError, UsageError, WorkDirError, WorkerLostError
from ..fhir.bulk import BulkExport, ExportRequest, observation_filter
from ..fhir.exportstate import STATE_DIR, STATE_FILE
from ..files.reader import READ_ERRORS, input_files, open_input
from .bulkshards import export_shards
from .exportissues import ExportIssues
from .patients import patient_key

if TYPE_CHECKING:
    from .runner import PassReport, _Pass

__all__ = ["bulk_pass"]

log = logging.getLogger(__name__)


class _Subject(msgspec.Struct):
    reference: str | None = None


class _Changed(msgspec.Struct):
    resourceType: str = ""
    id: str | None = None
    subject: _Subject | None = None


_CHANGED = msgspec.json.Decoder(_Changed)


def export_directory(root: Path, server: str) -> Path:
    """One export directory per server under ``root`` (``[run] bulk_dir``)."""
    return root / f"export-{hashlib.sha256(server.encode()).hexdigest()[:16]}"


def bulk_pass(passer: _Pass, report: PassReport, root: Path, stored: str | None) -> None:
    """Export, then evaluate and write the patients of the export (see the module docstring)."""
    job = passer.job
    opts = job.options
    full = opts.mode == "full" or (stored is None and opts.since is None)
    report.mode = f"bulk {'full' if full else 'incremental'}"  # what the summary's first line says
    since = None
    if not full:
        moment = opts.since
        if moment is None and stored is not None:
            last = parse_fhir_datetime(stored)
            moment = last - opts.overlap if last is not None else None
        since = format_instant(moment) if moment is not None else None
    types: tuple[str, ...] = INPUT_TYPES
    filters = [observation_filter(job.knowledge)]
    if full:
        types = (*INPUT_TYPES, "DetectedIssue")
        filters.append(f"DetectedIssue?code={quote(job.finding_codes, safe=':/|')}")
    request = ExportRequest(types=types, type_filters=tuple(filters), since=since)
    directory = export_directory(root, job.client.base_url)
    _forget_other(directory, job.client.base_url, request)
    result = BulkExport(
        job.client, directory, request, on_status=lambda text: log.info("bulk: %s", text)
    ).run()
    for note in result.notes:
        log.info("bulk: %s", note)
    for error in result.server_errors:
        report.problems.append(Problem("Bulk Data export", f"the server's error file: {error}"))
    files = input_files([directory])
    if full:
        _evaluate_export(passer, report, directory, files)
    else:
        passer.process(sorted(_changed_patients(files)), checkpoint=None)
    if report.interrupted or report.aborted is not None:
        return  # the same export is resumed next time
    passer.commit([], [], result.transaction_time)
    shutil.rmtree(directory, ignore_errors=True)


def _forget_other(directory: Path, server: str, request: ExportRequest) -> None:
    """An export of another request (an earlier pass's) is not resumed: it is removed; so is
    whatever is in the directory without an export's state (the job owns this directory, and a
    new export refuses a directory holding files it would be read with)."""
    state = directory / STATE_DIR / STATE_FILE
    if not state.exists():
        shutil.rmtree(directory, ignore_errors=True)
        return
    try:
        recorded = orjson.loads(state.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        recorded = {}
    if recorded.get("server") != server or recorded.get("request") != request.as_dict():
        shutil.rmtree(directory, ignore_errors=True)


def _changed_patients(files: Sequence[tuple[Path, str | None]]) -> set[str]:
    """The patients an incremental export names (subjects; Patients themselves)."""
    found: set[str] = set()
    for path, _input in files:
        # A line or a file that cannot be read is skipped here: evaluating the export reports it.
        try:
            with open_input(path) as stream:
                for line in stream:
                    try:
                        changed = _CHANGED.decode(line)
                    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
                        continue  # (RecursionError: JSON nested too deeply)
                    if changed.resourceType == "Patient" and changed.id:
                        found.add(f"Patient/{changed.id}")
                    elif changed.subject and changed.subject.reference:
                        key = patient_key(changed.subject.reference)
                        if key:
                            found.add(key)
        except READ_ERRORS:
            continue
    return found


def _evaluate_export(
    passer: _Pass, report: PassReport, directory: Path, files: Sequence[tuple[Path, str | None]]
) -> None:
    issues = [f for f in files if f[0].name.startswith("DetectedIssue.")]
    data = [f for f in files if not f[0].name.startswith("DetectedIssue.")]
    with ExportIssues(issues, report.problems) as existing:
        _settle_export(passer, report, directory, data, existing)


def _settle_export(
    passer: _Pass,
    report: PassReport,
    directory: Path,
    data: Sequence[tuple[Path, str | None]],
    existing: ExportIssues,
) -> None:
    size = passer.job.options.patients_per_request
    shards = export_shards(
        data,
        directory,
        knowledge=passer.job.knowledge,
        scale=passer.job.options.scale,
        as_of=passer.as_of,
        existing=list(existing),
        judge_in=passer.judge_in,
        shard_map=passer.job.shard_map,
    )
    # closing: a pass that stops between two shards drops the shards not started at once.
    with _said_after_writes(report), closing(shards):
        for shard in shards:
            report.problems.extend(shard.problems)
            patients = shard.patients
            for start in range(0, len(patients), size):
                if passer.job.stop.is_set():
                    report.interrupted = True
                    return
                group = patients[start : start + size]
                done, failed = passer.settle(group, shard.merged, shard.verdict, existing)
                passer.record(done, failed)
                if report.interrupted or report.aborted is not None:
                    return


@contextmanager
def _said_after_writes(report: PassReport) -> Iterator[None]:
    """A run that fails while evaluating the shards (a worker lost, the work directory full, rules
    that differ) says "nothing was written", as ``evaluate`` does; here the shards before were
    planned and written already: the message says so instead (its type, and exit code, stay)."""
    try:
        yield
    except (WorkerLostError, WorkDirError, InputError, UsageError) as exc:
        writes = sum(report.actions[a] for a in ("create", "update", "resolve"))
        if report.dry_run or not writes or "nothing was written" not in str(exc):
            raise
        stands = (
            f"the {writes} writes of the shards before it stand, and the next pass resumes this "
            "export (writing nothing twice)"
        )
        raise type(exc)(str(exc).replace("nothing was written", stands)) from None
