"""Exit codes a scheduler can act on (issue 9 §4): distinct, documented, stable, mapped once at the
command's edge; and the catch-all there (one line, the traceback only with -vv).

The server-side cases (patients failed, input problems only, server unavailable mid-pass) are in
tests/job/test_exit_codes.py.
"""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest

from fhir_leuko.cli import evaluate as evaluate_cli
from fhir_leuko.cli import main
from fhir_leuko.cli.run import pass_exit_code
from fhir_leuko.core.model import Problem
from fhir_leuko.errors import RETIRED_EXIT_CODES, ExitCode, FhirTemporaryError, LockError
from fhir_leuko.job.runner import PassReport
from fhir_leuko.job.state import State, server_key
from fhir_leuko.testing.sekmet import free_port

from .conftest import DATA, REPO, fhir_leuko

PUBLISHED = {
    "OK": 0,
    "INPUT_PROBLEMS": 1,
    "USAGE": 2,
    "INCOMPLETE": 3,
    "LOCKED": 4,
    "CANNOT_LISTEN": 5,
    "INTERNAL": 70,
}
"""Every exit code ever released, with its number. Add new codes here; never change or remove one
(a code no longer used moves to RETIRED_EXIT_CODES, and its number is never used again)."""


def test_exit_codes_are_stable_and_never_reused() -> None:
    current = {code.name: int(code) for code in ExitCode}
    retired = set(RETIRED_EXIT_CODES)
    for name, number in PUBLISHED.items():
        assert current.get(name) == number or number in retired, f"{name} = {number} changed"
    assert not retired & set(current.values()), "a retired number is in use again"
    assert len(set(current.values())) == len(current), "two codes share a number"
    assert all(code.meaning for code in ExitCode)


def _doc_table(path: Path, marker: str) -> dict[str, str]:
    text = path.read_text(encoding="utf-8")
    block = text.split(f"<!-- exit-codes:{marker}")[1].split(f"<!-- /exit-codes:{marker} -->")[0]
    rows = re.findall(r"^\s*\| (\d+|128\+N) \| (.+?) \|$", block, re.M)
    return dict(rows)


@pytest.mark.parametrize(
    ("path", "marker"), [("README.md", "all"), ("docs/scheduled-job.md", "run")]
)
def test_the_docs_show_the_table_of_the_code(path: str, marker: str) -> None:
    table = _doc_table(REPO / path, marker)
    assert {k: v for k, v in table.items() if k != "128+N"} == {
        str(int(code)): code.meaning for code in ExitCode
    }
    assert "128+N" in table


def test_help_shows_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--help"], ["run", "--help"], ["evaluate", "--help"], ["watch", "--help"], ["serve", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
    out = " ".join(capsys.readouterr().out.split())
    for code in ExitCode:
        assert f"{int(code)} {code.meaning}" in out, code
    assert "0 stopped as asked (SIGTERM, Ctrl-C, --max-passes)" in out  # watch's own


def _report(**fields: object) -> PassReport:
    report = PassReport("https://ehr.example.org/fhir", "incremental", datetime(2026, 1, 1, tzinfo=UTC))
    for name, value in fields.items():
        setattr(report, name, value)
    return report


PROBLEM = Problem("Observation search", "unknown unit 'x'", "Observation/1", "page 1")


@pytest.mark.parametrize(
    ("fields", "signum", "code"),
    [
        ({}, None, ExitCode.OK),
        ({"problems": [PROBLEM]}, None, ExitCode.INPUT_PROBLEMS),
        ({"failed": [("pt-1", "HTTP 422")]}, None, ExitCode.INCOMPLETE),
        ({"failed": [("pt-1", "x")], "problems": [PROBLEM]}, None, ExitCode.INCOMPLETE),
        ({"aborted": "the server stayed unavailable"}, None, ExitCode.INCOMPLETE),
        ({"interrupted": True}, None, ExitCode.INCOMPLETE),
        ({"interrupted": True, "failed": [("pt-1", "x")]}, 15, 143),
        ({"interrupted": True}, 2, 130),
    ],
)
def test_a_pass_report_maps_to_one_code(fields: dict[str, object], signum: int | None, code: int) -> None:
    assert pass_exit_code(_report(**fields), signum) == code


def test_errors_carry_their_code() -> None:
    assert FhirTemporaryError("down").exit_code == ExitCode.INCOMPLETE
    assert LockError("held").exit_code == ExitCode.LOCKED


def test_run_against_an_unreachable_server_is_3(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}/fhir"
    done = fhir_leuko(
        "run", "--server", dead, "--state", str(tmp_path / "s.db"), "--no-progress",
        env={**os.environ, "FHIR_LEUKO_FHIR_RETRY_ATTEMPTS": "1",
             "FHIR_LEUKO_FHIR_CONNECT_TIMEOUT": "1"},
    )
    assert done.returncode == 3, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("fhir-leuko: error: GET /metadata")


def test_run_while_another_holds_the_lock_is_4(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}/fhir"
    path = tmp_path / "s.db"
    with State(path) as state:
        state.acquire_lock(server_key(dead), stale_after=3600)
        done = fhir_leuko("run", "--server", dead, "--state", str(path), "--no-progress")
    assert done.returncode == 4, done.stderr
    assert "another run" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["profiles", "validate", "no-such-dir"], "not a directory"),
        (["profiles", "validate", "."], "no profile files"),
        (["evaluate", "no-such-file.json"], "no such file or directory"),
    ],
)
def test_missing_or_empty_paths_are_usage_errors(
    tmp_path: Path, args: list[str], message: str
) -> None:
    (tmp_path / "empty").mkdir()
    args = [a if a != "." else str(tmp_path / "empty") for a in args]
    done = fhir_leuko(*[str(tmp_path / a) if a.startswith("no-such") else a for a in args])
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and len(done.stderr.splitlines()) == 1


# -- the catch-all at the command's edge -------------------------------------------------------


def _broken_evaluation(*args: object, **kwargs: object) -> object:
    raise RuntimeError("something nobody planned for\nsecond line")


@pytest.mark.parametrize("verbose", [[], ["-v"], ["-vv"]])
def test_an_unexpected_error_is_one_line_and_exit_70(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], verbose: list[str]
) -> None:
    # Not a boundary: a stand-in for a bug deep inside an evaluation.
    monkeypatch.setattr(evaluate_cli, "evaluate_dataset", _broken_evaluation)
    code = main([*verbose, "evaluate", str(DATA / "lookback.json"), "--as-of", "2024-05-02"])
    assert code == ExitCode.INTERNAL
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last == (
        "fhir-leuko: error: evaluate: unexpected error (RuntimeError: something nobody planned for "
        "second line); this is a bug: run again with -vv for the traceback and report it"
    )
    assert ("Traceback (most recent call last)" in err) == (verbose == ["-vv"])
    if verbose != ["-vv"]:
        assert len(err.strip().splitlines()) == 1


def test_verbosity_may_follow_the_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(evaluate_cli, "evaluate_dataset", _broken_evaluation)
    assert main(["evaluate", str(DATA / "lookback.json"), "-vv"]) == ExitCode.INTERNAL
    assert "Traceback (most recent call last)" in capsys.readouterr().err
