"""``fhir-leuko run --report FILE`` (issue 14 §2): the pass's findings as the HTML report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fhir_leuko.testing.seed import seed_paths
from fhir_leuko.testing.sekmet import SekmetServer

from .conftest import EXAMPLES, cli

pytestmark = pytest.mark.server


def test_run_writes_the_report_of_its_pass(server: SekmetServer, tmp_path: Path) -> None:
    seed_paths(server.base_url, [EXAMPLES / "ward", EXAMPLES / "bulk-export"])
    report = tmp_path / "pass.html"
    done = cli(
        "run", "--server", server.base_url, "--state", str(tmp_path / "state.sqlite3"),
        "--as-of", "2026-11-20", "--no-progress", "--dry-run", "--report", str(report),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    flagged = {json.loads(line)["patient"]["reference"] for line in done.stdout.splitlines()}
    html = report.read_text(encoding="utf-8")
    assert flagged == {"Patient/ex-child-1", "Patient/ex-cloz-1", "Patient/ex-onc-1",
                       "Patient/ex-tx-1"}  # fmt: skip
    for patient in flagged:
        assert f'data-patient="{patient}"' in html
    assert html.count('<img class="trend" src="data:image/svg+xml;base64,') == len(flagged)
    assert f"{server.base_url} (" in html  # the server the pass read
    assert "default-src 'none'" in html


def test_report_into_a_missing_directory_is_a_usage_error(tmp_path: Path) -> None:
    done = cli(
        "run", "--server", "http://127.0.0.1:9/fhir", "--state", str(tmp_path / "state.sqlite3"),
        "--report", str(tmp_path / "no" / "r.html"),
    )  # fmt: skip
    assert done.returncode == 2
    assert "--report" in done.stderr and "does not exist" in done.stderr
    assert not (tmp_path / "state.sqlite3").exists()  # refused before anything was opened


def test_watch_rewrites_the_report_after_each_pass(server: SekmetServer, tmp_path: Path) -> None:
    seed_paths(server.base_url, [EXAMPLES / "ward", EXAMPLES / "bulk-export"])
    report = tmp_path / "watch.html"
    report.write_text("the report of an earlier run", encoding="utf-8")
    done = cli(
        "watch", "--server", server.base_url, "--state", str(tmp_path / "state.sqlite3"),
        "--as-of", "2026-11-20", "--no-progress", "--dry-run", "--report", str(report),
        "--every", "1s", "--max-passes", "2",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("pass finished") == 2
    html = report.read_text(encoding="utf-8")
    # A dry run is a first pass every time: the second pass's report names every flagged patient.
    for patient in ("ex-child-1", "ex-cloz-1", "ex-onc-1", "ex-tx-1"):
        assert f'data-patient="Patient/{patient}"' in html
    assert "earlier run" not in html


def test_watch_report_into_a_missing_directory_is_a_usage_error(tmp_path: Path) -> None:
    done = cli(
        "watch", "--server", "http://127.0.0.1:9/fhir", "--state", str(tmp_path / "state.sqlite3"),
        "--every", "1h", "--report", str(tmp_path / "no" / "r.html"),
    )  # fmt: skip
    assert done.returncode == 2
    assert "--report" in done.stderr and "does not exist" in done.stderr
    assert not (tmp_path / "state.sqlite3").exists()
