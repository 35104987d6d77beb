"""Shared fixtures. Real FHIR JSON only: the HL7/Synthea/US Core files in ../shared/fixtures (skipped
with a reason where that folder is absent) and hand-written files in tests/data."""

from __future__ import annotations

import gzip
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests

from fhir_leuko.core.knowledge import Knowledge
from fhir_leuko.core.model import Finding
from fhir_leuko.core.pipeline import Evaluation, evaluate_resources
from fhir_leuko.core.profiles import ProfileSet
from fhir_leuko.files.documents import load_knowledge, load_profiles
from fhir_leuko.files.reader import read_paths

Cmd = subprocess.CompletedProcess[str]

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
SHARED_FIXTURES = REPO.parent / "shared" / "fixtures"


@pytest.fixture(scope="session", autouse=True)
def _private_user_dirs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The default state and store files live in the user's XDG directories (platformdirs). A test
    that relies on a default must not read or write the real ones: a file left there by another
    checkout or version would change its outcome. Every test, and every command a test starts
    (they inherit os.environ), gets XDG directories of its own for the session."""
    base = tmp_path_factory.mktemp("xdg")
    names = ("XDG_DATA_HOME", "XDG_STATE_HOME", "XDG_CONFIG_HOME")
    saved = {name: os.environ.get(name) for name in names}
    for name in names:
        os.environ[name] = str(base / name.lower())
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(autouse=True)
def _restore_root_logging() -> Iterator[None]:
    """Tests that call ``fhir_leuko.cli.main`` in-process configure the root logger with a handler
    on the sys.stderr pytest captured for that test; once that capture is closed, later log calls
    would print "--- Logging error ---" tracebacks. Put the root logger back after each test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def knowledge() -> Knowledge:
    """The shipped knowledge files, compiled."""
    return load_knowledge()


@pytest.fixture(scope="session")
def profiles(knowledge: Knowledge) -> ProfileSet:
    """The shipped profiles."""
    return load_profiles(knowledge)


@pytest.fixture(scope="session")
def shared_fixtures() -> Path:
    """../shared/fixtures (HL7 R4 examples, Synthea, US Core, the R4 JSON schema)."""
    if not SHARED_FIXTURES.is_dir():
        pytest.skip(
            f"shared fixtures not found at {SHARED_FIXTURES} (CI has ../shared beside the checkout)"
        )
    return SHARED_FIXTURES


def utc(*args: int) -> datetime:
    """A UTC datetime, for as-of values in tests."""
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


AS_OF = utc(2024, 5, 2, 23, 59, 59)
"""The as-of of the hand-written scenarios in tests/data (their counts are taken 2024-05-01)."""


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """tests/data: hand-written FHIR JSON (see tests/data/README.md for what each file holds)."""
    return DATA


def run_paths(
    paths: list[Path], knowledge: Knowledge, profiles: ProfileSet, as_of: datetime = AS_OF
) -> Evaluation:
    """Read files and evaluate them, as ``fhir-leuko evaluate`` does (without the CLI)."""
    return evaluate_resources(read_paths(paths), knowledge, profiles, as_of=as_of)


def by_patient(result: Evaluation) -> dict[tuple[str, str], Finding]:
    """Findings keyed by (patient id without ``Patient/``, finding kind)."""
    return {(f.patient.removeprefix("Patient/"), f.kind.value): f for f in result.findings}


def fhir_leuko(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> Cmd:
    """Run the real command, ``python -m fhir_leuko ARGS``, in a child process."""
    return subprocess.run(
        [sys.executable, "-m", "fhir_leuko", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="session")
def r4_schema(shared_fixtures: Path) -> dict[str, Any]:
    """The FHIR R4 JSON schema (draft-06) from ../shared/fixtures/fhir-r4-schema."""
    path = shared_fixtures / "fhir-r4-schema" / "fhir.schema.json.gz"
    if not path.is_file():
        pytest.skip(f"FHIR R4 JSON schema not found at {path}")
    with gzip.open(path, "rb") as stream:
        schema: dict[str, Any] = json.load(stream)
    return schema


def schema_errors(schema: dict[str, Any], resource: dict[str, Any]) -> list[str]:
    """Messages of every R4 JSON-schema violation of one resource (validated as its own type)."""
    from jsonschema import Draft6Validator

    rtype = resource["resourceType"]
    # The schema's ResourceList is a oneOf over all 145 resource types, which makes validating a
    # Bundle take many seconds. fhir-leuko writes only these types; each one's schema pins its
    # resourceType, so the narrowed oneOf is exactly as strict for them.
    written = ("Bundle", "DetectedIssue", "Device")
    definitions = {
        **schema["definitions"],
        "ResourceList": {"oneOf": [{"$ref": f"#/definitions/{t}"} for t in written]},
    }
    validator = Draft6Validator({"$ref": f"#/definitions/{rtype}", "definitions": definitions})
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(resource)
    ]


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fhir-leuko's wheel, built once per session (packaging and container tests install it)."""
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
         "-w", str(out), "-q"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (built,) = out.glob("fhir_leuko-*.whl")
    return built


def wait_for_healthz(
    base: str, process: subprocess.Popen[Any], *, log: Path | None = None, seconds: float = 60
) -> None:
    """Until a started ``fhir-leuko serve`` answers ``GET {base}/healthz``; the process must stay
    up meanwhile (its ``log`` is shown if it ends)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if requests.get(f"{base}/healthz", timeout=2).status_code == 200:
                return
        except requests.RequestException:  # refused, or queued while it starts
            pass
        assert process.poll() is None, log.read_text() if log is not None else "serve ended"
        assert time.monotonic() < deadline, f"{base}/healthz: no answer in {seconds} s"
        time.sleep(0.1)
