"""The shards a killed run leaves behind are removed by the next run, and nothing else is
(``fhir_leuko/files/workdirs.py``): real processes, a real ``kill -9``, real locks."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .conftest import fhir_leuko

# A process that holds a work directory under argv[1] as a run does, until its stdin closes.
_HOLDER = """
import sys
from pathlib import Path
from fhir_leuko.files.workdirs import temporary_work_dir
with temporary_work_dir(Path(sys.argv[1])) as directory:
    (directory / "000").mkdir()
    print(directory, flush=True)
    sys.stdin.read()
"""


def _work_dirs(parent: Path) -> set[Path]:
    return {path for path in parent.iterdir() if path.name.startswith("fhir-leuko-shards-")}


def test_a_killed_runs_shards_are_removed_by_the_next_run_and_no_other(tmp_path: Path) -> None:
    """``kill -9`` (or the OOM killer) leaves a sharded run's work directory behind: the next run
    under the same ``--work-dir`` removes it and says so. Near misses, each kept: the directory of
    a run still going (another process), one whose owner is another host (its lock may be local
    to that host), one without an owner file (being set up, or not fhir-leuko's)."""
    from benchmarks.generate import generate

    export, work = tmp_path / "export", tmp_path / "work"
    generate(export, 20000)
    with subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(work)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as holder:
        assert holder.stdout is not None and holder.stdin is not None
        running = Path(holder.stdout.readline().strip())
        command = [
            sys.executable, "-m", "fhir_leuko", "evaluate", str(export), "--as-of", "2026-01-15",
            "--shards", "400", "--work-dir", str(work), "--output", str(tmp_path / "killed.ndjson"),
            "--no-progress",
        ]  # fmt: skip
        with subprocess.Popen(command, stderr=subprocess.DEVNULL) as killed:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not any(
                (path / "shards").exists() for path in (_work_dirs(work) if work.exists() else [])
            ):
                time.sleep(0.02)
            time.sleep(0.2)  # some shards written
            assert killed.poll() is None, "the run ended before it could be killed"
            killed.send_signal(signal.SIGKILL)
            killed.wait(timeout=30)
        (left,) = _work_dirs(work) - {running}
        assert any((left / "shards").iterdir())

        other_host = work / "fhir-leuko-shards-elsewhere"
        (other_host / "000").mkdir(parents=True)
        (other_host / ".owner").write_text(f"not-{socket.gethostname()}\n")
        no_owner = work / "fhir-leuko-shards-unowned"
        (no_owner / "000").mkdir(parents=True)

        again = fhir_leuko(
            "evaluate", str(export / "Patient.ndjson"), str(export / "Observation.000.ndjson"),
            "--as-of", "2026-01-15", "--shards", "2", "--work-dir", str(work),
            "--format", "ndjson", "--no-progress",
        )  # fmt: skip
        assert again.returncode in (0, 1), again.stderr
        assert f"removed {left} (" in again.stderr
        assert "the shards of a run that was killed" in again.stderr
        assert not left.exists()
        assert _work_dirs(work) == {running, other_host, no_owner}
        assert again.stderr.count("removed ") == 1
        holder.stdin.close()
        holder.wait(timeout=30)
    assert holder.returncode == 0
    assert not running.exists()  # its own run removed it
