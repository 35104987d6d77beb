"""``run --bulk``'s evaluation of a full export: in this process against two local workers.

``./dev bench bulk [--observations N] [--data DIR] [--rounds R] [--check]``

What a full ``run --bulk`` pass does between the download and the writes, without a server
(``fhir_leuko.job.bulkshards.export_shards`` over the generated export of ``./dev bench
evaluate``, cached in ``benchmarks/out/``): partition it, evaluate every patient, and take each
patient's verdict as the planner takes it. ``here``: the shards in this process (no ``[scale]``
workers); ``workers2``: ``[scale] workers = 2``. Each reading is a child process; R rounds
interleave one reading of each, and the best of each is compared (the machine is shared: a
reading can only be slowed down). The goal is issue 12 §4's for two workers: >= 1.5x the one
process. The children's verdicts (patient, findings, failure) must be the same; ``--check`` exits
1 when they differ or the goal is missed. Peak memory is the client's ``ru_maxrss`` (with
workers, the workers hold the shards).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import orjson

from .bench_evaluate import _dataset

__all__ = ["main"]

GOAL = 1.5
MODES = ("here", "workers2")


def _child(mode: str, data: Path) -> None:
    """One reading: prints a JSON line (seconds, patients, findings, digest, maxrss_kib)."""
    from fhir_leuko.core.model import PatientRecord
    from fhir_leuko.core.normalise import Dataset
    from fhir_leuko.files.documents import load_knowledge, load_profiles
    from fhir_leuko.files.executors import process_map
    from fhir_leuko.files.reader import input_files
    from fhir_leuko.job.bulkshards import BulkScale, export_shards
    from fhir_leuko.job.verdict import Verdict, judge

    started = time.perf_counter()
    knowledge = load_knowledge()
    profiles = load_profiles(knowledge, [])
    as_of = datetime(2026, 1, 15, 23, 59, 59, tzinfo=UTC)  # generate.AS_OF, end of day
    workers = 2 if mode == "workers2" else 1

    def judge_in(dataset: Dataset) -> object:
        return lambda p: judge(dataset.patients.get(p) or PatientRecord(p), profiles, as_of)

    seen: list[bytes] = []
    patients = findings = 0
    with tempfile.TemporaryDirectory() as export:
        shards = export_shards(
            input_files([data]),
            Path(export),
            knowledge=knowledge,
            scale=BulkScale(workers=workers),
            as_of=as_of,
            existing=[],
            judge_in=judge_in,  # type: ignore[arg-type]
            shard_map=partial(process_map, 2) if workers > 1 else None,
        )
        for shard in shards:
            for patient in shard.patients:
                target = shard.merged.get(patient, patient)
                verdict: Verdict = shard.verdict(target)
                patients += 1
                findings += len(verdict.findings)
                said = [(f.kind.value, f.severity) for f in verdict.findings]
                seen.append(orjson.dumps([patient, target, verdict.failure, said]))
    print(
        orjson.dumps(
            {
                "seconds": time.perf_counter() - started,
                "patients": patients,
                "findings": findings,
                # In patient order: the shards list their patients shard by shard.
                "digest": hashlib.sha256(b"".join(sorted(seen))).hexdigest(),
                "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            }
        ).decode()
    )


def _reading(mode: str, data: Path) -> dict[str, float | int | str]:
    load = os.getloadavg()[0]
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_bulk", "--child", mode, str(data)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"{mode}: the reading failed:\n{done.stderr[-2000:]}")
    out: dict[str, float | int | str] = orjson.loads(done.stdout.strip().splitlines()[-1])
    out["load"] = load
    return out


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:
        _child(argv[1], Path(argv[2]))
        return 0
    parser = argparse.ArgumentParser(prog="./dev bench bulk", description=__doc__)
    parser.add_argument("--observations", type=int, default=1_000_000, help="default 1,000,000")
    parser.add_argument("--data", type=Path, help="use this generated directory instead")
    parser.add_argument("--rounds", type=int, default=3, help="readings of each (default 3)")
    parser.add_argument("--check", action="store_true", help="exit 1 when the goal is missed")
    args = parser.parse_args(argv)
    data = _dataset(args.observations, args.data)
    readings: dict[str, list[dict[str, float | int | str]]] = {m: [] for m in MODES}
    for round_ in range(args.rounds):
        order = MODES if round_ % 2 == 0 else MODES[::-1]
        for mode in order:
            got = _reading(mode, data)
            readings[mode].append(got)
            print(
                f"  round {round_ + 1} {mode:9s} {float(got['seconds']):6.1f} s  "
                f"load {float(got['load']):.2f}",
                flush=True,
            )
    best = {m: min(readings[m], key=lambda r: float(r["seconds"])) for m in MODES}
    same = len({str(r["digest"]) for m in MODES for r in readings[m]}) == 1
    ratio = float(best["here"]["seconds"]) / float(best["workers2"]["seconds"])
    verdict = "met" if ratio >= GOAL else "MISSED"
    print(f"data: {data} ({best['here']['patients']:,} patients, {best['here']['findings']:,} findings)")
    for mode in MODES:
        b = best[mode]
        print(
            f"{mode:9s} best {float(b['seconds']):6.1f} s  client peak {int(b['maxrss_kib']) >> 10} MiB"
            f"  (load {float(b['load']):.2f})"
        )
    print(f"workers2: {ratio:.2f}x the one process (goal >= {GOAL}x: {verdict})")
    print("verdicts: " + ("the same in every reading" if same else "DIFFERENT"))
    print(f"load average now {os.getloadavg()[0]:.2f}")
    return 1 if args.check and (not same or verdict == "MISSED") else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
