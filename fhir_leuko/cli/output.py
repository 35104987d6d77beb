"""Where a command's output goes: stdout, ``-``, a device or pipe, or a regular file.

A regular file is written beside its target and renamed over it, so a reader never sees half a
file and a failed run leaves the old one whole. Anything else is written in place: renaming over
``/dev/null``, a FIFO or ``/dev/stdout`` would replace the device with a file (as root) or fail.
A symlink is followed: its target is written (or renamed over), the link stays a link. A new file
gets the mode the umask allows (``0666 & ~umask``, as the shell's ``>`` does), a replaced one keeps
its mode and, where the process may, its owner.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import tempfile
from pathlib import Path

from ..errors import UsageError

__all__ = ["STDOUT", "check_output", "write_output"]

STDOUT = "-"
"""``--output -``: standard output (the Unix convention)."""


def check_output(target: str | None) -> None:
    """Refuse, before any work is done, an output that cannot be written: a directory, or a file in
    a directory that does not exist.

    Raises:
        UsageError: naming the option and the reason.
    """
    if target is None or target == STDOUT:
        return
    path = Path(target)
    if path.is_dir():
        raise UsageError(f"--output {target}: is a directory (give a file name, or - for stdout)")
    if not path.exists():
        parent = Path(os.path.realpath(path)).parent
        if not parent.is_dir():
            raise UsageError(f"--output {target}: directory {parent} does not exist")


def write_output(target: str | None, data: bytes) -> None:
    """Write ``data`` to stdout (``None`` or ``-``) or to ``target`` (see the module docstring).

    Raises:
        UsageError: the target cannot be written (a directory, no space, no permission); a
            replaced regular file is then left as it was.
    """
    try:
        if target is None or target == STDOUT:
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
            return
        check_output(target)
        try:
            info = os.stat(target)  # follows symlinks: what is written is the target
        except FileNotFoundError:
            info = None
        if info is not None and not stat.S_ISREG(info.st_mode):
            with open(target, "wb") as handle:  # a device, a pipe, /dev/stdout: in place
                handle.write(data)
            return
        _replace(Path(os.path.realpath(target)), data, info)
    except BrokenPipeError:
        raise
    except OSError as exc:
        where = "stdout" if target in (None, STDOUT) else f"--output {target}"
        raise UsageError(f"{where}: cannot write: {exc.strerror or exc}") from None


def _replace(path: Path, data: bytes, existing: os.stat_result | None) -> None:
    """Write beside ``path`` and rename over it; a new file gets ``0666 & ~umask``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if existing is not None:
                os.fchmod(handle.fileno(), stat.S_IMODE(existing.st_mode))
                with contextlib.suppress(PermissionError):  # only root may give files away
                    os.fchown(handle.fileno(), existing.st_uid, existing.st_gid)
            else:
                os.fchmod(handle.fileno(), 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it; set back at once
    os.umask(mask)
    return mask
