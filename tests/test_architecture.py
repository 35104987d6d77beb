"""The import contracts hold, and a broken one fails (docs/architecture.md, pyproject.toml).

``./dev lint`` runs ``lint-imports`` over the real package; this test shows once that a contract
catches what it is for: in a copy of the package, a rule-core module imports a file reader, and
``lint-imports`` fails on exactly that import.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytest.importorskip("importlinter", reason="import-linter comes with the dev extra (./dev test)")


def test_the_core_importing_an_edge_breaks_the_contract(tmp_path: Path) -> None:
    shutil.copytree(
        REPO / "fhir_leuko",
        tmp_path / "fhir_leuko",
        ignore=shutil.ignore_patterns("__pycache__", "profiles"),
    )
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    module = tmp_path / "fhir_leuko" / "core" / "evaluate.py"
    source = module.read_text(encoding="utf-8")
    anchor = "from .fhirtime import"
    assert anchor in source
    module.write_text(
        source.replace(anchor, f"from ..files.reader import read_paths\n{anchor}", 1),
        encoding="utf-8",
    )

    result = subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports"), "--no-cache", "--no-logo"],
        cwd=tmp_path,
        # The copy, not the installed package, is the one analysed.
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == 1, result.stdout + result.stderr
    # The core's contract breaks; so does that of every room importing the core (present/).
    assert re.search(r"Contracts: \d+ kept, [12] broken\.", result.stdout), result.stdout
    broken = result.stdout.split("Broken contracts", 1)[1]
    assert broken.lstrip("-\n").startswith("The rule core is pure")
    assert "fhir_leuko.core is not allowed to import fhir_leuko.files:" in broken
    assert "fhir_leuko.core.evaluate -> fhir_leuko.files.reader" in broken
