"""Sharded evaluation (issue 12 §2): the same output as evaluating everything at once, for any
number of shards, on the test data, a generated export and the cases the join exists for (a
subject-less result, a result corrected to another patient, a Medication shared across shards)."""

from __future__ import annotations

import fcntl
import gzip
import json
import logging
import os
import pty
import shutil
import struct
import subprocess
import sys
import termios
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from fhir_leuko.core.detectedissue import to_ndjson
from fhir_leuko.core.knowledge import Knowledge
from fhir_leuko.core.pipeline import AsOf, Evaluation, evaluate_dataset
from fhir_leuko.core.profiles import ProfileSet
from fhir_leuko.files.bulkread import normalise_files
from fhir_leuko.files.executors import process_map
from fhir_leuko.files.reader import input_files
from fhir_leuko.files.shards import evaluate_sharded, partition, patient_shard, shard_count

from .conftest import AS_OF, DATA, SHARED_FIXTURES, fhir_leuko, utc

LOINC = "http://loinc.org"


def _flatten(source: Path, out: Path) -> Path:
    """Every JSON file of ``source`` as NDJSON (a Bundle's entries one per line) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    for number, path in enumerate(sorted(source.rglob("*.json"))):
        try:
            doc = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
            continue
        if not isinstance(doc, dict):
            continue
        if doc.get("resourceType") == "Bundle":
            entries = doc.get("entry") or []
            found = [e["resource"] for e in entries if isinstance(e, dict) and isinstance(e.get("resource"), dict)]
        else:
            found = [doc]
        if found and not any(r.get("resourceType") == "Bundle" for r in found):
            lines = b"".join(orjson.dumps(r) + b"\n" for r in found)
            (out / f"{number:03d}-{path.stem}.ndjson").write_bytes(lines)
    return out


def _identity_apart(flat: Path, apart: Path) -> Path:
    """Move the flattened files that partition leaves to memory (patient identity across the whole
    input, issue 13 §4: contained subjects, subjects by identifier) to ``apart``."""
    apart.mkdir(parents=True, exist_ok=True)
    for path in sorted(flat.iterdir()):
        if partition(input_files([path]), apart / ".try", 2) is None:
            path.rename(apart / path.name)
    return apart


def _whole(paths: list[Path], knowledge: Knowledge, profiles: ProfileSet, as_of: AsOf) -> Evaluation:
    return evaluate_dataset(normalise_files(input_files(paths), knowledge), profiles, as_of=as_of)


def _sharded(
    paths: list[Path], tmp: Path, count: int, as_of: AsOf, **pieces: Any
) -> Evaluation:
    """Sharded; ``pieces``: ``piece_bytes`` (files cut into pieces of about that size) and
    ``route_map`` (who routes them), as :func:`evaluate_sharded` takes them."""
    got = evaluate_sharded(
        input_files(paths),
        as_of=as_of,
        work_dir=tmp / f"s{count}",
        count=count,
        records=True,
        **pieces,
    )
    assert got is not None
    result, flagged = got
    assert set(flagged.patients) == {f.patient for f in result.findings}
    return result


def _same(whole: Evaluation, sharded: Evaluation, *, copied: bool = False) -> None:
    assert to_ndjson(sharded.issues) == to_ndjson(whole.issues)
    # In the same order too: both list problems in reading order (model.reading_order).
    assert list(map(str, sharded.problems)) == list(map(str, whole.problems))
    assert sharded.patients == whole.patients
    assert sharded.silence == whole.silence and sharded.as_of_by_patient == whole.as_of_by_patient
    if copied:  # a result read into two shards is counted as used in both (docs/population.md)
        assert {k: v for k, v in sharded.counts.items() if not k.startswith("results:")} == {
            k: v for k, v in whole.counts.items() if not k.startswith("results:")
        }
    else:
        assert +sharded.counts == +whole.counts


@pytest.mark.parametrize("as_of", [AS_OF, utc(2026, 1, 15), "latest"])
def test_the_test_data_as_ndjson_gives_the_same_output_in_any_number_of_shards(
    tmp_path: Path, knowledge: Knowledge, profiles: ProfileSet, as_of: AsOf
) -> None:
    flat = _flatten(DATA, tmp_path / "data")
    shutil.copy(DATA / "units.ndjson", flat / "units.ndjson")
    identity = _identity_apart(flat, tmp_path / "identity")
    whole = _whole([flat], knowledge, profiles, as_of)
    assert whole.problems and (whole.issues or as_of != AS_OF)
    # Listed file by file, line by line (line 9 before line 10), whichever step found each.
    places = [(p.source, int(p.position.split()[1])) for p in whole.problems if p.position]
    assert len(places) > 5 and places == sorted(places)
    assert whole.silence is not None or whole.issues
    for count in (1, 3, 7):
        _same(whole, _sharded([flat], tmp_path, count, as_of))
    # Files cut into pieces of a few hundred bytes (most lines are longer: many pieces hold one
    # line or none), each routed on its own: the same output, problems at the same file and line.
    _same(whole, _sharded([flat], tmp_path, 3, as_of, piece_bytes=700, route_map=map))
    cut = partition(input_files([flat]), tmp_path / "cut", 3, piece_bytes=700, route_map=map)
    assert cut is not None and len(cut.pieces) > 2 * len(cut.files)
    # Each file's pieces number its lines on from where the piece before stopped.
    for file, (path, _input) in enumerate(cut.files):
        offsets = [offset for _piece, f, offset in cut.pieces if f == file]
        assert offsets[0] == 0 and offsets == sorted(offsets)
        assert offsets[-1] <= Path(path).read_bytes().count(b"\n")
    # Contained subjects and subjects by identifier are evaluated in memory, as a whole run does.
    assert any(b'"reference":"#' in p.read_bytes() for p in identity.glob("*.ndjson"))


def test_the_shared_fixtures_as_ndjson(
    tmp_path: Path, knowledge: Knowledge, profiles: ProfileSet
) -> None:
    synthea = SHARED_FIXTURES / "synthea-smart-sample-data"
    if not synthea.is_dir():
        pytest.skip("../shared/fixtures is not beside the repository")
    flat = _flatten(synthea, tmp_path / "synthea")
    whole = _whole([flat], knowledge, profiles, AS_OF)
    _same(whole, _sharded([flat], tmp_path, 4, AS_OF))


def test_a_generated_export_with_gzip(
    tmp_path: Path, knowledge: Knowledge, profiles: ProfileSet
) -> None:
    from benchmarks.generate import AS_OF as GENERATED_AS_OF
    from benchmarks.generate import generate

    export = tmp_path / "export"
    generate(export, 4000)
    gz = export / "Observation.000.ndjson"
    (export / "Observation.000.ndjson.gz").write_bytes(gzip.compress(gz.read_bytes()))
    gz.unlink()
    as_of = datetime.fromisoformat(GENERATED_AS_OF + "T23:59:59+00:00")
    whole = _whole([export], knowledge, profiles, as_of)
    assert len(whole.issues) > 3
    _same(whole, _sharded([export], tmp_path, 5, as_of))
    # Routed in pieces of 64 KiB and evaluated on two worker processes (the gzipped file is one
    # piece): no serial pass, the same output.
    with process_map(2) as on_workers:
        _same(
            whole,
            _sharded(
                [export], tmp_path / "workers", 5, as_of,
                piece_bytes=64 << 10, route_map=on_workers, run_map=on_workers,
            ),
        )


# -- the join's cases, as hand-written FHIR JSON --------------------------------------------------


def _anc(oid: str, pid: str | None, value: float, when: str, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "751-8"}]},
        "effectiveDateTime": when,
        "valueQuantity": {"value": value, "unit": "10*3/uL", "system": "http://unitsofmeasure.org", "code": "10*3/uL"},
        **extra,
    }
    if pid:
        out["subject"] = {"reference": f"Patient/{pid}"}
    return out


def _two_shards() -> Iterator[str]:
    """Patient ids in shard 0 and shard 1 of 2 (in that order), then more of each in turn."""
    wanted = 0
    for n in range(1000):
        pid = f"p{n}"
        if patient_shard(f"Patient/{pid}", 2) == wanted:
            yield pid
            wanted = 1 - wanted


def _write(path: Path, *resources: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in resources))
    return path


def _patients_found(result: Evaluation) -> set[str]:
    return {f.patient for f in result.findings}


def test_a_result_without_subject_follows_its_report_into_the_patients_shard(
    tmp_path: Path, knowledge: Knowledge, profiles: ProfileSet
) -> None:
    a, b = next(_two_shards()), list(_two_shards())[1]
    report = {
        "resourceType": "DiagnosticReport",
        "id": "r1",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "57021-8"}]},
        "subject": {"reference": f"Patient/{b}"},
        "effectiveDateTime": "2024-05-01T08:00:00Z",
        "result": [{"reference": "Observation/o1"}],
    }
    # The firing case: the report names the patient of the subject-less ANC (0.4: severe).
    export = tmp_path / "export"
    _write(export / "DiagnosticReport.ndjson", report)
    _write(export / "Observation.ndjson", _anc("o1", None, 0.4, "2024-05-01T08:00:00Z"), _anc("o2", a, 2.5, "2024-05-01T08:00:00Z"))
    whole = _whole([export], knowledge, profiles, AS_OF)
    sharded = _sharded([export], tmp_path, 2, AS_OF)
    _same(whole, sharded)
    assert _patients_found(sharded) == {f"Patient/{b}"}
    # The near miss: no report names a patient for it: no finding, a problem naming the result.
    (export / "DiagnosticReport.ndjson").unlink()
    sharded = _sharded([export], tmp_path / "near", 2, AS_OF)
    _same(_whole([export], knowledge, profiles, AS_OF), sharded)
    assert not sharded.findings and any("o1" in str(p) for p in sharded.problems)


def test_a_result_corrected_to_another_patient_counts_only_for_that_patient(
    tmp_path: Path, knowledge: Knowledge, profiles: ProfileSet
) -> None:
    a, b = next(_two_shards()), list(_two_shards())[1]
    first = _anc("o1", a, 0.3, "2024-05-01T08:00:00Z", meta={"versionId": "1", "lastUpdated": "2024-05-01T09:00:00Z"})
    fixed = _anc("o1", b, 0.3, "2024-05-01T08:00:00Z", meta={"versionId": "2", "lastUpdated": "2024-05-02T09:00:00Z"})
    export = _write(tmp_path / "export" / "Observation.ndjson", first, fixed).parent
    whole = _whole([export], knowledge, profiles, AS_OF)
    sharded = _sharded([export], tmp_path, 2, AS_OF)
    _same(whole, sharded, copied=True)
    assert _patients_found(sharded) == {f"Patient/{b}"}  # not the wrong patient any more
    # Near miss: without the correction, the first patient has the finding.
    _write(tmp_path / "one" / "Observation.ndjson", first)
    assert _patients_found(_sharded([tmp_path / "one"], tmp_path / "n", 2, AS_OF)) == {f"Patient/{a}"}


def test_a_medication_shared_by_patients_in_several_shards_reaches_each(
    tmp_path: Path, knowledge: Knowledge, profiles: ProfileSet
) -> None:
    a, b = next(_two_shards()), list(_two_shards())[1]
    medication = {
        "resourceType": "Medication",
        "id": "vpa",
        "code": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "11118"}], "text": "valproic acid"},
    }

    def order(pid: str) -> dict[str, Any]:
        return {
            "resourceType": "MedicationRequest",
            "id": f"mr-{pid}",
            "status": "active",
            "intent": "order",
            "medicationReference": {"reference": "Medication/vpa"},
            "subject": {"reference": f"Patient/{pid}"},
            "authoredOn": "2024-04-01",
        }

    export = tmp_path / "export"
    _write(export / "Medication.ndjson", medication)
    _write(export / "MedicationRequest.ndjson", order(a), order(b))
    _write(export / "Observation.ndjson", _anc("o1", a, 0.8, "2024-05-01T08:00:00Z"), _anc("o2", b, 0.9, "2024-05-01T08:00:00Z"))
    whole = _whole([export], knowledge, profiles, AS_OF)
    sharded = _sharded([export], tmp_path, 2, AS_OF)
    _same(whole, sharded)
    # Both patients' neutropenia names the drug: the Medication was in both shards.
    text = to_ndjson(sharded.issues).decode().lower()
    assert text.count("valpro") >= 2 and len(_patients_found(sharded)) == 2


def test_records_merged_by_patient_link_meet_in_one_shard(
    tmp_path: Path, knowledge: Knowledge, profiles: ProfileSet
) -> None:
    """Patient.link (issue 13 §4) sharded: the linked Patients of data/patient-identity.json
    (replaced-by, replaces, seealso) with their records, without its contained subjects. The
    retired record's low WBC counts for the surviving one in every number of shards, also where
    the two records' keys hash to different shards."""
    doc = json.loads((DATA / "patient-identity.json").read_text())
    linked = {"pi-old", "pi-new", "pi-old2", "pi-new2", "pi-see", "pi-also"}
    resources = [
        e["resource"]
        for e in doc["entry"]
        if e["resource"]["id"] in linked
        or e["resource"].get("subject", {}).get("reference", "").removeprefix("Patient/") in linked
    ]
    export = tmp_path / "export"
    for rtype in {r["resourceType"] for r in resources}:
        _write(export / f"{rtype}.ndjson", *[r for r in resources if r["resourceType"] == rtype])
    whole = _whole([export], knowledge, profiles, AS_OF)
    assert {"Patient/pi-new", "Patient/pi-new2"} <= _patients_found(whole)
    assert "Patient/pi-old" not in _patients_found(whole)
    split = [
        count
        for count in (2, 3, 5, 7)
        if patient_shard("Patient/pi-old", count) != patient_shard("Patient/pi-new", count)
        or patient_shard("Patient/pi-old2", count) != patient_shard("Patient/pi-new2", count)
    ]
    assert split, "no shard count puts a retired record and its survivor apart"
    for count in (2, 3, 5, 7):
        _same(whole, _sharded([export], tmp_path, count, AS_OF))
    # On worker processes: the pieces and the shard tasks carry the link groups.
    with process_map(2) as on_workers:
        sharded = _sharded(
            [export], tmp_path / "workers", split[0], AS_OF,
            piece_bytes=700, route_map=on_workers, run_map=on_workers,
        )  # fmt: skip
    _same(whole, sharded)
    part = partition(input_files([export]), tmp_path / "p", split[0])
    assert part is not None
    assert part.shard_of("Patient/pi-old") == part.shard_of("Patient/pi-new")
    assert part.shard_of("Patient/pi-old2") == part.shard_of("Patient/pi-new2")


def test_input_that_cannot_be_sharded_exactly_is_left_to_memory(tmp_path: Path) -> None:
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": []}
    _write(tmp_path / "in" / "mixed.ndjson", bundle)
    assert partition(input_files([tmp_path / "in"]), tmp_path / "s", 2) is None
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "b.json").write_text(json.dumps(bundle))
    assert partition(input_files([tmp_path / "json"]), tmp_path / "s", 2) is None


def test_the_cli_with_shards_and_workers_writes_the_same_bytes(tmp_path: Path) -> None:
    flat = _flatten(DATA, tmp_path / "data")
    identity = _identity_apart(flat, tmp_path / "identity")
    # Input left to memory gives the same bytes with --shards too.
    kept = []
    for shards in ("0", "3"):
        out = tmp_path / f"identity-{shards}.ndjson"
        result = fhir_leuko(
            "evaluate", str(identity), "--as-of", "2024-05-02", "--output", str(out),
            "--shards", shards,
        )  # fmt: skip
        kept.append(out.read_bytes())
        # Shards were asked for and cannot be used: said at the default verbosity, with the cost.
        warned = "WARNING: evaluating in memory, not in shards (memory grows" in result.stderr
        assert warned == (shards == "3"), result.stderr
        assert "the input holds a contained subject" in result.stderr or shards == "0"
    assert kept[0] == kept[1] and kept[0]
    outputs = []
    for extra in (["--shards", "0"], ["--shards", "3"], ["--shards", "3", "--workers", "2"]):
        out = tmp_path / f"out-{len(outputs)}.ndjson"
        result = fhir_leuko("evaluate", str(flat), "--as-of", "2024-05-02", "--output", str(out), *extra)
        assert result.returncode == 1, result.stderr  # the test data has input problems on purpose
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1] == outputs[2] and outputs[0]


def test_the_html_report_of_a_sharded_run_is_the_same(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the report extra is not installed")
    (tmp_path / "one").mkdir()
    shutil.copy(DATA / "clozapine.json", tmp_path / "one")  # a few patients: a few plots
    flat = _flatten(tmp_path / "one", tmp_path / "data")
    pages = []
    for shards in ("0", "3"):
        out = tmp_path / f"report-{shards}.html"
        result = fhir_leuko(
            "evaluate", str(flat), "--as-of", "2024-05-02", "--format", "html", "--output",
            str(out), "--shards", shards,
        )
        assert result.returncode == 0, result.stderr
        pages.append(out.read_bytes())
    assert pages[0] == pages[1] and b"data:image/svg+xml" in pages[0]


def test_shard_count_keeps_every_worker_busy_to_the_end() -> None:
    """Shards take about the same time: a count that is no multiple of the workers leaves one
    idle for the whole last shard (9 shards of a million Observations on 2 workers: 5 then 4)."""
    mb = 1 << 20
    assert shard_count(1503 * mb) == 10  # 160 MB each at most, one process
    assert shard_count(1503 * mb, workers=2) == 10
    assert shard_count(1400 * mb) == 9
    assert shard_count(1400 * mb, workers=2) == 10
    assert shard_count(1400 * mb, workers=4) == 12
    assert shard_count(10 * mb, workers=3) == 6  # at least two each
    assert shard_count(10 * mb) == 1


def test_the_shards_phase_is_counted_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The evaluation of the shards (the longer phase) moves the progress display and logs each
    shard at -v: a bar that stopped at the end of the input would look like a hang."""
    flat = _flatten(DATA, tmp_path / "data")
    _identity_apart(flat, tmp_path / "identity")  # (what needs every Patient at once)
    ticks: list[int] = []
    counts: list[int] = []

    def shards_progress(count: int) -> Callable[[int], object]:
        counts.append(count)
        return ticks.append

    with caplog.at_level(logging.INFO, logger="fhir_leuko.files.shards"):
        got = evaluate_sharded(
            input_files([flat]), as_of=AS_OF, work_dir=tmp_path / "s", count=3,
            shards_progress=shards_progress,
        )  # fmt: skip
    assert got is not None
    assert counts == [3] and ticks == [1, 1, 1]
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("shard ")]
    assert [m.split(" (")[0] for m in logged] == [f"shard {k} of 3 evaluated" for k in (1, 2, 3)]
    assert sum(int(m.split("(")[1].split(" ")[0]) for m in logged) == got[0].patients


def test_the_cli_shows_the_shards_on_a_terminal(tmp_path: Path) -> None:
    """On a terminal (stderr a pty) the bar reads the input, then counts the shards."""
    flat = _flatten(DATA, tmp_path / "data")
    _identity_apart(flat, tmp_path / "identity")
    main, child = pty.openpty()
    # A terminal of 100 columns (a new pty has none, and tqdm then draws nothing).
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    with subprocess.Popen(
        [sys.executable, "-m", "fhir_leuko", "evaluate", str(flat), "--as-of", "2024-05-02",
         "--shards", "3", "--output", str(tmp_path / "out.ndjson")],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=child,
    ) as process:  # fmt: skip
        os.close(child)
        shown = b""
        while True:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            shown += chunk
        assert process.wait(timeout=120) == 1  # the test data has input problems on purpose
    os.close(main)
    text = shown.decode(errors="replace")
    assert "reading" in text and "evaluating" in text and "/3 " in text and "shard/s" in text


def test_progress_counts_every_byte_read_in_few_updates(
    tmp_path: Path, knowledge: Knowledge
) -> None:
    """The bar of the bytes read reaches the input's size, in memory and when routing shards,
    told about once a MiB (an update a line cost about 0.2 s a million lines on a terminal)."""
    from benchmarks.generate import generate

    export = tmp_path / "export"
    generate(export, 4000)
    files = input_files([export])
    size = sum(path.stat().st_size for path, _input in files)
    assert size > 3 << 20  # several MiB: the updates must be fewer than the lines
    most = size // (1 << 20) + len(files)
    in_memory: list[int] = []
    normalise_files(files, knowledge, progress=in_memory.append)
    routed: list[int] = []
    assert partition(files, tmp_path / "s", 3, progress=routed.append) is not None
    for told in (in_memory, routed):
        assert sum(told) == size
        assert len(told) <= most


def test_a_worker_process_that_dies_is_named_not_called_a_bug() -> None:
    """A local worker killed (the kernel's out-of-memory killer, kill -9) breaks the pool: the run
    ends with WorkerLostError (exit 3, nothing written), not "unexpected error: a bug"."""
    from fhir_leuko.errors import ExitCode, WorkerLostError

    with process_map(2) as run, pytest.raises(WorkerLostError) as lost:
        list(run(os._exit, [9, 9]))
    assert "a worker process was lost" in str(lost.value)
    assert lost.value.exit_code == ExitCode.INCOMPLETE
    with process_map(2) as run:  # the near miss: tasks that end normally
        assert list(run(abs, [-3, 4])) == [3, 4]


def test_local_workers_run_only_a_few_tasks_ahead_of_the_consumer(tmp_path: Path) -> None:
    """Four tasks per worker at most are submitted ahead of what was taken: results a slow
    consumer (a run --bulk pass writing to its server) has not taken do not pile up. Each task
    leaves a mark; once the first result is taken, 5 of the 12 run (4 ahead, and the one submitted
    when the first was taken), not all 12."""
    import time

    marks = [str(tmp_path / f"task-{k}") for k in range(12)]
    with process_map(1) as run:
        results = iter(run(Path.touch, [Path(m) for m in marks]))
        next(results)
        deadline = time.monotonic() + 10  # (a loaded machine: wait for the fifth, then a second)
        while sum(Path(m).exists() for m in marks) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1)
        assert sum(Path(m).exists() for m in marks) == 5
        assert len(list(results)) == 11  # the near miss: every task runs once taken
    assert all(Path(m).exists() for m in marks)


def test_an_input_changed_after_routing_stops_the_run(
    tmp_path: Path, knowledge: Knowledge
) -> None:
    """Shards read their lines back from the input by byte range: a file appended to or replaced
    after routing (an export still being written) would give other lines. The shard refuses,
    naming the file, instead of evaluating what it happens to read."""
    from fhir_leuko.errors import InputError
    from fhir_leuko.files.shards import load_shard

    flat = _flatten(DATA, tmp_path / "data")
    _identity_apart(flat, tmp_path / "identity")
    part = partition(input_files([flat]), tmp_path / "s", 2)
    assert part is not None
    assert load_shard(part, 0, knowledge).patients  # the near miss: unchanged, it loads
    changed = sorted(flat.iterdir())[0]
    with changed.open("ab") as out:
        out.write(b"\n")
    with pytest.raises(InputError) as refused:
        load_shard(part, 0, knowledge)
    assert str(changed) in str(refused.value) and "changed while" in str(refused.value)


def _file_size_limit(limit: int) -> Callable[[], None]:
    """A child's limit on the size of any file it writes (RLIMIT_FSIZE): writes past it fail with
    EFBIG, as on a full disk (SIGXFSZ ignored, so the write fails instead of killing)."""
    import resource
    import signal

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_work_directory_that_cannot_be_written_is_named_not_an_input_problem(
    tmp_path: Path,
) -> None:
    """Gzipped input is copied into the shards: a write that fails there (a full disk, here a
    file-size limit of 1 MB) ends the run with exit 2 naming the work directory. It is not a
    problem of the input file (whose lines would be lost while the run looked complete), nor a
    bug."""
    from benchmarks.generate import generate

    export = tmp_path / "export"
    generate(export, 4000)
    for path in export.glob("Observation*.ndjson"):
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(path.read_bytes()))
        path.unlink()
    out = tmp_path / "issues.ndjson"
    command = [
        sys.executable, "-m", "fhir_leuko", "evaluate", str(export), "--as-of", "2026-01-15",
        "--shards", "2", "--work-dir", str(tmp_path / "work"), "--output", str(out),
    ]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=120, preexec_fn=_file_size_limit(1 << 20)
    )
    assert done.returncode == 2, done.stderr
    assert f"cannot write the shards in {tmp_path / 'work'}" in done.stderr
    assert "problem:" not in done.stderr and "unexpected error" not in done.stderr
    assert not out.exists()
    # The near miss: without the limit the same run evaluates everything.
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode in (0, 1), done.stderr
    assert out.read_bytes()


def test_a_work_directory_the_workers_do_not_share_is_never_an_empty_result(
    tmp_path: Path, knowledge: Knowledge
) -> None:
    """A Dask worker on another machine that does not see --work-dir finds no shard index and no
    join records. Reading nothing would look like a shard without findings: it stops the run
    naming the work directory instead."""
    from dataclasses import replace

    from fhir_leuko.errors import WorkDirError
    from fhir_leuko.files.join import JoinTask, join_buckets
    from fhir_leuko.files.shards import load_shard

    flat = _flatten(DATA, tmp_path / "data")
    _identity_apart(flat, tmp_path / "identity")
    part = partition(input_files([flat]), tmp_path / "s", 2)
    assert part is not None and all(part.placed)
    assert load_shard(part, 1, knowledge).patients  # the near miss: the directory written
    elsewhere = tmp_path / "other-machine"
    for k in range(2):
        (elsewhere / f"{k:03d}").mkdir(parents=True)
    with pytest.raises(WorkDirError) as unshared:
        load_shard(replace(part, directory=elsewhere), 1, knowledge)
    assert f"shard 1 finds 0 lines in {elsewhere}" in str(unshared.value)
    with pytest.raises(WorkDirError):
        join_buckets(JoinTask((str(elsewhere / "join" / "00000"),), (0,)))


def test_shards_evaluated_with_other_rules_than_this_process_stop_the_run(
    tmp_path: Path, knowledge: Knowledge, profiles: ProfileSet
) -> None:
    """Workers load the profiles themselves, from their own install and the site directories at
    the same paths. A worker whose copy differs (another fhir-leuko version, a site profile edited
    on one machine, a stale copy in a long-lived Dask worker) would give other alerts than this
    process would: the run stops (exit 2) instead of merging them."""
    from fhir_leuko.errors import UsageError

    flat = _flatten(DATA, tmp_path / "data")
    _identity_apart(flat, tmp_path / "identity")
    site = tmp_path / "site"
    shutil.copytree(DATA / "site-profiles", site)
    profile = site / "adult-local.toml"

    def workers_with_another_copy(fn: Callable[[Any], Any], specs: Any) -> Any:
        # The workers read the site profile after it changed under the same path.
        profile.write_text(profile.read_text() + "\n# edited on one machine only\n")
        return map(fn, specs)

    files = input_files([flat])
    with pytest.raises(UsageError) as refused:
        evaluate_sharded(
            files, as_of=AS_OF, work_dir=tmp_path / "s1", count=2, profile_dirs=[site],
            run_map=workers_with_another_copy,
        )  # fmt: skip
    assert "was evaluated with other rules than this process's" in str(refused.value)
    # The near miss: the same files for both, the same run evaluates.
    got = evaluate_sharded(
        files, as_of=AS_OF, work_dir=tmp_path / "s2", count=2, profile_dirs=[site]
    )
    assert got is not None and got[0].issues


def test_workers_asked_for_on_small_input_are_said_to_be_unused(tmp_path: Path) -> None:
    flat = _flatten(DATA, tmp_path / "data")
    base = ["evaluate", str(flat), "--as-of", "2024-05-02", "--output", str(tmp_path / "o.ndjson")]
    small = fhir_leuko(*base, "--workers", "2")
    assert small.returncode == 1, small.stderr  # the test data has input problems on purpose
    assert "evaluated in memory in this process, without the workers" in small.stderr
    # The near miss: shards asked for as well, the workers are used and nothing is said.
    sharded = fhir_leuko(*base, "--workers", "2", "--shards", "2")
    assert "without the workers" not in sharded.stderr


@pytest.mark.parametrize("shards", ["-1", "65535"])
def test_a_shard_count_out_of_range_is_a_usage_error(tmp_path: Path, shards: str) -> None:
    """A shard number is 16 bits (one value means "none yet"): more is a usage error at once,
    never "unexpected error" after the input was read."""
    out = tmp_path / "o.ndjson"
    base = ["evaluate", str(DATA / "clozapine.json"), "--as-of", "2024-05-02", "--output", str(out)]
    done = fhir_leuko(*base, "--shards", shards)
    assert done.returncode == 2 and f"--shards {shards}: must be 0 (in memory) to 65534" in done.stderr
    assert fhir_leuko(*base, "--shards", "65534").returncode == 0  # the near miss: the largest


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rfind(")") + 2 :].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


@pytest.mark.parametrize(
    ("how", "code", "said"),
    [
        ("SIGTERM", 143, "fhir-leuko: stopped"),  # timeout, a Kubernetes Job's deadline
        ("SIGTERM to the group", 143, "fhir-leuko: stopped"),  # systemd's stop (control-group)
        ("SIGINT to the group", 130, "fhir-leuko: interrupted"),  # Ctrl-C on a terminal
        ("SIGKILL", -9, ""),  # kill -9, the OOM killer: nothing can unwind
    ],
)
def test_a_stopped_run_leaves_no_worker_behind(
    tmp_path: Path, how: str, code: int, said: str
) -> None:
    """However a sharded run with workers is stopped, its worker processes end with it (SIGTERM
    used to leave them computing, orphaned; after kill -9 of the client they waited for a task for
    good). Stopped by a signal it can handle, also one that reaches the workers, the run unwinds
    as Ctrl-C does: never a lost worker, the work directory emptied, nothing written."""
    import signal
    import time

    from benchmarks.generate import generate

    export = tmp_path / "export"
    generate(export, 20000)
    work, out = tmp_path / "work", tmp_path / "issues.ndjson"
    command = [
        sys.executable, "-m", "fhir_leuko", "evaluate", str(export), "--as-of", "2026-01-15",
        "--workers", "2", "--shards", "400", "--work-dir", str(work), "--output", str(out),
    ]  # fmt: skip
    signum = getattr(signal, how.split()[0])
    with subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: the group's signal reaches nothing else
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # (not inherited ignored)
    ) as process:
        deadline = time.monotonic() + 60
        workers: list[int] = []
        while len(workers) < 2 and time.monotonic() < deadline:  # the pool is up
            time.sleep(0.05)
            workers = [pid for pid in _children(process.pid) if "spawn_main" in (
                Path("/proc") / str(pid) / "cmdline").read_bytes().decode(errors="replace")]
        assert len(workers) == 2 and process.poll() is None
        time.sleep(0.5)
        if how.endswith("to the group"):
            os.killpg(process.pid, signum)
        else:
            process.send_signal(signum)
        _out, stderr = process.communicate(timeout=60)
    assert process.returncode == code, stderr
    assert said in stderr and "lost" not in stderr
    deadline = time.monotonic() + 10  # after kill -9 a worker sees its client gone within 1 s
    while [pid for pid in workers if _alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in workers if _alive(pid)]
    assert not out.exists()
    if signum != signal.SIGKILL:
        assert not any(work.iterdir())


def test_standard_input_asked_for_shards_says_why_it_is_read_in_memory(tmp_path: Path) -> None:
    """A pipe is read once, and shards read their lines back by byte range: the warning says so
    (it said "- is not NDJSON" of NDJSON on standard input); the near miss, the same lines in a
    file, is sharded without a warning."""
    flat = _flatten(DATA, tmp_path / "data")
    _identity_apart(flat, tmp_path / "in-memory")  # the rest can be sharded
    one = tmp_path / "all.ndjson"
    one.write_bytes(b"".join(path.read_bytes() for path in sorted(flat.iterdir())))
    base = ["--as-of", "2024-05-02", "--format", "ndjson", "--shards", "2", "--no-progress"]
    piped = subprocess.run(
        [sys.executable, "-m", "fhir_leuko", "evaluate", "-", *base],
        input=one.read_bytes(), capture_output=True, timeout=120, check=False,
    )
    stderr = piped.stderr.decode()
    assert "standard input is read once (save it to a file to shard it)" in stderr
    assert "is not NDJSON" not in stderr
    from_file = fhir_leuko("evaluate", str(one), *base)
    assert "evaluating in memory" not in from_file.stderr, from_file.stderr
    # The same DetectedIssues (their texts name the input: <stdin> or the file).
    assert len(piped.stdout.splitlines()) == len(from_file.stdout.splitlines()) > 0
