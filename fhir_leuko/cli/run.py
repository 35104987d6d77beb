"""``fhir-leuko run`` (one pass against a FHIR server) and ``fhir-leuko watch`` (passes on a
schedule). The work is in :mod:`fhir_leuko.job.runner`; this module reads the configuration, sets up
logging, signals and the state file, and prints the summary."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

import orjson
from cronsim import CronSim, CronSimError

from ..core.model import Finding, PatientRecord, quoted
from ..errors import (
    AuthError,
    ExitCode,
    FhirError,
    FhirLeukoError,
    LockError,
    UsageError,
    exit_code_table,
)
from ..fhir.client import FhirClient, RetryPolicy
from ..fhir.privacy import install_log_scrubbing
from ..files.documents import load_knowledge, load_profiles
from ..files.executors import ShardMap
from ..job.bulkshards import BulkScale
from ..job.config import (
    JobConfig,
    build_auth,
    load_job_config,
    parse_interval,
    resolve_state_path,
)
from ..job.metrics import JobMetrics, PassOutcome, parse_listen
from ..job.runner import Job, JobOptions, Mode, PassReport
from ..job.state import State
from ..job.walk import interruptible_sleep
from .formats import check_report_target, write_report
from .options import parse_instant
from .scale import ScaleOptions, add_scale_options, shard_executor, shards_flag

__all__ = [
    "JsonFormatter",
    "add_connection_options",
    "build_client",
    "connection_flags",
    "pass_exit_code",
    "register",
    "schedule_from",
]

log = logging.getLogger("fhir_leuko.run")

_RUN_HELP = "one pass against a FHIR server: evaluate changed patients, write DetectedIssues once"
_WATCH_HELP = "run passes on a schedule (--every 15m or --cron '*/15 * * * *') until stopped"

_CONFIG_EPILOG = """\
configuration (flags > FHIR_LEUKO_<TABLE>_<KEY> environment variables > --config TOML file):
  [fhir]  server, timeout, connect_timeout, verify, ca_bundle, headers, page_size,
          retry_attempts, retry_total              e.g. FHIR_LEUKO_FHIR_SERVER
  [auth]  method (none|basic|bearer|client-credentials|smart-backend), username, password[_file],
          token[_file], client_id, client_secret[_file], client_auth (basic|post),
          private_key_file, key_id, algorithm (RS384|ES384), token_url, scope
                                                   e.g. FHIR_LEUKO_AUTH_CLIENT_SECRET
  [run]   overlap, patients_per_request, write_mode, transactions, max_changes, profiles,
          profile, log_format, every, cron, stale_lock_after, bulk, bulk_dir,
          metrics_textfile, metrics_pushgateway, metrics_listen (watch)
  [state] path, dir                                e.g. FHIR_LEUKO_STATE_PATH, FHIR_LEUKO_STATE_DIR
  [scale] workers, dask_scheduler, work_dir        (run --bulk, evaluate; docs/population.md)
  Secrets are never flags: use the environment or *_file settings. See docs/scheduled-job.md.
"""

_RUN_EPILOG = f"""\
what a pass does:
  Finds the patients whose lab Observations, DiagnosticReports, MedicationRequests or
  MedicationStatements changed since the last run (the watermark in the state file; the first
  run takes every patient with labs in the lookback), fetches their data in a few searches per
  group of patients, evaluates them with the profiles, and writes one DetectedIssue per patient
  and finding: new ones by conditional create, changed ones as 'amended' (If-Match), recovered
  ones resolved (kept, with a 'count recovered' mitigation). Re-running never duplicates, also
  after a crash or kill -9. Only one run writes to a server at a time (a lock in the state file).

examples:
  fhir-leuko run --server https://ehr.example.org/fhir
  fhir-leuko run --config /etc/fhir-leuko/job.toml --log-format json
  FHIR_LEUKO_AUTH_CLIENT_SECRET=... fhir-leuko run --server URL --auth client-credentials \\
      --client-id fhir-leuko
  fhir-leuko run --server URL --auth smart-backend --client-id fhir-leuko \\
      --private-key-file /run/secrets/fhir-leuko.pem --key-id 2026-11
  fhir-leuko run --server URL --dry-run > would-write.ndjson
  fhir-leuko run --server URL --patient 123 --patient 456 --as-of 2026-11-20
  fhir-leuko run --server URL --full           # every patient with labs in the lookback

{exit_code_table(tuple(ExitCode), "stopped by signal N within seconds, before the next request (130 Ctrl-C, 143 SIGTERM)")}
{_CONFIG_EPILOG}"""

_WATCH_EPILOG = f"""\
The first pass starts at once, the next ones on the schedule (cron expressions are in UTC).
A pass that fails (server down, token refused, an unexpected error) is logged and the next one
runs on schedule. SIGTERM or Ctrl-C stops within seconds, between two requests, keeping the
progress made (a second Ctrl-C stops at once).
Each pass's "pass finished" log line carries the exit code 'run' would have given for it
("exit_code" with --log-format json; see 'fhir-leuko run --help').

examples:
  fhir-leuko watch --server https://ehr.example.org/fhir --every 15m
  fhir-leuko watch --config /etc/fhir-leuko/job.toml --cron "*/15 * * * *" --log-format json

exit codes (of the watch process):
  0      stopped as asked (SIGTERM, Ctrl-C, --max-passes)
  2      usage or configuration error at start; no pass ran
  70     an unexpected error outside a pass (a bug): one line names it, -vv shows the traceback
  130    a second Ctrl-C stopped it at once

{_CONFIG_EPILOG}"""


def add_connection_options(parser: argparse.ArgumentParser) -> None:
    """The server, TLS and authentication flags (``run``, ``watch`` and ``export``)."""
    conn = parser.add_argument_group("server and authentication")
    conn.add_argument("--server", metavar="URL", help="FHIR R4 base URL, e.g. https://host/fhir")
    conn.add_argument("--config", metavar="FILE", type=Path, help="a TOML configuration file")
    conn.add_argument("--ca-bundle", metavar="FILE", type=Path, help="CA certificates for TLS")
    conn.add_argument("--timeout", metavar="SECONDS", type=float, help="read timeout (default 60)")
    conn.add_argument(
        "--header",
        metavar="'NAME: VALUE'",
        action="append",
        default=[],
        help="an extra header on every FHIR request (repeatable)",
    )
    conn.add_argument(
        "--auth",
        choices=("none", "basic", "bearer", "client-credentials", "smart-backend"),
        help="authentication method (default none)",
    )
    conn.add_argument("--username", metavar="NAME", help="basic auth user name")
    conn.add_argument("--password-file", metavar="FILE", type=Path, help="basic auth password")
    conn.add_argument("--token-file", metavar="FILE", type=Path, help="static bearer token")
    conn.add_argument("--client-id", metavar="ID", help="OAuth2 / SMART client id")
    conn.add_argument(
        "--client-secret-file", metavar="FILE", type=Path, help="OAuth2 client secret"
    )
    conn.add_argument(
        "--private-key-file",
        metavar="FILE",
        type=Path,
        help="SMART Backend Services private key (PEM; RSA → RS384, EC P-384 → ES384)",
    )
    conn.add_argument("--key-id", metavar="KID", help="the key's kid in your JWKS")
    conn.add_argument(
        "--token-url", metavar="URL", help="token endpoint (default: SMART discovery)"
    )
    conn.add_argument("--scope", metavar="SCOPES", help="scopes to request (space-separated)")


def _add_common(parser: argparse.ArgumentParser) -> None:
    add_connection_options(parser)
    what = parser.add_argument_group("what to evaluate")
    what.add_argument(
        "--bulk",
        action="store_true",
        default=None,
        help="take the patients from a Bulk Data $export (the first pass and --full: everyone, "
        "evaluated from the export; later passes: _since the watermark); docs/population.md",
    )
    select = what.add_mutually_exclusive_group()
    select.add_argument(
        "--full", action="store_true", help="every patient with labs in the lookback"
    )
    select.add_argument(
        "--patient",
        metavar="ID",
        action="append",
        default=[],
        help="only this patient (id or Patient/id; repeatable; the watermark does not move)",
    )
    select.add_argument(
        "--since", metavar="DATETIME", help="changes since this time instead of the watermark"
    )
    what.add_argument(
        "--as-of",
        metavar="DATETIME",
        help="evaluate as of this time (backfills, tests; a bare date is the end of that day, "
        "UTC; default: now)",
    )
    what.add_argument(
        "--profiles",
        metavar="DIR",
        type=Path,
        action="append",
        default=None,
        help="site profiles directory (repeatable)",
    )
    what.add_argument(
        "--profile",
        metavar="ID",
        action="append",
        default=None,
        help="evaluate only this profile (repeatable)",
    )
    add_scale_options(parser, config=False, bulk=True)

    how = parser.add_argument_group("writing, state and output")
    how.add_argument(
        "--dry-run",
        action="store_true",
        help="write nothing (server and state); print what would be written as NDJSON",
    )
    how.add_argument(
        "--write-mode",
        choices=("conditional", "put"),
        help="new DetectedIssues by conditional create (default) or PUT of the deterministic id",
    )
    how.add_argument(
        "--transactions",
        choices=("auto", "never"),
        help="transaction Bundles when metadata lists them (auto, default) or never",
    )
    how.add_argument(
        "--patients-per-request", metavar="N", type=int, help="patients per search (default 25)"
    )
    how.add_argument(
        "--overlap", metavar="DURATION", help="re-read this far before the watermark (default 5m)"
    )
    how.add_argument(
        "--state",
        metavar="FILE",
        type=Path,
        help="the state file (SQLite; default: state.sqlite3 in the state directory)",
    )
    how.add_argument(
        "--state-dir",
        metavar="DIR",
        type=Path,
        help="the state directory shared with serve (FHIR_LEUKO_STATE_DIR; default "
        "$XDG_STATE_HOME/fhir-leuko, i.e. ~/.local/state/fhir-leuko)",
    )
    how.add_argument("--log-format", choices=("text", "json"), help="log lines as text or JSON")
    how.add_argument(
        "--no-progress", action="store_true", help="no progress bar even on a terminal"
    )
    metrics = parser.add_argument_group("monitoring (Prometheus; docs/scheduled-job.md)")
    metrics.add_argument(
        "--metrics-textfile",
        metavar="FILE.prom",
        type=Path,
        help="after each pass, write its outcome for node_exporter's textfile collector "
        "(atomically)",
    )
    metrics.add_argument(
        "--metrics-pushgateway",
        metavar="URL",
        help="after each pass, push its outcome to this Prometheus Pushgateway",
    )


def _add_report(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--report",
        metavar="FILE",
        type=Path,
        help=f"also write a self-contained HTML report of {what} (trend plots; holds patient "
        "data: keep it like the server's data)",
    )


def _collect_flagged(
    args: argparse.Namespace, job: Job
) -> list[tuple[PatientRecord, list[Finding]]]:
    """With ``--report``: the list the pass's flagged patients are gathered in, for the report."""
    flagged: list[tuple[PatientRecord, list[Finding]]] = []
    if args.report is not None:
        job.flagged = lambda record, findings: flagged.append((record, findings))
    return flagged


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = sub.add_parser(
        "run",
        help=_RUN_HELP,
        description=f"fhir-leuko run: {_RUN_HELP}.",
        epilog=_RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(run)
    _add_report(run, "this pass's findings")
    run.set_defaults(handler=run_command)
    watch = sub.add_parser(
        "watch",
        help=_WATCH_HELP,
        description=f"fhir-leuko watch: {_WATCH_HELP}.",
        epilog=_WATCH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(watch)
    _add_report(watch, "each pass's findings, replacing the previous pass's report")
    schedule = watch.add_argument_group("schedule")
    schedule.add_argument("--every", metavar="DURATION", help="e.g. 15m, 1h, 90s")
    schedule.add_argument("--cron", metavar="EXPR", help="a 5-field cron expression (UTC)")
    schedule.add_argument(
        "--max-passes", metavar="N", type=int, help="stop after N passes (tests, debugging)"
    )
    watch.add_argument(
        "--metrics-listen",
        metavar="[HOST:]PORT",
        help="serve the passes' metrics at http://HOST:PORT/metrics (host default 127.0.0.1)",
    )
    watch.set_defaults(handler=watch_command)


# -- configuration ---------------------------------------------------------------------------


def connection_flags(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The ``[fhir]`` and ``[auth]`` flags of :func:`add_connection_options`, in the TOML layout."""
    headers: dict[str, str] = {}
    for text in args.header:
        name, sep, value = text.partition(":")
        if not sep or not name.strip():
            raise UsageError(f"--header {text!r}: expected 'Name: value'")
        headers[name.strip()] = value.strip()
    tables: dict[str, dict[str, Any]] = {
        "fhir": {
            "server": args.server,
            "ca_bundle": args.ca_bundle,
            "timeout": args.timeout,
            "headers": headers or None,
        },
        "auth": {
            "method": args.auth,
            "username": args.username,
            "password_file": args.password_file,
            "token_file": args.token_file,
            "client_id": args.client_id,
            "client_secret_file": args.client_secret_file,
            "private_key_file": args.private_key_file,
            "key_id": args.key_id,
            "token_url": args.token_url,
            "scope": args.scope,
        },
    }
    return {
        table: {k: v for k, v in values.items() if v is not None}
        for table, values in tables.items()
    }


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    """The flags actually given, as a nested dict in the TOML layout."""
    tables: dict[str, dict[str, Any]] = {
        **connection_flags(args),
        "run": {
            "bulk": args.bulk,
            "write_mode": args.write_mode,
            "transactions": args.transactions,
            "patients_per_request": args.patients_per_request,
            "overlap": args.overlap,
            "log_format": args.log_format,
            "profiles": args.profiles,
            "profile": args.profile,
            "every": getattr(args, "every", None),
            "cron": getattr(args, "cron", None),
            "metrics_textfile": args.metrics_textfile,
            "metrics_pushgateway": args.metrics_pushgateway,
            "metrics_listen": getattr(args, "metrics_listen", None),
        },
        "state": {"path": args.state, "dir": args.state_dir},
        "scale": {
            "workers": args.workers,
            "dask_scheduler": args.dask_scheduler,
            "work_dir": args.work_dir,
        },
    }
    return {
        table: {k: v for k, v in values.items() if v is not None}
        for table, values in tables.items()
    }


def _instant(flag: str, text: str | None) -> datetime | None:
    return None if text is None else parse_instant(flag, text)


def _options(config: JobConfig, args: argparse.Namespace) -> JobOptions:
    mode: Mode = "patients" if args.patient else "full" if args.full else "incremental"
    return JobOptions(
        mode=mode,
        patients=tuple(args.patient),
        since=_instant("--since", args.since),
        as_of=_instant("--as-of", args.as_of),
        dry_run=args.dry_run,
        write_mode=config.run.write_mode,
        transactions=config.run.transactions,
        patients_per_request=config.run.patients_per_request,
        page_size=config.fhir.page_size,
        overlap=config.overlap(),
        max_changes=config.run.max_changes,
        stale_lock_after=config.stale_lock_after(),
        progress=sys.stderr.isatty() and not args.no_progress,
    )


def build_client(config: JobConfig, stop: threading.Event | None = None) -> FhirClient:
    """The FHIR client of the ``[fhir]`` and ``[auth]`` configuration; its retry waits end when
    ``stop`` is set (SIGTERM/SIGINT)."""
    fhir = config.fhir
    if not fhir.server:
        raise UsageError(
            "no FHIR server: give --server URL, FHIR_LEUKO_FHIR_SERVER or [fhir] server in --config"
        )
    if fhir.ca_bundle is not None and not fhir.ca_bundle.is_file():
        raise UsageError(f"--ca-bundle {fhir.ca_bundle}: no such file")
    verify: bool | str = str(fhir.ca_bundle) if fhir.ca_bundle else fhir.verify
    if verify is False:
        log.warning("TLS certificate verification is OFF ([fhir] verify = false)")
    return FhirClient(
        fhir.server,
        auth=build_auth(config),
        timeout=(fhir.connect_timeout, fhir.timeout),
        verify=verify,
        retry=RetryPolicy(max_attempts=fhir.retry_attempts, max_total=fhir.retry_total),
        headers=fhir.headers,
        sleep=interruptible_sleep(stop) if stop else time.sleep,  # ends at SIGTERM/SIGINT
    )


# -- logging --------------------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """One JSON object per log line (``run``, ``watch`` and ``serve`` with ``--log-format json``)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info or record.exc_text:
            # exc_text: the traceback as the log scrubber left it (patients as pseudonyms)
            text = record.exc_text or self.formatException(record.exc_info)  # type: ignore[arg-type]
            out["error"] = text.splitlines()[-1]
        return orjson.dumps(out).decode()


def _setup_logging(fmt: str, verbose: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("fhir-leuko: %(levelname)s: %(message)s"))
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, handlers=[handler], force=True
    )
    # Patients as pseudonyms in every line, urllib3's request lines (query strings) silenced.
    install_log_scrubbing()


def _print_report(report: PassReport, fmt: str) -> None:
    code = pass_exit_code(report)
    if fmt == "json":
        for problem in report.problems[:50]:
            fields = {"event": "input.problem", "problem": str(problem)}
            log.warning("input problem", extra={"fields": fields})
        finished = {"event": "pass.finished", **report.as_dict(), "exit_code": code}
        log.info("pass finished", extra={"fields": finished})
        return
    for line in report.summary_lines():
        print(f"fhir-leuko: {line}", file=sys.stderr)
    print(f"fhir-leuko: pass finished: {report.status} (exit code {code})", file=sys.stderr)
    for alias, reason in report.failed[:20]:
        print(f"fhir-leuko: failed: patient {alias}: {reason}", file=sys.stderr)
    for problem in report.problems[:50]:
        print(f"problem: {problem}", file=sys.stderr)
    if len(report.problems) > 50:
        print(f"problem: ... and {len(report.problems) - 50} more", file=sys.stderr)


# -- signals and the test hook ----------------------------------------------------------------


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[list[int]]:
    """SIGTERM/SIGINT set ``stop`` (the pass stops before its next request); a second SIGINT
    interrupts."""
    received: list[int] = []

    def handle(signum: int, frame: FrameType | None) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        received.append(signum)
        stop.set()
        log.warning("%s received: stopping before the next request", signal.Signals(signum).name)

    previous = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def _test_pause_hook() -> Callable[[str, int], None] | None:
    """``FHIR_LEUKO_TEST_PAUSE=write:2`` makes the process stop dead (sleep) at the 2nd write,
    after writing its pid to ``FHIR_LEUKO_TEST_PAUSE_FILE``, so that a test can kill -9 it at that
    exact point. Points: ``fetched`` (a group's data read), ``write`` (a write request answered),
    ``checkpoint`` (progress committed to the state file). Test use only."""
    spec = os.environ.get("FHIR_LEUKO_TEST_PAUSE")
    if not spec:
        return None
    name, _, number = spec.partition(":")
    target = int(number or "1")
    marker = os.environ.get("FHIR_LEUKO_TEST_PAUSE_FILE")

    def hook(point: str, count: int) -> None:
        if point == name and count == target:
            if marker:
                Path(marker).write_text(str(os.getpid()), encoding="ascii")
            while True:
                time.sleep(3600)

    return hook


# -- commands --------------------------------------------------------------------------------


def _setup(args: argparse.Namespace) -> tuple[JobConfig, Job, State | None]:
    config = load_job_config(_flags(args), args.config)
    _setup_logging(config.run.log_format, args.verbose)
    options = _options(config, args)
    knowledge = load_knowledge()
    profiles = load_profiles(knowledge, config.run.profiles)
    if config.run.profile:
        profiles = profiles.select(config.run.profile)
    stop = threading.Event()
    client = build_client(config, stop)
    state_path = resolve_state_path(config)
    shard_map = None
    if config.run.bulk and options.mode != "patients":
        bulk_dir = config.run.bulk_dir or state_path.parent / "fhir-leuko-bulk"
        scale, shard_map = _bulk_scale(config, args)
        options = dataclasses.replace(options, bulk_dir=bulk_dir, scale=scale)
    else:
        _unused_scale_flags(args)
    # A dry run changes nothing, the state file included: with no file yet it runs as a first pass.
    state = None if options.dry_run and not state_path.exists() else State(state_path)
    emit = None
    if options.dry_run:

        def emit(resource: dict[str, Any]) -> None:
            sys.stdout.buffer.write(orjson.dumps(resource) + b"\n")
            sys.stdout.buffer.flush()

    job = Job(
        client,
        knowledge,
        profiles,
        options,
        state=state,
        stop=stop,
        emit=emit,
        checkpoint_hook=_test_pause_hook(),
        shard_map=shard_map,
    )
    return config, job, state


def _bulk_scale(
    config: JobConfig, args: argparse.Namespace
) -> tuple[BulkScale, Callable[[], AbstractContextManager[ShardMap]] | None]:
    """``[scale]`` for ``run --bulk``: how a full export is sharded, and the executor its shards
    are evaluated on (``None``: in this process)."""
    scale = config.scale
    settings = BulkScale(
        shards=shards_flag(args),
        workers=scale.workers,
        work_dir=scale.work_dir,
        profile_dirs=tuple(str(d) for d in config.run.profiles),
        select=tuple(config.run.profile),
    )
    if scale.workers <= 1 and not scale.dask_scheduler:
        return settings, None
    where = (
        f"on the Dask cluster at {scale.dask_scheduler}"
        if scale.dask_scheduler
        else f"on {scale.workers} local worker processes"
    )
    settings = dataclasses.replace(settings, evaluated_on=where)
    options = ScaleOptions(scale.workers, scale.dask_scheduler, scale.work_dir)
    return settings, partial(shard_executor, options)


def _unused_scale_flags(args: argparse.Namespace) -> None:
    """Population-scale flags without ``--bulk`` (or with ``--patient``): said, not ignored."""
    given = [
        flag
        for flag, value in (
            ("--workers", args.workers),
            ("--dask-scheduler", args.dask_scheduler),
            ("--work-dir", args.work_dir),
            ("--shards", args.shards),
        )
        if value is not None
    ]
    if given:
        log.warning(
            "%s: used by --bulk passes only (everyone from a Bulk Data export; not with "
            "--patient): this pass evaluates in this process",
            ", ".join(given),
        )


class _Monitoring:
    """Each pass's outcome to where monitoring reads it (``[run] metrics_*``): a textfile for
    node_exporter, a Pushgateway, ``/metrics`` of ``watch``. A dry run reports nothing (it is not
    the production pass). Failing to export is a warning: the pass itself went as it went."""

    def __init__(self, config: JobConfig, job: Job, state: State | None) -> None:
        self.config = config.run
        self.job = job
        self.state = state
        self.metrics = JobMetrics()
        self.enabled = not job.options.dry_run
        textfile = self.config.metrics_textfile
        if textfile is not None and textfile.suffix != ".prom":
            raise UsageError(
                f"--metrics-textfile {textfile}: node_exporter's textfile collector reads only "
                "*.prom files"
            )

    def listen(self) -> Any:
        if self.config.metrics_listen is None:
            return None
        host, port = parse_listen(self.config.metrics_listen)
        server = self.metrics.serve(host, port)
        log.info("metrics at http://%s:%d/metrics", host, port)
        return server

    @contextmanager
    def pass_(self, exit_code: Callable[[PassReport], int]) -> Iterator[Callable[[PassReport], None]]:
        """Time a pass; its report is handed to the callable yielded. An exception ends the pass
        without one: recorded as status ``error`` with the exit code it ends ``run`` with."""
        started = time.time()
        reports: list[PassReport] = []
        try:
            yield reports.append
        except BaseException as exc:
            code = int(exc.exit_code) if isinstance(exc, FhirLeukoError) else 130 if isinstance(exc, KeyboardInterrupt) else int(ExitCode.INTERNAL)
            self._record(started, None, code)
            raise
        report = reports[0]
        self._record(started, report, exit_code(report))

    def _record(self, started: float, report: PassReport | None, code: int) -> None:
        if not self.enabled:
            return
        finished = time.time()
        server = self.job.server
        last_success: float | None = None
        if code in (ExitCode.OK, ExitCode.INPUT_PROBLEMS) and report is not None:
            last_success = finished
            if self.state is not None:
                self.state.set_last_success(
                    server, datetime.fromtimestamp(finished, UTC).isoformat(timespec="seconds")
                )
        elif self.state is not None:
            noted = self.state.last_success(server)
            last_success = datetime.fromisoformat(noted).timestamp() if noted else None
        self.metrics.record(PassOutcome(server, code, started, finished, report, last_success))
        try:
            if self.config.metrics_textfile is not None:
                self.metrics.write_textfile(self.config.metrics_textfile)
            if self.config.metrics_pushgateway:
                self.metrics.push(self.config.metrics_pushgateway, server)
        except Exception as exc:  # monitoring must not change the pass's outcome
            log.warning("could not export the pass's metrics: %s: %s", type(exc).__name__, quoted(str(exc)))


def pass_exit_code(report: PassReport, signum: int | None = None) -> int:
    """A pass's exit code (fhir_leuko.errors.ExitCode; the one mapping from a report): what
    failed outranks what was only noted. A pass stopped by signal N exits 128 + N."""
    if report.interrupted and signum is not None:
        return 128 + signum
    if report.failed or report.aborted is not None or report.interrupted:
        return int(ExitCode.INCOMPLETE)
    if report.problems:
        return int(ExitCode.INPUT_PROBLEMS)
    return int(ExitCode.OK)


def run_command(args: argparse.Namespace) -> int:
    if args.report is not None:
        check_report_target(args.report)  # before the state file is opened or the server asked
    config, job, state = _setup(args)
    fmt = config.run.log_format
    flagged = _collect_flagged(args, job)
    metrics = _Monitoring(config, job, state)
    try:
        with (
            _stop_on_signals(job.stop) as received,
            metrics.pass_(lambda r: pass_exit_code(r, received[0] if received else None)) as done,
        ):
            report = job.run()
            done(report)
        _print_report(report, fmt)
        if args.report is not None:
            write_report(args.report, report, flagged, job.profiles, config.fhir.server or "")
        return pass_exit_code(report, received[0] if received else None)
    finally:
        job.client.close()
        if state is not None:
            state.close()


def schedule_from(config: JobConfig) -> Callable[[datetime], datetime]:
    """The next pass time after a given time, from ``every`` or ``cron`` (UTC)."""
    every, cron = config.run.every, config.run.cron
    if bool(every) == bool(cron):
        raise UsageError("watch needs exactly one of --every DURATION or --cron EXPR")
    if every:
        interval = parse_interval(every)
        if interval < timedelta(seconds=1):
            raise UsageError(f"--every {every}: at least 1s")
        return lambda after: after + interval
    assert cron is not None
    try:
        CronSim(cron, datetime.now(UTC))
    except CronSimError as exc:
        raise UsageError(f"--cron {cron!r}: {exc}") from None
    return lambda after: next(CronSim(cron, after))


def watch_command(args: argparse.Namespace) -> int:
    if args.report is not None:
        check_report_target(args.report)  # before the state file is opened or the server asked
    config, job, state = _setup(args)
    fmt = config.run.log_format
    flagged = _collect_flagged(args, job)
    next_after = schedule_from(config)
    passes = 0
    metrics = _Monitoring(config, job, state)
    listening = metrics.listen()
    try:
        with _stop_on_signals(job.stop):
            while not job.stop.is_set():
                started = datetime.now(UTC)
                flagged.clear()
                try:
                    with metrics.pass_(pass_exit_code) as done:
                        report = job.run()
                        done(report)
                    _print_report(report, fmt)
                    if args.report is not None:
                        server = config.fhir.server or ""
                        write_report(args.report, report, flagged, job.profiles, server)
                except LockError as exc:
                    log.warning("pass skipped: %s", exc)
                except AuthError as exc:
                    log.error("pass failed: authentication: %s", exc)
                except FhirError as exc:
                    log.error("pass failed (the next pass runs on schedule): %s", exc)
                except UsageError as exc:  # the --report file could not be written (disk full ...)
                    log.error("%s (the next pass runs on schedule)", exc)
                except Exception as exc:  # a bug in one pass must not end the watcher
                    log.error(
                        "pass failed (the next pass runs on schedule): unexpected error "
                        "(%s: %s); this is a bug: -vv shows the traceback",
                        type(exc).__name__,
                        quoted(str(exc).replace("\n", " ")),
                        exc_info=exc if args.verbose >= 2 else None,
                    )
                passes += 1
                if args.max_passes and passes >= args.max_passes:
                    break
                due = next_after(started)
                now = datetime.now(UTC)
                while due <= now:  # a pass longer than the interval: skip the missed slots
                    due = next_after(due)
                log.info("next pass at %s", due.isoformat(timespec="seconds"))
                job.stop.wait((due - now).total_seconds())
        return int(ExitCode.OK)
    finally:
        if listening is not None:
            listening.shutdown()
            listening.server_close()
        job.client.close()
        if state is not None:
            state.close()
