"""One pass of the scheduled job: find the patients whose labs or medications changed, fetch what
the profiles need, evaluate them with the rule core, and write DetectedIssues back exactly once.

The rule core (``normalise``, ``evaluate``, ``build_detected_issue``) is used as it is: this module
only adds the FHIR server around it (see ``docs/scheduled-job.md`` for the full story).

**Which patients.** Incremental by default: ``Observation`` (the mapped LOINC codes),
``DiagnosticReport``, ``MedicationRequest`` and ``MedicationStatement`` with
``_lastUpdated=gt<watermark - overlap>``, sorted by ``_lastUpdated``. Resource versions already
handled inside the overlap are remembered in the state file, so an unchanged server costs one
request per resource type. Patients whose last evaluation failed (pending) are retried first. The
first run against a server (no watermark) and ``--full`` take every patient with a lab result in the
lookback; ``--patient`` takes the patients named.

**What is fetched**, for up to ``patients_per_request`` patients at once (R4 search parameters take
comma-separated values as OR): the Patients (``_id``), their lab Observations in the window
(``code`` = the mapped LOINC codes, ``date`` = the longest lookback plus trend window), their
DiagnosticReports with ``_include=DiagnosticReport:result`` (results without their own subject or
time), MedicationRequests and MedicationStatements with ``_include=...:medication``, Conditions,
Flags, and fhir-leuko's own DetectedIssues (``patient`` + ``code`` of fhir-leuko's finding
CodeSystem). Eight searches for the whole group: well under one request per patient.

**Writing** (identity = the deterministic identifier of patient + finding kind): a new finding is a
conditional create (``If-None-Exist: identifier=...``; 200 and 201 are both success) or, with
``write_mode="put"``, a PUT of the deterministic UUID; a changed finding updates the existing
resource with ``If-Match`` on its version, status ``amended``; a finding that no longer holds
because a newer count is not low is *resolved*: the resource is kept (status ``amended``) with a
``mitigation`` "count recovered" and a first detail line saying so. Writes of a group go in one
transaction Bundle when ``metadata`` lists ``transaction`` (single requests otherwise, and as the
fallback that isolates a failing patient). Re-running, also after a kill -9 at any point, finds the
resources by identifier and changes nothing.

**Watermark**: a server time (``meta.lastUpdated``), committed with the patients it covers: after
each group it moves to the earliest change of the patients not yet handled, so an interrupted run
resumes where it stopped. Failed patients are recorded as pending in the same transaction.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import orjson
from tqdm import tqdm

from ..core.detectedissue import (
    FINDING_SYSTEM,
    IDENTIFIER_SYSTEM,
    PROJECT_BASE,
    build_detected_issue,
    conditional_query,
    issue_id,
)
from ..core.evaluate import evaluate, latest_result
from ..core.explain import UNIT, format_count, reference_of
from ..core.fhir_models import check_resource
from ..core.fhirjson import DiagnosticReport as DiagnosticReportStruct
from ..core.fhirjson import (
    MedicationRequest,
    MedicationStatement,
    Observation,
    Sourced,
    iter_document,
)
from ..core.fhirtime import format_instant, parse_fhir_datetime
from ..core.knowledge import LOINC_SYSTEM, Knowledge
from ..core.model import FINDING_ANALYTE, Finding, FindingKind, PatientRecord, Problem
from ..core.normalise import normalise
from ..core.profiles import ProfileSet
from ..errors import (
    AuthError,
    FhirConflictError,
    FhirError,
    FhirFatalError,
    FhirLeukoError,
    FhirTemporaryError,
    LockError,
)
from ..fhir.client import FhirClient
from ..fhir.r4search import check_search_params
from .state import LockInfo, State, server_key

__all__ = [
    "CHANGE_TYPES",
    "MITIGATION_SYSTEM",
    "RECOVERED_CODE",
    "Job",
    "JobOptions",
    "PassReport",
    "pseudonym",
]

log = logging.getLogger(__name__)

MITIGATION_SYSTEM = f"{PROJECT_BASE}/CodeSystem/mitigation"
"""fhir-leuko's code for the mitigation that marks a resolved finding."""
RECOVERED_CODE = "count-recovered"

CHANGE_TYPES = ("Observation", "DiagnosticReport", "MedicationRequest", "MedicationStatement")
"""Resource types whose changes make a patient's evaluation stale."""

# Elements compared to decide whether a DetectedIssue on the server says what a new evaluation
# says. Not compared: id, meta, text, status, identifiedDateTime (the time of each evaluation),
# author/contained (fhir-leuko's version), mitigation (handled as "resolved").
_COMPARED = ("code", "severity", "patient", "implicated", "evidence", "detail", "reference")
_HUMAN_CLOSED = frozenset({"entered-in-error", "cancelled"})
_DEFAULT_STATUSES = ("final", "amended", "corrected")
_MAX_CONSECUTIVE_OUTAGES = 3

Action = Literal["create", "update", "resolve"]
Mode = Literal["incremental", "full", "patients"]


@dataclass(frozen=True)
class JobOptions:
    mode: Mode = "incremental"
    patients: Sequence[str] = ()
    since: datetime | None = None
    as_of: datetime | None = None
    """``None``: the time the pass starts."""
    dry_run: bool = False
    write_mode: Literal["conditional", "put"] = "conditional"
    transactions: Literal["auto", "never"] = "auto"
    patients_per_request: int = 25
    page_size: int = 500
    overlap: timedelta = timedelta(minutes=5)
    max_changes: int = 10_000
    stale_lock_after: timedelta = timedelta(minutes=30)
    progress: bool = False


@dataclass
class PassReport:
    """What one pass did (counts only: no patient data)."""

    server: str
    mode: str
    as_of: datetime
    watermark_from: str | None = None
    watermark_to: str | None = None
    changes: Counter[str] = field(default_factory=Counter)
    patients: int = 0
    findings: Counter[tuple[str, str]] = field(default_factory=Counter)
    actions: Counter[str] = field(default_factory=Counter)
    failed: list[tuple[str, str]] = field(default_factory=list)
    """(pseudonym, reason) of each failed patient."""
    problems: list[Problem] = field(default_factory=list)
    requests: int = 0
    interrupted: bool = False
    aborted: str | None = None
    """Why the pass stopped early (server unavailable), if it did."""
    dry_run: bool = False

    @property
    def ok(self) -> bool:
        return not self.failed and not self.problems and self.aborted is None

    @property
    def status(self) -> str:
        if self.aborted:
            return "failed"
        if self.interrupted:
            return "interrupted"
        return "ok" if self.ok else "partial"

    def as_dict(self) -> dict[str, Any]:
        return {
            "server": self.server,
            "mode": self.mode,
            "as_of": format_instant(self.as_of),
            "dry_run": self.dry_run,
            "status": self.status,
            "watermark_from": self.watermark_from,
            "watermark_to": self.watermark_to,
            "changes": dict(sorted(self.changes.items())),
            "patients_scanned": self.patients,
            "findings": {f"{k} {s}": n for (k, s), n in sorted(self.findings.items())},
            "written": self.actions["create"],
            "updated": self.actions["update"],
            "resolved": self.actions["resolve"],
            "unchanged": self.actions["unchanged"],
            "patients_failed": len(self.failed),
            "input_problems": len(self.problems),
            "http_requests": self.requests,
            "interrupted": self.interrupted,
            "aborted": self.aborted,
        }

    def summary_lines(self) -> list[str]:
        would = "would be " if self.dry_run else ""
        changes = ", ".join(f"{n} {t}" for t, n in sorted(self.changes.items()) if n)
        lines = [
            f"{self.mode} pass as of {format_instant(self.as_of)}"
            + (f"; watermark {self.watermark_from or '-'} -> {self.watermark_to or '-'}")
            + (" (dry run: nothing written)" if self.dry_run else ""),
            f"changes: {changes or 'none'}; patients scanned: {self.patients}",
        ]
        if self.findings:
            parts = [f"{k} {s} {n}" for (k, s), n in sorted(self.findings.items())]
            lines.append(f"findings: {sum(self.findings.values())} ({'; '.join(parts)})")
        else:
            lines.append("findings: 0")
        a = self.actions
        lines.append(
            f"DetectedIssues: {a['create']} {would}written, {a['update']} {would}updated, "
            f"{a['resolve']} {would}resolved, {a['unchanged']} unchanged"
        )
        lines.append(
            f"errors: {len(self.failed)} patients failed, {len(self.problems)} input problems; "
            f"HTTP requests: {self.requests}"
            + ("; interrupted" if self.interrupted else "")
            + (f"; stopped early: {self.aborted}" if self.aborted else "")
        )
        return lines


def pseudonym(server: str, patient: str) -> str:
    """A stable, non-reversible name for a patient in logs (the state file has the reference)."""
    return "pt-" + hashlib.sha256(f"{server}|{patient}".encode()).hexdigest()[:10]


def patient_key(reference: str | None) -> str | None:
    """``Patient/<id>`` for a Patient reference (relative, absolute, versioned); else ``None``."""
    if not reference or reference.startswith(("#", "urn:")):
        return None
    parts = reference.split("/_history/")[0].rstrip("/").split("/")
    if len(parts) >= 2 and parts[-2] == "Patient" and parts[-1]:
        return f"Patient/{parts[-1]}"
    return None


@dataclass
class _Write:
    patient: str
    kind: FindingKind
    action: Action
    resource: dict[str, Any]
    if_match: str | None = None

    @property
    def identifier(self) -> str:
        return issue_id(self.patient, self.kind)


@dataclass
class _Change:
    resource: str
    last_updated: str | None
    patient: str


def _content(issue: dict[str, Any]) -> bytes:
    return orjson.dumps({k: issue.get(k) for k in _COMPARED}, option=orjson.OPT_SORT_KEYS)


def _resolved(issue: dict[str, Any]) -> bool:
    for mitigation in issue.get("mitigation") or []:
        action = mitigation.get("action") if isinstance(mitigation, dict) else None
        for coding in (action or {}).get("coding") or []:
            if coding.get("system") == MITIGATION_SYSTEM and coding.get("code") == RECOVERED_CODE:
                return True
    return False


def _version(issue: dict[str, Any]) -> str | None:
    meta = issue.get("meta")
    version = meta.get("versionId") if isinstance(meta, dict) else None
    return version if isinstance(version, str) else None


def _for_update(body: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in body.items() if k not in ("meta", "text")}
    out["id"] = current["id"]
    # What people recorded on the DetectedIssue (a pharmacist's mitigation) is kept.
    theirs = [m for m in current.get("mitigation") or [] if not _resolved({"mitigation": [m]})]
    ours = [m for m in out.get("mitigation") or [] if _resolved({"mitigation": [m]})]
    if theirs or ours:
        out["mitigation"] = theirs + ours
    else:
        out.pop("mitigation", None)
    # R4 ObservationStatus "amended": modified after being final (new information).
    out["status"] = "amended"
    return out


_FLOOR = datetime.min.replace(tzinfo=UTC)


@dataclass
class _Batch:
    """The changes of one batch, by patient, and where the watermark may move."""

    by_patient: dict[str, list[_Change]]
    earliest: dict[str, tuple[datetime, str]]
    """Each patient's earliest change: (time, the server's text of it)."""
    end: str | None
    """The watermark once every patient of the batch is handled."""

    @classmethod
    def of(cls, changes: list[_Change], capped: list[str], server_start: str | None) -> _Batch:
        by_patient: dict[str, list[_Change]] = {}
        earliest: dict[str, tuple[datetime, str]] = {}
        latest: tuple[datetime, str] | None = None
        for change in changes:
            by_patient.setdefault(change.patient, []).append(change)
            moment = parse_fhir_datetime(change.last_updated)
            if moment is None or not change.last_updated:
                continue
            mark = (moment, change.last_updated)
            if change.patient not in earliest or mark < earliest[change.patient]:
                earliest[change.patient] = mark
            if latest is None or mark > latest:
                latest = mark
        if capped:
            # A type stopped at max_changes: its later changes are not seen yet.
            end: str | None = min(capped, key=lambda t: parse_fhir_datetime(t) or _FLOOR)
        else:
            start = parse_fhir_datetime(server_start)
            marks = [m for m in (latest, (start, server_start) if start else None) if m]
            end = max(marks)[1] if marks else None
        return cls(by_patient, {p: m for p, m in earliest.items()}, end)

    def checkpointer(
        self, passer: _Pass
    ) -> Callable[[list[str], list[tuple[str, str]], list[str]], None]:
        def checkpoint(done: list[str], failed: list[tuple[str, str]], rest: list[str]) -> None:
            # Every change before the earliest change of a patient not yet handled is handled.
            waiting = [self.earliest[p] for p in rest if p in self.earliest]
            mark = min(waiting)[1] if waiting else self.end
            handled = [
                (c.resource, c.last_updated)
                for p in [*done, *(f for f, _ in failed)]
                for c in self.by_patient.get(p, [])
            ]
            passer.commit(done, failed, mark, handled)

        return checkpoint


class _Outage(Exception):
    """The server stayed unavailable for several patients in a row: stop the pass."""


class Job:
    """One pass (``run()``), reusable for many passes (``watch``)."""

    def __init__(
        self,
        client: FhirClient,
        knowledge: Knowledge,
        profiles: ProfileSet,
        options: JobOptions,
        *,
        state: State | None,
        stop: threading.Event | None = None,
        emit: Callable[[dict[str, Any]], object] | None = None,
        checkpoint_hook: Callable[[str, int], object] | None = None,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.client = client
        self.knowledge = knowledge
        self.profiles = profiles
        self.options = options
        self.state = state
        self.stop = stop or threading.Event()
        self.emit = emit
        self.hook = checkpoint_hook
        self.now = now
        self.server = server_key(client.base_url)
        self.codes = ",".join(f"{LOINC_SYSTEM}|{code}" for code in sorted(knowledge.loinc))
        self.finding_codes = ",".join(f"{FINDING_SYSTEM}|{k.value}" for k in FindingKind)
        active = profiles.profiles or tuple(lp.profile for lp in profiles.loaded)
        self.lookback = timedelta(days=max((p.settings.lookback_days for p in active), default=30))
        # The trend in the explanation reaches back trend_days before the latest result.
        self.window = self.lookback + timedelta(
            days=max((p.settings.trend_days for p in active), default=180)
        )
        self._hook_counts: Counter[str] = Counter()

    # -- helpers --------------------------------------------------------------------------------

    def _point(self, name: str) -> None:
        """A named point of the pass (after a write, after a fetch, after a checkpoint): the test
        hook of ``fhir-leuko run`` can pause there so that tests kill -9 at exact moments."""
        self._hook_counts[name] += 1
        if self.hook is not None:
            self.hook(name, self._hook_counts[name])

    def _search(self, rtype: str, params: list[tuple[str, str]]) -> Iterator[bytes]:
        check_search_params(rtype, params)  # only R4 parameters reach a server
        return self.client.search(rtype, params)

    def _scrub(self, text: str, patient: str) -> str:
        alias = pseudonym(self.server, patient)
        text = text.replace(patient, alias)
        pid = patient.split("/", 1)[-1]
        return text.replace(pid, alias) if len(pid) >= 6 else text

    # -- the pass -------------------------------------------------------------------------------

    def run(self) -> PassReport:
        """One pass. Raises LockError (another run writes), AuthError, and FhirError when the
        server cannot be used at all (metadata); patient-level failures are in the report."""
        opts = self.options
        as_of = (opts.as_of or self.now()).astimezone(UTC)
        report = PassReport(self.server, opts.mode, as_of, dry_run=opts.dry_run)
        start_requests = self.client.requests_sent
        state = self.state
        lock: LockInfo | None = None
        if state is not None and not opts.dry_run:
            lock = state.acquire_lock(
                self.server, stale_after=opts.stale_lock_after.total_seconds()
            )
        run_id = 0
        try:
            # metadata first: a connectivity check, transaction support, and the server's clock
            # (its Date header) for the first watermark.
            self.client.capabilities()
            server_start = self.client.last_date
            stored = state.watermark(self.server) if state is not None else None
            report.watermark_from = stored
            report.watermark_to = stored
            if state is not None and not opts.dry_run:
                run_id = state.start_run(self.server, opts.mode, format_instant(as_of), stored)
            use_tx = (
                not opts.dry_run
                and opts.transactions == "auto"
                and self.client.supports("transaction")
            )
            if server_start is None:
                server_start = format_instant(self.now() - opts.overlap)
                log.warning("the server sent no Date header: first watermark from the local clock")
            passer = _Pass(self, report, as_of, run_id, lock, use_tx)
            if opts.mode == "patients":
                keys = [k for k in (_as_patient(p) for p in opts.patients) if k]
                passer.process(keys, checkpoint=None)
            elif opts.mode == "full" or (stored is None and opts.since is None):
                keys = passer.full_patients()
                recent: list[_Change] = []
                if stored is None:
                    # First run: also the changes just before the server's start time, which the
                    # next run's overlap re-reads; they are remembered as handled.
                    recent, _capped = passer.changes(server_start, set())
                    keys = sorted(set(keys) | {c.patient for c in recent})
                passer.process(keys, checkpoint=None)
                if stored is None and not report.interrupted and report.aborted is None:
                    handled = [(c.resource, c.last_updated) for c in recent]
                    passer.commit([], [], server_start, handled)
            else:
                since = format_instant(opts.since) if opts.since else stored
                assert since is not None
                passer.incremental(since, server_start)
        except FhirLeukoError as exc:
            report.aborted = str(exc)
            raise
        finally:
            report.requests = self.client.requests_sent - start_requests
            if state is not None and not opts.dry_run:
                if run_id:
                    state.finish_run(
                        run_id,
                        report.status,
                        orjson.dumps(report.as_dict()).decode(),
                        state.watermark(self.server),
                    )
                report.watermark_to = state.watermark(self.server)
                if lock is not None:
                    state.release_lock(lock)
        return report


def _as_patient(text: str) -> str | None:
    text = text.strip()
    if not text:
        return None
    return patient_key(text) or (f"Patient/{text}" if "/" not in text else None)


class _Pass:
    """The state of one pass (split out of Job to keep each step short)."""

    def __init__(
        self,
        job: Job,
        report: PassReport,
        as_of: datetime,
        run_id: int,
        lock: LockInfo | None,
        use_tx: bool,
    ) -> None:
        self.job = job
        self.report = report
        self.as_of = as_of
        self.run_id = run_id
        self.lock = lock
        self.use_tx = use_tx
        self.opts = job.options
        self.client = job.client
        self.server = job.server
        self.outages = 0
        self.deferred: set[str] = set()
        """Patients that failed because the server was unavailable: in an incremental pass they
        are not recorded as pending; the watermark stays before their changes instead."""
        self.bar: tqdm[Any] | None = None

    # -- selecting patients ---------------------------------------------------------------------

    def full_patients(self) -> list[str]:
        """Every patient with a mapped lab result (or a lab report) in the lookback."""
        start = format_instant(self.as_of - self.job.lookback)
        end = format_instant(self.as_of)
        found: dict[str, None] = {}
        searches: list[tuple[str, list[tuple[str, str]]]] = [
            (
                "Observation",
                [
                    ("code", self.job.codes),
                    ("date", f"ge{start}"),
                    ("date", f"le{end}"),
                    ("_elements", "subject"),
                    ("_count", str(self.opts.page_size)),
                ],
            ),
            (
                "DiagnosticReport",
                [
                    ("date", f"ge{start}"),
                    ("date", f"le{end}"),
                    ("_elements", "subject"),
                    ("_count", str(self.opts.page_size)),
                ],
            ),
        ]
        for rtype, params in searches:
            for page in self.job._search(rtype, params):
                for item in iter_document(page, f"{rtype} search"):
                    if isinstance(item, Problem):
                        continue
                    resource = item[0]
                    subject = getattr(resource, "subject", None)
                    key = patient_key(subject.reference if subject else None)
                    if key:
                        found[key] = None
                        self.report.changes[rtype] += 1
        return sorted(found)

    def incremental(self, since: str, server_start: str) -> None:
        """Batches of changes since the watermark, checkpointed group by group.

        ``server_start`` is the server's time before the change searches: once every change they
        returned is handled, the watermark may move there (the overlap covers late commits), so a
        quiet server costs one search per change type."""
        state = self.job.state
        first_batch = True
        while True:
            seen = state.seen(self.server) if state is not None else set()
            changes, capped = self.changes(since, seen)
            pending = list(state.pending(self.server)) if state is not None and first_batch else []
            first_batch = False
            batch = _Batch.of(changes, capped, server_start)
            order = sorted(
                set(batch.by_patient) | set(pending),
                key=lambda p: (_FLOOR if p in pending else batch.earliest.get(p, _FLOOR), p),
            )
            self.process(order, checkpoint=batch.checkpointer(self))
            if self.report.interrupted or self.report.aborted or not capped:
                return
            since = batch.end or since
            log.info("more changes than one batch holds: next batch from %s", since)

    def changes(self, since: str, seen: set[tuple[str, str]]) -> tuple[list[_Change], list[str]]:
        """Changed lab/medication resources since ``since - overlap`` not yet handled, and the
        last ``lastUpdated`` of each type whose collection stopped at ``max_changes``."""
        moment = parse_fhir_datetime(since)
        assert moment is not None
        start = format_instant(moment - self.opts.overlap)
        out: list[_Change] = []
        capped: list[str] = []
        for rtype in CHANGE_TYPES:
            params = [("_lastUpdated", f"gt{start}"), ("_sort", "_lastUpdated")]
            if rtype == "Observation":
                params.insert(0, ("code", self.job.codes))
            params.append(("_count", str(self.opts.page_size)))
            count = 0
            last: str | None = None
            for page in self.job._search(rtype, params):
                for item in iter_document(page, f"{rtype} changes"):
                    if isinstance(item, Problem):
                        self.report.problems.append(item)
                        continue
                    resource = item[0]
                    if not isinstance(
                        resource,
                        Observation
                        | DiagnosticReportStruct
                        | MedicationRequest
                        | MedicationStatement,
                    ):
                        continue
                    count += 1
                    updated = resource.meta.lastUpdated if resource.meta else None
                    last = updated or last
                    key = f"{rtype}/{resource.id}"
                    if updated and (key, updated) in seen:
                        continue
                    subject = resource.subject.reference if resource.subject else None
                    patient = patient_key(subject)
                    if patient is None:
                        continue  # no Patient subject (e.g. a result listed by its report)
                    self.report.changes[rtype] += 1
                    out.append(_Change(key, updated, patient))
                if count >= self.opts.max_changes:
                    if last:
                        capped.append(last)
                    break
        return out, capped

    # -- processing -----------------------------------------------------------------------------

    def process(
        self,
        patients: list[str],
        *,
        checkpoint: Callable[[list[str], list[tuple[str, str]], list[str]], None] | None,
    ) -> None:
        size = self.opts.patients_per_request
        show = self.opts.progress and bool(patients)
        self.bar = tqdm(total=len(patients), unit="patient", disable=not show, leave=False)
        handled: set[str] = set()
        try:
            for index in range(0, len(patients), size):
                if self.job.stop.is_set():
                    self.report.interrupted = True
                    break
                group = patients[index : index + size]
                try:
                    done, failed = self.group(group)
                except _Outage as exc:
                    self.report.aborted = self.scrub(str(exc), group)
                    done, failed = [], []
                for patient, reason in failed:
                    alias = pseudonym(self.server, patient)
                    text = self.scrub(reason, [patient])
                    self.report.failed.append((alias, text))
                    log.error("patient %s failed: %s", alias, text)
                finished = set(done) | {p for p, _ in failed}
                if len(finished) < len(group) and not self.report.aborted:
                    self.report.interrupted = True
                if checkpoint is not None:
                    failed = [(p, r) for p, r in failed if p not in self.deferred]
                    handled.update(done)
                    handled.update(p for p, _ in failed)
                    rest = [p for p in patients if p not in handled]
                    checkpoint(done, failed, rest)
                else:
                    self.commit(done, failed, None)
                if self.report.interrupted or self.report.aborted:
                    break
        finally:
            self.bar.close()

    def commit(
        self,
        done: list[str],
        failed: list[tuple[str, str]],
        watermark: str | None,
        handled: Iterable[tuple[str, str | None]] = (),
    ) -> None:
        state = self.job.state
        if state is None or self.opts.dry_run:
            return
        keep_from = None
        if watermark is not None:
            moment = parse_fhir_datetime(watermark)
            if moment is not None:
                keep_from = format_instant(moment - self.opts.overlap)
        state.checkpoint(
            self.server,
            watermark=watermark,
            seen=[(r, t) for r, t in handled if t],
            keep_seen_from=keep_from,
            done=done,
            failed=failed,
        )
        if self.lock is not None:
            state.heartbeat(self.lock)
        self.job._point("checkpoint")

    def group(self, group: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
        """Fetch, evaluate and write a group of patients; a fetch that fails for good is retried
        patient by patient so that one bad record fails only its patient."""
        try:
            items, existing = self.fetch(group)
        except (AuthError, LockError):
            raise
        except FhirTemporaryError as exc:
            self.outage(exc)
            if len(group) == 1:
                self.deferred.add(group[0])
                return [], [(group[0], str(exc))]
            return self.split(group)
        except FhirError as exc:
            if len(group) == 1:
                return [], [(group[0], str(exc))]
            log.warning(
                "a group fetch failed (%s); fetching its patients one by one",
                self.scrub(str(exc), group),
            )
            return self.split(group)
        self.outages = 0
        self.job._point("fetched")
        dataset = normalise(items, self.job.knowledge)
        self.report.problems.extend(dataset.problems)
        planned: dict[str, list[_Write]] = {}
        done: list[str] = []
        failed: list[tuple[str, str]] = []
        for patient in group:
            if self.job.stop.is_set():
                break
            record = dataset.patients.get(patient) or PatientRecord(patient)
            findings = evaluate(record, self.job.profiles, as_of=self.as_of)
            self.report.patients += 1
            for finding in findings:
                self.report.findings[(finding.kind.value, finding.severity)] += 1
            try:
                planned[patient] = self.plan(patient, record, findings, existing.get(patient, {}))
            except ValueError as exc:
                failed.append((patient, str(exc)))
            if self.bar is not None:
                self.bar.update(1)
        ok, bad = self.write(planned)
        done.extend(ok)
        failed.extend(bad)
        return done, failed

    def scrub(self, text: str, patients: Iterable[str]) -> str:
        """A server's message without the patients' references (logs carry no patient data)."""
        for patient in patients:
            text = self.job._scrub(text, patient)
        return text

    def split(self, group: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
        done: list[str] = []
        failed: list[tuple[str, str]] = []
        for patient in group:
            if self.job.stop.is_set():
                break
            d, f = self.group([patient])
            done.extend(d)
            failed.extend(f)
        return done, failed

    def outage(self, exc: FhirTemporaryError) -> None:
        self.outages += 1
        if self.outages >= _MAX_CONSECUTIVE_OUTAGES:
            raise _Outage(f"the server stayed unavailable ({exc})")

    def fetch(
        self, group: list[str]
    ) -> tuple[list[Sourced | Problem], dict[str, dict[str, list[dict[str, Any]]]]]:
        refs = ",".join(group)
        ids = ",".join(p.split("/", 1)[1] for p in group)
        count = ("_count", str(self.opts.page_size))
        start = format_instant(self.as_of - self.job.window)
        end = format_instant(self.as_of)
        searches: list[tuple[str, list[tuple[str, str]]]] = [
            ("Patient", [("_id", ids), count]),
            (
                "Observation",
                [
                    ("patient", refs),
                    ("code", self.job.codes),
                    ("date", f"ge{start}"),
                    ("date", f"le{end}"),
                    count,
                ],
            ),
            (
                "DiagnosticReport",
                [
                    ("patient", refs),
                    ("date", f"ge{start}"),
                    ("date", f"le{end}"),
                    ("_include", "DiagnosticReport:result"),
                    count,
                ],
            ),
            (
                "MedicationRequest",
                [("patient", refs), ("_include", "MedicationRequest:medication"), count],
            ),
            (
                "MedicationStatement",
                [("patient", refs), ("_include", "MedicationStatement:medication"), count],
            ),
            ("Condition", [("patient", refs), count]),
            ("Flag", [("patient", refs), count]),
        ]
        items: list[Sourced | Problem] = []
        for rtype, params in searches:
            for number, page in enumerate(self.job._search(rtype, params), start=1):
                items.extend(iter_document(page, f"{rtype} search", f"page {number}"))
        existing: dict[str, dict[str, list[dict[str, Any]]]] = {}
        issue_params = [("patient", refs), ("code", self.job.finding_codes), count]
        for page in self.job._search("DetectedIssue", issue_params):
            bundle = orjson.loads(page)
            for entry in bundle.get("entry") or []:
                resource = entry.get("resource") or {}
                if resource.get("resourceType") != "DetectedIssue":
                    continue
                patient = patient_key((resource.get("patient") or {}).get("reference"))
                for ident in resource.get("identifier") or []:
                    if ident.get("system") == IDENTIFIER_SYSTEM and patient:
                        existing.setdefault(patient, {}).setdefault(
                            str(ident.get("value")), []
                        ).append(resource)
        return items, existing

    # -- deciding what to write -----------------------------------------------------------------

    def plan(
        self,
        patient: str,
        record: PatientRecord,
        findings: list[Finding],
        existing: dict[str, list[dict[str, Any]]],
    ) -> list[_Write]:
        by_kind = {f.kind: f for f in findings}
        writes: list[_Write] = []
        for kind in FindingKind:
            ident = issue_id(patient, kind)
            found = existing.get(ident, [])
            if len(found) > 1:
                raise ValueError(
                    f"{len(found)} DetectedIssues carry identifier {IDENTIFIER_SYSTEM}|{ident} "
                    "(merge them by hand; fhir-leuko never picks one)"
                )
            current = found[0] if found else None
            finding = by_kind.get(kind)
            if finding is not None:
                new = build_detected_issue(finding, identified=self.as_of)
                if current is None:
                    if self.opts.write_mode == "put":
                        writes.append(_Write(patient, kind, "create", new))
                    else:
                        body = {k: v for k, v in new.items() if k != "id"}
                        writes.append(_Write(patient, kind, "create", body))
                    continue
                if _content(current) == _content(new) and not _resolved(current):
                    # Nothing new. (A DetectedIssue a person closed, entered-in-error or
                    # cancelled, also stays closed until the finding itself changes.)
                    self.report.actions["unchanged"] += 1
                    continue
                writes.append(
                    _Write(patient, kind, "update", _for_update(new, current), _version(current))
                )
                continue
            if current is None or _resolved(current) or current.get("status") in _HUMAN_CLOSED:
                continue
            resolved = self.resolution(record, kind, current)
            if resolved is None:
                # No count in the lookback at all: an old finding ages out silently. It is NOT
                # called recovered (no newer count says so); the resource stays as it was.
                self.report.actions["unchanged"] += 1
                continue
            writes.append(_Write(patient, kind, "resolve", resolved, _version(current)))
        return writes

    def resolution(
        self, record: PatientRecord, kind: FindingKind, current: dict[str, Any]
    ) -> dict[str, Any] | None:
        """The resolved version of ``current`` when a newer valid count exists and is not low."""
        url = str(current.get("reference") or "").split("|", 1)[0]
        profile = next((p for p in self.job.profiles.profiles if p.url == url), None)
        lookback = timedelta(days=profile.settings.lookback_days) if profile else self.job.lookback
        statuses = tuple(profile.settings.statuses) if profile else _DEFAULT_STATUSES
        result = latest_result(record, kind, as_of=self.as_of, lookback=lookback, statuses=statuses)
        if result is None:
            return None
        analyte = FINDING_ANALYTE[kind]
        comparator = {"<": "< ", "<=": "≤ ", ">": "> ", ">=": "≥ "}.get(result.comparator or "", "")
        sources = ", ".join(reference_of(k) for k in result.evidence)
        day = self.as_of.date().isoformat()
        sentence = (
            f"Resolved on {day}: the latest {analyte.label}, {comparator}"
            f"{format_count(result.value)} {UNIT} (reported {result.reported}) on "
            f"{result.effective_text} [{sources}, status {result.status}], is no longer low. "
            "This record of the earlier finding is kept; its text follows."
        )
        body = _for_update(current, current)
        previous = str(current.get("detail") or "")
        body["detail"] = f"{sentence}\n{previous}" if previous else sentence
        mitigations = list(body.get("mitigation") or [])
        mitigations.append(
            {
                "action": {
                    "coding": [
                        {
                            "system": MITIGATION_SYSTEM,
                            "code": RECOVERED_CODE,
                            "display": "Count recovered",
                        }
                    ],
                    "text": sentence.split(" This record")[0],
                },
                "date": format_instant(self.as_of),
            }
        )
        body["mitigation"] = mitigations
        return check_resource(body)

    # -- writing --------------------------------------------------------------------------------

    def write(self, planned: dict[str, list[_Write]]) -> tuple[list[str], list[tuple[str, str]]]:
        writes = [w for ws in planned.values() for w in ws]
        if self.opts.dry_run:
            for w in writes:
                self.report.actions[w.action] += 1
                if self.job.emit is not None:
                    self.job.emit(w.resource)
            return list(planned), []
        failed: dict[str, str] = {}
        pending = writes
        if self.use_tx and len(writes) > 0:
            try:
                pending = self.transaction(writes)
            except (AuthError, LockError):
                raise
            except FhirError as exc:
                if exc.status == 403:
                    log.warning(
                        "transactions refused (HTTP 403, e.g. scopes for one type only): "
                        "single requests for the rest of this run"
                    )
                    self.use_tx = False
                else:
                    log.warning("transaction failed (%s); writing one by one", exc)
                pending = writes
        for w in pending:
            if w.patient in failed:
                continue
            try:
                self.write_one(w)
            except (AuthError, LockError):
                raise
            except FhirError as exc:
                failed[w.patient] = str(exc)
                if isinstance(exc, FhirTemporaryError):
                    self.deferred.add(w.patient)
                    self.outage(exc)
        return [p for p in planned if p not in failed], sorted(failed.items())

    def _record(self, w: _Write, resource_id: str | None, version: str | None, action: str) -> None:
        self.report.actions[action] += 1
        state = self.job.state
        if state is not None:
            state.record_write(self.run_id, self.server, w.identifier, resource_id, version, action)

    def transaction(self, writes: list[_Write]) -> list[_Write]:
        """All writes in one transaction; returns the writes that need a second look (a
        conditional create that found an existing resource)."""
        entries = []
        for w in writes:
            entry: dict[str, Any] = {"resource": w.resource}
            if w.action == "create" and self.opts.write_mode == "conditional":
                entry["fullUrl"] = f"urn:uuid:{w.identifier}"
                entry["request"] = {
                    "method": "POST",
                    "url": "DetectedIssue",
                    "ifNoneExist": conditional_query({"identifier": w.resource["identifier"]}),
                }
            else:
                request: dict[str, Any] = {
                    "method": "PUT",
                    "url": f"DetectedIssue/{w.resource['id']}",
                }
                if w.if_match:
                    request["ifMatch"] = f'W/"{w.if_match}"'
                entry["request"] = request
            entries.append(entry)
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
        # Every entry is conditional or a PUT: a retry after a lost answer cannot duplicate.
        answer = self.client.transaction(bundle, idempotent=True)
        self.job._point("write")
        again: list[_Write] = []
        results = answer.get("entry") or []
        if len(results) != len(writes):
            raise FhirFatalError(
                f"transaction response has {len(results)} entries for {len(writes)} requests"
            )
        for w, entry in zip(writes, results, strict=True):
            response = entry.get("response") or {}
            status = str(response.get("status") or "")
            location = str(response.get("location") or "")
            rid = location.split("/_history/")[0].rstrip("/").rsplit("/", 1)[-1] or None
            version = str(response.get("etag") or "").removeprefix("W/").strip('"') or None
            if w.action == "create" and status.startswith("200"):
                again.append(w)  # it existed after all (search index lag): look again
                continue
            self._record(w, rid, version, w.action)
        return again

    def write_one(self, w: _Write, *, second: bool = False) -> None:
        client = self.client
        if w.action == "create":
            if self.opts.write_mode == "put":
                result = client.update(w.resource)
            else:
                query = conditional_query({"identifier": w.resource["identifier"]})
                result = client.create(w.resource, if_none_exist=query)
            self.job._point("write")
            if result.status == 201 or self.opts.write_mode == "put":
                self._record(w, result.id, result.version, "create")
                return
            # 200: the resource exists although the search did not show it: compare and update.
            current = result.resource
            if current is None or current.get("resourceType") != "DetectedIssue":
                if result.id is None:
                    raise FhirFatalError("conditional create answered 200 without the resource")
                current = client.read("DetectedIssue", result.id)
            self.reconsider(w, current, second)
            return
        try:
            result = client.update(w.resource, if_match=w.if_match)
        except FhirConflictError:
            if second:
                raise
            current = client.read("DetectedIssue", str(w.resource["id"]))
            self.reconsider(w, current, True)
            return
        self.job._point("write")
        self._record(w, result.id, result.version, w.action)

    def reconsider(self, w: _Write, current: dict[str, Any], second: bool) -> None:
        """The server's resource differs from what the plan assumed: decide again, once."""
        if second and w.action == "create":
            raise FhirConflictError("the DetectedIssue changed twice while being written")
        if w.action == "resolve":
            if _resolved(current):
                self.report.actions["unchanged"] += 1
                return
            body = {
                **current,
                "detail": w.resource["detail"],
                "mitigation": w.resource["mitigation"],
            }
            redo = _Write(
                w.patient, w.kind, "resolve", _for_update(body, current), _version(current)
            )
        else:
            if _content(current) == _content(w.resource) and not _resolved(current):
                self.report.actions["unchanged"] += 1
                return
            redo = _Write(
                w.patient, w.kind, "update", _for_update(w.resource, current), _version(current)
            )
        self.write_one(redo, second=True)
