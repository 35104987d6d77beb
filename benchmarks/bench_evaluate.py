"""``fhir-leuko evaluate`` end to end, against merely parsing the same bytes with orjson.

``./dev bench evaluate [--observations N] [--data DIR] [--check]``

1. Generates (once, cached under ``benchmarks/out/``) a deterministic bulk export of about N
   Observations with benchmarks/generate.py.
2. Parse only: reads every NDJSON file line by line and ``orjson.loads`` each line, in this process,
   once before and once after step 3 (the mean is used).
3. End to end: runs ``python -m fhir_leuko evaluate DIR --as-of ... --output FILE`` as a child
   process, and takes the child's CPU time and peak resident memory from ``wait4``.

Both rates are Observations per second of wall time; the goal (issue 2 §9) is end to end >= 0.5x
parse only. Figures are ratios on one machine, never a timed test. ``--check`` exits 1 when the goal
is missed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import orjson

from .generate import AS_OF, GENERATOR_VERSION, generate

__all__ = ["main"]

GOAL = 0.5
OUT = Path(__file__).resolve().parent / "out"


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


def _parse_only(files: list[Path]) -> tuple[float, float, int, int]:
    """Wall and CPU seconds to orjson-parse every line, the Observations, and the bytes read."""
    observations = 0
    size = 0
    started = time.perf_counter()
    cpu = time.process_time()
    for path in files:
        with path.open("rb") as stream:
            for line in stream:
                size += len(line)
                if orjson.loads(line)["resourceType"] == "Observation":
                    observations += 1
    return time.perf_counter() - started, time.process_time() - cpu, observations, size


def _end_to_end(directory: Path, output: Path) -> tuple[float, float, int, int, str]:
    """Wall and CPU seconds, exit code, peak RSS (KiB) and stderr of one ``fhir-leuko evaluate``."""
    command = [
        sys.executable,
        "-m",
        "fhir_leuko",
        "evaluate",
        str(directory),
        "--as-of",
        AS_OF,
        "--output",
        str(output),
        "--no-progress",
    ]
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert child.stderr is not None
    stderr = child.stderr.read().decode()
    _pid, status, usage = os.wait4(child.pid, 0)
    elapsed = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    return elapsed, usage.ru_utime + usage.ru_stime, child.returncode, usage.ru_maxrss, stderr


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="./dev bench evaluate", description=__doc__)
    parser.add_argument("--observations", type=int, default=1_000_000, help="default 1,000,000")
    parser.add_argument("--data", type=Path, help="use this generated directory instead")
    parser.add_argument("--check", action="store_true", help="exit 1 when the goal is missed")
    args = parser.parse_args(argv)

    directory = _dataset(args.observations, args.data)
    files = _files(directory)
    # Parse only before and after the end-to-end run, and take the mean: on a shared machine the
    # neighbours' load changes over a run, and this way both figures see the same conditions.
    before_s, before_cpu, observations, size = _parse_only(files)
    output = directory.parent / f"{directory.name}.issues.ndjson"
    e2e_s, e2e_cpu, code, maxrss_kib, stderr = _end_to_end(directory, output)
    after_s, after_cpu, _, _ = _parse_only(files)
    parse_s, parse_cpu = (before_s + after_s) / 2, (before_cpu + after_cpu) / 2
    if code not in (0, 1):
        print(stderr, file=sys.stderr)
        print(f"fhir-leuko evaluate failed with exit code {code}", file=sys.stderr)
        return 2
    parse_rate = observations / parse_s
    e2e_rate = observations / e2e_s
    ratio = e2e_rate / parse_rate
    issues = sum(1 for _ in output.open("rb"))
    print(f"data: {directory} ({len(files)} files, {size / 1e6:,.0f} MB, {observations:,} Observations)")
    print(
        f"parse only (orjson, line by line): {parse_s:7.1f} s  {parse_rate:>10,.0f} Observations/s"
        f"  (mean of {before_s:.1f} s before and {after_s:.1f} s after)"
    )
    print(f"fhir-leuko evaluate end to end:    {e2e_s:7.1f} s  {e2e_rate:>10,.0f} Observations/s")
    print(f"ratio end to end / parse only: {ratio:.2f}x (goal >= {GOAL}x: {'met' if ratio >= GOAL else 'MISSED'})")
    # On a shared machine wall time depends on the neighbours; CPU time much less so.
    print(
        f"CPU time: parse only {parse_cpu:.1f} s, end to end {e2e_cpu:.1f} s "
        f"(ratio {parse_cpu / e2e_cpu:.2f}x); load average {os.getloadavg()[0]:.2f}"
    )
    print(f"peak memory of fhir-leuko evaluate (ru_maxrss): {maxrss_kib / 1024:,.0f} MiB")
    print(f"DetectedIssues written: {issues:,}; exit code {code}")
    for line in stderr.splitlines():
        if line.startswith("fhir-leuko:"):
            print(f"  {line}")
    return 1 if args.check and ratio < GOAL else 0
