"""The work directory of one sharded run, and the ones that runs stopped by ``kill -9`` left.

A run's shards live in a directory of their own (``fhir-leuko-shards-*`` under ``--work-dir`` or
the system's temporary directory), removed when the run ends, whatever ends it, except what nothing
can unwind: ``kill -9``, the OOM killer, a host that goes down. A nightly job killed so leaves a
copy of its input's routing behind each time, until the disk is full. So each run also removes
the directories such runs left beside its own.

Which runs are gone is known from a lock, not a pid file: the run holds an exclusive ``flock`` on
the directory's ``.owner`` file for as long as it lives, and the kernel releases it however the
process ends (a pid can be reused by another process; a lock cannot outlive its holder). A
directory is removed only when all of these hold, so a run's directory is never taken from it:

* its ``.owner`` names this host: a file system shared with other hosts may keep its locks per
  host (NFS mounted ``local_lock=all``), and a run on another host would look gone;
* its lock can be taken now. ``.owner`` appears already locked (it is locked under another name,
  then renamed), so a directory still being set up has none and is left alone, as is one of an
  older fhir-leuko, of another user, or on a file system without locks.

The standard library's ``fcntl.flock`` is enough here; no locking library is needed. Where it is
missing (Windows), runs still remove their own directory and leave the others.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from .routing import work_dir_io

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no leftovers are removed
    fcntl = None  # type: ignore[assignment]

__all__ = ["PREFIX", "remove_abandoned", "temporary_work_dir"]

log = logging.getLogger(__name__)

PREFIX = "fhir-leuko-shards-"
_OWNER = ".owner"


@contextmanager
def temporary_work_dir(parent: Path | None) -> Iterator[Path]:
    """A new directory for one run's shards under ``parent`` (created if missing; default: the
    system's temporary directory), removed afterwards whatever happens; the directories that
    killed runs of this host left under ``parent`` are removed first."""
    base = parent or Path(tempfile.gettempdir())
    with work_dir_io(base, "create"):
        base.mkdir(parents=True, exist_ok=True)
        directory = Path(tempfile.mkdtemp(prefix=PREFIX, dir=base))
    owner = None
    try:
        owner = _own(directory)
        remove_abandoned(base, keep=directory)
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        if owner is not None:
            os.close(owner)  # only now: the directory is gone before its lock is free


def _own(directory: Path) -> int | None:
    """Lock ``directory``'s ``.owner`` for the life of this process; its descriptor, or ``None``
    where the file system (or the platform) has no locks."""
    if fcntl is None:
        return None
    pending = directory / f"{_OWNER}.{os.getpid()}"
    try:
        fd = os.open(pending, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        log.debug("no lock on %s (%s): it is removed by this run only", directory, exc)
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, f"{socket.gethostname()}\n".encode())
        os.rename(pending, directory / _OWNER)  # it appears locked: never taken while set up
    except OSError as exc:
        log.debug("no lock on %s (%s): it is removed by this run only", directory, exc)
        os.close(fd)
        pending.unlink(missing_ok=True)
        return None
    return fd


def remove_abandoned(base: Path, *, keep: Path | None = None) -> list[Path]:
    """Remove the work directories under ``base`` whose run, on this host, is gone (the module
    docstring says how that is known); the ones removed. Never raises: a directory that cannot be
    read or removed is left, and said."""
    if fcntl is None:
        return []
    try:
        candidates = sorted(p for p in base.iterdir() if p.name.startswith(PREFIX) and p != keep)
    except OSError:
        return []
    host = socket.gethostname()
    removed: list[Path] = []
    for directory in candidates:
        try:
            fd = os.open(directory / _OWNER, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue  # being set up, not ours, or not a work directory of this version
        try:
            if os.read(fd, 1024).decode(errors="replace").strip() != host:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its run is still going
            size = _size(directory)
            shutil.rmtree(directory, ignore_errors=True)
        finally:
            os.close(fd)
        if directory.exists():
            log.warning("could not remove all of %s, left by a run that was killed", directory)
        else:
            removed.append(directory)
            log.warning(
                "removed %s (%.1f MiB), the shards of a run that was killed before it could "
                "remove them (kill -9, the OOM killer)",
                directory,
                size / 2**20,
            )
    return removed


def _size(directory: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(directory):
        for name in files:
            with suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total
