"""Hospital-size paging (issue 8), through the strict-production-server proxy in front of the real
test server: full scans over more Observations than the offset cap, a server without a stable
order, a bulk load of more changes in one instant than one batch holds, and SIGTERM at any point.
Each ends with exactly the expected DetectedIssues: none missed, none duplicated."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from fhir_leuko.core.knowledge import Knowledge
from fhir_leuko.core.profiles import ProfileSet
from fhir_leuko.errors import ExitCode, PagingError
from fhir_leuko.fhir.client import FhirClient
from fhir_leuko.fhir.r4search import check_search_params
from fhir_leuko.job.state import State
from fhir_leuko.testing.sekmet import SekmetServer

from .conftest import STRICT, anc, at, by_identity, cli, issues, patient, run_pass, seed
from .strictproxy import StrictProxy

pytestmark = pytest.mark.server

AS_OF = "2026-11-20T12:00:00Z"
PATIENTS = 40
PER_PATIENT = 8  # 320 Observations: more than six times the proxy's offset cap (50)


def ward(base: str) -> None:
    """40 patients with 8 ANCs each over the last 8 days; every third one is low now."""
    resources = []
    for p in range(PATIENTS):
        resources.append(patient(f"pg-{p:02d}"))
        for day in range(PER_PATIENT):
            low = p % 3 == 0 and day == PER_PATIENT - 1
            when = f"2026-11-{12 + day:02d}T08:00:00Z"
            resources.append(anc(f"pg-{p:02d}-{day}", f"pg-{p:02d}", 0.4 if low else 2.5, when))
    seed(base, *resources)


EXPECTED = {(f"Patient/pg-{p:02d}", "neutropenia") for p in range(0, PATIENTS, 3)}


def assert_exactly_once(base: str, expected: set[tuple[str, str]] = EXPECTED) -> None:
    groups = by_identity(issues(base))
    assert {k: len(v) for k, v in groups.items()} == {k: 1 for k in expected}


def job_args(proxy: StrictProxy, state: Path, *extra: str) -> list[str]:
    return [
        "run",
        "--server",
        proxy.base_url,
        "--state",
        str(state),
        "--as-of",
        AS_OF,
        "--header",
        "Prefer: handling=strict",
        "--no-progress",
        *extra,
    ]


def assert_no_deep_offsets(proxy: StrictProxy) -> None:
    """Every search the job started was sorted and valid R4; it never sent an _offset itself."""
    started = [(p, q) for m, p, q in proxy.requests if m == "GET" and q and p != "metadata"]
    assert started
    for rtype, query in started:
        if any(name in ("_page_token", "_offset") for name, _ in query):
            continue  # a next link, followed verbatim
        check_search_params(rtype, query)
        assert any(name == "_sort" for name, _ in query) or ("_summary", "count") in query


@pytest.mark.parametrize(
    ("mode", "setting"),
    [
        ("incremental", {}),  # the first pass; sorted searches page by cursor (production)
        ("full", {}),
        ("incremental", {"sorted_paging": "offset"}),  # capped offsets: windows at the cursor
        ("full", {"count_cap": 10, "offset_cap": 20}),
    ],
    ids=["first-pass", "full", "first-pass-offset-capped", "full-small-pages"],
)
def test_full_scan_over_more_observations_than_the_offset_cap(
    strict: StrictProxy,
    state_path: Path,
    knowledge: Knowledge,
    profiles: ProfileSet,
    setting: dict[str, object],
    mode: str,
) -> None:
    ward(strict.upstream)
    strict.configure(**setting)
    client = FhirClient(strict.base_url, headers=STRICT)
    report = run_pass(
        strict.base_url,
        state_path,
        knowledge,
        profiles,
        client=client,
        as_of=at(AS_OF[:-1]),
        mode=mode,  # the first pass (no watermark) is a full scan too
    )
    assert report.ok, report.summary_lines()
    assert report.patients == PATIENTS
    assert_exactly_once(strict.upstream)
    assert_no_deep_offsets(strict)
    # and again: nothing new, nothing duplicated
    run_pass(
        strict.base_url,
        state_path,
        knowledge,
        profiles,
        client=client,
        mode="full",
        as_of=at(AS_OF[:-1]),
    )
    assert_exactly_once(strict.upstream)


def test_without_id_in_the_capability_statement_the_sort_is_lastupdated_alone(
    strict: StrictProxy, state_path: Path, knowledge: Knowledge, profiles: ProfileSet
) -> None:
    def without_id(statement: dict[str, Any]) -> dict[str, Any]:
        for resource in statement["rest"][0]["resource"]:
            if resource["type"] == "Observation":
                params = resource["searchParam"]
                resource["searchParam"] = [p for p in params if p["name"] != "_id"]
        return statement

    ward(strict.upstream)
    strict.configure(metadata_patch=without_id)
    client = FhirClient(strict.base_url, headers=STRICT)
    report = run_pass(
        strict.base_url, state_path, knowledge, profiles, client=client, as_of=at(AS_OF[:-1])
    )
    assert report.ok and report.patients == PATIENTS
    assert_exactly_once(strict.upstream)
    sorts = {
        (rtype, v) for m, rtype, q in strict.requests for n, v in q if n == "_sort" and m == "GET"
    }
    assert ("Observation", "_lastUpdated") in sorts
    assert ("Patient", "_lastUpdated,_id") in sorts
    assert not any(rtype == "Observation" and v != "_lastUpdated" for rtype, v in sorts)


def test_a_scan_through_small_windows(
    strict: StrictProxy, state_path: Path, knowledge: Knowledge, profiles: ProfileSet
) -> None:
    ward(strict.upstream)
    strict.configure(sorted_paging="offset")
    report = run_pass(
        strict.base_url,
        state_path,
        knowledge,
        profiles,
        as_of=at(AS_OF[:-1]),
        window_size=30,
        client=FhirClient(strict.base_url, headers=STRICT),
    )
    assert report.ok and report.patients == PATIENTS
    assert_exactly_once(strict.upstream)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"ignore_sort": True, "offset_cap": 10_000}, "cannot be stable"),
        ({"lose": {"pg-07-3"}}, "the server counts 320: the scan is not complete"),
    ],
    ids=["ignores-sort", "loses-a-result"],
)
def test_a_scan_that_cannot_be_complete_fails_the_pass(
    strict: StrictProxy,
    tmp_path: Path,
    knowledge: Knowledge,
    profiles: ProfileSet,
    setting: dict[str, object],
    message: str,
) -> None:
    ward(strict.upstream)
    strict.configure(**setting)
    with pytest.raises(PagingError, match=message):
        run_pass(
            strict.base_url,
            tmp_path / "a.sqlite3",
            knowledge,
            profiles,
            as_of=at(AS_OF[:-1]),
            client=FhirClient(strict.base_url, headers=STRICT),
        )
    done = cli(*job_args(strict, tmp_path / "b.sqlite3", "--full"))
    assert done.returncode == ExitCode.INCOMPLETE, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    assert issues(strict.upstream) == []  # nothing written from half a scan
    with State(tmp_path / "b.sqlite3") as st:
        assert st.watermark(strict.base_url) is None


def test_a_bulk_load_of_more_changes_in_one_instant_than_one_batch(
    strict: StrictProxy,
    sekmet: SekmetServer,
    state_path: Path,
    knowledge: Knowledge,
    profiles: ProfileSet,
) -> None:
    base = strict.upstream
    seed(base, *[patient(f"bk-{p:02d}") for p in range(30)])
    client = FhirClient(strict.base_url, headers=STRICT)
    first = run_pass(
        strict.base_url, state_path, knowledge, profiles, client=client, as_of=at(AS_OF[:-1])
    )
    assert first.ok and issues(base) == []
    # 60 results, two per patient, all with one meta.lastUpdated; in id order each patient's two
    # results fall in different batches of 20.
    sekmet.freeze_clock(datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.123Z"))
    seed(
        base,
        *[
            anc(
                f"bk-{i:03d}",
                f"bk-{i % 30:02d}",
                0.4 if i % 30 < 10 else 2.5,
                "2026-11-19T08:00:00Z",
            )
            for i in range(60)
        ],
    )
    sekmet.freeze_clock(None)
    started = time.monotonic()
    second = run_pass(
        strict.base_url,
        state_path,
        knowledge,
        profiles,
        client=client,
        as_of=at(AS_OF[:-1]),
        max_changes=20,
    )
    assert time.monotonic() - started < 60
    assert second.ok, second.summary_lines()
    assert second.changes["Observation"] == 60
    assert second.patients == 30  # each patient once, although its changes straddle batches
    assert_exactly_once(base, {(f"Patient/bk-{p:02d}", "neutropenia") for p in range(10)})
    third = run_pass(
        strict.base_url,
        state_path,
        knowledge,
        profiles,
        client=client,
        as_of=at(AS_OF[:-1]),
        max_changes=20,
    )
    assert third.ok and third.patients == 0
    assert third.requests <= 8  # metadata + one search per change type (+ a few next links)


def _wait_for(proc: subprocess.Popen[bytes], ready: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 60
    while not ready():
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            pytest.fail(f"the run ended before the signal: {err[-2000:]}")
        assert time.monotonic() < deadline
        time.sleep(0.01)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("where", ["scan", "groups", "retry-wait"])
def test_a_signal_stops_the_pass_within_seconds(
    strict: StrictProxy, tmp_path: Path, where: str, signum: int
) -> None:
    ward(strict.upstream)
    state = tmp_path / "state.sqlite3"
    # A slow server: the scan takes seconds (small pages), and so does each group; or one that
    # answers 503 with Retry-After: 30 (the client waits before it retries).
    strict.configure(
        delay=0.1, count_cap=10 if where == "scan" else 50, unavailable=where == "retry-wait"
    )
    ready = {
        "scan": lambda: len(strict.searches("Observation")) >= 3,
        "groups": lambda: len(strict.searches("Patient")) >= 1,
        "retry-wait": lambda: len(strict.searches()) >= 1,
    }[where]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fhir_leuko",
            *job_args(strict, state, "--patients-per-request", "5"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ},
    )
    try:
        _wait_for(proc, ready)
        sent = time.monotonic()
        proc.send_signal(signum)
        code = proc.wait(timeout=30)
        assert time.monotonic() - sent < 3
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        err = proc.stderr.read().decode() if proc.stderr else ""
        if proc.stderr:
            proc.stderr.close()
    assert code == 128 + signum, err
    assert "Traceback" not in err
    strict.configure()
    rerun = cli(*job_args(strict, state))
    assert rerun.returncode == 0, rerun.stderr
    assert_exactly_once(strict.upstream)
