"""The shards of a full ``run --bulk`` export, evaluated here or on workers (``[scale]``).

A full export is partitioned by patient like ``evaluate``'s input (:mod:`fhir_leuko.files.shards`:
bounded memory). Without workers each shard is normalised in this process and its patients are
evaluated as the planner takes them. With ``[scale] workers`` or ``dask_scheduler`` (the executor
injected into the :class:`~fhir_leuko.job.runner.Job`) the workers route the export and evaluate
each shard's patients (:func:`verdict_shard`, one task a shard), and send back the patients and a
:class:`~fhir_leuko.job.verdict.Verdict` with the record where planning or the report reads
anything (findings, one of our DetectedIssues, deceased); for everyone else (most patients)
planning writes nothing and needs nothing of the record. This process plans and writes shard by
shard in the same order, so the writes are the same whoever evaluated.

The workers must see the export (``[run] bulk_dir``) and the shards (``[scale] work_dir``, default
inside the export directory) at the same paths, and run the same fhir-leuko with the same site
profiles: each shard's rules fingerprint is checked (docs/population.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from ..core.evaluate import is_deceased
from ..core.knowledge import Knowledge
from ..core.model import PatientRecord, Problem
from ..core.normalise import Dataset
from ..files.bulkread import normalise_files
from ..files.executors import ShardMap, local_map
from ..files.partition import piece_size
from ..files.shards import (
    Partition,
    ShardSpec,
    check_rules,
    load_shard,
    load_spec,
    partition,
    patient_key_of,
    rules_fingerprint,
    shard_count,
    shard_specs,
)
from ..files.workdirs import temporary_work_dir
from .verdict import Verdict, judge

__all__ = ["BulkScale", "ShardOutcome", "VerdictTask", "export_shards", "verdict_shard"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BulkScale:
    """``[scale]`` as ``run --bulk`` uses it."""

    shards: int | None = None
    """Shards of a full export (``None``: one per 160 MB, a multiple of the workers; 0: none)."""
    workers: int = 1
    """The workers of the injected executor (the shard count is a multiple of them)."""
    work_dir: Path | None = None
    """Where the shards go (default: inside the export directory)."""
    profile_dirs: tuple[str, ...] = ()
    """The site profile directories the workers load (the job's own)."""
    select: tuple[str, ...] = ()
    """The profiles selected (``--profile``)."""
    evaluated_on: str = "in this process"
    """Who the injected executor is, for the log (``on 2 local worker processes``)."""


@dataclass(frozen=True)
class VerdictTask:
    """One shard to evaluate on a worker (picklable)."""

    spec: ShardSpec
    as_of: datetime
    existing: tuple[str, ...]
    """The patients of this shard with one of our DetectedIssues in the export: evaluated even
    without a result (a finding may have to be resolved)."""


@dataclass
class ShardVerdicts:
    """What a worker sends back for one shard."""

    index: int
    patients: list[str]
    merged: dict[str, str]
    verdicts: dict[str, Verdict]
    """Only the patients planning reads anything of (see :func:`verdict_shard`)."""
    problems: list[Problem]
    rules: str = ""

    def verdict(self, patient: str) -> Verdict:
        """A patient's verdict; one not sent had nothing found and needs no record."""
        found = self.verdicts.get(patient)
        return found if found is not None else Verdict(PatientRecord(patient))


@dataclass
class ShardOutcome:
    """One shard, ready for the planner: its patients in order, the records a ``Patient.link``
    replaced -> the survivor, the verdict on each patient, the input problems it found."""

    patients: list[str]
    merged: Mapping[str, str]
    verdict: Callable[[str], Verdict]
    problems: list[Problem] = field(default_factory=list)


def _patients(dataset: Dataset, existing: Sequence[str]) -> list[str]:
    """The patients a shard settles: every one with a result, and those with our DetectedIssues."""
    mine = {key for key, record in dataset.patients.items() if record.results}
    mine.update(existing)
    return sorted(mine)


def verdict_shard(task: VerdictTask) -> ShardVerdicts:
    """Normalise one shard and evaluate the patients it settles (a task: runs on a worker)."""
    dataset, profiles, rules = load_spec(task.spec)
    existing = set(task.existing)
    patients = _patients(dataset, task.existing)
    merged = {p: dataset.merged[p] for p in patients if p in dataset.merged}
    verdicts: dict[str, Verdict] = {}
    done: set[str] = set()
    for patient in patients:
        target = merged.get(patient, patient)
        if target in done:
            continue
        done.add(target)
        found = judge(dataset.patients.get(target) or PatientRecord(target), profiles, task.as_of)
        if (
            found.findings
            or found.failure
            or target in existing
            or is_deceased(found.record, task.as_of)
        ):
            verdicts[target] = found
        # Else nothing found, nothing of ours to resolve, alive (most patients): the planner
        # writes nothing and reads nothing of the record but that (Planner.plan), so nothing is
        # sent (ShardVerdicts.verdict).
    return ShardVerdicts(task.spec.index, patients, merged, verdicts, dataset.problems, rules)


@contextmanager
def _work_dir(scale: BulkScale, export: Path) -> Iterator[Path]:
    if scale.work_dir is None:
        yield export / ".fhir-leuko" / "shards"  # removed with the export
        return
    with temporary_work_dir(scale.work_dir) as directory:
        yield directory / "shards"


def export_shards(
    files: Sequence[tuple[Path, str | None]],
    export: Path,
    *,
    knowledge: Knowledge,
    scale: BulkScale,
    as_of: datetime,
    existing: Sequence[str],
    judge_in: Callable[[Dataset], Callable[[str], Verdict]],
    shard_map: Callable[[], AbstractContextManager[ShardMap]] | None,
) -> Generator[ShardOutcome, None, None]:
    """The shards of a full export, one after another (see the module docstring); in memory
    when it is small or cannot be partitioned exactly. ``existing``: the patient keys with our
    DetectedIssues; ``judge_in``: verdicts in this process."""
    total = sum(path.stat().st_size for path, _input in files)
    count = scale.shards if scale.shards is not None else shard_count(total, scale.workers)
    if count <= 1:
        yield _here(normalise_files(files, knowledge), list(existing), judge_in)
        return
    parallel = shard_map is not None
    with _work_dir(scale, export) as directory, (shard_map or _local)() as run_map:
        part = partition(
            files,
            directory,
            count,
            route_map=run_map if parallel else None,
            piece_bytes=piece_size(total, max(scale.workers, 2)) if parallel else None,
        )
        if part is None:  # (partition logged why)
            yield _here(normalise_files(files, knowledge), list(existing), judge_in)
            return
        log.info(
            "bulk: the export (%d MB) in %d shards, evaluated %s",
            total >> 20,
            count,
            scale.evaluated_on if parallel else "in this process",
        )
        owned = _owned(part, existing)
        if not parallel:
            for index in range(count):
                yield _here(load_shard(part, index, knowledge), owned[index], judge_in)
            return
        specs = shard_specs(part, as_of, scale.profile_dirs, scale.select)
        rules = rules_fingerprint(scale.profile_dirs, scale.select)
        tasks = [VerdictTask(spec, as_of, owned[spec.index]) for spec in specs]
        for result in run_map(verdict_shard, tasks):
            check_rules(result.index, result.rules, rules)
            yield ShardOutcome(result.patients, result.merged, result.verdict, result.problems)


def _local() -> AbstractContextManager[ShardMap]:
    return nullcontext(local_map)


def _owned(part: Partition, existing: Sequence[str]) -> list[tuple[str, ...]]:
    """The patients with our DetectedIssues, by the shard that owns them (one pass over them)."""
    by_shard: list[list[str]] = [[] for _ in range(part.count)]
    for patient in existing:
        by_shard[part.shard_of(patient_key_of(patient))].append(patient)
    return [tuple(patients) for patients in by_shard]


def _here(
    dataset: Dataset,
    existing: Sequence[str],
    judge_in: Callable[[Dataset], Callable[[str], Verdict]],
) -> ShardOutcome:
    return ShardOutcome(
        _patients(dataset, existing), dataset.merged, judge_in(dataset), dataset.problems
    )
