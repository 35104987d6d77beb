"""The same evaluation on a real ``dask.distributed`` cluster (issue 12 §3): a ``LocalCluster`` of
two worker processes, one task per shard, and the DetectedIssues byte-identical to one process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import fhir_leuko
from .test_shards import DATA, _flatten, _identity_apart

distributed = pytest.importorskip("distributed", reason="the dask extra is not installed")


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    with distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",  # (None still binds port 8787, for /metrics: maybe taken)
        host="127.0.0.1",
    ) as local:
        yield local.scheduler_address


@pytest.mark.slow
def test_shards_on_a_local_cluster_give_the_same_bytes(cluster: str, tmp_path: Path) -> None:
    flat = _flatten(DATA, tmp_path / "data")
    _identity_apart(flat, tmp_path / "in-memory")  # the rest can be sharded
    one = tmp_path / "one.ndjson"
    on_dask = tmp_path / "dask.ndjson"
    base = ["evaluate", str(flat), "--as-of", "2024-05-02"]
    assert fhir_leuko(*base, "--output", str(one), "--shards", "0").returncode == 1
    result = fhir_leuko(
        *base, "--output", str(on_dask), "--shards", "4", "--dask-scheduler", cluster,
        "--work-dir", str(tmp_path / "work"),
    )
    assert result.returncode == 1, result.stderr
    assert on_dask.read_bytes() == one.read_bytes() and one.read_bytes()
    # The cluster's scheduler ran fhir-leuko's shard tasks.
    with distributed.Client(cluster) as client:
        prefixes = client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.task_prefixes))
    assert "fhir-leuko-shard" in prefixes
    # The shards are gone from the work directory afterwards.
    assert not any((tmp_path / "work").iterdir())


def test_a_scheduler_that_cannot_be_reached_is_a_usage_error(tmp_path: Path) -> None:
    flat = _flatten(DATA, tmp_path / "data")
    result = fhir_leuko(
        "evaluate", str(flat), "--shards", "2", "--dask-scheduler", "tcp://127.0.0.1:9",
        "--output", str(tmp_path / "x.ndjson"),
        env={"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "1s"},
    )
    assert result.returncode == 2 and "--dask-scheduler tcp://127.0.0.1:9" in result.stderr


def test_a_task_that_kills_its_workers_is_a_lost_cluster_not_a_bug(cluster: str) -> None:
    """Dask runs a task again on other workers when its worker dies (out of memory, killed); when
    every one dies with it, the run ends with WorkerLostError (exit 3, nothing written), not with
    "unexpected error: this is a bug"."""
    import os

    from fhir_leuko.errors import ExitCode, WorkerLostError
    from fhir_leuko.files.executors import dask_map

    with dask_map(cluster) as run, pytest.raises(WorkerLostError) as lost:
        list(run(os._exit, [9]))
    assert "the Dask cluster was lost" in str(lost.value) and "nothing was written" in str(lost.value)
    assert lost.value.exit_code == ExitCode.INCOMPLETE
    # The near miss: the cluster's workers came back, and a task that ends normally counts.
    with dask_map(cluster) as run:
        assert list(run(abs, [-3, 4])) == [3, 4]


def test_a_worker_that_cannot_see_a_path_names_the_shared_storage_rule(cluster: str) -> None:
    from fhir_leuko.errors import UsageError
    from fhir_leuko.files.executors import dask_map

    with dask_map(cluster) as run, pytest.raises(UsageError) as refused:
        list(run(open, ["/nonexistent/fhir-leuko-work/000/00000.lines"]))
    message = str(refused.value)
    assert "/nonexistent/fhir-leuko-work/000/00000.lines" in message
    assert "same paths on every worker" in message


def test_a_scheduler_address_that_is_not_one_is_a_usage_error(tmp_path: Path) -> None:
    flat = _flatten(DATA, tmp_path / "data")
    result = fhir_leuko(
        "evaluate", str(flat), "--shards", "2", "--dask-scheduler", "scheduler-without-port",
        "--output", str(tmp_path / "x.ndjson"),
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "--dask-scheduler scheduler-without-port: not a scheduler address" in result.stderr


def _wait_for(path: str) -> str:
    """A task that ends when ``path`` exists (or says it waited in vain after 10 s)."""
    import os
    import time

    deadline = time.monotonic() + 10
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return "waited in vain"
        time.sleep(0.05)
    return "released"


def test_results_come_as_tasks_finish_and_a_stopped_run_cancels_the_rest(
    cluster: str, tmp_path: Path
) -> None:
    """The shards' results are taken in order as each is done (the bar of the shards moves; a
    pass that stops between two takes no more), not all at once at the end; the tasks not taken
    when the run stops are cancelled on the cluster."""
    from fhir_leuko.files.executors import dask_map

    gate = tmp_path / "gate"
    never = str(tmp_path / "never")
    with dask_map(cluster) as run:
        results = iter(run(_wait_for, [str(tmp_path), str(gate), never]))
        assert next(results) == "released"  # the first is done: taken before the others are
        gate.touch()  # only now can the second end: all at once, it would have waited in vain
        assert next(results) == "released"
        results.close()  # stopped: the third (waiting for a file that never comes) is cancelled
        with distributed.Client(cluster) as client:
            def waiting(dask_scheduler: object) -> list[str]:
                return [
                    str(key) for key, task in dask_scheduler.tasks.items()  # type: ignore[attr-defined]
                    if "wait_for" in str(key) or "fhir-leuko-task" in str(key)
                ]
            import time

            deadline = time.monotonic() + 10
            while client.run_on_scheduler(waiting) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not client.run_on_scheduler(waiting)


def test_a_run_that_fails_while_taking_results_leaves_no_error_behind(
    cluster: str, tmp_path: Path
) -> None:
    """A run that fails while it takes the results (a shard's rules differ: a usage error) closes
    its client; the results it had not taken are then released with it, without "Exception
    ignored in generator" on stderr when they are dropped."""
    import gc
    import sys

    from fhir_leuko.files.executors import dask_map

    caught: list[object] = []
    hook = sys.unraisablehook
    sys.unraisablehook = caught.append
    try:
        with pytest.raises(RuntimeError), dask_map(cluster) as run:
            results = run(_wait_for, [str(tmp_path), str(tmp_path / "never")])
            assert next(results) == "released"
            raise RuntimeError("the consumer failed")
        del results
        gc.collect()
    finally:
        sys.unraisablehook = hook
    assert caught == []
