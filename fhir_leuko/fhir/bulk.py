"""A FHIR Bulk Data Access client (``$export``, IG STU 2): kick-off, status polling, downloads.

Public API::

    export = BulkExport(client, Path("export/"), ExportRequest(level="system", since="..."),
                        on_status=print)
    result = export.run()     # -> ExportResult: files, transactionTime, server errors, notes

Flow (https://hl7.org/fhir/uv/bulkdata/STU2/export.html):

* **Kick-off** at system (``[base]/$export``), ``Patient/$export`` or ``Group/{id}/$export`` with
  ``Prefer: respond-async``, ``_type`` limited to what the profiles read, ``_typeFilter`` for the
  mapped LOINC codes (a server that refuses it with a 4xx gets the kick-off again without it, and
  the result says so) and ``_since``; the answer is 202 and the status URL in ``Content-Location``.
* **Status**: 202 while running (``X-Progress`` goes to ``on_status``; the next poll waits
  ``Retry-After``, and at least 1 s growing by half each poll up to 60 s); 200 with the manifest when complete; 429 and
  502-504 are retried by :class:`~fhir_leuko.fhir.client.FhirClient` like every other request; any
  other error means the export failed (its OperationOutcome is in the error).
* **Download** of every ``output`` file, streamed to disk (``Range`` resumes a partial file where
  the server supports it), with the access token only when the manifest ``requiresAccessToken``;
  each file is verified (complete last line, every line a JSON object, the manifest's ``count``).
  The ``error`` files (OperationOutcome NDJSON) are kept and their issues reported by resource.
* **DELETE** of the status URL once every file is safe on disk.

**Resumable**: the request, the status URL, the manifest and each verified file are recorded in
``DIR/.fhir-leuko/export.json`` as they happen. Run again after a kill -9 or a network failure, the
export goes on where it stopped (polling, or downloading the files not yet verified) without a new
kick-off, as long as the server keeps the job; only when the server has forgotten it (404/410) is
the export started again, and the files of the old one are removed. The export directory is what
``fhir-leuko evaluate`` reads (hidden files and directories are skipped by the reader).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import orjson
import requests

from ..core.fhirjson import INPUT_TYPES
from ..core.knowledge import LOINC_SYSTEM, Knowledge
from ..errors import (
    ExportWriteError,
    FhirError,
    FhirFatalError,
    FhirTemporaryError,
    UsageError,
)
from ..files.reader import expand_paths
from .client import FhirClient, operation_outcome_text
from .exportstate import STATE_DIR, STATE_FILE

__all__ = [
    "EXPORT_TYPES",
    "BulkExport",
    "ExportFile",
    "ExportRequest",
    "ExportResult",
    "Level",
    "observation_filter",
]

log = logging.getLogger(__name__)

EXPORT_TYPES: tuple[str, ...] = INPUT_TYPES
"""The resource types the profiles read (the ``_type`` of a kick-off): the one list,
:data:`fhir_leuko.core.fhirjson.INPUT_TYPES`, that the job's searches and the CDS service's
prefetch cover too."""

Level = Literal["system", "patient", "group"]
NDJSON = "application/fhir+ndjson"
_CHUNK = 1 << 20
_DOWNLOAD_ATTEMPTS = 5


def observation_filter(knowledge: Knowledge) -> str:
    """The ``_typeFilter`` of Observations: the mapped LOINC codes (the codes the scheduled job
    searches for). One query, its commas (OR) percent-encoded: a comma between queries would
    separate ``_typeFilter`` queries (Bulk Data IG, STU 2)."""
    codes = ",".join(f"{LOINC_SYSTEM}|{code}" for code in sorted(knowledge.loinc))
    return f"Observation?code={quote(codes, safe=':/|')}"


@dataclass(frozen=True)
class ExportRequest:
    """What to export: the level (and Group id), ``_type``, ``_typeFilter`` and ``_since``."""

    level: Level = "system"
    group: str | None = None
    types: tuple[str, ...] = EXPORT_TYPES
    type_filters: tuple[str, ...] = ()
    since: str | None = None

    def __post_init__(self) -> None:
        if self.level == "group" and not self.group:
            raise UsageError("--level group needs --group ID")
        if self.level != "group" and self.group:
            raise UsageError("--group is only for --level group")

    @property
    def path(self) -> str:
        if self.level == "group":
            return f"Group/{self.group}/$export"
        return "Patient/$export" if self.level == "patient" else "$export"

    def params(self, *, filters: bool) -> list[tuple[str, str]]:
        out = [("_outputFormat", NDJSON)]
        if self.types:
            out.append(("_type", ",".join(self.types)))
        if self.since:
            out.append(("_since", self.since))
        if filters:
            out.extend(("_typeFilter", f) for f in self.type_filters)
        return out

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class ExportFile:
    """One downloaded file: its resource type, where it came from and what was verified."""

    type: str
    url: str
    name: str
    """The file's name in the export directory (``Observation.000.ndjson``)."""
    lines: int = 0
    size: int = 0
    sha256: str = ""


@dataclass
class ExportResult:
    directory: Path
    transaction_time: str
    files: list[ExportFile]
    server_errors: list[str] = field(default_factory=list)
    """The issues of the manifest's ``error`` files, one text per issue, naming the resource."""
    notes: list[str] = field(default_factory=list)
    """What the user should know (``_typeFilter`` refused, a resumed or restarted export)."""
    requests: int = 0
    resumed: bool = False

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in self.files:
            out[f.type] = out.get(f.type, 0) + f.lines
        return out


class _Gone(Exception):
    """The server no longer has the export job or its files (404/410)."""


class BulkExport:
    """One Bulk Data export into ``directory``, resumed from its state file when there is one.

    ``checkpoint(point, count)`` is called at ``polled``, ``chunk`` (a downloaded piece of a file
    is on disk) and ``downloaded`` (a file verified): the CLI's test hook kills the process there.
    """

    def __init__(
        self,
        client: FhirClient,
        directory: Path,
        request: ExportRequest,
        *,
        on_status: Callable[[str], object] | None = None,
        progress: Callable[[int], object] | None = None,
        checkpoint: Callable[[str, int], object] | None = None,
        sleep: Callable[[float], object] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        max_wait: float = 24 * 3600.0,
    ) -> None:
        self.client = client
        self.directory = directory
        self.request = request
        self.on_status = on_status or (lambda _text: None)
        self.progress = progress
        self.checkpoint = checkpoint or (lambda _point, _count: None)
        self.sleep = sleep
        self.clock = clock
        self.max_wait = max_wait
        self.state_dir = directory / STATE_DIR
        self.state_path = self.state_dir / STATE_FILE
        self.state: dict[str, Any] = {}
        self.counts: dict[str, int] = {}

    # -- state ----------------------------------------------------------------------------------

    def _load(self) -> dict[str, Any]:
        if not self.state_path.exists():
            return {}
        try:
            data = orjson.loads(self.state_path.read_bytes())
        except (OSError, orjson.JSONDecodeError) as exc:
            raise UsageError(f"{self.state_path}: unreadable export state ({exc})") from None
        return data if isinstance(data, dict) else {}

    def _save(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        with tmp.open("wb") as handle:
            handle.write(orjson.dumps(self.state, option=orjson.OPT_INDENT_2))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.state_path)

    def _tick(self, point: str) -> None:
        self.counts[point] = self.counts.get(point, 0) + 1
        self.checkpoint(point, self.counts[point])

    # -- the export -----------------------------------------------------------------------------

    def run(self) -> ExportResult:
        """Export (or go on with the export recorded in the directory) and download every file.

        Raises:
            UsageError: the directory holds an export of another request or server.
            FhirError: the server failed the export, or stayed unavailable.
            ExportWriteError: the directory cannot be written (no space, not writable).
        """
        try:
            return self._run()
        except requests.exceptions.RequestException:
            raise  # (an OSError too, but the network's, not the disk's)
        except OSError as exc:
            raise ExportWriteError(
                f"cannot write {exc.filename or self.directory} ({exc.strerror or exc}); what was "
                "downloaded and verified is kept: run the same command again to resume once it can "
                "be written (room on the disk, permissions)"
            ) from None

    def _run(self) -> ExportResult:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.state_dir.mkdir(exist_ok=True)
        started = self.client.requests_sent
        notes: list[str] = []
        self.state = self._load()
        wanted = {"server": self.client.base_url, "request": self.request.as_dict()}
        resumed = bool(self.state)
        if self.state and {k: self.state.get(k) for k in wanted} != wanted:
            raise UsageError(
                f"{self.directory} holds an export of another server or request; "
                "use an empty directory (or remove this one) for a new export"
            )
        if not self.state:
            self._refuse_other_files()
        if self.state.get("complete"):
            notes.append("the directory already holds this export, complete: nothing to do")
            return self._result(notes, started, resumed)
        for _attempt in range(2):
            try:
                if not self.state.get("status_url"):
                    self._kick_off(wanted, notes)
                elif resumed:
                    notes.append("resumed the export recorded in the directory (no new kick-off)")
                if "manifest" not in self.state:
                    self.state["manifest"] = self._poll(self.state["status_url"])
                    self._save()
                self._download_all(notes)
                break
            except _Gone as gone:
                notes.append(f"{gone}: the server no longer has that export; started a new one")
                self._forget()
        else:  # pragma: no cover - a second _Gone right after a new kick-off
            raise FhirFatalError("the server forgot the export twice in a row")
        self._delete_job()
        self.state["complete"] = True
        self._save()
        return self._result(notes, started, resumed)

    def _refuse_other_files(self) -> None:
        """A new export goes into a directory without files that ``evaluate`` would read: they
        would be read with the export as if they were part of it (an older export's
        ``Observation.005.ndjson`` beside a new export of four files), without a word."""
        found = expand_paths([self.directory])
        if found:
            names = ", ".join(str(path.relative_to(self.directory)) for path in found[:3])
            more = f" and {len(found) - 3} more" if len(found) > 3 else ""
            raise UsageError(
                f"{self.directory} already holds files that 'fhir-leuko evaluate' would read "
                f"({names}{more}) and no export of fhir-leuko: they would be read with the "
                "export as part of it. Use an empty directory for a new export"
            )

    def _result(self, notes: list[str], started: int, resumed: bool) -> ExportResult:
        manifest = self.state.get("manifest") or {}
        files = [ExportFile(**f) for f in self.state.get("files", {}).values()]
        return ExportResult(
            directory=self.directory,
            transaction_time=str(manifest.get("transactionTime") or ""),
            files=sorted(files, key=lambda f: f.name),
            server_errors=list(self.state.get("server_errors", [])),
            notes=[*self.state.get("notes", []), *notes],
            requests=self.client.requests_sent - started,
            resumed=resumed,
        )

    def _forget(self) -> None:
        """Drop an export the server no longer has: its files and state (a new one follows)."""
        for entry in self.state.get("files", {}).values():
            (self.directory / entry["name"]).unlink(missing_ok=True)
        shutil.rmtree(self.state_dir / "parts", ignore_errors=True)
        shutil.rmtree(self.state_dir / "errors", ignore_errors=True)
        keep: dict[str, Any] = {k: self.state[k] for k in ("server", "request") if k in self.state}
        self.state = keep

    def _kick_off(self, wanted: Mapping[str, Any], notes: list[str]) -> None:
        prefer = ", ".join(
            p for p in ("respond-async", self.client.headers.get("Prefer")) if p
        )
        headers = {"Prefer": prefer, "Accept": "application/fhir+json"}
        filters = bool(self.request.type_filters)
        try:
            response = self.client.request(
                "GET", self.request.path, params=self.request.params(filters=filters),
                headers=headers,
            )
        except FhirFatalError as exc:
            if not filters or exc.status not in (400, 422):
                raise
            note = (
                f"the server refused _typeFilter ({exc.outcome or f'HTTP {exc.status}'}): "
                "exporting the types unfiltered (evaluate reads only the codes it knows)"
            )
            log.warning("%s", note)
            notes.append(note)
            filters = False
            response = self.client.request(
                "GET", self.request.path, params=self.request.params(filters=False),
                headers=headers,
            )
        location = response.headers.get("Content-Location")
        if response.status_code != 202 or not location:
            raise FhirFatalError(
                f"GET {self.request.path}: expected 202 Accepted with Content-Location "
                f"(Bulk Data kick-off), got HTTP {response.status_code}",
                status=response.status_code,
            )
        self.state = {
            **wanted,
            "status_url": location,
            "type_filter": filters,
            "notes": notes[:],
            "files": {},
        }
        notes.clear()
        self._save()
        self.on_status("export started")

    def _poll(self, url: str) -> dict[str, Any]:
        started = self.clock()
        wait = 1.0
        last = ""
        while True:
            try:
                response = self.client.request("GET", url, headers={"Accept": "application/json"})
            except FhirFatalError as exc:
                if exc.status in (404, 410):
                    raise _Gone(f"status {exc.status} for the export's status URL") from None
                raise FhirFatalError(
                    f"the server failed the export: {exc}", status=exc.status, url=exc.url,
                    outcome=exc.outcome,
                ) from None
            except FhirTemporaryError as exc:
                if exc.status is not None and exc.status >= 500 and exc.status not in (
                    502, 503, 504,
                ):
                    raise FhirFatalError(
                        f"the server failed the export: {exc}", status=exc.status, url=exc.url,
                        outcome=exc.outcome,
                    ) from None
                raise
            self._tick("polled")
            if response.status_code == 200:
                try:
                    manifest = orjson.loads(response.content)
                except orjson.JSONDecodeError:
                    raise FhirFatalError("the export's manifest is not JSON") from None
                if not isinstance(manifest, dict) or not isinstance(manifest.get("output"), list):
                    raise FhirFatalError("the export's manifest has no output list")
                self.on_status(f"export complete ({len(manifest['output'])} files)")
                return manifest
            progress = response.headers.get("X-Progress") or "in progress"
            if progress != last:
                self.on_status(f"export in progress: {progress}")
                last = progress
            after = self.client._retry_after(response)  # the one Retry-After parser
            # Never sooner than Retry-After, and growing: a long export is not polled every second
            # (about one poll per third of the time waited so far, at most one a minute).
            delay = max(after or 0.0, wait)
            wait = min(wait * 1.5, 60.0)
            if self.clock() - started + delay > self.max_wait:
                raise FhirTemporaryError(
                    f"the export was not complete after {self.max_wait:.0f} s (last X-Progress: "
                    f"{progress}); run the same command again to go on waiting"
                )
            self.sleep(delay)

    def _delete_job(self) -> None:
        """Tell the server it may drop the job and its files (IG: DELETE the status URL)."""
        url = self.state.get("status_url")
        if not url or self.state.get("job_deleted"):
            return
        try:
            self.client.request("DELETE", url, idempotent=True)
        except FhirError as exc:  # the files are safe on disk: not worth failing the export for
            log.warning("could not delete the export job on the server: %s", exc)
        self.state["job_deleted"] = True

    # -- downloads ------------------------------------------------------------------------------

    def _download_all(self, notes: list[str]) -> None:
        manifest = self.state["manifest"]
        token = bool(manifest.get("requiresAccessToken"))
        files: dict[str, Any] = self.state.setdefault("files", {})
        numbers: dict[str, int] = {}
        outputs = [o for o in manifest["output"] if isinstance(o, dict) and o.get("url")]
        for item in outputs:
            rtype = str(item.get("type") or "Resource")
            number = numbers[rtype] = numbers.get(rtype, -1) + 1
            name = f"{rtype}.{number:03d}.ndjson"
            done = files.get(item["url"])
            if done and (self.directory / name).is_file() and (
                (self.directory / name).stat().st_size == done["size"]
            ):
                continue
            target = self.directory / name
            entry = self._download(item["url"], target, token, rtype, item.get("count"))
            files[item["url"]] = asdict(entry)
            self._save()
            self._tick("downloaded")
        errors: list[str] = []
        error_dir = self.state_dir / "errors"
        for number, item in enumerate(manifest.get("error") or []):
            if not isinstance(item, dict) or not item.get("url"):
                continue
            target = error_dir / f"OperationOutcome.{number:03d}.ndjson"
            error_dir.mkdir(exist_ok=True)
            self._download(item["url"], target, token, "OperationOutcome", None)
            errors.extend(_outcome_issues(target.read_bytes().splitlines()))
        deleted = manifest.get("deleted") or []
        if deleted:
            notes.append(
                f"the manifest lists {len(deleted)} file(s) of deleted resources (not downloaded: "
                "fhir-leuko reads what exists)"
            )
        self.state["server_errors"] = errors

    def _download(
        self, url: str, target: Path, token: bool, rtype: str, count: object
    ) -> ExportFile:
        parts = self.state_dir / "parts"
        parts.mkdir(exist_ok=True)
        part = parts / f"{target.name}.part"
        attempt = 0
        while True:
            attempt += 1
            try:
                self._fetch_into(url, part, token)
                entry = _verify(part, url, target.name, rtype, count)
                break
            except _Gone:
                raise
            except _BadFile as exc:
                part.unlink(missing_ok=True)
                if attempt >= _DOWNLOAD_ATTEMPTS:
                    raise FhirFatalError(f"{target.name} from {url}: {exc}") from None
                log.warning("%s: %s; downloading it again", target.name, exc)
            except (requests.exceptions.RequestException, FhirTemporaryError) as exc:
                if attempt >= _DOWNLOAD_ATTEMPTS:
                    raise FhirTemporaryError(
                        f"downloading {target.name} failed {attempt} times ({exc}); run the same "
                        "command again to resume"
                    ) from None
                log.warning("%s: %s; resuming", target.name, exc.__class__.__name__)
                self.sleep(min(2.0**attempt, 30.0))
        os.replace(part, target)
        return entry

    def _fetch_into(self, url: str, part: Path, token: bool) -> None:
        have = part.stat().st_size if part.exists() else 0
        headers = {"Accept": NDJSON}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            response = self.client.request(
                "GET", url, headers=headers, stream=True, authenticate=token
            )
        except FhirFatalError as exc:
            if exc.status in (404, 410):
                raise _Gone(f"status {exc.status} for an export file") from None
            if exc.status == 416 and have:  # the part already holds the whole file
                return
            raise
        with response:
            mode = "ab" if have and response.status_code == 206 else "wb"
            with part.open(mode) as handle:
                for chunk in response.iter_content(_CHUNK):
                    handle.write(chunk)
                    handle.flush()
                    if self.progress is not None:
                        self.progress(len(chunk))
                    self._tick("chunk")


class _BadFile(Exception):
    pass


def _verify(path: Path, url: str, name: str, rtype: str, count: object) -> ExportFile:
    """Check a downloaded NDJSON file: a complete last line, every line a JSON object, and the
    manifest's ``count`` when it gives one."""
    digest = hashlib.sha256()
    lines = 0
    size = 0
    last = b"\n"
    with path.open("rb") as stream:
        for line in stream:
            digest.update(line)
            size += len(line)
            last = line
            body = line.strip()
            if not body:
                continue
            if body[:1] != b"{" or body[-1:] != b"}":
                raise _BadFile(f"line {lines + 1} is not a JSON object")
            lines += 1
    if last.strip():
        try:  # a file cut short mid-line can still end in "}" (of a nested element)
            orjson.loads(last)
        except orjson.JSONDecodeError:
            raise _BadFile("the last line is incomplete") from None
    if isinstance(count, int) and count != lines:
        raise _BadFile(f"{lines} resources, the manifest says {count}")
    return ExportFile(rtype, url, name, lines, size, digest.hexdigest())


def _outcome_issues(lines: Iterable[bytes]) -> list[str]:
    """One text per issue of the OperationOutcomes in an error file, naming the resource."""
    out: list[str] = []
    for line in lines:
        if not line.strip():
            continue
        try:
            outcome = orjson.loads(line)
        except orjson.JSONDecodeError:
            out.append("an error file line that is not JSON")
            continue
        if not isinstance(outcome, dict):
            continue
        for issue in outcome.get("issue") or []:
            if not isinstance(issue, dict):
                continue
            text = operation_outcome_text(
                orjson.dumps({"resourceType": "OperationOutcome", "issue": [issue]})
            )
            where = issue.get("expression") or issue.get("location") or []
            if where and isinstance(where, list):
                text = f"{', '.join(str(w) for w in where)}: {text}"
            out.append(text)
    return out
