"""The partition pass of sharded evaluation (:mod:`.shards`): NDJSON routed by patient into shards
on disk, in parallel.

The input files are cut into *pieces* (byte ranges; a piece holds the lines that start in it, and
a gzipped file is one piece). Each piece is routed by one task (:func:`.routing.route_piece`), in
this process or on the same workers that evaluate the shards (``route_map``), so no serial pass
over the whole input remains. The client then numbers the pieces' lines as one pass would (the
pieces of a file in order), joins the records bucket by bucket (:mod:`.join`, tasks on the same
workers: what belongs together stays together, the module docstring of :mod:`.shards` says how),
and copies the few lines that must be in more than one shard.

Three rooms: this one plans and orchestrates; :mod:`.routing` is one routing task; :mod:`.join`
is the join and the copies.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

from ..core.model import Problem
from ..errors import InputError
from .executors import ShardMap
from .join import Copies, JoinTask, join, join_buckets, write_copies
from .reader import STDIN, Progress, is_ndjson
from .routing import (
    PENDING,
    Piece,
    Routed,
    gzipped,
    patient_key_of,
    patient_shard,
    piece_lines,
    route_piece,
    work_dir_io,
)

__all__ = [
    "MAX_SHARDS",
    "PIECE_BYTES",
    "SHARD_BYTES",
    "JoinTask",
    "Partition",
    "Piece",
    "Routed",
    "check_unchanged",
    "gzipped",
    "join_buckets",
    "link_owners",
    "partition",
    "patient_key_of",
    "patient_shard",
    "piece_lines",
    "piece_size",
    "route_piece",
    "shard_count",
]

log = logging.getLogger(__name__)

SHARD_BYTES = 160 << 20
"""Input bytes per shard (about 110,000 Observations as servers write them): a shard's
normalising and evaluating then peaks well under 500 MB (benchmarks/README.md)."""

PIECE_BYTES = 256 << 20
"""The largest piece: what one routing task holds in memory stays small (36 bytes a line)."""

MAX_SHARDS = PENDING - 1
"""The most shards a partition can have: a shard number is 16 bits, and one value means none yet."""
_MAX_PIECES = 0xFFFF
_IN_MEMORY = (
    "evaluating in memory, not in shards (memory grows with the input, about 1 GB per million "
    "Observations)"
)
"""A warning, not a note: sharding was asked for (or the input is large), and a run that needs
more memory than the machine has should not come as a surprise."""


def link_owners(links: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Patient keys joined by ``Patient.link`` (any type, either direction, chains and cycles
    included) -> the smallest key of their group, which every process computes alike: the group
    goes to that key's shard, so the records a link merges (issue 13 §4) meet in one shard."""
    parent: dict[str, str] = {}

    def root(key: str) -> str:
        while parent.get(key, key) != key:
            key = parent[key]
        return key

    for a, b in links:
        first, second = root(a), root(b)
        if first != second:
            low, high = sorted((first, second))
            parent[high] = low
            parent.setdefault(low, low)
    return {key: root(key) for key in parent}


def shard_count(total_bytes: int, workers: int = 1) -> int:
    """How many shards for this much input: at most :data:`SHARD_BYTES` each, at least two per
    worker, and a multiple of the workers: shards take about the same time, so 9 shards on 2
    workers would leave one idle for the last (0.8 s of 6 at a million Observations)."""
    count = max(1, math.ceil(total_bytes / SHARD_BYTES))
    if workers <= 1:
        return count
    return max(2, math.ceil(count / workers)) * workers


def piece_size(total_bytes: int, workers: int) -> int:
    """Pieces for ``workers`` routing tasks at once: four per worker (a slow one does not leave
    the others idle), at least 32 MiB each."""
    return max(32 << 20, math.ceil(total_bytes / (4 * workers)))


@dataclass
class Partition:
    """The shards written by :func:`partition`, and what the merge needs."""

    directory: Path
    count: int
    files: list[tuple[str, str | None]]
    """The input files (path, input) in reading order."""
    inputs: list[str | None]
    """Every input whose files were opened (each is a source of the run)."""
    pieces: list[tuple[int, int, int]] = field(default_factory=list)
    """(piece, file, line offset) in reading order: a piece's line ``n`` is line ``n + offset``
    of its file; shard files are named by the piece."""
    problems: list[Problem] = field(default_factory=list)
    """Files that could not be read (whole or in part)."""
    lines: int = 0
    copies: int = 0
    copied: Counter[str] = field(default_factory=Counter)
    """Resources read into more than one shard, by type (taken off the merged counts)."""
    owners: dict[str, str] = field(default_factory=dict)
    """Linked patients' keys -> their group's key (:func:`link_owners`)."""
    placed: list[int] = field(default_factory=list)
    """The lines written into each shard's index (routed and copied): what it must read back."""
    stamps: list[tuple[int, int]] = field(default_factory=list)
    """Each input file's (size, modification time in ns) before it was routed: a shard reads the
    lines back from the file by byte range, so a file that changed since would give other lines
    (:func:`check_unchanged`)."""

    def shard_of(self, key: str) -> int:
        """The shard that owns a patient key (without a source prefix)."""
        return patient_shard(self.owners.get(key, key), self.count)


def _pieces(
    files: Sequence[tuple[Path, str | None]], directory: Path, count: int, piece_bytes: int
) -> list[Piece]:
    """The pieces of the files, of about ``piece_bytes`` each (a gzipped file is one piece)."""
    total = sum(path.stat().st_size for path, _input in files)
    piece_bytes = max(piece_bytes, math.ceil(total / max(1, _MAX_PIECES - len(files))) + 1)
    pieces: list[Piece] = []
    for file, (path, _input) in enumerate(files):
        size = 0 if gzipped(path) else path.stat().st_size
        cuts = max(1, math.ceil(size / piece_bytes))
        step = math.ceil(size / cuts) if cuts > 1 else 0
        for cut in range(cuts):
            end = (cut + 1) * step if cut < cuts - 1 else -1
            pieces.append(
                Piece(len(pieces), file, str(path), cut * step, end, str(directory), count)
            )
    return pieces


def _empty(directory: Path, count: int) -> None:
    """``directory`` emptied, with one empty directory per shard."""
    shutil.rmtree(directory, ignore_errors=True)
    with work_dir_io(directory, "create"):
        for k in range(count):
            (directory / f"{k:03d}").mkdir(parents=True)


RouteMap = ShardMap
"""``map(fn, tasks)`` on some executor (:mod:`.executors`): routes the pieces, then joins the
buckets; the results in the order of the tasks."""


def partition(
    files: Sequence[tuple[Path, str | None]],
    directory: Path,
    count: int,
    *,
    progress: Progress | None = None,
    route_map: RouteMap | None = None,
    piece_bytes: int | None = None,
) -> Partition | None:
    """Write the shards of these files into ``directory`` (emptied first), or ``None`` (and a log
    line saying why) when the input must be evaluated in memory to stay exact.

    ``route_map`` routes the pieces on an executor's workers (:mod:`.executors`; progress is then
    counted piece by piece); without it they are routed in this process, one after another.
    ``piece_bytes`` cuts files into pieces of about that size (at most :data:`PIECE_BYTES`).
    """
    if count < 1:
        raise ValueError("count must be at least 1")
    if count > MAX_SHARDS:
        raise ValueError(f"at most {MAX_SHARDS} shards")
    if any(path == STDIN for path, _input in files):
        # Shards read their lines back from the input by byte range: a pipe is read once.
        log.warning("%s: standard input is read once (save it to a file to shard it)", _IN_MEMORY)
        return None
    not_ndjson = [path for path, _input in files if not is_ndjson(path)]
    if not_ndjson:
        log.warning("%s: %s is not NDJSON", _IN_MEMORY, not_ndjson[0])
        return None
    _empty(directory, count)
    stamps = [_stamp(path) for path, _input in files]
    pieces = _pieces(files, directory, count, min(piece_bytes or PIECE_BYTES, PIECE_BYTES))
    if len(pieces) > _MAX_PIECES:
        log.warning("%s: more than %d input files", _IN_MEMORY, _MAX_PIECES)
        shutil.rmtree(directory, ignore_errors=True)
        return None
    result = Partition(directory, count, [(str(p), i) for p, i in files], [], stamps=stamps)
    routed = _route(pieces, progress, route_map)
    unsafe = next((r.unsafe for r in routed if r.unsafe), "")
    owners = link_owners(link for r in routed for link in r.links) if not unsafe else {}
    apart = [k for k, o in owners.items() if patient_shard(k, count) != patient_shard(o, count)]
    if apart:
        # Records merged by Patient.link hashed to different shards: route everything again, each
        # linked patient to its group's shard (the links are known only after a whole pass).
        log.info("routing again: %d linked patients hashed apart from their records", len(apart))
        _empty(directory, count)
        pieces = [replace(piece, owners=owners) for piece in pieces]
        routed = _route(pieces, None, route_map)
        result.owners = owners
    copies: Copies = {}
    held: set[tuple[int, int]] = set()
    if not unsafe:
        copies, held, unsafe = join(directory, pieces, routed, route_map)
    if unsafe:
        log.warning("%s: the input holds %s", _IN_MEMORY, unsafe)
        shutil.rmtree(directory, ignore_errors=True)
        return None
    inputs: dict[str | None, None] = {}
    offsets: dict[int, int] = {}
    failed: set[int] = set()
    for piece, done in zip(pieces, routed, strict=False):
        path, input = files[piece.file]
        if done.opened:
            inputs.setdefault(input)
        if done.problem and piece.file not in failed:
            failed.add(piece.file)
            result.problems.append(Problem(str(path), done.problem))
        offset = offsets.get(piece.file, 0)
        result.pieces.append((piece.index, piece.file, offset))
        offsets[piece.file] = offset + done.lines
        result.lines += done.routed
    result.inputs = list(inputs)
    result.copies = sum(len(v) for v in copies.values())
    result.copied, extra = write_copies(directory, count, pieces, copies, held)
    result.placed = [
        sum(done.placed[k] for done in routed if done.placed) + extra[k] for k in range(count)
    ]
    shutil.rmtree(directory / "join", ignore_errors=True)
    return result


def _stamp(path: Path) -> tuple[int, int]:
    try:
        stat = path.stat()
    except OSError:
        return (-1, -1)  # unreadable: routing names the problem
    return (stat.st_size, stat.st_mtime_ns)


def check_unchanged(path: str, stamp: tuple[int, int]) -> None:
    """Raise :class:`InputError` when an input file is not what was routed: its lines would be
    read back from other byte ranges (an export still being written, a file replaced)."""
    if stamp != (-1, -1) and _stamp(Path(path)) != stamp:
        raise InputError(
            f"{path} changed while it was being evaluated (its size or modification time is not "
            "what it was when the input was partitioned); nothing was written: run again once "
            "the input is complete"
        )


def _route(
    pieces: Sequence[Piece], progress: Progress | None, route_map: RouteMap | None
) -> list[Routed]:
    if route_map is None:  # in this process: progress line by line, and stop at the first unsafe
        out: list[Routed] = []
        for piece in pieces:
            out.append(route_piece(piece, progress))
            if out[-1].unsafe:
                break
        return out
    done: list[Routed] = []
    routed_pieces = route_map(partial(route_piece, progress=None), pieces)
    for piece, routed in zip(pieces, routed_pieces, strict=True):
        done.append(routed)
        if progress is not None:
            size = Path(piece.path).stat().st_size
            progress((size if piece.end < 0 else piece.end) - piece.start)
    return done
