"""The scheduled job: one pass finds the patients whose labs or medications changed, fetches what
the profiles need, evaluates them with the rule core, and writes DetectedIssues back exactly once.

The rule core (``normalise``, ``evaluate``, ``build_detected_issue``) is used as it is: the job only
adds the FHIR server around it (see ``docs/scheduled-job.md`` for the full story). This module holds
:class:`Job` (one pass: lock, metadata, the mode, the run ledger) and the pass coordinator
(:class:`_Pass`: patients in groups, checkpoints, outages); the stages are modules of their own:

* :mod:`.changes` — **which patients**: incremental by ``_lastUpdated`` watermark (changes of the
  mapped lab codes, reports and medication records), patients pending from an earlier pass first;
  the first run against a server (no watermark) and ``--full`` take every patient with a lab result
  in the lookback; ``--patient`` takes the patients named.
* :mod:`.fetch` — **what is fetched** for a group of up to ``patients_per_request`` patients: eight
  searches for the whole group.
* :mod:`.plan` — **what to write** for each patient: create, update (``amended``), resolve ("count
  recovered"), or nothing.
* :mod:`.write` — **writing exactly once**: transactions, conditional creates, ``If-Match``.

**Watermark**: a server time (``meta.lastUpdated``), committed with the patients it covers: after
each group it moves to the earliest change of the patients not yet handled, so an interrupted run
resumes where it stopped. Failed patients are recorded as pending in the same transaction.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import orjson
from tqdm import tqdm

from ..core.detectedissue import FINDING_SYSTEM
from ..core.fhirjson import DiagnosticReport as DiagnosticReportStruct
from ..core.fhirjson import MedicationRequest, MedicationStatement, Observation, Sourced, Unread
from ..core.fhirtime import format_instant, parse_fhir_datetime
from ..core.knowledge import Knowledge
from ..core.model import Finding, FindingKind, PatientRecord, Problem
from ..core.normalise import Dataset, normalise
from ..core.profiles import ProfileSet
from ..errors import AuthError, FhirError, FhirLeukoError, FhirTemporaryError, LockError
from ..fhir.client import FhirClient
from ..fhir.privacy import patients_in_scope
from ..fhir.r4search import check_search_params
from ..files.executors import ShardMap
from .bulk import bulk_pass
from .bulkshards import BulkScale
from .changes import CHANGE_TYPES, Batch, Change, ChangeWalk, Checkpoint, full_patients
from .fetch import ExistingView, fetch
from .patients import as_patient, pseudonym, scrub
from .plan import MITIGATION_SYSTEM, RECOVERED_CODE, Planner, Write
from .state import LockInfo, State, server_key
from .verdict import Verdict, judge
from .verdict import unusable as _unusable
from .walk import Stopped, Walker
from .write import Writer

__all__ = [
    "CHANGE_TYPES",
    "MITIGATION_SYSTEM",
    "RECOVERED_CODE",
    "Job",
    "JobOptions",
    "Mode",
    "PassReport",
    "pseudonym",
]

log = logging.getLogger(__name__)

_MAX_CONSECUTIVE_OUTAGES = 3

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
    """Changed resources of one type per batch (the next batch continues the same walk)."""
    window_size: int = 5_000
    """Resources read in one search before the next window starts at the cursor, so that no
    walk depends on deep pages (``next`` links are followed only within a window)."""
    stale_lock_after: timedelta = timedelta(minutes=30)
    progress: bool = False
    bulk_dir: Path | None = None
    """``run --bulk``: the patients come from a Bulk Data export kept under this directory
    (:mod:`.bulk`)."""
    scale: BulkScale = field(default_factory=BulkScale)
    """``run --bulk``: how a full export is sharded and who evaluates the shards (``[scale]``)."""


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
            "patients_deceased": self.actions["deceased"],
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
            + (f"; {a['deceased']} deceased patients left as they are" if a["deceased"] else "")
        )
        lines.append(
            f"errors: {len(self.failed)} patients failed, {len(self.problems)} input problems; "
            f"HTTP requests: {self.requests}"
            + ("; interrupted" if self.interrupted else "")
            + (f"; stopped early: {self.aborted}" if self.aborted else "")
        )
        return lines


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
        flagged: Callable[[PatientRecord, list[Finding]], object] | None = None,
        checkpoint_hook: Callable[[str, int], object] | None = None,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        shard_map: Callable[[], AbstractContextManager[ShardMap]] | None = None,
    ) -> None:
        self.client = client
        self.knowledge = knowledge
        self.profiles = profiles
        self.options = options
        self.state = state
        self.stop = stop or threading.Event()
        self.emit = emit
        self.flagged = flagged
        """Called with each patient that has findings, as evaluated (``run --report``)."""
        self.hook = checkpoint_hook
        self.now = now
        self.shard_map = shard_map
        """``run --bulk``: the executor the shards of a full export are evaluated on (entered
        only when there are shards; ``None``: in this process)."""
        self.server = server_key(client.base_url)
        # The mapped LOINC codes without a system: a server matches them under LOINC's OID or a
        # differently written system too, which the rule core reads or reports (issue 7 §3).
        self.codes = ",".join(sorted(knowledge.loinc))
        self.code_param = "code"
        """``combo-code`` (the Observation's code or a component's: a CBC sent as components)
        when the server lists it, else ``code`` (set from metadata by :meth:`run`)."""
        self.finding_codes = ",".join(f"{FINDING_SYSTEM}|{k.value}" for k in FindingKind)
        active = profiles.profiles or tuple(lp.profile for lp in profiles.loaded)
        self.lookback = timedelta(days=max((p.settings.lookback_days for p in active), default=30))
        # The trend in the explanation reaches back trend_days before the latest result.
        self.window = self.lookback + timedelta(
            days=max((p.settings.trend_days for p in active), default=180)
        )
        # A drug given this long before a count is still implicated in it.
        self.drug_window = timedelta(
            days=max((p.settings.drug_window_days for p in active), default=30)
        )
        self._hook_counts: Counter[str] = Counter()
        self._sorts: dict[str, str] = {}
        self.walker = Walker(self.search, self.stop, self.sort, window_size=options.window_size)

    # -- helpers --------------------------------------------------------------------------------

    def point(self, name: str) -> None:
        """A named point of the pass (after a write, after a fetch, after a checkpoint): the test
        hook of ``fhir-leuko run`` can pause there so that tests kill -9 at exact moments."""
        self._hook_counts[name] += 1
        if self.hook is not None:
            self.hook(name, self._hook_counts[name])

    def search(self, rtype: str, params: list[tuple[str, str]]) -> Iterator[bytes]:
        check_search_params(rtype, params)  # only R4 parameters reach a server
        return self.client.search(rtype, params)

    def observation_code_param(self) -> str:
        """``combo-code`` when the server's CapabilityStatement lists it for Observation (R4:
        code or component code), so a CBC sent as one Observation with components is found;
        else ``code``, and a warning that such CBCs cannot be found on this server."""
        listed = self.client.search_params("Observation")
        if listed is not None and "combo-code" in listed:
            return "combo-code"
        log.warning(
            "the server does not list the Observation search parameter combo-code: a blood count "
            "sent as one Observation with components (WBC, ANC as component.code) cannot be "
            "found by search on this server"
        )
        return "code"

    def sort(self, rtype: str) -> str:
        """The ``_sort`` of every paged search of a type: ``_lastUpdated``, with ``_id`` as the
        tie-breaker when the CapabilityStatement lists ``_id`` for the type."""
        if rtype not in self._sorts:
            listed = self.client.search_params(rtype)
            if listed is not None and "_lastUpdated" not in listed:
                log.warning(
                    "the server's CapabilityStatement does not list _lastUpdated for %s: sorting "
                    "by it all the same (paging is checked for a stable order)",
                    rtype,
                )
            tie = listed is not None and "_id" in listed
            self._sorts[rtype] = "_lastUpdated,_id" if tie else "_lastUpdated"
        return self._sorts[rtype]

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
            self.code_param = self.observation_code_param()
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
            if opts.bulk_dir is not None and opts.mode != "patients":
                bulk_pass(passer, report, opts.bulk_dir, stored)
            elif opts.mode == "patients":
                keys = [k for k in (as_patient(p) for p in opts.patients) if k]
                passer.process(keys, checkpoint=None)
            elif opts.mode == "full" or (stored is None and opts.since is None):
                keys = full_patients(self, report, as_of)
                recent: list[Change] = []
                if stored is None:
                    # First run: also the changes just before the server's start time, which the
                    # next run's overlap re-reads; they are remembered as handled.
                    recent = ChangeWalk(self, report, server_start, set()).all()
                    keys = sorted(set(keys) | {c.patient for c in recent})
                passer.process(keys, checkpoint=None)
                if stored is None and not report.interrupted and report.aborted is None:
                    handled = [(c.resource, c.last_updated) for c in recent]
                    passer.commit([], [], server_start, handled)
            else:
                since = format_instant(opts.since) if opts.since else stored
                assert since is not None
                passer.incremental(since, server_start)
        except Stopped:
            # SIGTERM/SIGINT between two requests: what was committed stays, the rest is redone.
            report.interrupted = True
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


class _Pass:
    """One pass over its patients, group by group: fetch, evaluate, plan, write, checkpoint.

    A group whose fetch fails for good is retried patient by patient, so one bad record fails only
    its patient; a server unavailable for several groups in a row stops the pass (:class:`_Outage`).
    """

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
        self.lock = lock
        self.opts = job.options
        self.server = job.server
        self.outages = 0
        self.deferred: set[str] = set()
        """Patients that failed because the server was unavailable: in an incremental pass they
        are not recorded as pending; the watermark stays before their changes instead."""
        self.bar: tqdm[Any] | None = None
        self.planner = Planner(job, report.actions, as_of)
        self.fetched: set[tuple[str, str]] | None = None
        """Versions of changeable resources fetched in this pass, kept while more batches of
        changes follow (:meth:`not_yet_evaluated`)."""
        self.evaluated: set[str] = set()
        """Patients fetched, evaluated and written in this pass (:meth:`group`; a full bulk pass
        keeps none: its batches do not overlap, and it would hold a whole population's keys)."""
        self.writer = Writer(job, report.actions, run_id, use_tx, self.deferred, self.outage)

    def incremental(self, since: str, server_start: str) -> None:
        """Batches of changes since the watermark, checkpointed group by group.

        ``server_start`` is the server's time before the change searches: once every change they
        returned is handled, the watermark may move there (the overlap covers late commits), so a
        quiet server costs one search per change type."""
        state = self.job.state
        seen = state.seen(self.server) if state is not None else set()
        walk = ChangeWalk(self.job, self.report, since, seen)
        pending = list(state.pending(self.server)) if state is not None else []
        while True:
            changes, capped = walk.batch()
            changes = self.not_yet_evaluated(changes)
            batch = Batch.of(changes, capped, server_start)
            # A later batch follows: remember what this one's patients were evaluated with.
            self.fetched = set() if capped and self.fetched is None else self.fetched
            self.process(batch.order(pending), checkpoint=batch.checkpointer(self.commit))
            pending = []
            if self.report.interrupted or self.report.aborted or not capped:
                return
            log.info("more changes than one batch holds: the next batch continues the walk")

    def not_yet_evaluated(self, changes: list[Change]) -> list[Change]:
        """The changes whose patient this pass has not evaluated with that very version yet.

        A patient whose changes straddle two batches is evaluated once: its later change was
        already in what the earlier batch fetched for it. (A change that was not, e.g. one
        committed after that fetch, makes the patient evaluated again.) The versions skipped are
        recorded as handled at once."""
        if not self.fetched:
            return changes
        skip = [
            c
            for c in changes
            if c.patient in self.evaluated and (c.resource, c.last_updated) in self.fetched
        ]
        if not skip:
            return changes
        self.commit([], [], None, [(c.resource, c.last_updated) for c in skip])
        skipped = {id(c) for c in skip}
        return [c for c in changes if id(c) not in skipped]

    def process(
        self,
        patients: list[str],
        *,
        checkpoint: Checkpoint | None,
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
                    with patients_in_scope(self.server, group):  # their ids: pseudonyms in logs
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

    def record(self, done: list[str], failed: list[tuple[str, str]]) -> None:
        """Report and commit one group's outcome (``run --bulk``'s groups)."""
        for patient, reason in failed:
            alias = pseudonym(self.server, patient)
            text = self.scrub(reason, [patient])
            self.report.failed.append((alias, text))
            log.error("patient %s failed: %s", alias, text)
        if len(done) + len(failed) == 0 and self.job.stop.is_set():
            self.report.interrupted = True
        self.commit(done, failed, None)

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
        self.job.point("checkpoint")

    def group(self, group: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
        """Fetch, evaluate and write a group of patients.

        One bad record, or one bad answer, fails only its patient: a fetch that fails for good
        (a search refused, a page that is not JSON twice, a cyclic next link) and data the rule
        core cannot use (anything it raises) send the group's patients through again one by one,
        and what still fails then fails that patient alone, named with the reason; the pass goes on
        with every other patient."""
        try:
            items, existing = fetch(self.job, group, self.as_of)
        except (AuthError, LockError):
            raise
        except FhirTemporaryError as exc:
            self.outage(exc)
            if len(group) == 1:
                self.deferred.add(group[0])
                return [], [(group[0], str(exc))]
            return self.split(group)
        except FhirError as exc:
            return self.one_by_one(group, "a group fetch failed", str(exc))
        except Exception as exc:  # an answer fhir-leuko cannot use: fails its group, not the pass
            return self.one_by_one(group, "a group fetch failed", _unusable("the answer", exc))
        self.outages = 0
        self.job.point("fetched")
        if self.fetched is not None:
            self.fetched.update(_versions(items))
        try:
            dataset = normalise(items, self.job.knowledge)
        except Exception as exc:  # a resource the core cannot use: find whose, fail only them
            return self.one_by_one(group, "reading a group's data failed", _unusable("its data", exc))
        self.report.problems.extend(dataset.problems)
        done, failed = self.settle(group, dataset.merged, self.judge_in(dataset), existing)
        self.evaluated.update(done)
        return done, failed

    def judge_in(self, dataset: Dataset) -> Callable[[str], Verdict]:
        """The verdict on a patient of ``dataset``, evaluated in this process."""
        profiles, as_of = self.job.profiles, self.as_of
        return lambda patient: judge(
            dataset.patients.get(patient) or PatientRecord(patient), profiles, as_of
        )

    def settle(
        self,
        group: list[str],
        merged: Mapping[str, str],
        verdict: Callable[[str], Verdict],
        existing: ExistingView,
    ) -> tuple[list[str], list[tuple[str, str]]]:
        """Evaluate a group's records (``verdict``: here or already on a worker), plan and
        write: the patients done and failed. ``merged``: the records a ``Patient.link`` replaced
        -> the surviving one."""
        planned: dict[str, list[Write]] = {}
        done: list[str] = []
        failed: list[tuple[str, str]] = []
        for patient in group:
            if self.job.stop.is_set():
                break
            if self.bar is not None:
                self.bar.update(1)
            # A record replaced by another (Patient.link): its resources count for the survivor,
            # who is evaluated (once) and alerted instead; nothing is written for the retired one.
            target = merged.get(patient, patient)
            if target != patient:
                planned[patient] = []
            if target in planned:
                continue
            patient = target
            judged = verdict(patient)
            if judged.failure is not None:
                failed.append((patient, judged.failure))
                continue
            record, findings = judged.record, judged.findings
            self.report.patients += 1
            for finding in findings:
                self.report.findings[(finding.kind.value, finding.severity)] += 1
            if findings and self.job.flagged is not None:
                self.job.flagged(record, findings)
            try:
                planned[patient] = self.planner.plan(
                    patient, record, findings, existing.get(patient, {})
                )
            except ValueError as exc:  # the planner's own refusals say what to do
                failed.append((patient, str(exc)))
            except Exception as exc:
                failed.append((patient, _unusable("its DetectedIssues", exc)))
        ok, bad = self.writer.write(planned)
        done.extend(ok)
        failed.extend(bad)
        return done, failed

    def scrub(self, text: str, patients: Iterable[str]) -> str:
        return scrub(text, self.server, patients)

    def one_by_one(
        self, group: list[str], what: str, reason: str
    ) -> tuple[list[str], list[tuple[str, str]]]:
        """A group failed for a reason that may be one patient's: its patients one by one (one
        alone fails with ``reason``)."""
        if len(group) == 1:
            return [], [(group[0], reason)]
        log.warning("%s (%s); its patients one by one", what, self.scrub(reason, group))
        return self.split(group)

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


_CHANGEABLE = {
    Observation: "Observation",
    DiagnosticReportStruct: "DiagnosticReport",
    MedicationRequest: "MedicationRequest",
    MedicationStatement: "MedicationStatement",
}


def _versions(items: Iterable[Sourced | Problem]) -> Iterator[tuple[str, str]]:
    """(``Type/id``, ``meta.lastUpdated``) of the fetched resources a change walk reports."""
    for item in items:
        if isinstance(item, Problem):
            continue
        resource = item[0]
        if isinstance(resource, Unread):
            continue
        rtype = _CHANGEABLE.get(type(resource))
        meta = getattr(resource, "meta", None)
        if rtype and meta is not None and meta.lastUpdated:
            yield f"{rtype}/{resource.id}", meta.lastUpdated
