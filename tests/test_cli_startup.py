"""What the command costs before and after its work: it imports only what the command uses, and
the console entry point leaves without freeing the dataset one object at a time
(``fhir_leuko/cli/fastexit.py``), with everything written and the exit code the work decided."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fhir_leuko.cli import fastexit, main

from .conftest import DATA, fhir_leuko

AS_OF = "2024-05-02"

_WATCHED = ("requests", "jwt", "cryptography", "fhir_leuko", "uvicorn", "fastapi")
_IMPORTED = f"""
import sys
from fhir_leuko.cli import main
main(sys.argv[1:])
print(" ".join(sorted(m for m in sys.modules if m.split(".")[0] in {_WATCHED!r})), file=sys.stderr)
"""


def _modules_after(*args: str) -> set[str]:
    """The modules (of the packages watched) a run of the command in a fresh process imported."""
    done = subprocess.run(
        [sys.executable, "-c", _IMPORTED, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode in (0, 1), done.stderr
    return set(done.stderr.strip().splitlines()[-1].split())


def test_evaluate_loads_neither_the_job_nor_a_server_client(tmp_path: Path) -> None:
    out = tmp_path / "issues.ndjson"
    modules = _modules_after(
        "evaluate", str(DATA / "clozapine.json"), "--as-of", AS_OF, "-o", str(out)
    )
    assert "fhir_leuko.cli.evaluate" in modules and out.read_text()
    # The HTTP client, JWT and its crypto, the job's runner, the other commands, the service.
    for absent in (
        "requests",
        "jwt",
        "cryptography",
        "fhir_leuko.fhir.auth",
        "fhir_leuko.fhir.client",
        "fhir_leuko.job.runner",
        "fhir_leuko.cli.run",
        "fhir_leuko.cli.serve",
        "uvicorn",
    ):
        assert absent not in modules, absent


def test_the_names_of_the_fhir_and_job_packages_still_resolve() -> None:
    """Their modules are imported when a name is first used (fhir_leuko/lazyexports.py)."""
    import fhir_leuko.fhir as fhir
    import fhir_leuko.job as job

    assert fhir.FhirClient.__module__ == "fhir_leuko.fhir.client"
    assert job.Job.__module__ == "fhir_leuko.job.runner"
    for package in (fhir, job):
        for name in package.__all__:
            assert getattr(package, name) is not None, name
    with pytest.raises(AttributeError, match="NoSuchName"):
        assert fhir.NoSuchName is None


def test_help_still_lists_every_command() -> None:
    done = fhir_leuko("--help")
    assert done.returncode == 0
    for command in (
        "evaluate",
        "explain",
        "export",
        "profiles",
        "run",
        "watch",
        "serve",
        "cards",
        "state",
    ):
        assert f"\n    {command} " in done.stdout, command


def test_the_fast_exit_writes_everything_and_keeps_the_exit_code(tmp_path: Path) -> None:
    """The console entry leaves with os._exit: stdout (a pipe), stderr and the code are the same
    as a call of main() in this process gives."""
    args = [
        "evaluate",
        str(DATA / "clozapine.json"),
        str(DATA / "problems"),
        "--as-of",
        AS_OF,
        "--format",
        "ndjson",
    ]
    done = fhir_leuko(*args)
    here = tmp_path / "here.ndjson"
    code = main([*args, "-o", str(here)])
    assert fastexit.holding()  # evaluate kept its dataset for the exit
    assert code == 1 and done.returncode == 1  # input problems: everything else written
    assert done.stdout == here.read_text() and done.stdout.count("\n") >= 2
    assert done.stderr.rstrip().splitlines()[-1].startswith("fhir-leuko: input problems: ")


def test_main_called_again_releases_what_the_last_call_kept() -> None:
    args = ["evaluate", str(DATA / "clozapine.json"), "--as-of", AS_OF, "-o", "/dev/null"]
    main(args)
    assert fastexit.holding()
    main(["profiles", "list"])
    assert not fastexit.holding()
