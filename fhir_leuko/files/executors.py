"""Who routes the pieces of the input and evaluates the shards (:mod:`fhir_leuko.files.shards`):
this process, local worker processes, or a ``dask.distributed`` cluster. Each is a ``map`` that
gives the results in the order of the tasks (the merge sorts them by shard anyway), injected into
:func:`fhir_leuko.files.shards.evaluate_sharded`.

Dask is the optional extra ``fhir-leuko[dask]``: one task per piece, then one per shard, no
shuffle, results taken in task order as they finish. The workers read the shards from the work directory, so it must be on
storage every worker sees (a shared file system); they load the shipped profiles from their own
installed fhir-leuko and site profiles from the same paths.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from itertools import islice
from typing import Any, Protocol, TypeVar

from ..errors import UsageError, WorkerLostError

__all__ = ["ShardMap", "dask_map", "local_map", "process_map"]

_T = TypeVar("_T")
_R = TypeVar("_R")


_TASK_NAMES = {"ShardSpec": "shard", "Piece": "piece", "JoinTask": "join", "VerdictTask": "shard"}
"""How Dask names the tasks (``fhir-leuko-shard-…``: the dashboard and logs show them)."""


class ShardMap(Protocol):
    """``map(fn, tasks)`` on an executor: the results, in the order of ``tasks`` (the pieces the
    partition routes, the buckets it joins, then the shards)."""

    def __call__(self, fn: Callable[[_T], _R], tasks: Sequence[_T], /) -> Iterable[_R]: ...


def local_map(fn: Callable[[_T], _R], specs: Sequence[_T]) -> Iterator[_R]:
    """Every shard in this process, one after another (bounded memory, one core)."""
    return map(fn, specs)


_LOST = (
    "{what} was lost before its task was done ({why}); nothing was written. Run again; if it was "
    "killed for memory, with fewer workers or more memory for each (docs/population.md, sizing)"
)


def _lost_process(results: Iterator[_R]) -> Iterator[_R]:
    """The pool's results, a dead worker named as such: the pool reports it only as broken."""
    try:
        yield from results
    except BrokenProcessPool:
        why = "the process ended without a result: killed by the system, perhaps out of memory"
        raise WorkerLostError(_LOST.format(what="a worker process", why=why)) from None


@contextmanager
def process_map(workers: int) -> Iterator[ShardMap]:
    """Shards on ``workers`` local processes (spawned: a clean interpreter, no inherited state).

    Raises (while the results are iterated):
        WorkerLostError: a worker process died (killed, out of memory) before its task was done.
    """
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=context,
        initializer=_worker_start,
        initargs=(os.getpid(),),
    )

    def run(fn: Callable[[_T], _R], specs: Sequence[_T]) -> Iterator[_R]:
        return _lost_process(_ahead(pool, fn, specs, 4 * workers))

    try:
        yield run
    finally:
        # Stopped (Ctrl-C, SIGTERM), failed, or done with what it needed (a pass that stops
        # between two shards): the tasks not started are dropped, the running ones end (one shard
        # each), and the workers with them: none is left running alone.
        pool.shutdown(wait=True, cancel_futures=True)


def _ahead(
    pool: ProcessPoolExecutor, fn: Callable[[_T], _R], specs: Sequence[_T], ahead: int
) -> Iterator[_R]:
    """The results in task order, with at most ``ahead`` tasks submitted and not yet taken
    (``Executor.map`` submits them all): results a slow consumer has not taken yet (a ``run
    --bulk`` pass writing to its server) do not pile up in this process. Four per worker keep the
    workers as busy as ``map`` does; two cost 5 % at a million Observations (the results are taken
    in order, so one slow task left the other worker idle behind it)."""
    tasks = iter(specs)
    pending: deque[Future[_R]] = deque(pool.submit(fn, spec) for spec in islice(tasks, ahead))
    while pending:
        result = pending.popleft().result()
        for spec in islice(tasks, 1):
            pending.append(pool.submit(fn, spec))
        yield result


def _worker_start(client: int) -> None:
    """In each worker process, first.

    Ctrl-C reaches the whole process group of a terminal, and systemd's stop sends SIGTERM to
    every process of the unit (``KillMode=control-group``): a worker that died of either would
    make the run a lost worker (exit 3) instead of a stopped one. The client decides: it drops the
    tasks not started, and the running ones end. And a worker ends when its client is gone (kill
    -9, the OOM killer): the pool's queues never tell it (each worker holds both ends of its
    pipe), so it would wait for a task, orphaned, for good."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(
        target=_end_with_client, args=(client,), name="fhir-leuko-client-watch", daemon=True
    ).start()


def _end_with_client(client: int) -> None:
    # An orphan is given another parent (init or a subreaper): portable, unlike prctl's
    # PR_SET_PDEATHSIG (Linux only, and tied to the thread that started the worker).
    while os.getppid() == client:
        time.sleep(1)
    os._exit(1)  # nobody reads this worker's results any more


def _in_order(client: Any, futures: list[Any]) -> Iterator[_R]:
    """Each task's result as soon as it and those before it are done (a bar of the shards moves
    as they finish; a pass that stops between two takes no more), Dask's failures named. The
    tasks not taken are cancelled: a stopped run leaves nothing computing for nobody."""
    try:
        for future in futures:
            yield _dask_result(future)
    finally:
        # (A run that failed while taking results has closed its client already, and a closed
        # client's tasks are released with it: cancelling would raise in a generator's cleanup.)
        if client.status == "running":
            client.cancel(futures)


def _dask_result(future: Any) -> Any:
    from distributed.comm.core import CommClosedError  # (imported already: dask_map)
    from distributed.scheduler import KilledWorker

    try:
        return future.result()
    except KilledWorker:
        # Dask ran the task again on other workers (distributed.scheduler.allowed-failures)
        # and each died with it: most often the memory a shard needs.
        why = "every worker that ran one of its tasks died: killed, perhaps out of memory"
        raise WorkerLostError(_LOST.format(what="the Dask cluster", why=why)) from None
    except (CancelledError, CommClosedError, TimeoutError):
        why = "the scheduler closed or went away"
        raise WorkerLostError(_LOST.format(what="the Dask cluster", why=why)) from None
    except OSError as exc:  # raised by a task: a worker cannot use a path the client gave
        raise UsageError(
            f"a Dask worker cannot use {exc.filename or 'a path'} ({exc.strerror or exc}): "
            "the input (for run --bulk: [run] bulk_dir) and the work directory must be at the "
            "same paths on every worker (a shared file system, docs/population.md)"
        ) from None


@contextmanager
def dask_map(scheduler: str | Any) -> Iterator[ShardMap]:
    """Shards as tasks on a Dask cluster: ``scheduler`` is its address (``tcp://host:8786``) or an
    object ``distributed.Client`` accepts (a ``LocalCluster``).

    Raises:
        UsageError: the ``dask`` extra is not installed, the scheduler cannot be reached, or a
            worker cannot use a path (the work directory is not shared).
        WorkerLostError: workers kept dying on a task, or the scheduler went away (while the
            results are taken).
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
    except ValueError as exc:  # not an address at all (distributed parses it first)
        raise UsageError(f"--dask-scheduler {scheduler}: not a scheduler address ({exc})") from None
    with client:

        def run(fn: Callable[[_T], _R], specs: Sequence[_T]) -> Iterator[_R]:
            # One task per piece or shard; pure=False: two runs over the same input are two runs.
            token = uuid.uuid4().hex[:12]
            kind = _TASK_NAMES.get(type(specs[0]).__name__, "task") if specs else "task"
            keys = [f"fhir-leuko-{kind}-{token}-{i}" for i in range(len(specs))]
            futures = client.map(fn, list(specs), pure=False, key=keys)
            return _in_order(client, futures)

        yield run
