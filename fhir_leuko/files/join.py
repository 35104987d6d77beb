"""The join of the partition pass (:mod:`.partition`): what belongs together stays together.

Routing (:mod:`.routing`) writes, per piece, join records by kind (``obs``: an Observation's key
and shard; ``member``: a result a report lists; ``panel``: a member a panel lists), in buckets by
the key's hash. Each bucket is joined on its own (:func:`join_buckets`, tasks on the same workers
that routed), which gives the lines that must go to further shards (the module docstring of
:mod:`.shards` says which); :func:`write_copies` then appends them there.
"""

from __future__ import annotations

import math
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .executors import ShardMap
from .reader import READ_ERRORS, open_input
from .routing import (
    BUCKETS,
    PENDING,
    ROUTE_DECODER,
    Piece,
    Routed,
    ShardWriter,
    gzipped,
    join_dir,
    piece_lines,
    work_dir_io,
)

__all__ = ["Copies", "JoinTask", "join", "join_buckets", "write_copies"]


def _load_bucket(
    directories: Sequence[Path], kind: str, bucket: int
) -> Iterator[tuple[int, int, int, int]]:
    """(hash, shard, piece, line) of the records of one bucket, piece by piece."""
    for directory in directories:
        path = directory / kind
        # Routing writes every kind: a missing file is a work directory the workers do not share.
        with work_dir_io(directory.parent.parent, "read"), path.open("rb") as handle:
            sizes = array("Q")
            sizes.fromfile(handle, BUCKETS)
            total = sum(sizes)
            before = sum(sizes[:bucket])
            size = sizes[bucket]
            if not size:
                continue
            hashes, places = array("Q"), array("Q")
            handle.seek(8 * (BUCKETS + before))
            hashes.fromfile(handle, size)
            handle.seek(8 * (BUCKETS + total + before))
            places.fromfile(handle, size)
        for h, place in zip(hashes, places, strict=True):
            yield h, place >> 48, (place >> 32) & 0xFFFF, place & 0xFFFFFFFF


Copies = dict[tuple[int, int], set[int]]
"""(piece, line) -> the further shards that line goes to."""


@dataclass(frozen=True)
class JoinTask:
    """Some buckets of the join, for one task (picklable): the pieces' join directories."""

    directories: tuple[str, ...]
    buckets: tuple[int, ...]


_JOIN_TASKS = 8
"""Tasks the join is cut into when the pieces were routed on workers (64 buckets, 8 each)."""


def join_buckets(task: JoinTask) -> tuple[Copies, set[tuple[int, int]], str]:
    """The join of some buckets (a task: buckets share nothing): the lines that go to further
    shards, the lines the pass held back, and why the input cannot be sharded, if so."""
    directories = [Path(d) for d in task.directories]
    out: Copies = {}
    held: set[tuple[int, int]] = set()
    unsafe = ""
    for bucket in task.buckets:
        # One entry per Observation key; the few read twice also in `versions`.
        first: dict[int, tuple[int, int, int]] = {}
        versions: dict[int, list[tuple[int, int, int]]] = {}
        for h, shard, piece, line in _load_bucket(directories, "obs", bucket):
            if shard == PENDING:
                held.add((piece, line))
            known = first.get(h)
            if known is None:
                first[h] = (shard, piece, line)
            else:
                versions.setdefault(h, [known]).append((shard, piece, line))
        for entries in versions.values():
            shards = {s for s, _f, _l in entries if s != PENDING}
            if len(shards) > 1:  # versions of one Observation in several shards
                for s, f, n in entries:
                    out.setdefault((f, n), set()).update(shards - {s})
        placed: set[tuple[int, int]] = set()
        for kind in ("member", "panel"):
            for h, container, piece, line in _load_bucket(directories, kind, bucket):
                known = first.get(h)
                if known is None or (known[0] == container and h not in versions):
                    continue  # not in the input, or in the container's shard: the usual case
                entries = versions.get(h) or [known]
                targets = {s for s, _f, _l in entries if s != PENDING}
                if container == PENDING:
                    if kind == "panel" and any(s == PENDING for s, _f, _l in entries):
                        unsafe = "a panel without a subject listing results without one"
                    out.setdefault((piece, line), set()).update(targets or {0})
                    continue
                if targets - {container}:
                    out.setdefault((piece, line), set()).update(targets - {container})
                for s, f, n in entries:
                    if s == PENDING:
                        out.setdefault((f, n), set()).add(container)
                        placed.add((f, n))
        for h, (s, f, n) in first.items():
            if s == PENDING and (f, n) not in placed and h not in versions:
                out.setdefault((f, n), set()).add(0)
        for entries in versions.values():
            for s, f, n in entries:
                if s == PENDING and (f, n) not in placed:
                    out.setdefault((f, n), set()).add(0)
    return out, held, unsafe


def join(
    directory: Path,
    pieces: Sequence[Piece],
    routed: Sequence[Routed],
    route_map: ShardMap | None,
) -> tuple[Copies, set[tuple[int, int]], str]:
    """Which lines go to which further shards, the lines the pass held back (placed only here:
    subject-less Observations and Medications), and why the input cannot be sharded, if so.

    The buckets are joined by tasks on the workers that routed the pieces (``route_map``), or
    here: at a million Observations the join is 0.5 s that the workers would otherwise wait."""
    directories = tuple(str(join_dir(directory, piece.index)) for piece in pieces)
    if route_map is None:
        parts: Iterable[tuple[Copies, set[tuple[int, int]], str]] = [
            join_buckets(JoinTask(directories, tuple(range(BUCKETS))))
        ]
    else:
        tasks = [
            JoinTask(directories, tuple(range(i, BUCKETS, _JOIN_TASKS)))
            for i in range(_JOIN_TASKS)
        ]
        parts = route_map(join_buckets, tasks)
    out: Copies = {}
    held: set[tuple[int, int]] = set()
    unsafe = ""
    for part_out, part_held, part_unsafe in parts:
        for at, targets in part_out.items():  # a report lists results of several buckets
            out.setdefault(at, set()).update(targets)
        held |= part_held
        unsafe = unsafe or part_unsafe
    medications: dict[str, set[int]] = {}
    for done in routed:
        for key, shards in done.medications.items():
            medications.setdefault(key, set()).update(shards)
    for done in routed:
        for line, key in done.medication_lines:
            held.add((done.piece, line))
            out.setdefault((done.piece, line), set()).update(medications.get(key) or {0})
    return out, held, unsafe


def write_copies(
    directory: Path,
    count: int,
    pieces: Sequence[Piece],
    copies: Copies,
    unwritten: set[tuple[int, int]],
) -> tuple[Counter[str], list[int]]:
    """Append each copied line to its further shards (``-extra`` files), piece by piece. Gives
    the resources that are now in more than one shard, by type (``unwritten``: lines the pass held
    back, so their first copy is not an extra one), and the lines appended to each shard."""
    copied: Counter[str] = Counter()
    placed = [0] * count
    by_piece: dict[int, dict[int, set[int]]] = {}
    for (at, number), targets in copies.items():
        by_piece.setdefault(at, {})[number] = targets
    for index in sorted(by_piece):
        wanted = by_piece[index]
        piece = pieces[index]
        path = Path(piece.path)
        writer = ShardWriter(directory, index, count, gzipped(path), "-extra")
        end = piece.end if piece.end >= 0 else math.inf
        try:
            with open_input(path) as stream:
                offset = piece_lines(stream, piece.start)
                for number, text in enumerate(stream, start=1):
                    if offset >= end:
                        break
                    into = wanted.get(number)
                    if into:
                        for shard in sorted(into):
                            writer.add(shard, number, text, offset)
                        extra = len(into) - ((index, number) in unwritten)
                        if extra > 0:
                            route = ROUTE_DECODER.decode(text)
                            copied[route.resourceType] += extra
                    offset += len(text)
        except READ_ERRORS:
            pass  # already a problem of the pass
        finally:
            writer.close()
        for shard, numbers in enumerate(writer.numbers):
            placed[shard] += len(numbers)
    return copied, placed
