"""Leaving a batch command without freeing what it built, as mypy's ``--fast-exit`` does.

``evaluate`` ends holding its dataset: for a bulk export, millions of lab results. Freeing them
one by one when the run is over costs about 0.3 s a million Observations (4 % of the run;
benchmarks/README.md), and nobody waits for it but the user. A command hands what it is done with
to :func:`keep_until_exit`; the console entry point (:func:`fhir_leuko.cli.run`) then flushes and
leaves with :func:`os._exit`. ``main()`` called from Python (the tests) releases what an earlier
call kept, so nothing accumulates there.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import NoReturn

__all__ = ["holding", "keep_until_exit", "leave", "release"]

_KEPT: list[object] = []


def keep_until_exit(*objects: object) -> None:
    """Keep ``objects`` alive until the process exits (which then skips freeing them)."""
    _KEPT.extend(objects)


def holding() -> bool:
    """Whether a command kept anything (and the process may leave without freeing it)."""
    return bool(_KEPT)


def release() -> None:
    """Drop what an earlier command kept (a new ``main()`` in the same process)."""
    _KEPT.clear()


def leave(code: int, on_broken_pipe: Callable[[], None]) -> NoReturn:
    """Exit with ``code`` now. Everything is written and every file and worker closed by then (the
    command has returned); this flushes what Python's own shutdown would, and nothing else runs."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, ValueError):
            on_broken_pipe()
    os._exit(code)
