"""``fhir-leuko export`` (FHIR Bulk Data ``$export``) against the local test server: wall time and
HTTP requests of a full export and of an incremental one (``_since``).

``./dev bench export [--patients N] [--changed FRACTION]``

1. Starts sekmet-fhir 0.1.1 on 127.0.0.1 with an empty store and loads N synthetic patients (the
   same as ``./dev bench fhir_job``: a Patient, two CBCs of WBC, ANC and lymphocytes, a third on a
   drug, a fifth with a Condition).
2. **full**: a system-level export of what the profiles read (``_type``, ``_typeFilter`` on the
   mapped LOINC codes), polled, downloaded, verified, the job deleted.
3. **since**: a fraction of the patients gets a new count; an export with ``_since`` = the first
   export's ``transactionTime`` holds only those.

Requests are counted by the FhirClient (kick-off, status polls, downloads, DELETE; retries
included). The server waits up to a second before it reports an export complete, so most of the
time of a small export is that wait and the polls (``Retry-After: 1``).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from fhir_leuko.fhir.bulk import BulkExport, ExportRequest, ExportResult, observation_filter
from fhir_leuko.fhir.client import FhirClient
from fhir_leuko.files.documents import load_knowledge
from fhir_leuko.testing.sekmet import SekmetServer

from .bench_fhir_job import AS_OF, _obs, _patient, _seed

__all__ = ["main"]


def _export(base: str, directory: Path, since: str | None) -> tuple[ExportResult, float, float]:
    client = FhirClient(base)
    request = ExportRequest(type_filters=(observation_filter(load_knowledge()),), since=since)
    started, cpu = time.perf_counter(), time.process_time()
    result = BulkExport(client, directory, request).run()
    return result, time.perf_counter() - started, time.process_time() - cpu


def _row(name: str, result: ExportResult, seconds: float, cpu: float) -> str:
    resources = sum(result.counts().values())
    size = sum(f.size for f in result.files)
    return (
        f"| {name} | {resources:,} | {len(result.files)} | {size / 1e6:,.1f} | {result.requests} | "
        f"{seconds:.2f} | {cpu:.2f} |"
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="./dev bench export", description=__doc__)
    parser.add_argument("--patients", type=int, default=2000, help="default 2,000")
    parser.add_argument("--changed", type=float, default=0.1, help="default 0.1")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp, SekmetServer(
        Path(tmp) / "sekmet"
    ) as server:
        base = server.base_url
        started = time.perf_counter()
        _seed(base, [r for i in range(args.patients) for r in _patient(i)])
        print(f"loaded {args.patients:,} patients in {time.perf_counter() - started:.1f} s")
        print(f"load average {os.getloadavg()[0]:.2f}")
        full, full_s, full_cpu = _export(base, Path(tmp) / "full", None)
        time.sleep(1.1)  # sekmet's lastUpdated has a one-second resolution
        changed = max(1, int(args.patients * args.changed))
        later = AS_OF + timedelta(days=1)
        _seed(
            base,
            [_obs(f"bench-{i:06d}-new", f"bench-{i:06d}", "751-8", 0.4, later) for i in range(changed)],
        )
        delta, delta_s, delta_cpu = _export(base, Path(tmp) / "since", full.transaction_time)
        print("| export | resources | files | MB | requests | seconds | client CPU s |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        print(_row(f"full ({args.patients:,} patients)", full, full_s, full_cpu))
        print(_row(f"_since ({changed:,} changed)", delta, delta_s, delta_cpu))
        print(f"load average now {os.getloadavg()[0]:.2f}")
        ok = sum(delta.counts().values()) == changed
        print(f"the _since export holds exactly the {changed} changed Observations: {'yes' if ok else 'NO'}")
    return 0 if ok else 1
