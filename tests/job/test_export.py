"""``fhir-leuko export`` against the real test server's ``$export`` (sekmet-fhir 0.1.1): system,
Patient and Group level, ``_type``, ``_typeFilter``, ``_since``, kill -9 and resume, and the
export directory read by ``evaluate`` with the same findings as the resources themselves."""

from __future__ import annotations

import gzip
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests

from fhir_leuko.cli import main
from fhir_leuko.fhir.bulk import BulkExport, ExportRequest
from fhir_leuko.fhir.client import FhirClient
from fhir_leuko.testing.sekmet import SekmetServer

from .conftest import LOINC, anc, patient, seed, valproate_order, wbc

AS_OF = "2026-11-20T12:00:00Z"


def glucose(oid: str, pid: str) -> dict[str, Any]:
    """A lab Observation of a code fhir-leuko does not map (kept out by _typeFilter)."""
    return {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "2345-7"}]},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": "2026-11-18T08:00:00Z",
        "valueQuantity": {"value": 5.4, "unit": "mmol/L"},
    }


def _ward(base: str, prefix: str = "e", n: int = 4) -> list[dict[str, Any]]:
    resources: list[dict[str, Any]] = []
    for i in range(n):
        pid = f"{prefix}-{i}"
        resources += [
            patient(pid),
            anc(f"{pid}-anc", pid, 0.4 + 0.3 * i, "2026-11-18T08:00:00Z"),
            wbc(f"{pid}-wbc", pid, 2.1 + i, "2026-11-18T08:00:00Z"),
            glucose(f"{pid}-glu", pid),
        ]
    resources.append(valproate_order(f"{prefix}-0-vpa", f"{prefix}-0", "2026-11-01"))
    resources.append(
        {
            "resourceType": "Group",
            "id": f"{prefix}-ward",
            "type": "person",
            "actual": True,
            "member": [{"entity": {"reference": f"Patient/{prefix}-1"}}],
        }
    )
    seed(base, *resources)
    return resources


def _lines(directory: Path) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(directory.glob("*.ndjson")):
        for line in path.read_bytes().splitlines():
            resource = orjson.loads(line)
            out.setdefault(resource["resourceType"], []).append(resource)
    return out


def _export(server: SekmetServer, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable, "-m", "fhir_leuko", "export", "--server", server.base_url,
            "--output-dir", str(out), "--no-progress", *extra,
        ],
        capture_output=True, text=True, timeout=120, check=False,
    )


@pytest.mark.server
def test_system_export_is_what_evaluate_reads(
    server: SekmetServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seeded = _ward(server.base_url)
    out = tmp_path / "export"
    assert main(["export", "--server", server.base_url, "--output-dir", str(out)]) == 0
    err = capsys.readouterr().err
    found = _lines(out)
    # _type: no Group; _typeFilter: no glucose.
    assert sorted(found) == ["MedicationRequest", "Observation", "Patient"]
    assert sorted(r["id"] for r in found["Observation"]) == sorted(
        f"e-{i}-{k}" for i in range(4) for k in ("anc", "wbc")
    )
    assert "transactionTime" in err and "8 Observation" in err
    state = orjson.loads((out / ".fhir-leuko" / "export.json").read_bytes())
    assert state["complete"] and state["job_deleted"] and state["type_filter"]
    # DELETE was sent: the server no longer knows the job.
    assert requests.get(state["status_url"], timeout=10).status_code == 404
    # Evaluating the directory finds what evaluating the resources themselves finds.
    written = tmp_path / "seeded.ndjson"
    written.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in seeded))
    issues, expected = tmp_path / "issues.ndjson", tmp_path / "expected.ndjson"
    assert main(["evaluate", str(out), "--as-of", AS_OF, "--output", str(issues)]) == 0
    assert main(["evaluate", str(written), "--as-of", AS_OF, "--output", str(expected)]) == 0
    capsys.readouterr()
    assert issues.read_bytes() == expected.read_bytes()
    assert len(issues.read_bytes().splitlines()) >= 4
    # Running the same command again does nothing (and succeeds).
    assert main(["export", "--server", server.base_url, "--output-dir", str(out)]) == 0
    assert "already holds this export" in capsys.readouterr().err
    # A file cut short or gone since it was verified: refused, naming it (its patients would get
    # no word); the near miss, the same file gzipped since: read, the same findings.
    obs = out / "Observation.000.ndjson"
    body = obs.read_bytes()
    obs.write_bytes(body[: len(body) // 2])
    again = ["evaluate", str(out), "--as-of", AS_OF, "--output", str(tmp_path / "again.ndjson")]
    assert main(again) == 2
    assert (
        f"its file Observation.000.ndjson has {len(body) // 2:,} bytes, {len(body):,} when it "
        "was downloaded and verified" in capsys.readouterr().err
    )
    obs.unlink()
    assert main(again) == 2
    assert "its file Observation.000.ndjson is missing" in capsys.readouterr().err
    (out / "Observation.000.ndjson.gz").write_bytes(gzip.compress(body))
    assert main(again) == 0
    assert (tmp_path / "again.ndjson").read_bytes() == issues.read_bytes()


@pytest.mark.server
def test_a_new_export_refuses_a_directory_holding_files_evaluate_would_read(
    server: SekmetServer, tmp_path: Path
) -> None:
    """An older export's ``Observation.005.ndjson`` beside a new export of four files would be read
    as part of it: refused (exit 2, naming it), nothing asked of the server; the near miss, a
    directory holding only what evaluate does not read (a README), takes the export."""
    _ward(server.base_url)
    out = tmp_path / "export"
    out.mkdir()
    (out / "README.md").write_text("nightly export\n", encoding="utf-8")
    (out / "old").mkdir()
    (out / "old" / "Observation.005.ndjson").write_text("{}\n", encoding="utf-8")
    refused = _export(server, out)
    assert refused.returncode == 2, refused.stderr
    assert (
        f"{out} already holds files that 'fhir-leuko evaluate' would read "
        "(old/Observation.005.ndjson) and no export of fhir-leuko"
    ) in refused.stderr
    assert not (out / ".fhir-leuko" / "export.json").exists()  # no kick-off
    shutil.rmtree(out / "old")
    done = _export(server, out)
    assert done.returncode == 0, done.stderr
    assert len(_lines(out)["Observation"]) == 8


@pytest.mark.server
def test_levels_type_filter_and_since(server: SekmetServer, tmp_path: Path) -> None:
    _ward(server.base_url)
    client = FhirClient(server.base_url)
    group = BulkExport(client, tmp_path / "g", ExportRequest(level="group", group="e-ward")).run()
    assert {r["id"] for rs in _lines(group.directory).values() for r in rs} == {
        "e-1", "e-1-anc", "e-1-wbc", "e-1-glu",  # no _typeFilter here: the glucose comes too
    }
    level = BulkExport(client, tmp_path / "p", ExportRequest(level="patient", types=("Patient",)))
    assert sorted(r["id"] for r in _lines(level.run().directory)["Patient"]) == [
        f"e-{i}" for i in range(4)
    ]
    time.sleep(1.1)  # sekmet's lastUpdated has a one-second resolution
    since = requests.get(f"{server.base_url}/metadata", timeout=10).headers["Date"]
    from email.utils import parsedate_to_datetime

    instant = parsedate_to_datetime(since).strftime("%Y-%m-%dT%H:%M:%SZ")
    time.sleep(1.1)
    seed(server.base_url, anc("e-3-anc-2", "e-3", 0.2, "2026-11-19T08:00:00Z"))
    delta = BulkExport(client, tmp_path / "d", ExportRequest(since=instant)).run()
    assert {r["id"] for rs in _lines(delta.directory).values() for r in rs} == {"e-3-anc-2"}
    assert delta.counts() == {"Observation": 1}

    # Evaluated later, each export says what it is not: an incremental one lacks the patients'
    # earlier results; two PATHs of the same server's exports are two sources (a patient twice).
    def warnings(*args: str) -> list[str]:
        done = subprocess.run(
            [sys.executable, "-m", "fhir_leuko", "evaluate", *args, "--as-of", AS_OF, "-o", "-"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert done.returncode in (0, 1), done.stderr
        return [line for line in done.stderr.splitlines() if "WARNING" in line]

    (incremental,) = warnings(str(delta.directory))
    assert f"{delta.directory} is an incremental export (_since {instant})" in incremental
    assert warnings(str(group.directory)) == []  # the near miss: no _since
    (twice,) = warnings(str(group.directory), str(level.directory))
    assert f"{group.directory} and {level.directory} hold exports of the same server" in twice
    assert warnings(str(group.directory), str(level.directory), "--same-source") == []


def _paused(server: SekmetServer, out: Path, point: str, marker: Path) -> None:
    """Start an export that stops dead at ``point``, and kill -9 it there."""
    env = {**os.environ, "FHIR_LEUKO_TEST_PAUSE": point, "FHIR_LEUKO_TEST_PAUSE_FILE": str(marker)}
    child = subprocess.Popen(
        [
            sys.executable, "-m", "fhir_leuko", "export", "--server", server.base_url,
            "--output-dir", str(out), "--no-progress",
        ],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    # The pid is written after the file is created: wait for it, not only for the file.
    while not (marker.exists() and marker.read_text().strip()):
        assert child.poll() is None, child.stderr.read() if child.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(int(marker.read_text()), signal.SIGKILL)
    child.communicate(timeout=10)
    marker.unlink()


@pytest.mark.server
@pytest.mark.parametrize("point", ["polled:1", "chunk:1", "downloaded:1"])
def test_kill_9_then_resume_without_a_new_export(
    server: SekmetServer, tmp_path: Path, point: str
) -> None:
    _ward(server.base_url)
    out = tmp_path / "export"
    _paused(server, out, point, tmp_path / "pid")
    before = orjson.loads((out / ".fhir-leuko" / "export.json").read_bytes())
    assert not before.get("complete")
    # (a directory holding it is walked as the reader walks it: checked too)
    # Read now, the export would give some patients' findings and say nothing of the others.
    for command in (
        ["evaluate", str(out)], ["evaluate", str(tmp_path)], ["explain", "Patient/e-0", str(out)],
    ):  # fmt: skip
        refused = subprocess.run(
            [sys.executable, "-m", "fhir_leuko", *command, "--as-of", AS_OF],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert refused.returncode == 2, (command, refused.stderr)
        assert "holds an export that is not complete (" in refused.stderr, refused.stderr
        assert "Run the same 'fhir-leuko export' again" in refused.stderr
    done = _export(server, out)
    assert done.returncode == 0, done.stderr
    assert "resumed the export" in done.stderr and "export started" not in done.stderr
    after = orjson.loads((out / ".fhir-leuko" / "export.json").read_bytes())
    assert after["status_url"] == before["status_url"] and after["complete"]
    assert len(_lines(out)["Observation"]) == 8
    assert not list((out / ".fhir-leuko" / "parts").iterdir())
    # The near miss: finished, the same directory is read.
    read = subprocess.run(
        [sys.executable, "-m", "fhir_leuko", "evaluate", str(out), "--as-of", AS_OF],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert read.returncode == 0, read.stderr
    assert "findings: 0" not in read.stderr


@pytest.mark.server
def test_a_forgotten_export_starts_again(server: SekmetServer, tmp_path: Path) -> None:
    _ward(server.base_url)
    out = tmp_path / "export"
    _paused(server, out, "downloaded:1", tmp_path / "pid")
    state = orjson.loads((out / ".fhir-leuko" / "export.json").read_bytes())
    requests.delete(state["status_url"], timeout=10)  # the server drops the job and its files
    done = _export(server, out)
    assert done.returncode == 0, done.stderr
    assert "no longer has that export" in done.stderr
    assert len(_lines(out)["Observation"]) == 8
    assert orjson.loads((out / ".fhir-leuko" / "export.json").read_bytes())["status_url"] != (
        state["status_url"]
    )
