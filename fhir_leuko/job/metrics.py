"""The job's passes as Prometheus metrics: a textfile for node_exporter's textfile collector, a push
to a Pushgateway, or ``/metrics`` served by ``watch`` (prometheus-client).

What monitoring needs to alert on a scheduled job is the outcome of its last pass, and when it last
succeeded. Every metric has the ``server`` label (the FHIR base URL; one deployment per server);
none carries patient data.

* ``fhir_leuko_job_last_pass_status{status}``: 1 for the last pass's status, 0 for the others
  (``ok``, ``partial``, ``interrupted``, ``failed``, ``error``: the pass raised before it had a
  report, e.g. the lock was held or the token refused), and ``…_exit_code``: what ``run`` exited
  with (docs/scheduled-job.md, exit codes);
* ``…_start_timestamp_seconds``, ``…_end_timestamp_seconds``, ``…_duration_seconds``;
* ``fhir_leuko_job_last_success_timestamp_seconds``: the end of the last pass that wrote
  everything (exit 0 or 1), kept in the state file so it survives restarts;
* counts of the last pass: ``…_findings{kind,severity}``, ``…_detectedissues{action}`` (written,
  updated, resolved, unchanged), ``…_patients_scanned``, ``…_patients_failed``,
  ``…_input_problems``, ``…_http_requests``, ``…_changes{resource_type}``;
* ``fhir_leuko_job_passes_total{status}``: passes since the process started (``watch``);
* ``fhir_leuko_build_info{version}``.

A textfile is written atomically (a temporary file in the same directory, then renamed), so the
collector never reads half a file.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, push_to_gateway, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import write_to_textfile
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from .._version import __version__
from ..errors import UsageError
from .runner import PassReport

__all__ = ["STATUSES", "JobMetrics", "PassOutcome", "parse_listen"]

STATUSES = ("ok", "partial", "interrupted", "failed", "error")
"""The values of the ``status`` label: a :class:`PassReport`'s status, or ``error``."""

_ACTIONS = (("written", "create"), ("updated", "update"), ("resolved", "resolve"), ("unchanged", "unchanged"))

JOB = "fhir-leuko"
"""The Pushgateway job name."""


@dataclass(frozen=True)
class PassOutcome:
    """One pass, as monitoring sees it."""

    server: str
    exit_code: int
    started: float
    """Unix time."""
    finished: float
    report: PassReport | None = None
    """``None`` when the pass raised before it had one (lock held, token refused, a bug)."""
    last_success: float | None = None

    @property
    def status(self) -> str:
        return self.report.status if self.report is not None else "error"


@dataclass(eq=False)  # a collector is registered by identity
class JobMetrics(Collector):
    """The last pass of each server, and the passes of this process; a prometheus-client
    collector (``registry.register(metrics)``)."""

    last: dict[str, PassOutcome] = field(default_factory=dict)
    passes: Counter[tuple[str, str]] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, outcome: PassOutcome) -> None:
        with self._lock:
            previous = self.last.get(outcome.server)
            if outcome.last_success is None and previous is not None:
                outcome = PassOutcome(**{**outcome.__dict__, "last_success": previous.last_success})
            self.last[outcome.server] = outcome
            self.passes[(outcome.server, outcome.status)] += 1

    def registry(self) -> CollectorRegistry:
        """A registry holding these metrics only (not the process's default metrics)."""
        registry = CollectorRegistry(auto_describe=True)
        registry.register(self)
        return registry

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            last = dict(self.last)
            passes = Counter(self.passes)
        info = GaugeMetricFamily("fhir_leuko_build_info", "fhir-leuko's version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        yield from _last_pass(last.values())
        total = CounterMetricFamily(
            "fhir_leuko_job_passes", "Passes run by this process, by status", labels=["server", "status"]
        )
        for (server, status), count in sorted(passes.items()):
            total.add_metric([server, status], count)
        yield total

    # -- where they go ------------------------------------------------------------------------

    def write_textfile(self, path: Path) -> None:
        """Write the metrics for node_exporter's textfile collector, atomically."""
        path.parent.mkdir(parents=True, exist_ok=True)
        write_to_textfile(str(path), self.registry())

    def push(self, gateway: str, server: str, timeout: float = 10.0) -> None:
        """PUT the metrics to a Pushgateway, grouped by job ``fhir-leuko`` and ``server``."""
        push_to_gateway(
            gateway, job=JOB, registry=self.registry(), grouping_key={"server": server}, timeout=timeout
        )

    def serve(self, host: str, port: int) -> WSGIServer:
        """Serve ``GET /metrics`` (any path) on ``host:port`` in a daemon thread; ``.shutdown()``
        stops it.

        Raises:
            UsageError: the address cannot be bound.
        """
        try:
            server, _thread = start_http_server(port, addr=host, registry=self.registry())
        except OSError as exc:
            raise UsageError(f"--metrics-listen {host}:{port}: cannot listen: {exc.strerror or exc}") from None
        return server


def parse_listen(text: str) -> tuple[str, int]:
    """``PORT``, ``HOST:PORT`` or ``[IPV6]:PORT`` (default host 127.0.0.1).

    Raises:
        UsageError: not an address with a port 1-65535.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError:
        raise UsageError(f"--metrics-listen {text!r}: expected [HOST:]PORT") from None
    if not 1 <= port <= 65535:
        raise UsageError(f"--metrics-listen {text!r}: port must be 1-65535")
    return host, port


def _gauge(name: str, documentation: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, labels=labels)


def _last_pass(outcomes: Iterable[PassOutcome]) -> Iterator[Metric]:
    prefix = "fhir_leuko_job_last_pass_"
    status = _gauge(prefix + "status", "1 for the status of the last pass, 0 for the others", ["server", "status"])
    exit_code = _gauge(prefix + "exit_code", "The exit code run gave (or would have given) for the last pass", ["server"])
    start = _gauge(prefix + "start_timestamp_seconds", "When the last pass started (Unix time)", ["server"])
    end = _gauge(prefix + "end_timestamp_seconds", "When the last pass ended (Unix time)", ["server"])
    duration = _gauge(prefix + "duration_seconds", "How long the last pass took", ["server"])
    success = _gauge(
        "fhir_leuko_job_last_success_timestamp_seconds",
        "When the last pass that wrote everything (exit 0 or 1) ended (Unix time)",
        ["server"],
    )
    findings = _gauge(prefix + "findings", "Findings of the last pass by kind and severity", ["server", "kind", "severity"])
    issues = _gauge(prefix + "detectedissues", "DetectedIssues of the last pass by action", ["server", "action"])
    scanned = _gauge(prefix + "patients_scanned", "Patients evaluated by the last pass", ["server"])
    failed = _gauge(prefix + "patients_failed", "Patients that failed in the last pass (retried next pass)", ["server"])
    problems = _gauge(prefix + "input_problems", "Input problems reported by the last pass", ["server"])
    requests = _gauge(prefix + "http_requests", "HTTP requests the last pass sent to the FHIR server", ["server"])
    changes = _gauge(prefix + "changes", "Changed resources the last pass read, by type", ["server", "resource_type"])
    for outcome in sorted(outcomes, key=lambda o: o.server):
        server = [outcome.server]
        for name in STATUSES:
            status.add_metric([outcome.server, name], 1 if name == outcome.status else 0)
        exit_code.add_metric(server, outcome.exit_code)
        start.add_metric(server, outcome.started)
        end.add_metric(server, outcome.finished)
        duration.add_metric(server, max(0.0, outcome.finished - outcome.started))
        if outcome.last_success is not None:
            success.add_metric(server, outcome.last_success)
        report = outcome.report
        if report is None:
            continue
        for (kind, severity), count in sorted(report.findings.items()):
            findings.add_metric([outcome.server, kind, severity], count)
        for label, action in _ACTIONS:
            issues.add_metric([outcome.server, label], report.actions[action])
        scanned.add_metric(server, report.patients)
        failed.add_metric(server, len(report.failed))
        problems.add_metric(server, len(report.problems))
        requests.add_metric(server, report.requests)
        for resource_type, count in sorted(report.changes.items()):
            changes.add_metric([outcome.server, resource_type], count)
    yield from (status, exit_code, start, end, duration, success, findings, issues, scanned, failed, problems, requests, changes)
