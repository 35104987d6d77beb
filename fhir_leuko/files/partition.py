"""The partition pass of sharded evaluation (:mod:`.shards`): NDJSON routed by patient into shards
on disk, in parallel.

The input files are cut into *pieces* (byte ranges; a piece holds the lines that start in it, and
a gzipped file is one piece). Each piece is routed by one task (:func:`route_piece`), in this
process or on the same workers that evaluate the shards (``route_map``), so no serial pass over
the whole input remains: a task decodes only what routing needs of each line (``resourceType``,
``id``, ``subject``, members; msgspec skips the rest unbuilt, under 1 us a line) and writes, per
shard, the line numbers (counted from the piece's first line) and byte ranges of the lines that go
there, and its join records. The client then numbers the pieces' lines as one pass would (the
pieces of a file in order), joins the records bucket by bucket (:func:`join_buckets`, tasks on
the same workers: what belongs together stays together, the module docstring of :mod:`.shards`
says how), and copies the few lines that must be in more than one shard.

Join records are keyed by a hash of the ``Observation/id`` key that is the same in every process
(CRC-32 and Adler-32: tasks run in other interpreters); two keys with the same hash only cost a
copy of a line into a shard that does not own its patient, which never changes the output.
"""

from __future__ import annotations

import logging
import math
import shutil
import zlib
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import IO

import msgspec

from ..core.fhirjson import INPUT_TYPES
from ..core.model import Problem
from ..errors import InputError
from .executors import ShardMap
from .reader import READ_ERRORS, Progress, is_ndjson, open_input, read_failure

__all__ = [
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

_PENDING = 0xFFFF
"""The shard of a resource that has none of its own yet (a subject-less Observation)."""
_MAX_PIECES = 0xFFFF
_BUCKETS = 64
_MASK = _BUCKETS - 1
_KINDS = ("obs", "member", "panel")
_IN_MEMORY = (
    "evaluating in memory, not in shards (memory grows with the input, about 1 GB per million "
    "Observations)"
)
"""A warning, not a note: sharding was asked for (or the input is large), and a run that needs
more memory than the machine has should not come as a surprise."""
_SUBJECT_TYPES = frozenset(INPUT_TYPES) - {"Patient", "Medication"}
"""The types routed by their ``subject`` (or ``patient``): every input type but the Patient itself
and the Medication, which several patients' records may share."""


class _Ref(msgspec.Struct):
    reference: str | None = None
    identifier: msgspec.Raw | None = None


class _Link(msgspec.Struct):
    other: _Ref | None = None


class _Route(msgspec.Struct):
    """What routing a line needs, and nothing else (msgspec skips the rest unbuilt)."""

    resourceType: str = ""
    id: str | None = None
    subject: _Ref | None = None
    medicationReference: _Ref | None = None
    result: list[_Ref] = []
    hasMember: list[_Ref] = []
    link: list[_Link] = []


_ROUTE = msgspec.json.Decoder(_Route)


def _last_two(reference: str) -> list[str]:
    return reference.split("/_history/")[0].rstrip("/").split("/")


def patient_key_of(reference: str) -> str:
    """The patient key a subject reference gives in an input without Bundles (NDJSON resolves
    by ``Type/id`` only): what :meth:`Identity._patient_key` gives there, before any prefix."""
    parts = _last_two(reference)
    if len(parts) >= 2 and parts[-2] == "Patient":
        return f"Patient/{parts[-1]}"
    return reference


def _resource_key(reference: str) -> str:
    """``Type/id`` of a reference (relative, absolute or versioned), as the core resolves it."""
    if reference.count("/") == 1:
        return reference
    parts = _last_two(reference)
    return f"{parts[-2]}/{parts[-1]}" if len(parts) >= 2 else reference


def patient_shard(key: str, count: int) -> int:
    """The shard of a patient key (without a source prefix) that no ``Patient.link`` joins to
    another: :meth:`Partition.shard_of` says which shard owns any key."""
    return zlib.crc32(key.encode()) % count


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


def _key_hash(key: str) -> int:
    """A 64-bit hash of a key, the same in every process (``hash`` is salted per process)."""
    data = key.encode()
    return zlib.crc32(data) << 32 | zlib.adler32(data)


def gzipped(path: Path) -> bool:
    return path.name.lower().endswith(".gz")


@dataclass(frozen=True)
class Piece:
    """The lines of one input file that start in the byte range ``[start, end)`` (``end`` -1: to
    the end of the file): what one routing task reads (picklable)."""

    index: int
    file: int
    path: str
    start: int
    end: int
    directory: str
    count: int
    """The number of shards."""
    owners: dict[str, str] = field(default_factory=dict)
    """Linked patients' keys -> their group's key (:func:`link_owners`): route by that."""


@dataclass
class Routed:
    """What routing one piece found, sent back to the client."""

    piece: int
    lines: int = 0
    """Every line of the piece (its lines are numbered from 1 within the piece)."""
    routed: int = 0
    """The lines that are not blank."""
    opened: bool = False
    problem: str = ""
    """Why the file could not be read (whole or in part)."""
    unsafe: str = ""
    medications: dict[str, set[int]] = field(default_factory=dict)
    """The shards whose medication records reference each Medication."""
    medication_lines: list[tuple[int, str]] = field(default_factory=list)
    """(line, ``Medication/id``) of the Medications of the piece (placed by the join)."""
    links: list[tuple[str, str]] = field(default_factory=list)
    """(``Patient/id``, the patient key its ``link.other`` gives) of the piece's Patients."""


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
    stamps: list[tuple[int, int]] = field(default_factory=list)
    """Each input file's (size, modification time in ns) before it was routed: a shard reads the
    lines back from the file by byte range, so a file that changed since would give other lines
    (:func:`check_unchanged`)."""

    def shard_of(self, key: str) -> int:
        """The shard that owns a patient key (without a source prefix)."""
        return patient_shard(self.owners.get(key, key), self.count)


class _Writer:
    """Where the lines of one piece go, for each shard: their line numbers and byte ranges in the
    file (read back through ``mmap``: nothing is copied), or, for gzipped input, the lines
    themselves."""

    def __init__(
        self, directory: Path, index: int, count: int, copy: bool, suffix: str = ""
    ) -> None:
        self.base = [directory / f"{k:03d}" / f"{index:05d}{suffix}" for k in range(count)]
        self.copy = copy
        self.handles: list[IO[bytes] | None] = [None] * count
        self.numbers = [array("I") for _ in range(count)]
        self.starts = [array("Q") for _ in range(count)]
        self.ends = [array("Q") for _ in range(count)]

    def add(self, shard: int, number: int, line: bytes, start: int) -> None:
        self.numbers[shard].append(number)
        if not self.copy:
            self.starts[shard].append(start)
            self.ends[shard].append(start + len(line))
            return
        handle = self.handles[shard]
        if handle is None:
            handle = self.handles[shard] = self.base[shard].with_suffix(".ndjson").open(
                "wb", buffering=1 << 20
            )
        handle.write(line if line.endswith(b"\n") else line + b"\n")

    def close(self) -> None:
        for shard, numbers in enumerate(self.numbers):
            handle = self.handles[shard]
            if handle is not None:
                handle.close()
            if not numbers:
                continue
            with self.base[shard].with_suffix(".lines").open("wb") as out:
                numbers.tofile(out)
            if not self.copy:
                with self.base[shard].with_suffix(".ranges").open("wb") as out:
                    self.starts[shard].tofile(out)
                    self.ends[shard].tofile(out)


_Columns = tuple["array[int]", "array[int]"]


class _JoinRecords:
    """One piece's join records, by kind and bucket: the key's hash, and its shard, piece and line
    packed in one number (shard << 48 | piece << 32 | line). Written at the end of the piece, one
    file per kind: the 64 bucket sizes, then the hashes, then the packed places."""

    def __init__(self, piece: int) -> None:
        self.piece = piece << 32
        self.columns: dict[str, list[_Columns]] = {
            kind: [(array("Q"), array("Q")) for _ in range(_BUCKETS)] for kind in _KINDS
        }

    def add(self, kind: str, key: str, shard: int, line: int) -> None:
        h = _key_hash(key)
        hashes, places = self.columns[kind][(h >> 32) & _MASK]
        hashes.append(h)
        places.append(shard << 48 | self.piece | line)

    def write(self, directory: Path) -> None:
        for kind, buckets in self.columns.items():
            sizes = array("Q", (len(hashes) for hashes, _places in buckets))
            if not any(sizes):
                continue
            with (directory / kind).open("wb") as out:
                sizes.tofile(out)
                for hashes, _places in buckets:
                    hashes.tofile(out)
                for _hashes, places in buckets:
                    places.tofile(out)


def _load_bucket(
    directories: Sequence[Path], kind: str, bucket: int
) -> Iterator[tuple[int, int, int, int]]:
    """(hash, shard, piece, line) of the records of one bucket, piece by piece."""
    for directory in directories:
        path = directory / kind
        if not path.exists():
            continue
        with path.open("rb") as handle:
            sizes = array("Q")
            sizes.fromfile(handle, _BUCKETS)
            total = sum(sizes)
            before = sum(sizes[:bucket])
            size = sizes[bucket]
            if not size:
                continue
            hashes, places = array("Q"), array("Q")
            handle.seek(8 * (_BUCKETS + before))
            hashes.fromfile(handle, size)
            handle.seek(8 * (_BUCKETS + total + before))
            places.fromfile(handle, size)
        for h, place in zip(hashes, places, strict=True):
            yield h, place >> 48, (place >> 32) & 0xFFFF, place & 0xFFFFFFFF


class _Router:
    """The routing of one piece (:func:`route_piece`)."""

    def __init__(self, piece: Piece, copy: bool, out: Routed) -> None:
        self.piece = piece
        self.count = piece.count
        self.out = out
        self.writer = _Writer(Path(piece.directory), piece.index, piece.count, copy)
        self.join = _JoinRecords(piece.index)
        self.patient_shards: dict[str, int] = {}
        """Shard by subject reference as written (one entry per patient: bounded by patients)."""

    def shard_of(self, key: str) -> int:
        """The shard of a patient key: its link group's (:func:`link_owners`), else its own."""
        return patient_shard(self.piece.owners.get(key, key), self.count)

    def lines(self, lines: Iterable[bytes], offset: int, progress: Progress | None) -> None:
        end = self.piece.end if self.piece.end >= 0 else math.inf
        writer = self.writer
        add = writer.add
        copy = writer.copy
        numbers, starts, ends = writer.numbers, writer.starts, writer.ends
        buckets = self.join.columns["obs"]
        here = self.join.piece
        shards_of = self.patient_shards
        shard_of = self.shard_of
        decode = _ROUTE.decode
        crc32, adler32 = zlib.crc32, zlib.adler32
        out = self.out
        routed = 0
        number = 0
        shown = offset  # progress is told every MiB (bulkread._counted says why)
        for number, line in enumerate(lines, start=1):
            start = offset
            if start >= end:
                number -= 1
                break
            offset += len(line)
            if progress is not None and offset - shown >= 1 << 20:
                progress(offset - shown)
                shown = offset
            if not line or line.isspace():
                continue
            routed += 1
            try:
                route = decode(line)  # under 1 us: what routing needs, nothing built else
            except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
                # (RecursionError: JSON nested too deeply, see core.fhirjson.decode_json)
                add(0, number, line, start)  # shard 0 reports the problem, as a whole run would
                continue
            subject = route.subject
            # The common line of a bulk export: an Observation with a subject, no members.
            if (
                route.resourceType == "Observation"
                and subject
                and subject.reference
                and subject.reference[0] != "#"
                and route.id
                and not route.hasMember
            ):
                reference = subject.reference
                shard = shards_of.get(reference)
                if shard is None:
                    shard = shards_of[reference] = shard_of(patient_key_of(reference))
                key = f"Observation/{route.id}".encode()
                h = crc32(key) << 32 | adler32(key)
                hashes, places = buckets[(h >> 32) & _MASK]
                hashes.append(h)
                places.append(shard << 48 | here | number)
                if copy:
                    add(shard, number, line, start)
                else:
                    numbers[shard].append(number)
                    starts[shard].append(start)
                    ends[shard].append(offset)
                continue
            self.general(route, number, line, start)
            if out.unsafe:
                break
        if progress is not None and offset > shown:
            progress(offset - shown)
        out.lines = number
        out.routed = routed

    def general(self, route: _Route, number: int, line: bytes, start: int) -> None:
        rtype = route.resourceType
        subject = route.subject.reference if route.subject else None
        shard = self.shard_of(patient_key_of(subject)) if subject else _PENDING
        add = self.writer.add
        if rtype == "Bundle":
            self.out.unsafe = "a Bundle"
            return
        # Patient identity that needs every Patient of the source to resolve (issue 13 §4): the
        # patient of a contained subject or of one given by identifier. Kept exact by evaluating
        # such input in memory. Records merged by Patient.link are routed to one shard instead
        # (partition routes again when linked patients hashed apart: link_owners).
        if route.link and rtype == "Patient":
            others = [link.other.reference if link.other else None for link in route.link]
            if not route.id or not all(others):
                self.out.unsafe = "Patient.link without a Patient id or a reference"
                return
            key = f"Patient/{route.id}"
            self.out.links.extend((key, patient_key_of(other)) for other in others if other)
        if route.subject and (
            (subject and subject.startswith("#"))
            or (subject is None and route.subject.identifier is not None)
        ):
            self.out.unsafe = "a contained subject or a subject given by identifier"
            return
        if rtype == "Patient":
            shard = self.shard_of(f"Patient/{route.id}") if route.id else 0
        elif rtype == "Medication":
            if route.id:
                self.out.medication_lines.append((number, f"Medication/{route.id}"))
            else:
                add(0, number, line, start)
            return
        elif rtype not in _SUBJECT_TYPES:
            add(0, number, line, start)
            return
        join = self.join.add
        if rtype == "Observation":
            if route.id:
                join("obs", f"Observation/{route.id}", shard, number)
            for member in route.hasMember:
                if member.reference and not member.reference.startswith("#"):
                    join("panel", _resource_key(member.reference), shard, number)
            if shard == _PENDING and route.id:
                return  # placed after the pass, with the report or panel that lists it
        elif rtype == "DiagnosticReport":
            # A report without a subject stays in shard 0 and is copied to its results' shards.
            shard = 0 if shard == _PENDING else shard
            for member in route.result:
                reference = member.reference
                if reference and not reference.startswith("#"):
                    join("member", _resource_key(reference), shard, number)
        if route.medicationReference and route.medicationReference.reference:
            key = _resource_key(route.medicationReference.reference)
            self.out.medications.setdefault(key, set()).add(shard if shard != _PENDING else 0)
        add(shard if shard != _PENDING else 0, number, line, start)

    def close(self) -> None:
        self.writer.close()
        directory = _join_dir(Path(self.piece.directory), self.piece.index)
        directory.mkdir(parents=True, exist_ok=True)
        self.join.write(directory)


def _join_dir(directory: Path, piece: int) -> Path:
    return directory / "join" / f"{piece:05d}"


def piece_lines(stream: IO[bytes], start: int) -> int:
    """Position ``stream`` at the first line that starts at or after byte ``start`` (the line
    holding byte ``start - 1`` belongs to the piece before); that line's offset."""
    if start <= 0:
        return 0
    stream.seek(start - 1)
    return start - 1 + len(stream.readline())


def route_piece(piece: Piece, progress: Progress | None = None) -> Routed:
    """Route the lines of one piece into the shards (a task: runs in any process that sees the
    input and the shard directory at the same paths)."""
    out = Routed(piece.index)
    path = Path(piece.path)
    router = _Router(piece, gzipped(path), out)
    try:
        with open_input(path) as stream:
            out.opened = True
            router.lines(stream, piece_lines(stream, piece.start), progress)
    except READ_ERRORS as exc:
        out.problem = read_failure(exc)
    finally:
        router.close()
    return out


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
    if count >= _PENDING:
        raise ValueError(f"at most {_PENDING - 1} shards")
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
    copies: dict[tuple[int, int], set[int]] = {}
    held: set[tuple[int, int]] = set()
    if not unsafe:
        copies, held, unsafe = _join(directory, pieces, routed, route_map)
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
    _write_copies(result, pieces, copies, held)
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


_Copies = dict[tuple[int, int], set[int]]
"""(piece, line) -> the further shards that line goes to."""


@dataclass(frozen=True)
class JoinTask:
    """Some buckets of the join, for one task (picklable): the pieces' join directories."""

    directories: tuple[str, ...]
    buckets: tuple[int, ...]


_JOIN_TASKS = 8
"""Tasks the join is cut into when the pieces were routed on workers (64 buckets, 8 each)."""


def join_buckets(task: JoinTask) -> tuple[_Copies, set[tuple[int, int]], str]:
    """The join of some buckets (a task: buckets share nothing): the lines that go to further
    shards, the lines the pass held back, and why the input cannot be sharded, if so."""
    directories = [Path(d) for d in task.directories]
    out: _Copies = {}
    held: set[tuple[int, int]] = set()
    unsafe = ""
    for bucket in task.buckets:
        # One entry per Observation key; the few read twice also in `versions`.
        first: dict[int, tuple[int, int, int]] = {}
        versions: dict[int, list[tuple[int, int, int]]] = {}
        for h, shard, piece, line in _load_bucket(directories, "obs", bucket):
            if shard == _PENDING:
                held.add((piece, line))
            known = first.get(h)
            if known is None:
                first[h] = (shard, piece, line)
            else:
                versions.setdefault(h, [known]).append((shard, piece, line))
        for entries in versions.values():
            shards = {s for s, _f, _l in entries if s != _PENDING}
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
                targets = {s for s, _f, _l in entries if s != _PENDING}
                if container == _PENDING:
                    if kind == "panel" and any(s == _PENDING for s, _f, _l in entries):
                        unsafe = "a panel without a subject listing results without one"
                    out.setdefault((piece, line), set()).update(targets or {0})
                    continue
                if targets - {container}:
                    out.setdefault((piece, line), set()).update(targets - {container})
                for s, f, n in entries:
                    if s == _PENDING:
                        out.setdefault((f, n), set()).add(container)
                        placed.add((f, n))
        for h, (s, f, n) in first.items():
            if s == _PENDING and (f, n) not in placed and h not in versions:
                out.setdefault((f, n), set()).add(0)
        for entries in versions.values():
            for s, f, n in entries:
                if s == _PENDING and (f, n) not in placed:
                    out.setdefault((f, n), set()).add(0)
    return out, held, unsafe


def _join(
    directory: Path,
    pieces: Sequence[Piece],
    routed: Sequence[Routed],
    route_map: RouteMap | None,
) -> tuple[_Copies, set[tuple[int, int]], str]:
    """Which lines go to which further shards, the lines the pass held back (placed only here:
    subject-less Observations and Medications), and why the input cannot be sharded, if so.

    The buckets are joined by tasks on the workers that routed the pieces (``route_map``), or
    here: at a million Observations the join is 0.5 s that the workers would otherwise wait."""
    directories = tuple(str(_join_dir(directory, piece.index)) for piece in pieces)
    if route_map is None:
        parts: Iterable[tuple[_Copies, set[tuple[int, int]], str]] = [
            join_buckets(JoinTask(directories, tuple(range(_BUCKETS))))
        ]
    else:
        tasks = [
            JoinTask(directories, tuple(range(i, _BUCKETS, _JOIN_TASKS)))
            for i in range(_JOIN_TASKS)
        ]
        parts = route_map(join_buckets, tasks)
    out: _Copies = {}
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


def _write_copies(
    result: Partition,
    pieces: Sequence[Piece],
    copies: dict[tuple[int, int], set[int]],
    unwritten: set[tuple[int, int]],
) -> None:
    """Append each copied line to its further shards (``-extra`` files), piece by piece; count the
    resources that are now in more than one shard (``unwritten``: lines the pass held back)."""
    by_piece: dict[int, dict[int, set[int]]] = {}
    for (at, number), targets in copies.items():
        by_piece.setdefault(at, {})[number] = targets
    for index in sorted(by_piece):
        wanted = by_piece[index]
        piece = pieces[index]
        path = Path(piece.path)
        writer = _Writer(result.directory, index, result.count, gzipped(path), "-extra")
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
                            route = _ROUTE.decode(text)
                            result.copied[route.resourceType] += extra
                    offset += len(text)
        except READ_ERRORS:
            pass  # already a problem of the pass
        finally:
            writer.close()
