"""``fhir-leuko run --bulk`` against the real test server (issue 12 §1): the first pass evaluates
everyone from a Bulk Data export and writes with the job's exactly-once writer; later passes take
the patients of a ``_since`` export; a kill -9 mid-pass loses and duplicates nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from fhir_leuko.core.knowledge import Knowledge
from fhir_leuko.core.profiles import ProfileSet
from fhir_leuko.job.bulk import export_directory
from fhir_leuko.job.state import State
from fhir_leuko.testing.sekmet import SekmetServer

from .conftest import anc, by_identity, cli, issues, low_ward, patient, seed, valproate_order

AS_OF = "2026-11-20T12:00:00Z"
LATER = "2026-11-21T12:00:00Z"


def _ward(base: str) -> None:
    seed(
        base,
        *low_ward("b"),
        patient("b-healthy"),
        anc("b-healthy-anc", "b-healthy", 3.5, "2026-11-18T08:00:00Z"),
    )


def _args(base: str, state: Path, as_of: str, *extra: str) -> list[str]:
    return [
        "run", "--bulk", "--server", base, "--state", str(state), "--as-of", as_of,
        "--no-progress", "--log-format", "json", "--overlap", "1s", *extra,
    ]


def _report(stderr: str) -> dict[str, object]:
    """The pass.finished log line (--log-format json)."""
    for line in reversed(stderr.splitlines()):
        if '"pass.finished"' in line:
            record = orjson.loads(line)
            fields: dict[str, object] = record.get("fields", record)
            return fields
    raise AssertionError(f"no pass.finished line in {stderr!r}")


def test_bulk_passes_write_each_finding_once_and_follow_changes(
    server: SekmetServer, tmp_path: Path
) -> None:
    _ward(server.base_url)
    time.sleep(1.5)  # the overlap (1 s) before the first export's time holds none of the ward
    state = tmp_path / "state.sqlite3"
    # What a pass killed at the wrong moment may leave in the job's export directory without
    # its state: cleared, never read with the new export (it would be a patient of nobody's).
    stray = export_directory(tmp_path / "fhir-leuko-bulk", server.base_url.rstrip("/"))
    stray.mkdir(parents=True)
    (stray / "Observation.007.ndjson").write_bytes(
        orjson.dumps(anc("stray-anc", "stray", 0.1, "2026-11-18T08:00:00Z")) + b"\n"
    )
    first = cli(*_args(server.base_url, state, AS_OF))
    assert first.returncode == 0, first.stderr
    found = by_identity(issues(server.base_url))
    assert {p for p, _kind in found} == {f"Patient/b-{i}" for i in range(6)}
    assert all(len(v) == 1 for v in found.values())
    # The watermark is the export's transactionTime; the export (patient data) is gone.
    with State(state) as s:
        mark = s.watermark(server.base_url.rstrip("/"))
    assert mark and mark.startswith("20")
    assert not any((tmp_path / "fhir-leuko-bulk").glob("export-*"))

    # Nothing changed: an incremental export with _since holds nothing; nothing is written.
    again = cli(*_args(server.base_url, state, AS_OF))
    assert again.returncode == 0, again.stderr
    assert by_identity(issues(server.base_url)) == found

    # Changes: b-0 recovers, b-1 drops further, a new patient; b-2 starts valproate.
    time.sleep(1.1)
    seed(
        server.base_url,
        anc("b-0-anc-2", "b-0", 2.5, "2026-11-21T08:00:00Z"),
        anc("b-1-anc-2", "b-1", 0.2, "2026-11-21T08:00:00Z"),
        valproate_order("b-2-vpa", "b-2", "2026-11-01"),
        patient("b-9"),
        anc("b-9-anc-1", "b-9", 0.4, "2026-11-21T08:00:00Z"),
    )
    third = cli(*_args(server.base_url, state, LATER, "-v"))
    assert third.returncode == 0, third.stderr
    after = by_identity(issues(server.base_url))
    assert all(len(v) == 1 for v in after.values())
    assert ("Patient/b-9", "neutropenia") in after
    assert after[("Patient/b-0", "neutropenia")][0]["status"] in ("final", "amended")
    assert "count-recovered" in orjson.dumps(after[("Patient/b-0", "neutropenia")][0]).decode()
    assert "valpro" in orjson.dumps(after[("Patient/b-2", "neutropenia")][0]).decode().lower()
    # Only the patients the _since export named were evaluated.
    assert _report(third.stderr)["patients_scanned"] == 4, third.stderr


def test_a_bulk_pass_killed_mid_write_resumes_without_duplicates(
    server: SekmetServer, tmp_path: Path
) -> None:
    _ward(server.base_url)
    state = tmp_path / "state.sqlite3"
    marker = tmp_path / "pid"
    env = {
        **os.environ,
        "FHIR_LEUKO_TEST_PAUSE": "write:1",
        "FHIR_LEUKO_TEST_PAUSE_FILE": str(marker),
    }
    child = subprocess.Popen(
        [sys.executable, "-m", "fhir_leuko", *_args(server.base_url, state, AS_OF, "--transactions", "never")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 90
    while not (marker.exists() and marker.read_text().strip()):  # written, not only created
        assert child.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(int(marker.read_text()), signal.SIGKILL)
    child.wait(10)
    assert len(issues(server.base_url)) == 1  # one write made before the kill
    done = cli(*_args(server.base_url, state, AS_OF, "--transactions", "never"))
    assert done.returncode == 0, done.stderr
    found = by_identity(issues(server.base_url))
    assert {p for p, _kind in found} == {f"Patient/b-{i}" for i in range(6)}
    assert all(len(v) == 1 for v in found.values())


def test_a_full_bulk_pass_reads_our_detectedissues_from_the_export(
    server: SekmetServer, tmp_path: Path
) -> None:
    """--full exports fhir-leuko's DetectedIssues too: a second full pass writes nothing new, and a
    recovered count resolves the finding it wrote."""
    _ward(server.base_url)
    state = tmp_path / "state.sqlite3"
    assert cli(*_args(server.base_url, state, AS_OF)).returncode == 0
    before = by_identity(issues(server.base_url))
    seed(server.base_url, anc("b-3-anc-2", "b-3", 3.0, "2026-11-20T08:00:00Z"))
    again = cli(*_args(server.base_url, state, AS_OF, "--full"))
    assert again.returncode == 0, again.stderr
    report = _report(again.stderr)
    assert report["written"] == 0 and report["resolved"] == 1, report
    after = by_identity(issues(server.base_url))
    assert after.keys() == before.keys() and all(len(v) == 1 for v in after.values())
    assert "count-recovered" in orjson.dumps(after[("Patient/b-3", "neutropenia")][0]).decode()


def _population(base: str) -> None:
    """The ward, a patient who has died (found, never alerted), and one with a low ANC alone (once
    it recovers, nothing is found: only the export's DetectedIssue says there is one to
    resolve)."""
    _ward(base)
    seed(
        base,
        patient("b-anc"),
        anc("b-anc-1", "b-anc", 0.8, "2026-11-18T08:00:00Z"),
        {"resourceType": "Patient", "id": "b-dead", "birthDate": "1950-01-01",
         "deceasedBoolean": True},
        anc("b-dead-anc", "b-dead", 0.3, "2026-11-18T08:00:00Z"),
    )


def _said(found: list[dict[str, object]]) -> list[str]:
    """What the DetectedIssues say, without what the server assigns (id, meta)."""
    return sorted(
        orjson.dumps({k: v for k, v in issue.items() if k not in ("id", "meta")},
                     option=orjson.OPT_SORT_KEYS).decode()
        for issue in found
    )


_COUNTS = ("mode", "written", "updated", "resolved", "unchanged", "patients_scanned", "findings",
           "patients_deceased", "patients_failed", "input_problems")


def test_a_full_bulk_pass_on_workers_writes_what_one_process_writes(
    sekmet: SekmetServer, tmp_path: Path
) -> None:
    """[scale] for run --bulk: a full export in shards evaluated in this process, and on two
    worker processes, writes exactly what the in-memory pass writes (first pass, then --full
    resolving a recovered count that only the export's DetectedIssues tell)."""
    seen: dict[str, tuple[object, ...]] = {}
    modes = {
        "memory": ("--shards", "0"),
        "shards": ("--shards", "3"),
        "workers": ("--shards", "3", "--workers", "2"),
    }
    with ExitStack() as stack:
        try:
            import distributed
        except ImportError:
            pass  # the dask extra (./dev installs it): the Dask cluster's run is skipped
        else:
            cluster = stack.enter_context(distributed.LocalCluster(
                # dashboard ":0": None still binds port 8787 (for /metrics), taken by any other
                # cluster on the machine, and distributed's warning about it fails the test.
                n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                host="127.0.0.1",
            ))
            modes["dask"] = (
                "--shards", "3", "--dask-scheduler", cluster.scheduler_address,
                "--work-dir", str(tmp_path / "work"),
            )
        _each_mode(sekmet, tmp_path, modes, seen)
    assert seen["shards"] == seen["memory"]
    assert seen["workers"] == seen["memory"]
    if "dask" in seen:
        assert seen["dask"] == seen["memory"]
        assert not any((tmp_path / "work").iterdir())  # the shards are removed


def _each_mode(
    sekmet: SekmetServer,
    tmp_path: Path,
    modes: dict[str, tuple[str, ...]],
    seen: dict[str, tuple[object, ...]],
) -> None:
    for name, extra in modes.items():
        sekmet.reset()
        _population(sekmet.base_url)
        state = tmp_path / name / "state.sqlite3"
        first = cli(*_args(sekmet.base_url, state, AS_OF, *extra))
        assert first.returncode == 0, first.stderr
        written = issues(sekmet.base_url)
        seed(
            sekmet.base_url,
            anc("b-3-anc-2", "b-3", 3.0, "2026-11-20T08:00:00Z"),
            anc("b-anc-2", "b-anc", 3.1, "2026-11-20T08:00:00Z"),
        )
        again = cli(*_args(sekmet.base_url, state, AS_OF, "--full", *extra))
        assert again.returncode == 0, again.stderr
        reports = [_report(first.stderr), _report(again.stderr)]
        seen[name] = (
            _said(written),
            _said(issues(sekmet.base_url)),
            [{k: r.get(k) for k in _COUNTS} for r in reports],
        )
        said = {
            "workers": "in 3 shards, evaluated on 2 local worker processes",
            "dask": "in 3 shards, evaluated on the Dask cluster at tcp://",
            "shards": "in 3 shards, evaluated in this process",
        }
        assert all((text in first.stderr) == (mode == name) for mode, text in said.items())
        assert "used by --bulk passes only" not in first.stderr
        if name == "memory":
            assert {orjson.loads(i)["patient"]["reference"] for i in seen[name][0]} == {
                *(f"Patient/b-{i}" for i in range(6)), "Patient/b-anc"
            }  # the patient who died is found, and left alone
            assert reports[1]["resolved"] == 2 and reports[1]["written"] == 0, reports[1]
            assert reports[0]["patients_deceased"] == 1, reports[0]
            assert [r["mode"] for r in reports] == ["bulk full", "bulk full"]


def test_population_flags_without_bulk_are_said_not_ignored(
    server: SekmetServer, tmp_path: Path
) -> None:
    _ward(server.base_url)
    state = tmp_path / "state.sqlite3"
    plain = [a for a in _args(server.base_url, state, AS_OF) if a != "--bulk"]
    ran = cli(*plain, "--workers", "2", "--shards", "4")
    assert ran.returncode == 0, ran.stderr
    assert "--workers, --shards: used by --bulk passes only" in ran.stderr
    assert len(issues(server.base_url)) == 12  # and the pass itself ran as ever


def _losing_at(shard: int) -> Any:
    """An executor (injected as the Job's shard_map) that routes and joins as this process does,
    and loses its worker when shard ``shard`` is due, as process_map reports it."""
    from contextlib import nullcontext

    from fhir_leuko.errors import WorkerLostError
    from fhir_leuko.job.bulkshards import VerdictTask

    def run(fn: Any, tasks: Any) -> Any:
        for task in tasks:
            if isinstance(task, VerdictTask) and task.spec.index == shard:
                raise WorkerLostError(
                    "a worker process was lost before its task was done (killed); nothing was "
                    "written. Run again"
                )
            yield fn(task)

    return lambda: nullcontext(run)


def test_a_worker_lost_after_some_writes_does_not_say_nothing_was_written(
    server: SekmetServer, tmp_path: Path, knowledge: Knowledge, profiles: ProfileSet
) -> None:
    """run --bulk plans and writes shard by shard: a worker lost at the last shard leaves the
    earlier shards' writes in place, and the error says so (evaluate's "nothing was written" would
    be false here); lost at the first shard, nothing was written, and it says that."""
    from fhir_leuko.errors import WorkerLostError
    from fhir_leuko.fhir.client import FhirClient
    from fhir_leuko.job.bulkshards import BulkScale
    from fhir_leuko.job.runner import Job, JobOptions

    _population(server.base_url)
    said = {}
    for shard in (0, 2):
        with State(tmp_path / f"state-{shard}.sqlite3") as state:
            job = Job(
                FhirClient(server.base_url),
                knowledge,
                profiles,
                JobOptions(
                    as_of=datetime(2026, 11, 20, 12, tzinfo=UTC),
                    bulk_dir=tmp_path / f"bulk-{shard}",
                    scale=BulkScale(shards=3, workers=2),
                ),
                state=state,
                shard_map=_losing_at(shard),
            )
            with pytest.raises(WorkerLostError) as lost:
                job.run()
        said[shard] = str(lost.value)
    assert "nothing was written" in said[0]  # the near miss: lost before any write
    written = len(issues(server.base_url))
    assert 0 < written < 13  # the first two shards' findings, not all 13
    assert "nothing was written" not in said[2]
    assert f"the {written} writes of the shards before it stand" in said[2], said[2]
    assert "the next pass resumes this export" in said[2]
