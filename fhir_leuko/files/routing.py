"""Routing one piece of the input into the shards (a task of the partition pass, :mod:`.partition`).

A piece is the lines of one input file that start in a byte range (a gzipped file is one piece).
The task decodes only what routing needs of each line (``resourceType``, ``id``, ``subject``,
members; msgspec skips the rest unbuilt, under 1 us a line) and writes, per shard, the line
numbers (counted from the piece's first line) and byte ranges of the lines that go there, and its
join records (:mod:`.join` reads them).

Join records are keyed by a hash of the ``Observation/id`` key that is the same in every process
(CRC-32 and Adler-32: tasks run in other interpreters); two keys with the same hash only cost a
copy of a line into a shard that does not own its patient, which never changes the output.
"""

from __future__ import annotations

import math
import zlib
from array import array
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import msgspec

from ..core.fhirjson import INPUT_TYPES
from ..errors import WorkDirError
from .reader import READ_ERRORS, Progress, open_input, read_failure

__all__ = [
    "BUCKETS",
    "PENDING",
    "ROUTE_DECODER",
    "Piece",
    "Routed",
    "ShardWriter",
    "gzipped",
    "join_dir",
    "patient_key_of",
    "patient_shard",
    "piece_lines",
    "resource_key",
    "route_piece",
    "work_dir_error",
    "work_dir_io",
]

PENDING = 0xFFFF
"""The shard of a resource that has none of its own yet (a subject-less Observation)."""
BUCKETS = 64
"""Join records go in this many buckets by their key's hash (each joined on its own)."""
_MASK = BUCKETS - 1
_KINDS = ("obs", "member", "panel")
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


ROUTE_DECODER = msgspec.json.Decoder(_Route)


def _last_two(reference: str) -> list[str]:
    return reference.split("/_history/")[0].rstrip("/").split("/")


def patient_key_of(reference: str) -> str:
    """The patient key a subject reference gives in an input without Bundles (NDJSON resolves
    by ``Type/id`` only): what :meth:`Identity._patient_key` gives there, before any prefix."""
    parts = _last_two(reference)
    if len(parts) >= 2 and parts[-2] == "Patient":
        return f"Patient/{parts[-1]}"
    return reference


def resource_key(reference: str) -> str:
    """``Type/id`` of a reference (relative, absolute or versioned), as the core resolves it."""
    if reference.count("/") == 1:
        return reference
    parts = _last_two(reference)
    return f"{parts[-2]}/{parts[-1]}" if len(parts) >= 2 else reference


def patient_shard(key: str, count: int) -> int:
    """The shard of a patient key (without a source prefix) that no ``Patient.link`` joins to
    another: :meth:`Partition.shard_of` says which shard owns any key."""
    return zlib.crc32(key.encode()) % count


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
    placed: list[int] = field(default_factory=list)
    """The lines written for each shard: a shard that finds fewer in its index reads another
    work directory than the one written (not shared with the workers)."""


def work_dir_error(directory: Path | str, doing: str, exc: OSError) -> WorkDirError:
    return WorkDirError(
        f"cannot {doing} the shards in {directory} ({exc.strerror or exc}); nothing was written: "
        "--work-dir needs room (about 20 bytes a line of input; the lines themselves for gzipped "
        "input) that every worker can write (docs/population.md)"
    )


@contextmanager
def work_dir_io(directory: Path | str, doing: str = "write") -> Iterator[None]:
    """OSErrors of the work directory as :class:`WorkDirError`. A full disk or a directory the
    workers cannot write is the setup's problem: never a problem of the input (``route_piece``
    turns OSErrors of the input into problems naming it, and would name the wrong file) nor a
    bug."""
    try:
        yield
    except OSError as exc:
        raise work_dir_error(directory, doing, exc) from None


class ShardWriter:
    """Where the lines of one piece go, for each shard: their line numbers and byte ranges in the
    file (read back through ``mmap``: nothing is copied), or, for gzipped input, the lines
    themselves."""

    def __init__(
        self, directory: Path, index: int, count: int, copy: bool, suffix: str = ""
    ) -> None:
        self.directory = directory
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
        try:  # (not work_dir_io: a with statement a line costs more than try)
            handle = self.handles[shard]
            if handle is None:
                handle = self.handles[shard] = self.base[shard].with_suffix(".ndjson").open(
                    "wb", buffering=1 << 20
                )
            handle.write(line if line.endswith(b"\n") else line + b"\n")
        except OSError as exc:
            raise work_dir_error(self.directory, "write", exc) from None

    def close(self) -> None:
        with work_dir_io(self.directory):
            self._close()

    def _close(self) -> None:
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
            kind: [(array("Q"), array("Q")) for _ in range(BUCKETS)] for kind in _KINDS
        }

    def add(self, kind: str, key: str, shard: int, line: int) -> None:
        h = _key_hash(key)
        hashes, places = self.columns[kind][(h >> 32) & _MASK]
        hashes.append(h)
        places.append(shard << 48 | self.piece | line)

    def write(self, directory: Path) -> None:
        # Every kind, even with no records: the join then knows a missing file for what it is
        # (a work directory not shared with the workers), never for "no records".
        for kind, buckets in self.columns.items():
            sizes = array("Q", (len(hashes) for hashes, _places in buckets))
            with (directory / kind).open("wb") as out:
                sizes.tofile(out)
                for hashes, _places in buckets:
                    hashes.tofile(out)
                for _hashes, places in buckets:
                    places.tofile(out)


class _Router:
    """The routing of one piece (:func:`route_piece`)."""

    def __init__(self, piece: Piece, copy: bool, out: Routed) -> None:
        self.piece = piece
        self.count = piece.count
        self.out = out
        self.writer = ShardWriter(Path(piece.directory), piece.index, piece.count, copy)
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
        decode = ROUTE_DECODER.decode
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
        shard = self.shard_of(patient_key_of(subject)) if subject else PENDING
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
                    join("panel", resource_key(member.reference), shard, number)
            if shard == PENDING and route.id:
                return  # placed after the pass, with the report or panel that lists it
        elif rtype == "DiagnosticReport":
            # A report without a subject stays in shard 0 and is copied to its results' shards.
            shard = 0 if shard == PENDING else shard
            for member in route.result:
                reference = member.reference
                if reference and not reference.startswith("#"):
                    join("member", resource_key(reference), shard, number)
        if route.medicationReference and route.medicationReference.reference:
            key = resource_key(route.medicationReference.reference)
            self.out.medications.setdefault(key, set()).add(shard if shard != PENDING else 0)
        add(shard if shard != PENDING else 0, number, line, start)

    def close(self) -> None:
        self.writer.close()
        directory = join_dir(Path(self.piece.directory), self.piece.index)
        with work_dir_io(self.piece.directory):
            directory.mkdir(parents=True, exist_ok=True)
            self.join.write(directory)


def join_dir(directory: Path, piece: int) -> Path:
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
    out.placed = [len(numbers) for numbers in router.writer.numbers]
    return out
