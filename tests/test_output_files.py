"""Where ``evaluate`` writes (issue 9 §3): a regular file atomically with the umask's mode; a device,
a FIFO or /dev/stdout in place (a device stays a device); a symlink's target; ``-`` for stdout and
for stdin; a directory as --output is exit 2. Each case runs the real command."""

from __future__ import annotations

import gzip
import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from .conftest import DATA, fhir_leuko

AS_OF = "2024-05-02"
INPUT = DATA / "pediatric.json"
ISSUES = 8  # DetectedIssues evaluate writes for pediatric.json as of AS_OF


def _count(data: bytes | str) -> int:
    text = data.decode() if isinstance(data, bytes) else data
    return len([json.loads(line) for line in text.splitlines()])


def _evaluate(*args: str, stdin: bytes | None = None, umask: int | None = None) -> subprocess.CompletedProcess[bytes]:
    command = [sys.executable, "-m", "fhir_leuko", "evaluate", *args, "--as-of", AS_OF]
    if umask is not None:  # the shell sets the umask, as a user's login shell would
        command = ["sh", "-c", f'umask {umask:03o} && exec "$@"', "sh", *command]
    return subprocess.run(command, input=stdin, capture_output=True, timeout=120, check=False)


def test_output_dash_is_stdout() -> None:
    done = _evaluate(str(INPUT), "--output", "-")
    assert done.returncode == 0, done.stderr
    assert _count(done.stdout) == ISSUES
    assert not Path("-").exists()


@pytest.mark.parametrize("form", ["json", "ndjson", "ndjson.gz"])
def test_dash_reads_stdin(tmp_path: Path, form: str) -> None:
    bundle = json.loads(INPUT.read_text(encoding="utf-8"))
    if form == "json":
        data = INPUT.read_bytes()
    else:
        data = b"".join(json.dumps(e["resource"]).encode() + b"\n" for e in bundle["entry"])
        if form == "ndjson.gz":
            data = gzip.compress(data)
    done = _evaluate("-", stdin=data)
    assert done.returncode == 0, done.stderr
    assert _count(done.stdout) == ISSUES
    assert b"read 1 file" in done.stderr


def test_problems_in_stdin_name_stdin() -> None:
    done = _evaluate("-", stdin=b'{"resourceType": "Observation", "id": "x"}\n{broken\n')
    assert done.returncode == 1
    assert b"problem: <stdin>:line 2: not valid JSON" in done.stderr


def test_output_directory_is_a_usage_error(tmp_path: Path) -> None:
    done = fhir_leuko("evaluate", str(INPUT), "--as-of", AS_OF, "--output", str(tmp_path))
    assert done.returncode == 2
    assert done.stderr == (
        f"fhir-leuko: error: --output {tmp_path}: is a directory (give a file name, or - for stdout)\n"
    )


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_new_file_gets_the_umasks_mode(tmp_path: Path, umask: int) -> None:
    out = tmp_path / "issues.ndjson"
    done = _evaluate(str(INPUT), "--output", str(out), umask=umask)
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask
    assert _count(out.read_bytes()) == ISSUES
    assert [p.name for p in tmp_path.iterdir()] == ["issues.ndjson"]  # no temporary file left


def test_replaced_file_keeps_its_mode(tmp_path: Path) -> None:
    out = tmp_path / "issues.ndjson"
    out.write_text("old\n", encoding="utf-8")
    out.chmod(0o640)
    done = _evaluate(str(INPUT), "--output", str(out), umask=0o077)
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    assert _count(out.read_bytes()) == ISSUES


@pytest.mark.parametrize("dangling", [False, True])
def test_symlink_is_followed_and_stays_a_link(tmp_path: Path, dangling: bool) -> None:
    target = tmp_path / "real" / "issues.ndjson"
    target.parent.mkdir()
    if not dangling:
        target.write_text("old\n", encoding="utf-8")
    link = tmp_path / "link.ndjson"
    link.symlink_to(target)
    done = _evaluate(str(INPUT), "--output", str(link))
    assert done.returncode == 0, done.stderr
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert _count(target.read_bytes()) == ISSUES
    assert sorted(p.name for p in target.parent.iterdir()) == ["issues.ndjson"]


def test_fifo_is_written_in_place(tmp_path: Path) -> None:
    fifo = tmp_path / "issues.fifo"
    os.mkfifo(fifo)
    received: list[bytes] = []

    def read() -> None:
        with open(fifo, "rb") as stream:
            received.append(stream.read())

    reader = threading.Thread(target=read)
    reader.start()
    done = _evaluate(str(INPUT), "--output", str(fifo))
    reader.join(timeout=60)
    assert done.returncode == 0, done.stderr
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    assert _count(received[0]) == ISSUES
    assert [p.name for p in tmp_path.iterdir()] == ["issues.fifo"]


def _device(tmp_path: Path, name: str, minor: int) -> Path:
    """Our own node of a memory device (1, minor), so that no test ever risks /dev itself (the old
    code replaced the device with a regular file when run as root)."""
    node = tmp_path / name
    try:
        os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, minor))
    except OSError as exc:
        pytest.skip(f"cannot make a device node here ({exc.strerror}): not root")
    return node


def test_device_stays_a_device(tmp_path: Path) -> None:
    null = _device(tmp_path, "null", 3)
    before = null.stat()
    done = _evaluate(str(INPUT), "--output", str(null))
    assert done.returncode == 0, done.stderr
    after = null.lstat()
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev
    assert stat.S_IMODE(after.st_mode) == stat.S_IMODE(before.st_mode)
    assert [p.name for p in tmp_path.iterdir()] == ["null"]


def test_dev_null_and_dev_stdout_are_written_in_place() -> None:
    if os.geteuid() != 0:  # as root the old code would have replaced /dev/null: never risk it
        done = _evaluate(str(INPUT), "--output", "/dev/null")
        assert done.returncode == 0 and done.stdout == b"", done.stderr
    done = _evaluate(str(INPUT), "--output", "/dev/stdout")
    assert done.returncode == 0, done.stderr
    assert _count(done.stdout) == ISSUES


def test_a_full_device_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    """Writing fails (ENOSPC, like /dev/full): one line, exit 2, and the device stays a device."""
    full = _device(tmp_path, "full", 7)
    done = _evaluate(str(INPUT), "--output", str(full))
    assert done.returncode == 2
    assert done.stderr.decode().strip() == (
        f"fhir-leuko: error: --output {full}: cannot write: No space left on device"
    )
    assert stat.S_ISCHR(full.lstat().st_mode)
    assert [p.name for p in tmp_path.iterdir()] == ["full"]
