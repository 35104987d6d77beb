"""The first hour with fhir-leuko (issue 11 §4): ./dev explains itself, rebuilds a venv made by
another Python, does without flock(1); `./dev demo --keep` leaves a server to explore and its
printed commands work; `evaluate --help`'s first example runs; the docs stay inside the repo."""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from fhir_leuko.cli import build_parser

from .conftest import REPO, wait_for_healthz

DEV = REPO / "dev"
BASE_PYTHON = Path(sys.base_prefix) / "bin" / "python3"
"""The interpreter this test run's venv was made from (what ./dev's PYTHON would be)."""


def _dev(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(DEV), *args], capture_output=True, text=True, env=env, timeout=timeout, check=False
    )


def _identity(python: str | Path) -> str:
    code = 'import sys; print(sys.base_prefix, "%d.%d.%d" % sys.version_info[:3])'
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_dev_help_is_text_not_code() -> None:
    done = _dev("help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: ./dev COMMAND [ARGS]")
    for command in ("demo [--keep]", "test [ARGS]", "lint", "bench", "setup", "shell", "help"):
        assert f"  {command}" in done.stdout
    for line in done.stdout.splitlines():
        assert not re.match(r"\s*(set -|cd |exec |venv=|python=|fi$|esac$|;;|[a-z_]+\(\) \{)", line), line
        assert "$(" not in line and "${" not in line, line
    assert _dev("--help").stdout == done.stdout


def test_dev_without_or_with_an_unknown_command_is_exit_2() -> None:
    bare = _dev()
    assert bare.returncode == 2 and bare.stderr.startswith("usage: ./dev")
    unknown = _dev("frobnicate")
    assert unknown.returncode == 2
    assert "dev: unknown command 'frobnicate' (./dev help)" in unknown.stderr


def _installed_venv(tmp_path: Path, python: Path) -> Path:
    """A venv made by ``python`` that ./dev takes as installed (its stamp matches pyproject.toml)."""
    venv = tmp_path / "venv"
    subprocess.run([str(python), "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    digest = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()
    (venv / ".fhir-leuko-installed").write_text(digest + "\n")
    return venv


def _env(venv: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV"))}
    # No package index and no pip configuration: an install ./dev starts fails at once.
    env.update(FHIR_LEUKO_VENV=str(venv), PYTHON=str(BASE_PYTHON), PIP_NO_INDEX="1", PIP_CONFIG_FILE=os.devnull)
    env.update(extra)
    return env


def _other_python() -> Path | None:
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3", "/opt/homebrew/bin/python3"):
        path = Path(candidate)
        if path.exists() and _identity(path) != _identity(BASE_PYTHON):
            return path
    return None


@pytest.mark.parametrize("maker", ["another-python", "python-gone"])
def test_dev_rebuilds_a_venv_made_by_another_python(tmp_path: Path, maker: str) -> None:
    if maker == "another-python":
        other = _other_python()
        if other is None:
            pytest.skip("no second Python installation on this machine")
        venv = _installed_venv(tmp_path, other)
    else:
        venv = _installed_venv(tmp_path, BASE_PYTHON)
        for link in (venv / "bin").glob("python*"):
            link.unlink()
            link.symlink_to("/nonexistent/python3")
    assert _identity(BASE_PYTHON) not in (venv / "pyvenv.cfg").read_text() or maker == "python-gone"
    done = _dev("setup", env=_env(venv), timeout=300)
    assert f"dev: {venv} was made by another Python" in done.stderr, done.stderr
    assert f"making it again with {BASE_PYTHON}" in done.stderr
    assert _identity(venv / "bin" / "python") == _identity(BASE_PYTHON)
    # The install itself cannot succeed without a package index: that is this test's doing.
    assert "dev: installing fhir-leuko" in done.stderr


def test_dev_leaves_a_matching_venv_alone(tmp_path: Path) -> None:
    venv = _installed_venv(tmp_path, BASE_PYTHON)
    marker = venv / "kept"
    marker.touch()
    done = _dev("setup", env=_env(venv))
    assert done.returncode == 0, done.stderr
    assert marker.exists() and done.stderr == ""


def test_dev_a_directory_that_is_not_a_venv_is_not_deleted(tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "data.txt").write_text("keep me")
    done = _dev("setup", env=_env(precious))
    assert done.returncode == 2
    assert "exists but is not a Python venv" in done.stderr
    assert (precious / "data.txt").read_text() == "keep me"


def test_dev_works_without_flock(tmp_path: Path) -> None:
    # A PATH with everything but flock (as on macOS).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for directory in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(directory):
            continue
        for entry in os.scandir(directory):
            target = bin_dir / entry.name
            if entry.name != "flock" and not target.exists() and os.access(entry.path, os.X_OK):
                target.symlink_to(entry.path)
    venv = _installed_venv(tmp_path, BASE_PYTHON)
    done = _dev("setup", env=_env(venv, PATH=str(bin_dir)))
    assert done.returncode == 0, done.stderr
    assert "flock" not in done.stderr
    assert not Path(f"{venv}.lockdir").exists()
    # A lock left by a process that is gone is taken over.
    stale = Path(f"{venv}.lockdir")
    stale.mkdir()
    (stale / "pid").write_text("999999999")
    assert _dev("setup", env=_env(venv, PATH=str(bin_dir))).returncode == 0
    assert not stale.exists()


def test_evaluate_help_first_example_exits_0() -> None:
    parser = build_parser()
    evaluate = parser._subparsers._group_actions[0].choices["evaluate"]  # type: ignore[union-attr]
    epilog = evaluate.epilog or ""
    first = epilog.split("examples:\n", 1)[1].splitlines()[0].split("#")[0]
    argv = shlex.split(first)
    assert argv[:2] == ["fhir-leuko", "evaluate"]
    done = subprocess.run(
        [sys.executable, "-m", "fhir_leuko", *argv[1:]],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") >= 1


DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "profiles" / "README.md", *sorted((REPO / "examples").rglob("*.md"))]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_docs_point_only_inside_the_repository(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    assert "../shared" not in text
    for target in re.findall(r"\]\(([^)#\s]+)", text):
        if re.match(r"[a-z]+:", target):
            continue
        resolved = (doc.parent / target).resolve()
        assert resolved.is_relative_to(REPO), f"{doc.name}: {target} is outside the repository"
        assert resolved.exists(), f"{doc.name}: {target} does not exist"


def test_readme_names_no_package_index_host() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    for host in ("pypi.org", "pypi.python.org", "files.pythonhosted.org", "test.pypi.org"):
        assert host not in text


@pytest.mark.slow
@pytest.mark.server
def test_demo_keep_leaves_a_server_to_explore(tmp_path: Path) -> None:
    demo = subprocess.Popen(
        [sys.executable, str(REPO / "examples" / "demo.py"), "--keep"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
    )
    serve: subprocess.Popen[bytes] | None = None
    try:
        assert demo.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 240
        while not any("until you press Ctrl-C" in line for line in lines):
            line = demo.stdout.readline()
            assert line or demo.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "".join(lines)
            lines.append(line)
        while not lines[-1].strip().startswith("-H 'Content-Type"):
            lines.append(demo.stdout.readline())
        text = "".join(lines)
        temp = Path(re.search(r"its data in (\S+) are removed", text)[1])  # type: ignore[index]
        assert temp.is_dir()
        commands = [line.strip() for line in text.split("In another terminal:", 1)[1].splitlines() if line.strip() and not line.strip().startswith("#")]
        # The curl lines: each URL answers.
        for command in commands:
            if command.startswith("curl -s '"):
                url = shlex.split(command.split("|")[0])[2]
                assert requests.get(url, timeout=30).status_code == 200, url
        # fhir-leuko run again: nothing changed, nothing written.
        run = shlex.split(next(c for c in commands if " run --server " in c))
        again = subprocess.run(run, capture_output=True, text=True, timeout=300, check=False)
        assert again.returncode == 0, again.stderr
        assert "DetectedIssues: 0 written, 0 updated, 0 resolved" in again.stderr
        # serve against the demo server, then the printed patient-view call.
        serve_cmd = shlex.split(next(c for c in commands if " serve --config " in c))
        serve = subprocess.Popen(serve_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        call = shlex.split(" ".join(c.rstrip("\\").strip() for c in commands if "cds-services" in c or c.startswith("-H 'Content-Type")))
        url, body = call[2], call[call.index("--data") + 1]
        base = url.split("/cds-services")[0]
        wait_for_healthz(base, serve)
        answer = requests.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=60)
        assert answer.status_code == 200, answer.text
        assert len(answer.json()["cards"]) == 1
    finally:
        if serve is not None:
            serve.terminate()
            serve.wait(timeout=30)
        demo.send_signal(signal.SIGINT)
        out, _ = demo.communicate(timeout=60)
    assert demo.returncode == 0, out
    assert "stopping the FHIR server and removing its data" in out
    assert not temp.exists()
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_changelog_has_a_section_for_this_version() -> None:
    from fhir_leuko import __version__

    text = (REPO / "CHANGELOG.md").read_text(encoding="utf-8")
    headings = re.findall(r"^## \[([^\]]+)\](.*)$", text, re.M)
    assert headings[0][0] == "Unreleased"
    released = {name: rest for name, rest in headings[1:]}
    assert __version__ in released, f"no '## [{__version__}] - DATE' section"
    assert re.fullmatch(r" - \d{4}-\d{2}-\d{2}", released[__version__])
