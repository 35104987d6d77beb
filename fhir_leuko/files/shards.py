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
* a Medication goes to every shard whose medication records reference it (or shard 0);
* patients joined by ``Patient.link`` go to one shard, their group's
  (:func:`.partition.link_owners`).

Each shard evaluates only the patients it owns (:meth:`Partition.shard_of`): a resource copied
in for context never makes a second record of its patient. Input that this cannot keep exact (a
Bundle, a file that is not NDJSON, a subject-less panel of subject-less results, a contained
subject or one given by identifier) is evaluated in memory as before: :func:`partition` returns
``None`` and says why.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import mmap
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from heapq import merge
from pathlib import Path

from .._version import __version__
from ..core.decision import Silence
from ..core.knowledge import Knowledge
from ..core.model import PatientRecord, Problem, reading_order
from ..core.normalise import Dataset, Normaliser
from ..core.pipeline import AsOf, Evaluation, evaluate_dataset
from ..core.profiles import ProfileSet
from ..errors import InputError, UsageError, WorkDirError
from .documents import load_knowledge, load_profiles
from .partition import (
    SHARD_BYTES,
    Partition,
    RouteMap,
    check_unchanged,
    partition,
    patient_key_of,
    patient_shard,
    shard_count,
)
from .reader import Progress
from .routing import work_dir_io

__all__ = [
    "SHARD_BYTES",
    "Partition",
    "ShardResult",
    "ShardSpec",
    "check_rules",
    "evaluate_shard",
    "evaluate_sharded",
    "load_shard",
    "load_spec",
    "merge_results",
    "partition",
    "patient_key_of",
    "patient_shard",
    "rules_fingerprint",
    "shard_count",
    "shard_specs",
]

log = logging.getLogger(__name__)


def _numbered(base: Path, original: Path, offset: int) -> Iterator[tuple[int, bytes]]:
    """The (line number, line) pairs of one shard's part of one piece of an input file (numbers
    in the file: the piece's own plus ``offset``)."""
    numbers = array("I")
    numbers.frombytes(base.with_suffix(".lines").read_bytes())
    lines_of = map(offset.__add__, numbers) if offset else iter(numbers)
    ranges = base.with_suffix(".ranges")
    if not ranges.exists():  # gzipped input: the lines were copied
        with base.with_suffix(".ndjson").open("rb") as lines:
            yield from zip(lines_of, lines, strict=True)
        return
    bounds = array("Q")
    bounds.frombytes(ranges.read_bytes())
    half = len(bounds) // 2
    try:
        handle = original.open("rb")
    except OSError as exc:  # the input, not the work directory: name it as the input
        raise InputError(f"{original}: cannot read file: {exc.strerror or exc}") from None
    with handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as m:
        slices = map(slice, bounds[:half], bounds[half:])
        yield from zip(lines_of, map(m.__getitem__, slices), strict=True)


def _index_lines(base: Path) -> int:
    """How many lines an index file of a shard lists (4 bytes each), 0 when there is none."""
    try:
        return base.with_suffix(".lines").stat().st_size // 4
    except FileNotFoundError:
        return 0


def _shard_lines(
    directory: Path, shard: int, piece: int, offset: int, original: Path
) -> tuple[Iterator[tuple[int, bytes]] | None, int]:
    """A shard's lines of one piece, and how many its index lists."""
    base = directory / f"{shard:03d}" / f"{piece:05d}"
    extra = base.with_name(base.name + "-extra")
    routed, copied = _index_lines(base), _index_lines(extra)
    if not routed and not copied:
        return None, 0
    if not copied:
        return _numbered(base, original, offset), routed
    if not routed:
        return _numbered(extra, original, offset), copied
    both = merge(
        _numbered(base, original, offset),
        _numbered(extra, original, offset),
        key=lambda pair: pair[0],
    )
    return both, routed + copied


@dataclass(frozen=True)
class ShardSpec:
    """One task: evaluate shard ``index`` of a :class:`Partition` (picklable: a worker process or
    a Dask worker loads the profiles itself, from the shipped ones and ``profile_dirs``)."""

    directory: str
    index: int
    count: int
    files: tuple[tuple[str, str | None], ...]
    pieces: tuple[tuple[int, int, int], ...]
    """(piece, file, line offset): :attr:`Partition.pieces`."""
    inputs: tuple[str | None, ...]
    as_of: AsOf
    profile_dirs: tuple[str, ...] = ()
    select: tuple[str, ...] = ()
    records: bool = False
    """Send back the records of the patients with findings (the HTML report's trends)."""
    owners: tuple[tuple[str, str], ...] = ()
    """:attr:`Partition.owners`: linked patients' keys -> their group's key."""
    stamps: tuple[tuple[int, int], ...] = ()
    """:attr:`Partition.stamps`: each input file as it was routed."""
    placed: int = -1
    """The lines the partition wrote into this shard's index (-1: not known)."""


@dataclass
class ShardResult:
    index: int
    evaluation: Evaluation
    flagged: dict[str, PatientRecord]
    """The records of the patients with findings (the HTML report shows their trends)."""
    rules: str = ""
    """The fingerprint of the rules the shard was evaluated with (:func:`_rules`)."""


def _profile_files(dirs: tuple[str, ...]) -> tuple[tuple[str, int, int], ...]:
    """(path, size, mtime) of every file in the site profile directories: a long-lived worker
    (Dask) loads its profiles again when one of them changed, never a stale copy."""
    found = []
    for directory in dirs:
        for path in sorted(Path(directory).rglob("*")):
            if path.is_file():
                stat = path.stat()
                found.append((str(path), stat.st_size, stat.st_mtime_ns))
    return tuple(found)


def _rules(dirs: tuple[str, ...], select: tuple[str, ...]) -> tuple[Knowledge, ProfileSet, str]:
    """The knowledge and profiles of these directories (loaded once while their files stay the
    same), and a fingerprint of what decides a finding: the fhir-leuko version, the knowledge
    files' versions and every profile file's bytes."""
    return _loaded_rules(dirs, select, _profile_files(dirs))


@lru_cache(maxsize=4)
def _loaded_rules(
    dirs: tuple[str, ...], select: tuple[str, ...], _files: tuple[tuple[str, int, int], ...]
) -> tuple[Knowledge, ProfileSet, str]:
    knowledge = load_knowledge()
    profiles = load_profiles(knowledge, [Path(d) for d in dirs])
    if select:
        profiles = profiles.select(list(select))
    digest = hashlib.sha256(f"fhir-leuko {__version__}\n".encode())
    for name, version in sorted(knowledge.versions.items()):
        digest.update(f"{name} {version}\n".encode())
    for loaded in profiles.loaded:
        digest.update(f"{loaded.profile.id}\n".encode())
        digest.update(loaded.path.read_bytes())
    return knowledge, profiles, digest.hexdigest()[:16]


def load_shard(part: Partition, index: int, knowledge: Knowledge) -> Dataset:
    """The normalised records of the patients shard ``index`` owns (``run --bulk`` plans and
    writes from them)."""
    return _load(
        Path(part.directory),
        index,
        part.count,
        part.files,
        part.pieces,
        part.inputs,
        knowledge,
        part.owners,
        part.stamps,
        part.placed[index] if part.placed else -1,
    )


def _load(
    directory: Path,
    index: int,
    count: int,
    files: Sequence[tuple[str, str | None]],
    pieces: Sequence[tuple[int, int, int]],
    inputs: Sequence[str | None],
    knowledge: Knowledge,
    owners: Mapping[str, str],
    stamps: Sequence[tuple[int, int]] = (),
    placed: int = -1,
) -> Dataset:
    for (path, _input), stamp in zip(files, stamps, strict=False):
        check_unchanged(path, stamp)
    # The pieces of each file in order: the lines come in the order one pass reads them.
    parts = []
    found = 0
    with work_dir_io(directory, "read"):
        for piece, file, offset in pieces:
            path, input = files[file]
            numbered, lines = _shard_lines(directory, index, piece, offset, Path(path))
            found += lines
            if numbered is not None:
                parts.append((numbered, path, input))
    if placed >= 0 and found != placed:
        # Never an empty shard that looks like "no findings": the routing wrote elsewhere.
        raise WorkDirError(
            f"shard {index} finds {found} lines in {directory} where the partition wrote "
            f"{placed}: this is not the work directory the routing wrote (--work-dir must be "
            "storage every worker shares at the same path, docs/population.md); nothing was "
            "written"
        )
    normaliser = Normaliser(knowledge)
    with normaliser.collecting(), work_dir_io(directory, "read"):
        for input in inputs:  # every source of the run exists in every shard
            normaliser.feed_lines((), "", input=input)
        for numbered, path, input in parts:
            normaliser.feed_numbered(numbered, path, input=input)
        dataset = normaliser.run()
    for (path, _input), stamp in zip(files, stamps, strict=False):
        check_unchanged(path, stamp)  # and not while its lines were read
    mine = {}
    for key, record in dataset.patients.items():
        bare = key.removeprefix(f"{record.source}|") if record.source else key
        if patient_shard(owners.get(bare, bare), count) == index:  # Partition.shard_of
            mine[key] = record
    dataset.patients = mine
    return dataset


def load_spec(spec: ShardSpec) -> tuple[Dataset, ProfileSet, str]:
    """What a shard task starts with: the normalised records of the patients shard ``spec.index``
    owns, the profiles it names (loaded by this process: a worker's own) and their fingerprint
    (:func:`rules_fingerprint`)."""
    # The previous shard's objects are garbage now, and a few of them may be in cycles, which
    # reference counting alone never frees while evaluate keeps the cyclic collector off: one
    # collection per shard (cheap here, with little else alive) keeps memory flat over shards.
    gc.collect()
    knowledge, profiles, rules = _rules(spec.profile_dirs, spec.select)
    dataset = _load(
        Path(spec.directory),
        spec.index,
        spec.count,
        spec.files,
        spec.pieces,
        spec.inputs,
        knowledge,
        dict(spec.owners),
        spec.stamps,
        spec.placed,
    )
    return dataset, profiles, rules


def rules_fingerprint(profile_dirs: Sequence[str], select: Sequence[str]) -> str:
    """The fingerprint of the rules this process evaluates with (the fhir-leuko version, the
    knowledge files' versions and every profile file's bytes): each shard's must be the same."""
    return _rules(tuple(profile_dirs), tuple(select))[2]


def check_rules(index: int, got: str, want: str) -> None:
    """Raise :class:`UsageError` when shard ``index`` was evaluated with other rules (``got``)
    than this process's (``want``): its alerts would not be this run's."""
    if got != want:
        raise UsageError(
            f"shard {index} was evaluated with other rules than this process's (rules "
            f"{got or 'unknown'}, here {want}: another fhir-leuko version or other "
            "profile files on a worker); nothing was written: install the same fhir-leuko on "
            "every worker, with the site profiles at the same paths and the same content"
        )


def evaluate_shard(spec: ShardSpec) -> ShardResult:
    """Normalise and evaluate one shard: the patients it owns, with the same core as ever."""
    dataset, profiles, rules = load_spec(spec)
    evaluation = evaluate_dataset(dataset, profiles, as_of=spec.as_of)
    mine = dataset.patients if spec.records else {}
    flagged = {f.patient: mine[f.patient] for f in evaluation.findings if f.patient in mine}
    return ShardResult(spec.index, evaluation, flagged, rules)


def merge_results(
    results: Iterable[ShardResult], partition: Partition, rules: str = ""
) -> tuple[Evaluation, Dataset]:
    """One :class:`Evaluation` from the shards', as evaluating everything at once gives it:
    DetectedIssues in patient-key order; a problem found in several shards (a copied resource)
    once; why nothing was found summed over the shards. With it, a :class:`Dataset` of the
    records of the patients with findings (when the shards sent them: ``records``).

    Raises:
        UsageError: ``rules`` given, and a shard was evaluated with other rules (a worker with
            another fhir-leuko version or other profile files): its alerts would not be this
            run's.
    """
    ordered = sorted(results, key=lambda r: r.index)
    for result in ordered:
        if rules:
            check_rules(result.index, result.rules, rules)
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
    out.problems.sort(key=reading_order)  # as Normaliser.run lists them
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
    route_map: RouteMap | None = None,
    piece_bytes: int | None = None,
    shards_progress: Callable[[int], Progress] | None = None,
) -> tuple[Evaluation, Dataset] | None:
    """Partition (its pieces routed with ``route_map``, the same workers: no serial pass; in this
    process without it), evaluate every shard with ``run_map`` (``map``, or an executor of
    :mod:`.executors`), merge (:func:`merge_results`). ``None`` when the input must be evaluated
    in memory.

    ``progress`` counts the bytes routed; ``shards_progress``, called with the number of shards
    when their evaluation starts, gives what is called with 1 as each shard is done (the longer
    phase: a bar that stopped at the end of the input would look like a hang)."""
    part = partition(
        files, work_dir, count, progress=progress, route_map=route_map, piece_bytes=piece_bytes
    )
    if part is None:
        return None
    dirs = [str(d) for d in profile_dirs]
    specs = shard_specs(part, as_of, dirs, select, records=records)
    tick = shards_progress(count) if shards_progress is not None else None
    # What this process evaluates with, read before any shard runs (11 ms): every shard must
    # have used the same rules.
    rules = rules_fingerprint(dirs, select)
    return merge_results(_counted(run_map(evaluate_shard, specs), count, tick), part, rules)


def shard_specs(
    part: Partition,
    as_of: AsOf,
    profile_dirs: Sequence[str],
    select: Sequence[str],
    *,
    records: bool = False,
) -> list[ShardSpec]:
    """One task per shard of ``part`` (its directory as the partition wrote it)."""
    return [
        ShardSpec(
            str(part.directory),
            index,
            part.count,
            tuple(part.files),
            tuple(part.pieces),
            tuple(part.inputs),
            as_of,
            tuple(profile_dirs),
            tuple(select),
            records,
            tuple(sorted(part.owners.items())),
            tuple(part.stamps),
            part.placed[index] if part.placed else -1,
        )
        for index in range(part.count)
    ]


def _counted(
    results: Iterable[ShardResult], count: int, tick: Progress | None
) -> Iterator[ShardResult]:
    """The shards' results as they come, each logged (``-v``) and counted."""
    for done, result in enumerate(results, start=1):
        log.info(
            "shard %d of %d evaluated (%d patients, %d findings)",
            done,
            count,
            result.evaluation.patients,
            len(result.evaluation.findings),
        )
        if tick is not None:
            tick(1)
        yield result
