"""Reading files into the rule core, fast: NDJSON lines decoded and checked in one loop.

A Bulk Data export is millions of Observations, and decoding and checking each of them is most of
the work of ``fhir-leuko evaluate``. Here NDJSON files (also gzipped) are fed line by line to
:meth:`fhir_leuko.core.normalise.Normaliser.feed_lines`, without a ``(resource, Origin)`` pair per
line; other files go through :func:`fhir_leuko.files.reader.read_file`. The result is what
:func:`fhir_leuko.core.normalise.normalise` gives for :func:`fhir_leuko.files.reader.read_paths`.

(Reading on several processes was tried: on this project's 2-vCPU machines two processes parse
only 1.4x faster than one, and passing the results back cost more than that; benchmarks/README.md.)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from ..core.knowledge import Knowledge
from ..core.model import Problem
from ..core.normalise import Dataset, Normaliser
from .reader import (
    READ_ERRORS,
    Progress,
    input_files,
    is_ndjson,
    open_input,
    read_failure,
    read_file,
)

__all__ = ["normalise_files", "normalise_paths"]


def _counted(lines: Iterable[bytes], progress: Progress) -> Iterator[bytes]:
    """The lines, their bytes told to ``progress`` every MiB (a progress bar's update a line
    costs about 0.2 s a million lines)."""
    pending = 0
    try:
        for line in lines:
            pending += len(line)
            if pending >= 1 << 20:
                progress(pending)
                pending = 0
            yield line
    finally:
        if pending:
            progress(pending)


def normalise_paths(
    paths: Sequence[Path],
    knowledge: Knowledge,
    *,
    progress: Progress | None = None,
    same_source: bool = False,
) -> Dataset:
    """What :func:`fhir_leuko.core.normalise.normalise` gives for these files and directories
    (read as :func:`fhir_leuko.files.reader.read_paths` reads them: each path given a source).

    Raises:
        InputError: a path does not exist (before anything is read).
    """
    return normalise_files(
        input_files(paths, same_source=same_source), knowledge, progress=progress
    )


def normalise_files(
    files: Sequence[tuple[Path, str | None]],
    knowledge: Knowledge,
    *,
    progress: Progress | None = None,
) -> Dataset:
    """:func:`normalise_paths` for the files :func:`~fhir_leuko.files.reader.input_files` listed."""
    normaliser = Normaliser(knowledge)
    with normaliser.collecting():
        for path, input in files:
            if not is_ndjson(path):
                normaliser.feed(read_file(path, progress, input))
                continue
            try:
                with open_input(path) as stream:
                    lines = stream if progress is None else _counted(stream, progress)
                    normaliser.feed_lines(lines, str(path), input=input)
            except READ_ERRORS as exc:
                normaliser.data.problems.append(Problem(str(path), read_failure(exc)))
        return normaliser.run()
