"""``fhir-leuko evaluate`` end to end, against merely parsing the same bytes with orjson.

``./dev bench evaluate [--observations N] [--data DIR] [--rounds R] [--variants LIST] [--check]``

1. Generates (once, cached under ``benchmarks/out/``) a deterministic bulk export of about N
   Observations with benchmarks/generate.py.
2. Parse only: reads every NDJSON file line by line and ``orjson.loads`` each line, in this process.
3. End to end: ``python -m fhir_leuko evaluate DIR --as-of ... --output FILE`` as a child process,
   in one or more *variants* (``memory``: everything in memory, ``--shards 0``; ``shards``: the
   default, shards on disk above 160 MB, one process; ``workers2``: ``--workers 2``; ``dask2``: a
   ``distributed.LocalCluster`` of two worker processes started here, its start-up not timed).
   Peak memory is the largest resident set of the child and its children together (sampled every
   20 ms from /proc) and the child's own ``ru_maxrss``.
4. ``bound2`` (not a path of fhir-leuko: a bound): the input split in two by patient beforehand
   (cached, not timed), and two ``evaluate --shards 0`` children run at once, one per half. It is
   what two processes give when partitioning costs nothing: with today's work per Observation, no
   design that partitions the input while it evaluates can be faster on the same two cores. Its
   output, the halves' lines together, must be the first variant's lines.

Noise: the machine is shared, so each of R rounds takes one reading of parse only and one of each
variant, in a rotating order, and the *best* reading of each is compared (a reading can only be
slowed down by the neighbours, never sped up). Every reading prints the load average when it
started. Rates are Observations per second of wall time; the goals (issue 2 §9, issue 12 §2):
one process >= 0.5x parse only, two workers >= 1.0x parse only, and two workers >= 1.5x the
sharded single process (issue 12 §4; printed when ``shards`` is measured too). ``--check`` exits 1
when a goal is missed or a variant's output differs from the first variant's (byte for byte).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from .generate import AS_OF, GENERATOR_VERSION, generate

__all__ = ["main"]

GOAL = 0.5
GOAL_TWO_WORKERS = 1.0
GOAL_SCALING = 1.5
"""Two workers against the sharded single process (the same bounded-memory path)."""
OUT = Path(__file__).resolve().parent / "out"
VARIANTS = {
    "memory": ["--shards", "0"],
    "shards": [],
    "workers2": ["--workers", "2"],
    "dask2": ["--dask-scheduler", "{scheduler}"],
    "bound2": ["--shards", "0"],
}
_TWO = ("workers2", "dask2", "bound2")


def _dataset(observations: int, data: Path | None) -> Path:
    if data is not None:
        return data
    directory = OUT / f"evaluate-{observations}-v{GENERATOR_VERSION}"
    stamp = directory / ".complete"
    if not stamp.exists():
        print(f"generating about {observations:,} Observations into {directory} ...", flush=True)
        started = time.perf_counter()
        counts = generate(directory, observations)
        stamp.write_text(orjson.dumps(counts).decode())
        print(f"  generated in {time.perf_counter() - started:.1f} s: {counts}", flush=True)
    return directory


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name.endswith(".ndjson"))


def _load() -> float:
    return os.getloadavg()[0]


@dataclass
class Reading:
    seconds: float
    cpu: float
    load: float
    rss_tree_kib: int = 0
    maxrss_kib: int = 0


@dataclass
class Side:
    name: str
    readings: list[Reading] = field(default_factory=list)

    @property
    def best(self) -> Reading:
        return min(self.readings, key=lambda r: r.seconds)


def _parse_only(files: list[Path]) -> tuple[Reading, int, int]:
    """One reading: orjson-parse every line; the Observations and the bytes read."""
    observations = 0
    size = 0
    load = _load()
    started = time.perf_counter()
    cpu = time.process_time()
    for path in files:
        with path.open("rb") as stream:
            for line in stream:
                size += len(line)
                if orjson.loads(line)["resourceType"] == "Observation":
                    observations += 1
    reading = Reading(time.perf_counter() - started, time.process_time() - cpu, load)
    return reading, observations, size


def _halves(directory: Path) -> list[Path]:
    """The input split in two by patient (``bound2``), cached beside it: each line goes to the
    half of the patient it names (its subject, or the Patient itself), as fhir-leuko's shards
    would place it (``patient_shard``)."""
    from fhir_leuko.files.partition import patient_key_of, patient_shard

    halves = [directory.parent / f"{directory.name}.halves" / f"half-{k}" for k in (0, 1)]
    stamp = halves[0].parent / ".complete"
    if stamp.exists():
        return halves
    print(f"splitting {directory} in two by patient (once, not timed) ...", flush=True)
    for half in halves:
        half.mkdir(parents=True, exist_ok=True)
    for path in _files(directory):
        outs = [(half / path.name).open("wb") for half in halves]
        with path.open("rb") as stream:
            for line in stream:
                resource = orjson.loads(line)
                if resource["resourceType"] == "Patient":
                    key = f"Patient/{resource['id']}"
                else:
                    subject = (resource.get("subject") or {}).get("reference")
                    if not subject:  # the generator writes none: the bound would need the join
                        raise SystemExit(f"bound2: {path.name}: a line names no patient")
                    key = patient_key_of(subject)
                outs[patient_shard(key, 2)].write(line)
        for out in outs:
            out.close()
    stamp.write_text("")
    return halves


def _tree_rss_kib(root: int) -> int:
    """Resident memory of a process and all its descendants (KiB), from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        pid, ppid = int(entry), int(fields[1])
        children.setdefault(ppid, []).append(pid)
        rss[pid] = int(fields[21]) * (os.sysconf("SC_PAGE_SIZE") // 1024)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total


def _end_to_end(
    directories: list[Path], outputs: list[Path], extra: list[str]
) -> tuple[Reading, int, str]:
    """``fhir-leuko evaluate`` children, one per directory, all at once: their reading (wall time
    until the last ends, CPU and resident memory summed), the worst exit code, the stderr of the
    first."""
    load = _load()
    started = time.perf_counter()
    evaluate = [sys.executable, "-m", "fhir_leuko", "evaluate", "--as-of", AS_OF, "--no-progress"]
    commands = [
        [*evaluate, str(directory), "--output", str(output), "--format", "ndjson", *extra]
        for directory, output in zip(directories, outputs, strict=True)
    ]
    children = [
        subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for command in commands
    ]
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak[0] = max(peak[0], sum(_tree_rss_kib(child.pid) for child in children))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stderrs = [b""] * len(children)

    def drain(k: int) -> None:
        stream = children[k].stderr
        assert stream is not None
        stderrs[k] = stream.read()

    drains = [threading.Thread(target=drain, args=(k,)) for k in range(len(children))]
    for thread in drains:
        thread.start()
    cpu, maxrss, codes = 0.0, 0, []
    for child in children:
        _pid, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        codes.append(child.returncode)
        cpu += usage.ru_utime + usage.ru_stime
        maxrss = max(maxrss, usage.ru_maxrss)
    elapsed = time.perf_counter() - started
    done.set()
    sampler.join()
    for thread in drains:
        thread.join()
    code = max(codes, key=lambda c: (c not in (0, 1), c))
    return Reading(elapsed, cpu, load, peak[0], maxrss), code, stderrs[0].decode()


@contextmanager
def _cluster(wanted: bool) -> Iterator[str]:
    if not wanted:
        yield ""
        return
    from distributed import LocalCluster

    started = time.perf_counter()
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0", host="127.0.0.1"
    ) as cluster:
        print(f"dask2: LocalCluster of 2 worker processes started in {time.perf_counter() - started:.1f} s (not timed)")
        yield str(cluster.scheduler_address)


def _verdict(ratio: float, goal: float) -> str:
    return f"goal >= {goal}x: {'met' if ratio >= goal else 'MISSED'}"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="./dev bench evaluate", description=__doc__)
    parser.add_argument("--observations", type=int, default=1_000_000, help="default 1,000,000")
    parser.add_argument("--data", type=Path, help="use this generated directory instead")
    parser.add_argument("--rounds", type=int, default=3, help="readings of each side (default 3)")
    parser.add_argument(
        "--variants",
        default="memory,shards",
        help=f"comma-separated, of {', '.join(VARIANTS)}; 'all' for every one (default memory,shards)",
    )
    parser.add_argument("--check", action="store_true", help="exit 1 when a goal is missed")
    args = parser.parse_args(argv)
    names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or args.rounds < 1:
        parser.error(f"unknown variant(s) {unknown}" if unknown else "--rounds must be >= 1")

    directory = _dataset(args.observations, args.data)
    files = _files(directory)
    parse = Side("parse only")
    sides = {name: Side(name) for name in names}
    outputs = {name: directory.parent / f"{directory.name}.{name}.issues.ndjson" for name in names}
    halves = _halves(directory) if "bound2" in names else []
    half_outputs = [outputs.get("bound2", OUT / "unused").with_suffix(f".{k}") for k in (0, 1)]
    observations = size = 0
    stderr_of: dict[str, str] = {}
    with _cluster("dask2" in names) as scheduler:
        for round_number in range(args.rounds):
            order = ["parse", *names]
            shift = round_number % len(order)
            for name in order[shift:] + order[:shift]:
                if name == "parse":
                    reading, observations, size = _parse_only(files)
                    parse.readings.append(reading)
                else:
                    extra = [a.format(scheduler=scheduler) for a in VARIANTS[name]]
                    if name == "bound2":
                        reading, code, stderr = _end_to_end(halves, half_outputs, extra)
                        outputs[name].write_bytes(b"".join(p.read_bytes() for p in half_outputs))
                    else:
                        reading, code, stderr = _end_to_end([directory], [outputs[name]], extra)
                    if code not in (0, 1):
                        print(stderr, file=sys.stderr)
                        print(f"{name}: fhir-leuko evaluate failed with exit code {code}", file=sys.stderr)
                        return 2
                    sides[name].readings.append(reading)
                    stderr_of[name] = stderr
                label = "parse only" if name == "parse" else name
                print(
                    f"  round {round_number + 1} {label:<10} {reading.seconds:7.1f} s wall "
                    f"{reading.cpu:7.1f} s CPU  load {reading.load:.2f}",
                    flush=True,
                )

    print(f"data: {directory} ({len(files)} files, {size / 1e6:,.0f} MB, {observations:,} Observations)")
    best_parse = parse.best
    parse_rate = observations / best_parse.seconds
    print(
        f"parse only (orjson, line by line): best {best_parse.seconds:6.1f} s  "
        f"{parse_rate:>10,.0f} Observations/s  (load {best_parse.load:.2f})"
    )
    missed = False
    first = outputs[names[0]].read_bytes()
    sharded = sides["shards"].best.seconds if "shards" in sides else None
    for name in names:
        best = sides[name].best
        rate = observations / best.seconds
        ratio = rate / parse_rate
        goal = GOAL_TWO_WORKERS if name in _TWO else GOAL
        verdict = _verdict(ratio, goal)
        if name == "bound2":  # a bound, not a path of fhir-leuko: never a goal of its own
            verdict = f"vs {goal}x: a bound, the input split beforehand"
            same = sorted(outputs[name].read_bytes().splitlines()) == sorted(first.splitlines())
        else:
            missed |= ratio < goal
            same = outputs[name].read_bytes() == first
        scaling = ""
        if sharded and name in ("workers2", "dask2"):
            times = sharded / best.seconds
            scaling = f"  {times:.2f}x the sharded one process ({_verdict(times, GOAL_SCALING)})"
            missed |= times < GOAL_SCALING
        missed |= not same
        print(
            f"{name + ':':<10} best {best.seconds:6.1f} s  {rate:>10,.0f} Observations/s  "
            f"{ratio:.2f}x parse only ({verdict}){scaling}  CPU {best.cpu:.1f} s  load {best.load:.2f}"
        )
        print(
            f"{'':<10} peak memory {max(r.rss_tree_kib for r in sides[name].readings) / 1024:,.0f} MiB "
            f"(all processes; the evaluate process alone {max(r.maxrss_kib for r in sides[name].readings) / 1024:,.0f} MiB); "
            f"output {'identical to ' + names[0] if same else 'DIFFERENT from ' + names[0]}"
            + (" (the halves' lines together)" if name == "bound2" else "")
        )
    issues = sum(1 for _ in outputs[names[0]].open("rb"))
    print(f"DetectedIssues written: {issues:,}; load average now {_load():.2f}")
    for line in stderr_of.get(names[0], "").splitlines():
        if line.startswith("fhir-leuko:"):
            print(f"  {line}")
    return 1 if args.check and missed else 0
