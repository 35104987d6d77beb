"""Reading FHIR R4 JSON from disk: Bundles, single resources, NDJSON (also gzipped), directories.

This is an edge: it does file I/O and hands the rule core decoded resources with their origin.
Every problem (unreadable file, invalid JSON line, malformed entry) becomes a :class:`Problem`
naming the file, the position and the resource where known; reading always goes on.

Each path given is an *input* (a directory, or a file given alone), and each resource's
:attr:`~fhir_leuko.core.fhirjson.Origin.input` names it: the rule core keeps the resources of
different sources apart (``core/normalise/sources.py``). Inputs are read in a fixed order (by
name, whatever the order they were given in) and each file once, as part of the outermost input
that holds it.
"""

from __future__ import annotations

import gzip
import io
import os
import re
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, cast

from ..core.fhirjson import (
    TOO_DEEP,
    Bundle,
    MalformedResourceError,
    Origin,
    Sourced,
    bundle_entries,
    decode_any,
    iter_document,
    malformed_document,
)
from ..core.model import UNREADABLE_FILE, Problem
from ..errors import InputError

__all__ = [
    "INPUT_SUFFIXES",
    "READ_ERRORS",
    "STDIN",
    "UNREAD_COMPRESSIONS",
    "expand_paths",
    "input_files",
    "input_label",
    "is_ndjson",
    "open_input",
    "read_failure",
    "read_file",
    "read_paths",
    "unread_compression",
    "walk_directory",
]

STDIN = Path("-")
"""The path that means standard input (``fhir-leuko evaluate -``)."""

INPUT_SUFFIXES = (".json", ".ndjson", ".jsonl", ".json.gz", ".ndjson.gz", ".jsonl.gz")

READ_ERRORS = (OSError, EOFError, zlib.error)
"""What reading a file may raise: OSError (including gzip.BadGzipFile, a bad header), EOFError (a
.gz cut short) and zlib.error (a .gz whose compressed body is corrupt, which is not an OSError).
Each becomes a problem naming the file; what was read before it is kept."""


Progress = Callable[[int], object]
"""Called with the number of bytes just read (e.g. ``tqdm.update``)."""


UNREAD_COMPRESSIONS = {
    ".zst": "zstd",
    ".bz2": "bzip2",
    ".xz": "xz",
    ".lz4": "lz4",
    ".br": "brotli",
    ".zip": "zip",
    ".7z": "7-Zip",
}
"""Compressions a data file may come in that fhir-leuko does not read (gzip is what Bulk Data
servers write). A file of FHIR data named so (``Observation.000.ndjson.zst``) is not skipped in a
directory as other files are: it is read as a problem naming it, so that its resources are never
left out without a word ("no Observation in the input" of an export compressed with zstd)."""


def unread_compression(path: Path) -> str | None:
    """The compression fhir-leuko does not read that ``path``'s name says, or ``None``."""
    return UNREAD_COMPRESSIONS.get(os.path.splitext(path.name.lower())[1])


def is_ndjson(path: Path) -> bool:
    """NDJSON by its name (``.ndjson``, ``.jsonl``, also gzipped; or compressed so that it cannot
    be read, as :func:`open_input` says)."""
    name = path.name.lower()
    if unread_compression(path):
        name = os.path.splitext(name)[0]
    return name.removesuffix(".gz").endswith((".ndjson", ".jsonl"))


def _is_input(path: Path) -> bool:
    name = path.name.lower()
    if name.startswith("."):
        return False
    if unread_compression(path):  # FHIR data by its name: a problem, never skipped
        name = os.path.splitext(name)[0]
        return name.endswith((".json", ".ndjson", ".jsonl"))
    return name.endswith(INPUT_SUFFIXES)


def walk_directory(path: Path) -> Iterator[tuple[Path, list[str]]]:
    """The directories under ``path`` (``path`` first) with the names of their files, sorted, as
    every reader of a directory walks them: hidden ones are skipped (an export's own state), and
    symbolic links to directories are followed (``exports/latest`` pointing at the newest export:
    not following it left what it holds out without a word), each real directory once (a link
    back up the tree would loop; one also reached by its own name is read once)."""
    seen: set[str] = set()
    for root, dirnames, filenames in os.walk(path, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        yield Path(root), sorted(filenames)


def expand_paths(paths: Iterable[Path]) -> list[Path]:
    """Files to read, in a stable order; directories are walked recursively.

    ``-`` is standard input (once, however often it is named); a FIFO or device (``/dev/stdin``,
    a shell's ``<(zcat x.gz)``) is read like a file.

    Raises:
        InputError: a path does not exist.
    """
    files: list[Path] = []
    for path in paths:
        if path == STDIN:
            if STDIN not in files:
                files.append(STDIN)
        elif path.is_dir():
            for root, filenames in walk_directory(path):
                files.extend(root / name for name in filenames if _is_input(Path(name)))
        elif path.exists():
            files.append(path)
        else:
            raise InputError(f"{path}: no such file or directory")
    return files


# A file of a FHIR Bulk Data export: one NDJSON file per resource type, possibly in parts
# (https://hl7.org/fhir/uv/bulkdata/export.html: "Observation.ndjson", "Observation.2.ndjson").
_EXPORT_FILE = re.compile(r"^[A-Z][A-Za-z]+(?:\.[0-9]+)?\.(?:ndjson|jsonl)(?:\.gz)?$")


def input_label(path: Path) -> str:
    """How an input is named as a source: the path as given, normalised (``./export/`` is
    ``export``), not the absolute path, so output does not depend on where it runs. A file of a
    Bulk Data export (``export/Patient.ndjson``) given on its own is part of its export: its input
    is the directory (so ``export/Observation.ndjson export/Patient.ndjson`` is one source)."""
    if _EXPORT_FILE.match(path.name) and not path.is_dir():
        return os.path.normpath(str(path.parent))
    return os.path.normpath(str(path))


def input_files(
    paths: Iterable[Path], *, same_source: bool = False
) -> list[tuple[Path, str | None]]:
    """Files to read, each with the input it belongs to (``None`` for every file with
    ``same_source``: everything is one source, as one server's export split in several places).

    Inputs are taken in order of their name and each file once: a file inside a directory that is
    given too belongs to that directory (the outermost input holding it), and a path given twice
    is one input.

    Raises:
        InputError: a path does not exist (before anything is read).
    """
    given: dict[str, list[Path]] = {}
    for path in paths:
        given.setdefault(input_label(path), []).append(path)
    # Outermost first: a directory claims its files before an input inside it can.
    depth = {label: len(Path(label).resolve().parts) for label in given}
    owner: set[Path] = set()
    files_of: dict[str, list[Path]] = {}
    for label in sorted(given, key=lambda label: (depth[label], label)):
        mine = files_of[label] = []
        for file in expand_paths(sorted(set(given[label]))):
            key = file.resolve()
            if key not in owner:
                owner.add(key)
                mine.append(file)
    return [
        (file, None if same_source else label)
        for label in sorted(given)
        for file in files_of[label]
    ]


def _iter_lines(
    lines: Iterable[bytes],
    source: str,
    progress: Progress | None,
    first: int = 1,
    input: str | None = None,
) -> Iterator[Sourced | Problem]:
    # iter_document inlined: this loop runs once per line of a bulk export (millions of times),
    # where a nested generator per line costs as much as the rest of the reading.
    for number, line in enumerate(lines, start=first):
        if progress is not None:
            progress(len(line))
        if not line or line.isspace():
            continue
        try:
            resource = decode_any(line)
        except MalformedResourceError as exc:
            yield from malformed_document(exc, line, source, f"line {number}", input)
            continue
        if resource is None:
            continue
        if isinstance(resource, Bundle):
            yield from bundle_entries(resource, source, f"line {number}", input)
        else:
            yield resource, Origin(source, f"line {number}", None, input)


_BUFFER = 1 << 20


def open_input(path: Path) -> IO[bytes]:
    """An input file opened for reading bytes, gunzipped on the fly when its name ends in .gz.

    Standard input (``-``) is read whole, and gunzipped when it starts with gzip's magic number.
    """
    if path == STDIN:
        data = sys.stdin.buffer.read()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        return io.BytesIO(data)
    if path.name.lower().endswith(".gz"):
        return cast(IO[bytes], gzip.open(path, "rb"))
    compression = unread_compression(path)
    if compression is not None:
        raise OSError(
            f"compressed with {compression}, which fhir-leuko does not read: decompress it, or "
            "compress it with gzip (.gz) as Bulk Data servers do"
        )
    # A large buffer: iterating the lines of a bulk export costs half as much as with the
    # default 8 KiB one (benchmarks/README.md).
    return path.open("rb", buffering=_BUFFER)


def read_failure(exc: BaseException) -> str:
    """The problem reason for one of :data:`READ_ERRORS`."""
    if isinstance(exc, zlib.error | EOFError | gzip.BadGzipFile):
        return f"{UNREADABLE_FILE}: corrupt or truncated gzip data ({exc or type(exc).__name__})"
    return f"{UNREADABLE_FILE}: {exc}"


def _holds_ndjson(data: bytes, reason: str) -> bool:
    """Whether a .json file that is not one JSON document holds NDJSON: JSON follows the first
    value, or the first value is nested too deeply to read and more lines start a resource (a
    pretty-printed document starts only one line with '{')."""
    if "trailing characters" in reason:
        return True
    if TOO_DEEP not in reason:
        return False
    starts = 0
    for line in data.splitlines():
        starts += line.startswith(b"{")
        if starts > 1:
            return True
    return False


def read_file(
    path: Path, progress: Progress | None = None, input: str | None = None
) -> Iterator[Sourced | Problem]:
    """Resources of one file (``-``: standard input), and its problems; ``input`` names the input
    it belongs to."""
    source = "<stdin>" if path == STDIN else str(path)
    name = path.name.lower().removesuffix(".gz")
    try:
        if name.endswith((".ndjson", ".jsonl")):
            with open_input(path) as stream:
                yield from _iter_lines(stream, source, progress, 1, input)
            return
        with open_input(path) as stream:
            data = stream.read()
    except READ_ERRORS as exc:
        yield Problem(source, read_failure(exc))
        return
    if progress is not None:
        progress(len(data))
    problems: list[Problem] = []
    found = False
    for item in iter_document(data, source, "", input):
        if isinstance(item, Problem):
            problems.append(item)
        else:
            found = True
            yield item
    if not found and problems and _holds_ndjson(data, problems[0].reason):
        # A .json file holding NDJSON (one resource per line) is common in exports.
        yield from _iter_lines(data.splitlines(), source, None, 1, input)
        return
    yield from problems


def read_paths(
    paths: Iterable[Path], progress: Progress | None = None, *, same_source: bool = False
) -> Iterator[Sourced | Problem]:
    """Every resource fhir-leuko reads from these files and directories, and every problem; each
    path given is a source of its own unless ``same_source`` (see :func:`input_files`).

    Raises:
        InputError: a path does not exist (before anything is read).
    """
    for path, input in input_files(paths, same_source=same_source):
        yield from read_file(path, progress, input)
