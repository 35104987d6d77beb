"""The wheel carries the profiles and knowledge files, and an installed copy works anywhere.

Builds the wheel from this checkout (hatchling, no build isolation: no network), installs it with
--no-deps into a temporary --target directory, and runs it from /tmp-like directories with only
that directory on PYTHONPATH (the dependencies come from the running interpreter's environment).
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from fhir_leuko import __version__

from .conftest import DATA

pytestmark = pytest.mark.slow

SHIPPED = [
    "fhir_leuko/profiles/adult-default.toml",
    "fhir_leuko/profiles/pediatric.toml",
    "fhir_leuko/profiles/clozapine.toml",
    "fhir_leuko/profiles/README.md",
    "fhir_leuko/profiles/knowledge/loinc.toml",
    "fhir_leuko/profiles/knowledge/units.toml",
    "fhir_leuko/profiles/knowledge/drugs.toml",
    "fhir_leuko/profiles/knowledge/conditions.toml",
    "fhir_leuko/profiles/knowledge/SOURCES.md",
    "fhir_leuko/py.typed",
]


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return target


def test_wheel_contains_profiles_and_knowledge(wheel: Path) -> None:
    assert wheel.name.startswith(f"fhir_leuko-{__version__}-")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [name for name in SHIPPED if name not in names]
    assert missing == []
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "examples/"))]
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "fhir-leuko = fhir_leuko.cli:run" in zipfile.ZipFile(wheel).read(entry_points).decode()


def _run_installed(target: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(target)
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120, check=False
    )


def test_installed_copy_works_outside_the_repository(installed: Path, tmp_path: Path) -> None:
    where = _run_installed(installed, tmp_path, "-c", "import fhir_leuko; print(fhir_leuko.__file__)")
    assert where.returncode == 0, where.stderr
    assert where.stdout.strip() == str(installed / "fhir_leuko" / "__init__.py")

    listed = _run_installed(installed, tmp_path, "-m", "fhir_leuko", "profiles", "list")
    assert listed.returncode == 0, listed.stderr
    assert "adult-default 1.0.0" in listed.stdout
    assert f"  file: {installed / 'fhir_leuko' / 'profiles' / 'adult-default.toml'}" in listed.stdout
    assert "knowledge: loinc " in listed.stdout

    evaluated = _run_installed(
        installed, tmp_path, "-m", "fhir_leuko", "evaluate", str(DATA / "clozapine.json"), "--as-of", "2024-05-02"
    )
    assert evaluated.returncode == 0, evaluated.stderr
    assert len(evaluated.stdout.splitlines()) == 14
