"""Run a real PostgreSQL server (Debian's ``postgresql`` package) on loopback for tests.

``./dev test`` installs the package on a fresh machine when it runs as root (``apt-get install -y
postgresql``); elsewhere :func:`find_bin` returns ``None`` and the tests that need a shared store
skip and say what to install.

The server is private to the test session: ``initdb`` into a temporary directory (trust
authentication, listening on ``127.0.0.1`` on a free port and on a socket in that directory),
started with ``pg_ctl``; :meth:`PostgresServer.stop` stops it and removes the directory. PostgreSQL
refuses to run as root: as root, the directory is given to the ``postgres`` user (which the Debian
package creates) and the programs run as that user (``runuser``).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from .sekmet import free_port

__all__ = ["PostgresServer", "find_bin"]


def find_bin() -> Path | None:
    """The directory of ``initdb`` and ``pg_ctl`` (the newest Debian version), or ``None``."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: p.parent.parent.name)
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PostgresServer:
    """A throw-away PostgreSQL server. Use as a context manager; :attr:`dsn` connects to it."""

    def __init__(self, bin_dir: Path, database: str = "fhir_leuko") -> None:
        self.bin_dir = bin_dir
        self.database = database
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="fhir-leuko-pg-"))
        self.data = self.dir / "data"
        self._as: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.dir, user.pw_uid, user.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
            self.user = "postgres"
        else:
            self.user = pwd.getpwuid(os.geteuid()).pw_name

    @property
    def dsn(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{self.database}"

    def _run(self, *args: str, timeout: float = 120) -> None:
        done = subprocess.run(
            [*self._as, *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed: {done.stdout}{done.stderr}")

    def start(self) -> None:
        self._run(
            str(self.bin_dir / "initdb"),
            "-D", str(self.data),
            "--auth=trust",
            "--encoding=UTF8",
            "--no-sync",
            "-U", self.user,
        )
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} -c fsync=off"
        self._run(
            str(self.bin_dir / "pg_ctl"),
            "-D", str(self.data),
            "-o", options,
            "-l", str(self.dir / "server.log"),
            "-w",
            "start",
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                self._run(str(self.bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, self.database, timeout=30)
                return
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self) -> None:
        if self.data.exists():
            subprocess.run(
                [*self._as, str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"],
                capture_output=True,
                timeout=60,
                check=False,
            )
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
