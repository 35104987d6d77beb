"""Bounded memory for a large export: partition the NDJSON by patient on disk, then evaluate shard
by shard with the same rule core.

``fhir-leuko evaluate`` holds every Observation of its input in memory (about 1 GB per million).
Above :data:`SHARD_BYTES` of input the files are first partitioned in one streaming pass
(:func:`partition`) into shards on disk: each line goes to the shard of its patient (a CRC-32 of
the patient key its subject gives, as :class:`~fhir_leuko.core.normalise.identity.Identity`
names it); the line keeps its file and line number, so problems name the same place. Then each
shard is normalised and evaluated on its own (:func:`evaluate_shard`), by this process or by
workers (:mod:`fhir_leuko.files.executors`), and the results are merged in patient-key order:
the output is byte-identical to evaluating everything at once, for any number of shards.

What belongs together is kept together, with a small join on disk after the pass (by a hash of
each Observation's key, in buckets):

* an Observation without a subject follows the DiagnosticReport (or panel) that lists it;
* a report (or panel) whose results are in other shards is copied to those shards too (it gives
  them their group and time);
* an Observation read twice (two versions) with subjects in different shards is copied to each;
* a Medication goes to every shard whose medication records reference it (or shard 0).

Each shard evaluates only the patients it owns (their key's shard): a resource copied in for
context never makes a second record of its patient. Input that this cannot keep exact (a Bundle,
a file that is not NDJSON, a subject-less panel of subject-less results) is evaluated in memory as
before: :func:`partition` returns ``None`` and says why.
"""

from __future__ import annotations

import gc
import logging
import math
import mmap
import shutil
import zlib
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from heapq import merge
from pathlib import Path
from typing import IO

import msgspec

from ..core.decision import Silence
from ..core.knowledge import Knowledge
from ..core.model import PatientRecord, Problem
from ..core.normalise import Dataset, Normaliser
from ..core.pipeline import AsOf, Evaluation, evaluate_dataset
from ..core.profiles import ProfileSet
from .documents import load_knowledge, load_profiles
from .reader import READ_ERRORS, Progress, is_ndjson, open_input, read_failure

__all__ = [
    "SHARD_BYTES",
    "Partition",
    "ShardResult",
    "ShardSpec",
    "evaluate_shard",
    "evaluate_sharded",
    "load_shard",
    "merge_results",
    "partition",
    "patient_key_of",
    "patient_shard",
    "shard_count",
]

log = logging.getLogger(__name__)

SHARD_BYTES = 160 << 20
"""Input bytes per shard (about 110,000 Observations as servers write them): a shard's
normalising and evaluating then peaks well under 500 MB (benchmarks/README.md)."""

_PENDING = 0xFFFF
"""The shard of a resource that has none of its own yet (a subject-less Observation)."""
_BUCKETS = 64
_MASK = _BUCKETS - 1
_FLUSH = 1 << 15
_SUBJECT_TYPES = frozenset(
    {
        "Observation",
        "DiagnosticReport",
        "MedicationRequest",
        "MedicationStatement",
        "MedicationAdministration",
        "MedicationDispense",
        "Condition",
        "Flag",
    }
)


class _Ref(msgspec.Struct):
    reference: str | None = None
    identifier: msgspec.Raw | None = None


class _Route(msgspec.Struct):
    """What routing a line needs, and nothing else (msgspec skips the rest unbuilt)."""

    resourceType: str = ""
    id: str | None = None
    subject: _Ref | None = None
    medicationReference: _Ref | None = None
    result: list[_Ref] = []
    hasMember: list[_Ref] = []
    link: list[msgspec.Raw] = []


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
    """The shard that owns a patient key (without a source prefix)."""
    return zlib.crc32(key.encode()) % count


def shard_count(total_bytes: int, workers: int = 1) -> int:
    """How many shards for this much input: at most :data:`SHARD_BYTES` each, and at least two per
    worker so that a slow shard does not leave the other workers idle."""
    return max(1, math.ceil(total_bytes / SHARD_BYTES), 2 * workers if workers > 1 else 1)


def _hash(key: str) -> int:
    return zlib.crc32(key.encode()) << 32 | zlib.adler32(key.encode())


@dataclass
class Partition:
    """The shards written by :func:`partition`, and what the merge needs."""

    directory: Path
    count: int
    files: list[tuple[str, str | None]]
    """The input files (path, input) in reading order; shard files are named by this index."""
    inputs: list[str | None]
    """Every input whose files were opened (each is a source of the run)."""
    problems: list[Problem] = field(default_factory=list)
    """Files that could not be read (whole or in part)."""
    lines: int = 0
    copies: int = 0
    copied: Counter[str] = field(default_factory=Counter)
    """Resources read into more than one shard, by type (taken off the merged counts)."""


class _Writer:
    """Where the lines of one input file go, for each shard: their line numbers and byte ranges
    in the file (read back through ``mmap``: nothing is copied), or, for gzipped input, the
    lines themselves."""

    def __init__(self, directory: Path, index: int, count: int, copy: bool, suffix: str = "") -> None:
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


class _Join:
    """(hash, shard, file, line) records of Observations and of report/panel members, bucketed
    by hash (Python's ``hash`` of the ``Observation/id`` key: the join runs in this process), and
    kept on disk once a bucket grows, for the join after the pass."""

    kinds = ("obs", "member", "panel")

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.columns: dict[str, list[tuple[array[int], array[int], array[int], array[int]]]] = {
            kind: [self._empty() for _ in range(_BUCKETS)] for kind in self.kinds
        }

    @staticmethod
    def _empty() -> tuple[array[int], array[int], array[int], array[int]]:
        return (array("q"), array("H"), array("H"), array("I"))

    def add(self, kind: str, key: str, shard: int, file: int, line: int) -> None:
        h = hash(key.encode())
        cols = self.columns[kind][h & _MASK]
        cols[0].append(h)
        cols[1].append(shard)
        cols[2].append(file)
        cols[3].append(line)

    def flush(self, at_least: int = 0) -> None:
        """Write the buckets holding at least ``at_least`` records to disk."""
        for kind, buckets in self.columns.items():
            for bucket, cols in enumerate(buckets):
                if len(cols[0]) < max(at_least, 1):
                    continue
                for column, values in enumerate(cols):
                    with (self.directory / f"{kind}-{bucket:02d}-{column}").open("ab") as out:
                        values.tofile(out)
                buckets[bucket] = self._empty()

    def load(self, kind: str, bucket: int) -> Iterator[tuple[int, int, int, int]]:
        columns: list[array[int]] = []
        for column, code in enumerate("qHHI"):
            values = array(code)
            path = self.directory / f"{kind}-{bucket:02d}-{column}"
            if path.exists():
                values.frombytes(path.read_bytes())
            columns.append(values)
        return zip(*columns, strict=True)


class _Partitioner:
    def __init__(self, directory: Path, work: Path, count: int) -> None:
        self.directory = directory
        self.count = count
        self.join = _Join(work)
        self.medications: dict[str, set[int]] = {}
        self.medication_lines: list[tuple[int, int, str]] = []
        self.patient_shards: dict[str, int] = {}
        """Shard by subject reference as written (one entry per patient: bounded by patients)."""
        self.unsafe = ""

    def file(
        self, index: int, lines: Iterable[bytes], progress: Progress | None, copy: bool
    ) -> int:
        count = self.count
        writer = _Writer(self.directory, index, count, copy)
        add = writer.add
        numbers, starts, ends = writer.numbers, writer.starts, writer.ends
        buckets = self.join.columns["obs"]
        shards_of = self.patient_shards
        decode = _ROUTE.decode
        routed = 0
        offset = 0
        try:
            for number, line in enumerate(lines, start=1):
                start = offset
                offset += len(line)
                if progress is not None:
                    progress(len(line))
                if not line or line.isspace():
                    continue
                routed += 1
                if not routed & 0xFFFF:
                    self.join.flush(_FLUSH)
                try:
                    route = decode(line)  # about 1 us: what routing needs, nothing built else
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
                        shard = shards_of[reference] = patient_shard(
                            patient_key_of(reference), count
                        )
                    h = hash(f"Observation/{route.id}".encode())
                    cols = buckets[h & _MASK]
                    cols[0].append(h)
                    cols[1].append(shard)
                    cols[2].append(index)
                    cols[3].append(number)
                    if copy:
                        add(shard, number, line, start)
                    else:
                        numbers[shard].append(number)
                        starts[shard].append(start)
                        ends[shard].append(offset)
                    continue
                self.general(writer, route, index, number, line, start)
                if self.unsafe:
                    return routed
        finally:
            writer.close()
        return routed

    def general(
        self, writer: _Writer, route: _Route, index: int, number: int, line: bytes, start: int
    ) -> None:
        rtype = route.resourceType
        subject = route.subject.reference if route.subject else None
        shard = patient_shard(patient_key_of(subject), self.count) if subject else _PENDING
        if rtype == "Bundle":
            self.unsafe = "a Bundle"
            return
        # Patient identity that needs every Patient of the source to resolve (issue 13 §4): the
        # patient of a contained subject or of one given by identifier, records merged by
        # Patient.link. Kept exact by evaluating such input in memory.
        if route.link and rtype == "Patient":
            self.unsafe = "Patient.link (merged patient records)"
            return
        if route.subject and (
            (subject and subject.startswith("#"))
            or (subject is None and route.subject.identifier is not None)
        ):
            self.unsafe = "a contained subject or a subject given by identifier"
            return
        if rtype == "Patient":
            shard = patient_shard(f"Patient/{route.id}", self.count) if route.id else 0
        elif rtype == "Medication":
            if route.id:
                self.medication_lines.append((index, number, f"Medication/{route.id}"))
            else:
                writer.add(0, number, line, start)
            return
        elif rtype not in _SUBJECT_TYPES:
            writer.add(0, number, line, start)
            return
        join = self.join.add
        if rtype == "Observation":
            if route.id:
                join("obs", f"Observation/{route.id}", shard, index, number)
            for member in route.hasMember:
                if member.reference and not member.reference.startswith("#"):
                    join("panel", _resource_key(member.reference), shard, index, number)
            if shard == _PENDING and route.id:
                return  # placed after the pass, with the report or panel that lists it
        elif rtype == "DiagnosticReport":
            # A report without a subject stays in shard 0 and is copied to its results' shards.
            shard = 0 if shard == _PENDING else shard
            for member in route.result:
                reference = member.reference
                if reference and not reference.startswith("#"):
                    join("member", _resource_key(reference), shard, index, number)
        if route.medicationReference and route.medicationReference.reference:
            key = _resource_key(route.medicationReference.reference)
            self.medications.setdefault(key, set()).add(shard if shard != _PENDING else 0)
        writer.add(shard if shard != _PENDING else 0, number, line, start)

    def copies(self) -> dict[tuple[int, int], set[int]]:
        """Which lines go to which further shards (the join after the pass)."""
        self.join.flush()
        out: dict[tuple[int, int], set[int]] = {}
        for bucket in range(_BUCKETS):
            # One entry per Observation key; the few read twice also in `versions`.
            first: dict[int, tuple[int, int, int]] = {}
            versions: dict[int, list[tuple[int, int, int]]] = {}
            for h, shard, file, line in self.join.load("obs", bucket):
                known = first.get(h)
                if known is None:
                    first[h] = (shard, file, line)
                else:
                    versions.setdefault(h, [known]).append((shard, file, line))
            for entries in versions.values():
                shards = {s for s, _f, _l in entries if s != _PENDING}
                if len(shards) > 1:  # versions of one Observation in several shards
                    for s, f, n in entries:
                        out.setdefault((f, n), set()).update(shards - {s})
            placed: set[tuple[int, int]] = set()
            for kind in ("member", "panel"):
                for h, container, file, line in self.join.load(kind, bucket):
                    known = first.get(h)
                    if known is None or (known[0] == container and h not in versions):
                        continue  # not in the input, or in the container's shard: the usual case
                    entries = versions.get(h) or [known]
                    targets = {s for s, _f, _l in entries if s != _PENDING}
                    if container == _PENDING:
                        if kind == "panel" and any(s == _PENDING for s, _f, _l in entries):
                            self.unsafe = "a panel without a subject listing results without one"
                        out.setdefault((file, line), set()).update(targets or {0})
                        continue
                    if targets - {container}:
                        out.setdefault((file, line), set()).update(targets - {container})
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
        for file, line, key in self.medication_lines:
            out.setdefault((file, line), set()).update(self.medications.get(key) or {0})
        return out

    def unwritten(self) -> set[tuple[int, int]]:
        """The lines the pass held back (placed only by the join): subject-less Observations and
        Medications."""
        held = {(file, line) for file, line, _key in self.medication_lines}
        for bucket in range(_BUCKETS):
            held.update((f, n) for _h, s, f, n in self.join.load("obs", bucket) if s == _PENDING)
        return held


def partition(
    files: Sequence[tuple[Path, str | None]],
    directory: Path,
    count: int,
    *,
    progress: Progress | None = None,
) -> Partition | None:
    """Write the shards of these files into ``directory`` (emptied first), or ``None`` (and a log
    line saying why) when the input must be evaluated in memory to stay exact."""
    if count < 1:
        raise ValueError("count must be at least 1")
    not_ndjson = [path for path, _input in files if not is_ndjson(path)]
    if not_ndjson:
        log.info("evaluating in memory: %s is not NDJSON", not_ndjson[0])
        return None
    shutil.rmtree(directory, ignore_errors=True)
    for k in range(count):
        (directory / f"{k:03d}").mkdir(parents=True)
    work = directory / "join"
    work.mkdir()
    partitioner = _Partitioner(directory, work, count)
    result = Partition(directory, count, [(str(p), i) for p, i in files], [])
    inputs: dict[str | None, None] = {}
    for index, (path, input) in enumerate(files):
        try:
            with open_input(path) as stream:
                inputs.setdefault(input)
                result.lines += partitioner.file(index, stream, progress, _gzipped(path))
        except READ_ERRORS as exc:
            result.problems.append(Problem(str(path), read_failure(exc)))
        if partitioner.unsafe:
            break
    copies = {} if partitioner.unsafe else partitioner.copies()
    if partitioner.unsafe:
        log.info("evaluating in memory: the input holds %s", partitioner.unsafe)
        shutil.rmtree(directory, ignore_errors=True)
        return None
    result.inputs = list(inputs)
    result.copies = sum(len(v) for v in copies.values())
    _write_copies(result, copies, partitioner.unwritten())
    shutil.rmtree(work, ignore_errors=True)
    return result


def _write_copies(
    result: Partition, copies: dict[tuple[int, int], set[int]], unwritten: set[tuple[int, int]]
) -> None:
    """Append each copied line to its further shards (``.extra`` files), file by file; count the
    resources that are now in more than one shard (``unwritten``: lines the pass held back)."""
    by_file: dict[int, dict[int, set[int]]] = {}
    for (file, number), targets in copies.items():
        by_file.setdefault(file, {})[number] = targets
    for file in sorted(by_file):
        wanted = by_file[file]
        path = Path(result.files[file][0])
        writer = _Writer(result.directory, file, result.count, _gzipped(path), "-extra")
        offset = 0
        try:
            with open_input(path) as stream:
                for number, text in enumerate(stream, start=1):
                    into = wanted.get(number)
                    if into:
                        for shard in sorted(into):
                            writer.add(shard, number, text, offset)
                        extra = len(into) - ((file, number) in unwritten)
                        if extra > 0:
                            route = _ROUTE.decode(text)
                            result.copied[route.resourceType] += extra
                    offset += len(text)
        except READ_ERRORS:
            pass  # already a problem of the pass
        finally:
            writer.close()


def _gzipped(path: Path) -> bool:
    return path.name.lower().endswith(".gz")


def _numbered(base: Path, original: Path) -> Iterator[tuple[int, bytes]]:
    """The (line number, line) pairs of one shard's part of one input file."""
    numbers = array("I")
    numbers.frombytes(base.with_suffix(".lines").read_bytes())
    ranges = base.with_suffix(".ranges")
    if not ranges.exists():  # gzipped input: the lines were copied
        with base.with_suffix(".ndjson").open("rb") as lines:
            yield from zip(numbers, lines, strict=True)
        return
    bounds = array("Q")
    bounds.frombytes(ranges.read_bytes())
    half = len(bounds) // 2
    with original.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as m:
        slices = map(slice, bounds[:half], bounds[half:])
        yield from zip(numbers, map(m.__getitem__, slices), strict=True)


def _shard_lines(
    directory: Path, shard: int, file: int, original: Path
) -> Iterator[tuple[int, bytes]] | None:
    base = directory / f"{shard:03d}" / f"{file:05d}"
    extra = base.with_name(base.name + "-extra")
    routed = base.with_suffix(".lines").exists()
    copied = extra.with_suffix(".lines").exists()
    if not routed and not copied:
        return None
    if not copied:
        return _numbered(base, original)
    if not routed:
        return _numbered(extra, original)
    return merge(_numbered(base, original), _numbered(extra, original), key=lambda pair: pair[0])


@dataclass(frozen=True)
class ShardSpec:
    """One task: evaluate shard ``index`` of a :class:`Partition` (picklable: a worker process or
    a Dask worker loads the profiles itself, from the shipped ones and ``profile_dirs``)."""

    directory: str
    index: int
    count: int
    files: tuple[tuple[str, str | None], ...]
    inputs: tuple[str | None, ...]
    as_of: AsOf
    profile_dirs: tuple[str, ...] = ()
    select: tuple[str, ...] = ()
    records: bool = False
    """Send back the records of the patients with findings (the HTML report's trends)."""


@dataclass
class ShardResult:
    index: int
    evaluation: Evaluation
    flagged: dict[str, PatientRecord]
    """The records of the patients with findings (the HTML report shows their trends)."""


@lru_cache(maxsize=4)
def _profiles(dirs: tuple[str, ...], select: tuple[str, ...]) -> tuple[Knowledge, ProfileSet]:
    knowledge = load_knowledge()
    profiles = load_profiles(knowledge, [Path(d) for d in dirs])
    return knowledge, profiles.select(list(select)) if select else profiles


def load_shard(part: Partition, index: int, knowledge: Knowledge) -> Dataset:
    """The normalised records of the patients shard ``index`` owns (``run --bulk`` plans and
    writes from them)."""
    return _load(
        Path(part.directory), index, part.count, tuple(part.files), tuple(part.inputs), knowledge
    )


def _load(
    directory: Path,
    index: int,
    count: int,
    files: Sequence[tuple[str, str | None]],
    inputs: Sequence[str | None],
    knowledge: Knowledge,
) -> Dataset:
    normaliser = Normaliser(knowledge)
    with normaliser.collecting():
        for input in inputs:  # every source of the run exists in every shard
            normaliser.feed_lines((), "", input=input)
        for file, (path, input) in enumerate(files):
            numbered = _shard_lines(directory, index, file, Path(path))
            if numbered is not None:
                normaliser.feed_numbered(numbered, path, input=input)
        dataset = normaliser.run()
    mine = {}
    for key, record in dataset.patients.items():
        bare = key.removeprefix(f"{record.source}|") if record.source else key
        if patient_shard(bare, count) == index:
            mine[key] = record
    dataset.patients = mine
    return dataset


def evaluate_shard(spec: ShardSpec) -> ShardResult:
    """Normalise and evaluate one shard: the patients it owns, with the same core as ever."""
    # The previous shard's objects are garbage now, and a few of them may be in cycles, which
    # reference counting alone never frees while evaluate keeps the cyclic collector off: one
    # collection per shard (cheap here, with little else alive) keeps memory flat over shards.
    gc.collect()
    knowledge, profiles = _profiles(spec.profile_dirs, spec.select)
    dataset = _load(
        Path(spec.directory), spec.index, spec.count, spec.files, spec.inputs, knowledge
    )
    evaluation = evaluate_dataset(dataset, profiles, as_of=spec.as_of)
    mine = dataset.patients if spec.records else {}
    flagged = {f.patient: mine[f.patient] for f in evaluation.findings if f.patient in mine}
    return ShardResult(spec.index, evaluation, flagged)


def merge_results(
    results: Iterable[ShardResult], partition: Partition
) -> tuple[Evaluation, Dataset]:
    """One :class:`Evaluation` from the shards', as evaluating everything at once gives it:
    DetectedIssues in patient-key order; a problem found in several shards (a copied resource)
    once; why nothing was found summed over the shards. With it, a :class:`Dataset` of the
    records of the patients with findings (when the shards sent them: ``records``)."""
    ordered = sorted(results, key=lambda r: r.index)
    shards = [r.evaluation for r in ordered]
    flagged = Dataset()
    for r in ordered:
        flagged.patients.update(r.flagged)
    pairs = sorted(
        (finding.patient, index, i)
        for index, shard in enumerate(shards)
        for i, finding in enumerate(shard.findings)
    )
    out = Evaluation(problems=list(partition.problems))
    seen: set[Problem] = set(out.problems)
    for shard in shards:
        out.as_of = shard.as_of
        out.counts.update(shard.counts)
        out.patients += shard.patients
        out.as_of_by_patient.update(shard.as_of_by_patient)
        for problem in shard.problems:
            if problem not in seen:
                seen.add(problem)
                out.problems.append(problem)
    out.counts.subtract(partition.copied)
    for _key, index, i in pairs:
        out.findings.append(shards[index].findings[i])
        out.issues.append(shards[index].issues[i])
    if not out.findings:
        out.silence = _silence([s.silence for s in shards if s.silence is not None])
    flagged.problems = out.problems
    flagged.counts = out.counts
    return out, flagged


def _silence(parts: list[Silence]) -> Silence | None:
    """The shards' reasons for finding nothing, as one (what a whole run's would say)."""
    if not parts:
        return None
    out = Silence(as_of=parts[0].as_of)
    lookbacks: set[int] = set()
    for part in parts:
        out.patients += part.patients
        out.with_results += part.with_results
        out.outcomes.update(part.outcomes)
        out.not_used.update(part.not_used)
        out.statuses.update(part.statuses)
        for moment in (part.earliest,):
            if moment is not None:
                out.earliest = moment if out.earliest is None else min(out.earliest, moment)
        if part.latest is not None:
            out.latest = part.latest if out.latest is None else max(out.latest, part.latest)
        lookbacks.update(part.lookbacks)
    out.lookbacks = tuple(sorted(lookbacks))
    return out


def evaluate_sharded(
    files: Sequence[tuple[Path, str | None]],
    *,
    as_of: AsOf,
    work_dir: Path,
    count: int,
    profile_dirs: Sequence[Path] = (),
    select: Sequence[str] = (),
    run_map: Callable[..., Iterable[ShardResult]] = map,
    progress: Progress | None = None,
    records: bool = False,
) -> tuple[Evaluation, Dataset] | None:
    """Partition, evaluate every shard with ``run_map`` (``map``, or an executor of
    :mod:`.executors`), merge (:func:`merge_results`). ``None`` when the input must be evaluated
    in memory."""
    part = partition(files, work_dir, count, progress=progress)
    if part is None:
        return None
    specs = [
        ShardSpec(
            str(work_dir),
            index,
            count,
            tuple(part.files),
            tuple(part.inputs),
            as_of,
            tuple(str(d) for d in profile_dirs),
            tuple(select),
            records,
        )
        for index in range(count)
    ]
    return merge_results(run_map(evaluate_shard, specs), part)
