"""The population-scale options of ``evaluate`` (and ``run --bulk``): shards on disk, local worker
processes, a Dask cluster (docs/population.md)."""

from __future__ import annotations

import argparse
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from ..core.normalise import Dataset
from ..core.pipeline import AsOf, Evaluation
from ..errors import UsageError
from ..files.executors import ShardMap, dask_map, local_map, process_map
from ..files.partition import MAX_SHARDS, piece_size
from ..files.reader import Progress
from ..files.shards import SHARD_BYTES, evaluate_sharded, shard_count
from ..files.workdirs import temporary_work_dir
from ..job.config import load_job_config

__all__ = [
    "SCALE_HELP",
    "SHARD_BYTES",
    "ScaleOptions",
    "Terminated",
    "add_scale_options",
    "evaluate_in_shards",
    "scale_settings",
    "shard_executor",
    "shards_flag",
]

SCALE_HELP = f"""\
population scale (docs/population.md):
  Input over {SHARD_BYTES >> 20} MB of NDJSON is partitioned by patient into shards on disk and evaluated
  shard by shard: memory stays bounded and the output is byte-identical. --workers N evaluates
  shards on N local processes; --dask-scheduler on a dask.distributed cluster (the dask extra;
  --work-dir must then be storage every worker can read). [scale] workers, dask_scheduler and
  work_dir in --config, or FHIR_LEUKO_SCALE_WORKERS, FHIR_LEUKO_SCALE_DASK_SCHEDULER,
  FHIR_LEUKO_SCALE_WORK_DIR.
"""


@dataclass(frozen=True)
class ScaleOptions:
    workers: int = 1
    dask_scheduler: str | None = None
    work_dir: Path | None = None
    shards: int | None = None


def add_scale_options(
    parser: argparse.ArgumentParser, *, config: bool = True, bulk: bool = False
) -> None:
    """The population-scale flags (``bulk``: as ``run --bulk`` uses them, on a full export)."""
    title = (
        "population scale (--bulk: the shards of a full export; [scale] in --config)"
        if bulk
        else "population scale (large exports)"
    )
    group = parser.add_argument_group(title)
    group.add_argument(
        "--workers", metavar="N", type=int, help="evaluate shards on N local processes"
    )
    group.add_argument(
        "--dask-scheduler",
        metavar="ADDRESS",
        help="evaluate shards as tasks on this dask.distributed scheduler (tcp://host:8786)",
    )
    group.add_argument(
        "--work-dir",
        metavar="DIR",
        type=Path,
        help="where the shards go (default: "
        + ("inside the export directory)" if bulk else "a temp dir)"),
    )
    group.add_argument(
        "--shards",
        metavar="N",
        type=int,
        help=f"partition into N shards whatever the size (default: one per {SHARD_BYTES >> 20} MB "
        "of input, none below that); 0: never (everything in memory)",
    )
    if config:
        group.add_argument(
            "--config", metavar="FILE", type=Path, help="a TOML file with a [scale] table"
        )


def scale_settings(args: argparse.Namespace) -> ScaleOptions:
    """Flags > ``FHIR_LEUKO_SCALE_*`` > the ``[scale]`` table of ``--config`` > defaults."""
    flags = {
        "workers": args.workers,
        "dask_scheduler": args.dask_scheduler,
        "work_dir": args.work_dir,
    }
    given = {k: v for k, v in flags.items() if v is not None}
    scale = load_job_config({"scale": given}, getattr(args, "config", None)).scale
    return ScaleOptions(scale.workers, scale.dask_scheduler, scale.work_dir, shards_flag(args))


def shards_flag(args: argparse.Namespace) -> int | None:
    """``--shards N``, checked (a shard number is 16 bits; 0: in memory)."""
    if args.shards is not None and not 0 <= args.shards <= MAX_SHARDS:
        raise UsageError(f"--shards {args.shards}: must be 0 (in memory) to {MAX_SHARDS}")
    shards: int | None = args.shards
    return shards


def shard_executor(scale: ScaleOptions) -> AbstractContextManager[ShardMap]:
    if scale.dask_scheduler:
        return dask_map(scale.dask_scheduler)
    if scale.workers > 1:
        return process_map(scale.workers)
    return nullcontext(local_map)


class Terminated(KeyboardInterrupt):
    """SIGTERM during a sharded evaluation: stopped as Ctrl-C stops it (exit 128 + 15)."""

    signum = signal.SIGTERM


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (``timeout``, a Kubernetes Job's deadline, systemd) unwinds the run as Ctrl-C does:
    the workers stop after their current task and the work directory is removed. Killed outright
    instead, the worker processes would go on computing, orphaned, and the shards stay on disk."""
    if threading.current_thread() is not threading.main_thread():
        yield  # (signal handlers belong to the main thread)
        return

    def stop(_signum: int, _frame: FrameType | None) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def evaluate_in_shards(
    files: Sequence[tuple[Path, str | None]],
    total: int,
    scale: ScaleOptions,
    args: argparse.Namespace,
    as_of: AsOf,
    progress: Progress | None,
    records: bool = False,
    shards_progress: Callable[[int], Progress] | None = None,
) -> tuple[Evaluation, Dataset] | None:
    """The sharded evaluation of ``evaluate`` and the records of the patients with findings
    (``None``: this input is evaluated in memory); ``progress`` and ``shards_progress`` as
    :func:`~fhir_leuko.files.shards.evaluate_sharded` takes them."""
    count = scale.shards or shard_count(total, scale.workers)
    parallel = bool(scale.dask_scheduler) or scale.workers > 1
    with (
        _terminate_as_interrupt(),
        temporary_work_dir(scale.work_dir) as directory,
        shard_executor(scale) as run_map,
    ):
        return evaluate_sharded(
            files,
            as_of=as_of,
            work_dir=directory / "shards",
            count=count,
            profile_dirs=args.profiles,
            select=args.profile,
            run_map=run_map,
            progress=progress,
            shards_progress=shards_progress,
            records=records,
            # The workers route the pieces of the input too: no serial pass in this process.
            route_map=run_map if parallel else None,
            piece_bytes=piece_size(total, scale.workers if scale.workers > 1 else 8)
            if parallel
            else None,
        )
