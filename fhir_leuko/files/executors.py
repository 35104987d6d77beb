"""Who evaluates the shards (:mod:`fhir_leuko.files.shards`): this process, local worker
processes, or a ``dask.distributed`` cluster. Each is a ``map`` that gives the results in the
order of the tasks (the merge sorts them by shard anyway), injected into
:func:`fhir_leuko.files.shards.evaluate_sharded`.

Dask is the optional extra ``fhir-leuko[dask]``: one task per shard, no shuffle, results
gathered in task order. The workers read the shards from the work directory, so it must be on
storage every worker sees (a shared file system); they load the shipped profiles from their own
installed fhir-leuko and site profiles from the same paths.
"""

from __future__ import annotations

import multiprocessing
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from typing import Any

from ..errors import UsageError
from .shards import ShardResult, ShardSpec

__all__ = ["ShardMap", "dask_map", "local_map", "process_map"]

ShardMap = Callable[[Callable[[ShardSpec], ShardResult], Sequence[ShardSpec]], Iterable[ShardResult]]
"""``map(evaluate_shard, specs)``: the results, in the order of ``specs``."""


def local_map(
    fn: Callable[[ShardSpec], ShardResult], specs: Sequence[ShardSpec]
) -> Iterator[ShardResult]:
    """Every shard in this process, one after another (bounded memory, one core)."""
    return map(fn, specs)


@contextmanager
def process_map(workers: int) -> Iterator[ShardMap]:
    """Shards on ``workers`` local processes (spawned: a clean interpreter, no inherited state)."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:

        def run(
            fn: Callable[[ShardSpec], ShardResult], specs: Sequence[ShardSpec]
        ) -> Iterator[ShardResult]:
            return pool.map(fn, specs)

        yield run


@contextmanager
def dask_map(scheduler: str | Any) -> Iterator[ShardMap]:
    """Shards as tasks on a Dask cluster: ``scheduler`` is its address (``tcp://host:8786``) or an
    object ``distributed.Client`` accepts (a ``LocalCluster``).

    Raises:
        UsageError: the ``dask`` extra is not installed, or the scheduler cannot be reached.
    """
    try:
        from distributed import Client
    except ImportError:
        raise UsageError(
            "--dask-scheduler needs the dask extra: pip install 'fhir-leuko[dask]'"
        ) from None
    try:
        # The connect timeout is Dask's own (distributed.comm.timeouts.connect, 30 s by default).
        client = Client(scheduler)  # type: ignore[no-untyped-call]
    except (OSError, TimeoutError) as exc:
        raise UsageError(f"--dask-scheduler {scheduler}: cannot connect ({exc})") from None
    with client:

        def run(
            fn: Callable[[ShardSpec], ShardResult], specs: Sequence[ShardSpec]
        ) -> list[ShardResult]:
            # One task per shard; pure=False: two runs over the same directory are two runs.
            token = uuid.uuid4().hex[:12]
            keys = [f"fhir-leuko-shard-{token}-{s.index}" for s in specs]
            futures = client.map(fn, list(specs), pure=False, key=keys)
            results: list[ShardResult] = client.gather(futures)  # type: ignore[no-untyped-call]
            return results

        yield run
