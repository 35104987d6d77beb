"""Input that used to escape as a Python traceback (issue 9 §1): each case is an input problem that
names the file, the line or entry and the resource, and everything valid beside it is still read.

- JSON nested ~1,000 levels deep anywhere (msgspec raises RecursionError; orjson stops at 1,024);
- dates at the edges of the calendar (``0001-01-01T00:00:00+01:00`` is not a UTC instant), a
  birthDate in 9999;
- a .gz whose compressed body is corrupt (``zlib.error``, which is not an ``OSError``);
- a huge medication text, which the DetectedIssue quotes only in part.
"""

from __future__ import annotations

import gzip
import json
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest

from fhir_leuko.core.fhirjson import TOO_DEEP, decode_json, decode_resource
from fhir_leuko.core.fhirtime import (
    EARLIEST,
    LATEST,
    age_reached,
    parse_as_of,
    parse_fhir_datetime,
    shift,
    to_utc,
)
from fhir_leuko.core.knowledge import Knowledge
from fhir_leuko.core.model import QUOTE_LIMIT, Problem, quoted
from fhir_leuko.core.profiles import ProfileSet
from fhir_leuko.files.bulkread import normalise_paths

from .conftest import by_patient, fhir_leuko, run_paths

DEPTH = 1_000  # the issue's example: about 1,000 levels of '[' inside an extension


def _wbc(pid: str, value: float = 2.5, when: str = "2024-05-01T08:00:00Z") -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": f"{pid}-wbc",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "6690-2"}]},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": when,
        "valueQuantity": {
            "value": value,
            "unit": "10*3/uL",
            "system": "http://unitsofmeasure.org",
            "code": "10*3/uL",
        },
    }


def _deep(resource: dict[str, Any], depth: int = DEPTH) -> bytes:
    """The resource as JSON with an extension nested ``depth`` arrays deep, before its id."""
    rest = json.dumps({k: v for k, v in resource.items() if k not in ("resourceType", "id")})
    head = f'{{"resourceType": "{resource["resourceType"]}", "extension": '
    nested = "[" * depth + "]" * depth
    return f'{head}{nested}, "id": "{resource["id"]}", {rest[1:]}'.encode()


def _ndjson(*lines: bytes) -> bytes:
    return b"\n".join(lines) + b"\n"


def _bundle(*entries: bytes) -> bytes:
    head = b'{"resourceType": "Bundle", "id": "b", "type": "collection", "entry": ['
    return head + b", ".join(entries) + b'], "link": [{"relation": "self", "url": "x"}]}'


def _entry(n: int, resource: bytes) -> bytes:
    return b'{"fullUrl": "urn:uuid:%d", "resource": %s}' % (n, resource)


# -- deeply nested JSON ------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [DEPTH, 5_000, 100_000])
def test_deep_json_is_a_malformed_resource_named_by_its_id(depth: int) -> None:
    from fhir_leuko.core.fhirjson import MalformedResourceError

    with pytest.raises(MalformedResourceError) as caught:
        decode_resource(_deep(_wbc("deep"), depth))
    assert TOO_DEEP in caught.value.reason
    # The id comes after the deep part: found by scanning while it is near the start.
    assert caught.value.label == ("Observation/deep-wbc" if depth < 10_000 else "Observation")


def test_every_typed_decoder_reports_deep_json_as_invalid_json() -> None:
    """The one decode boundary (fhirjson.decode_json) serves the FHIR client's pages and the CDS
    service's requests too: msgspec.DecodeError, which those callers handle, not RecursionError."""

    class Page(msgspec.Struct):
        resourceType: str | None = None

    with pytest.raises(msgspec.DecodeError, match=TOO_DEEP):
        decode_json(msgspec.json.Decoder(Page), b'{"entry": ' + b"[" * DEPTH + b"]" * DEPTH + b"}")


def test_deep_line_in_ndjson_loses_only_itself(
    tmp_path: Path, knowledge: Knowledge, profiles: ProfileSet
) -> None:
    path = tmp_path / "Observation.ndjson"
    bundle = _bundle(_entry(1, _deep(_wbc("in-bundle"))), _entry(2, json.dumps(_wbc("bundled")).encode()))
    path.write_bytes(
        _ndjson(
            json.dumps(_wbc("before")).encode(),
            _deep(_wbc("deep")),
            json.dumps(_wbc("after")).encode(),
            bundle,
        )
    )
    problems, found = _read_both(path, knowledge, profiles)
    reason = f"{TOO_DEEP} to read (about 1,000 levels or more)"
    assert [str(p) for p in problems] == [
        f"{path}:line 2: Observation/deep-wbc: {reason}",
        f"{path}:line 4 entry[0]: Observation/in-bundle-wbc: {reason}",
    ]
    assert found == {"before", "after", "bundled"}


def _read_both(
    path: Path, knowledge: Knowledge, profiles: ProfileSet
) -> tuple[list[Problem], set[str]]:
    """Problems and patients with a finding, read by ``read_paths`` and by the fast reader
    (``normalise_paths``) alike: both must agree."""
    slow = run_paths([path], knowledge, profiles)
    fast = normalise_paths([path], knowledge)
    slow_found = {p for p, _ in by_patient(slow)}
    assert sorted(map(str, slow.problems)) == sorted(map(str, fast.problems))
    assert {k.removeprefix("Patient/") for k, r in fast.patients.items() if r.results} == slow_found
    return slow.problems, slow_found


@pytest.mark.parametrize("depth", [DEPTH, 50_000])
def test_deep_entry_in_a_bundle_loses_only_itself(
    tmp_path: Path, depth: int, knowledge: Knowledge, profiles: ProfileSet
) -> None:
    """A Bundle is as deep as its deepest entry: msgspec fails on the whole document, and the
    entries are then split without recursion so that only the deep one is lost."""
    nested = _bundle(_entry(9, json.dumps(_wbc("inner-ok")).encode()), _entry(8, _deep(_wbc("inner-deep"))))
    path = tmp_path / "bundle.json"
    path.write_bytes(
        _bundle(
            _entry(1, json.dumps(_wbc("b-ok")).encode()),
            _entry(2, _deep(_wbc("b-deep"), depth)),
            _entry(3, nested),
            _entry(4, json.dumps(_wbc("b-last")).encode()),
        )
    )
    result = run_paths([path], knowledge, profiles)
    # (the id follows the deep extension: beyond the first 64 KiB it is not looked for)
    label = "Observation/b-deep-wbc" if depth < 10_000 else "Observation"
    assert [(p.position, p.resource) for p in result.problems] == [
        ("entry[1]", label),
        ("entry[2] entry[1]", "Observation/inner-deep-wbc"),
    ]
    assert {p for p, _ in by_patient(result)} == {"b-ok", "inner-ok", "b-last"}


def test_json_file_holding_ndjson_with_a_deep_first_line(
    tmp_path: Path, knowledge: Knowledge, profiles: ProfileSet
) -> None:
    path = tmp_path / "export.json"
    path.write_bytes(_ndjson(_deep(_wbc("first")), json.dumps(_wbc("second")).encode()))
    result = run_paths([path], knowledge, profiles)
    assert [(p.position, p.resource) for p in result.problems] == [("line 1", "Observation/first-wbc")]
    assert {p for p, _ in by_patient(result)} == {"second"}


@pytest.mark.parametrize("shards", [[], ["--shards", "2"]], ids=["whole", "sharded"])
def test_evaluate_cli_deep_line_is_exit_1_and_the_rest_written(
    tmp_path: Path, shards: list[str]
) -> None:
    path = tmp_path / "Observation.ndjson"
    path.write_bytes(_ndjson(_deep(_wbc("deep")), json.dumps(_wbc("fine")).encode()))
    done = fhir_leuko("evaluate", str(path), "--as-of", "2024-05-02", "--format", "ndjson", *shards)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert f"problem: {path}:line 1: Observation/deep-wbc: {TOO_DEEP}" in done.stderr
    issues = [json.loads(line) for line in done.stdout.splitlines()]
    assert [i["patient"]["reference"] for i in issues] == ["Patient/fine"]


# -- calendar edges --------------------------------------------------------------------------

EDGES = ("0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00")


def test_instants_outside_the_calendar_in_utc_are_invalid_not_overflow() -> None:
    for text in EDGES:
        assert parse_fhir_datetime(text) is None
    assert to_utc(datetime(1, 1, 1, tzinfo=UTC)) == EARLIEST
    assert parse_fhir_datetime("9999-12-31T23:59:59+00:00") == LATEST.replace(microsecond=0)
    assert parse_fhir_datetime("0001-01-01T00:00:00-01:00") == EARLIEST + timedelta(hours=1)


def test_windows_stop_at_the_edges_of_the_calendar() -> None:
    assert shift(EARLIEST + timedelta(days=1), -timedelta(days=30)) == EARLIEST
    assert shift(LATEST - timedelta(days=1), timedelta(days=30)) == LATEST
    assert shift(datetime(2024, 5, 1, tzinfo=UTC), -timedelta(days=1)) == datetime(
        2024, 4, 30, tzinfo=UTC
    )


def test_age_of_a_far_future_birth_date_is_never_reached() -> None:
    born = date(9999, 12, 31)
    for duration in ((18, "y"), (6, "mo"), (7, "d"), (2, "w")):
        assert age_reached(born, date(2024, 5, 1), duration) is False
    # near miss: an age reached exactly on the calendar's last day still counts
    assert age_reached(date(9981, 12, 31), date(9999, 12, 31), (18, "y")) is True


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("0001-01-01", "outside the supported range 1900-01-01 to 8999-12-31"),
        ("9999-12-31T23:59:59-01:00", "outside the supported range"),
        ("1899-12-31T23:59:59Z", "outside the supported range"),
        ("2024-13-01", "not an ISO 8601 date"),
    ],
)
def test_as_of_outside_the_supported_range_is_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_as_of(text)
    assert parse_as_of("1900-01-01T00:00:00Z") == datetime(1900, 1, 1, tzinfo=UTC)  # near miss


def _edge_bundle(edge: str) -> dict[str, Any]:
    """One patient per date element holding ``edge``, each with a low count that would fire, and
    one clean patient."""
    pid = "edge"

    def entry(resource: dict[str, Any]) -> dict[str, Any]:
        return {"resource": resource}

    meds = [
        {
            "resourceType": "MedicationStatement",
            "id": f"ms-{n}",
            "status": "active",
            "medicationCodeableConcept": {"text": "Methotrexate 2.5 MG Oral Tablet"},
            "subject": {"reference": f"Patient/{pid}-med-{n}"},
            **period,
        }
        for n, period in enumerate(
            [
                {"effectiveDateTime": edge},
                {"effectivePeriod": {"start": edge}},
                {"effectivePeriod": {"start": "2024-01-01", "end": edge}},
            ]
        )
    ]
    report = {
        "resourceType": "DiagnosticReport",
        "id": "dr-edge",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "58410-2"}]},
        "subject": {"reference": f"Patient/{pid}-report"},
        "effectiveDateTime": edge,
        "result": [{"reference": "Observation/edge-report-wbc"}],
    }
    report_obs = {k: v for k, v in _wbc(f"{pid}-report").items() if k != "effectiveDateTime"}
    condition = {
        "resourceType": "Condition",
        "id": "cond-edge",
        "clinicalStatus": {"coding": [{"code": "active"}]},
        "code": {"text": "Aplastic anemia"},
        "subject": {"reference": f"Patient/{pid}-cond"},
        "onsetDateTime": edge,
        "abatementDateTime": edge,
    }
    patient = {"resourceType": "Patient", "id": f"{pid}-born", "birthDate": "9999-12-31"}
    resources = [
        _wbc(f"{pid}-obs", when=edge),
        *meds,
        *[_wbc(f"{pid}-med-{n}") for n in range(len(meds))],
        report,
        report_obs,
        condition,
        _wbc(f"{pid}-cond"),
        patient,
        _wbc(f"{pid}-born"),
        _wbc("clean"),
    ]
    return {"resourceType": "Bundle", "type": "collection", "entry": [entry(r) for r in resources]}


BORN_AFTER = "birthDate is after one of the patient's lab results: age treated as unknown"


@pytest.mark.parametrize("edge", EDGES)
def test_calendar_edge_dates_in_every_date_element(
    tmp_path: Path, edge: str, knowledge: Knowledge, profiles: ProfileSet
) -> None:
    path = tmp_path / "edges.json"
    path.write_text(json.dumps(_edge_bundle(edge)), encoding="utf-8")
    result = run_paths([path], knowledge, profiles)
    found = {p for p, _ in by_patient(result)}
    # An Observation whose time is out of the calendar (its own, or its report's) is a named
    # problem; every other patient is evaluated. Medication and condition dates out of the
    # calendar count as absent (an open end, an unknown start or onset).
    reason = f"invalid effective time {edge!r}"
    assert sorted((p.resource, p.reason) for p in result.problems) == [
        ("Observation/edge-obs-wbc", reason),
        ("Observation/edge-report-wbc", reason),
        ("Patient/edge-born", BORN_AFTER),
    ]
    assert found == {"clean", "edge-med-0", "edge-med-1", "edge-med-2", "edge-cond", "edge-born"}
    implicated = {
        f.patient: [d.exposure.key for d in f.implicated] for f in result.findings
    }
    assert implicated["Patient/edge-med-2"] == ["MedicationStatement/ms-2"]  # open end: active


def test_evaluate_cli_calendar_edges_are_problems_not_tracebacks(tmp_path: Path) -> None:
    path = tmp_path / "edges.json"
    path.write_text(json.dumps(_edge_bundle(EDGES[1])), encoding="utf-8")
    done = fhir_leuko("evaluate", str(path), "--as-of", "2024-05-02")
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert "Observation/edge-obs-wbc: invalid effective time" in done.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["evaluate", str(Path(__file__).parent / "data" / "lookback.json"), "--as-of", "0001-01-01"],
        ["evaluate", str(Path(__file__).parent / "data" / "lookback.json"), "--as-of", ""],
        ["run", "--server", "http://127.0.0.1:9/fhir", "--since", "9999-12-31T23:59:59-01:00"],
        ["run", "--server", "http://127.0.0.1:9/fhir", "--as-of", ""],
    ],
    ids=["as-of-year-1", "as-of-empty", "since-past-9999", "run-as-of-empty"],
)
def test_as_of_and_since_out_of_range_are_usage_errors(tmp_path: Path, args: list[str]) -> None:
    done = fhir_leuko(*args, "--state", str(tmp_path / "s.db")) if args[0] == "run" else fhir_leuko(*args)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    flag = args[-2]
    assert done.stderr.startswith(f"fhir-leuko: error: {flag} {args[-1]!r}: "), done.stderr
    assert len(done.stderr.splitlines()) == 1


# -- corrupt .gz ----------------------------------------------------------------------------


def _corrupt_gzip(data: bytes) -> bytes:
    """A gzip stream with a valid header whose deflate body is garbage (zlib.error when read)."""
    packed = bytearray(gzip.compress(data))
    for i in range(12, min(len(packed) - 8, 60)):
        packed[i] ^= 0x5A
    return bytes(packed)


@pytest.mark.parametrize("name", ["Observation.ndjson.gz", "bundle.json.gz"])
def test_corrupt_gz_is_a_problem_naming_the_file(
    tmp_path: Path, name: str, knowledge: Knowledge, profiles: ProfileSet
) -> None:
    bad = tmp_path / name
    bad.write_bytes(_corrupt_gzip(json.dumps(_wbc("lost")).encode() * 20))
    good = tmp_path / "good.ndjson"
    good.write_text(json.dumps(_wbc("kept")) + "\n", encoding="utf-8")
    problems, found = _read_both(tmp_path, knowledge, profiles)
    assert [(p.source, p.reason.split(" (")[0]) for p in problems] == [
        (str(bad), "cannot read file: corrupt or truncated gzip data")
    ]
    assert found == {"kept"}
    done = fhir_leuko("evaluate", str(tmp_path), "--as-of", "2024-05-02")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"problem: {bad}: cannot read file: corrupt or truncated gzip data" in done.stderr


@pytest.mark.parametrize("shards", ["0", "2"])
def test_data_compressed_as_fhir_leuko_cannot_read_is_named_not_skipped(
    tmp_path: Path, shards: str, knowledge: Knowledge, profiles: ProfileSet
) -> None:
    """An export compressed with zstd or bzip2 (not gzip, as Bulk Data servers write it): a
    directory walk skipped such files as it skips a README, and the run said "no Observation in
    the input", exit 0. Now each is a problem naming the file and the compression, once, in memory
    and sharded alike; the near misses, files that are no FHIR data by their name, stay skipped."""
    import bz2

    lost = (json.dumps(_wbc("lost")) + "\n").encode()
    (tmp_path / "Observation.001.ndjson.zst").write_bytes(b"\x28\xb5\x2f\xfd" + lost)
    (tmp_path / "Observation.002.ndjson.bz2").write_bytes(bz2.compress(lost))
    (tmp_path / "good.ndjson").write_text(json.dumps(_wbc("kept")) + "\n", encoding="utf-8")
    (tmp_path / "README.md").write_text("# an export\n", encoding="utf-8")
    (tmp_path / "logs.tar.bz2").write_bytes(bz2.compress(b"not data"))
    problems, found = _read_both(tmp_path, knowledge, profiles)
    assert found == {"kept"}
    assert [(Path(p.source).name, p.reason.split(",")[0]) for p in problems] == [
        ("Observation.001.ndjson.zst", "cannot read file: compressed with zstd"),
        ("Observation.002.ndjson.bz2", "cannot read file: compressed with bzip2"),
    ]
    done = fhir_leuko("evaluate", str(tmp_path), "--as-of", "2024-05-02", "--shards", shards)
    assert done.returncode == 1, done.stderr
    named = [line for line in done.stderr.splitlines() if line.startswith("problem:")]
    assert named == [f"problem: {p}" for p in problems]
    assert "README" not in done.stderr and "logs.tar" not in done.stderr
    assert "evaluating in memory" not in done.stderr


def test_a_run_that_found_nothing_never_says_so_of_files_it_could_not_read(tmp_path: Path) -> None:
    """"why: no Observation in the input" was said of an export whose Observations could not be
    read; "none was below its lower limit" of input one file of which could not be. Each why now
    says that files could not be read; the near misses, the same input without them, do not."""
    import bz2

    def why(*names: str) -> str:
        done = fhir_leuko("evaluate", *(str(tmp_path / n) for n in names), "--as-of", "2024-05-02")
        assert done.returncode in (0, 1), done.stderr
        (line,) = [x for x in done.stderr.splitlines() if x.startswith("fhir-leuko: why: ")]
        return line.removeprefix("fhir-leuko: why: ")

    normal = (json.dumps(_wbc("fine", value=6.5)) + "\n").encode()
    (tmp_path / "Observation.001.ndjson.bz2").write_bytes(bz2.compress(normal))
    (tmp_path / "Observation.002.ndjson").write_bytes(normal)
    (tmp_path / "Patient.ndjson").write_text(
        json.dumps({"resourceType": "Patient", "id": "fine", "birthDate": "1970-01-01"}) + "\n",
        encoding="utf-8",
    )
    assert why("Patient.ndjson", "Observation.001.ndjson.bz2") == (
        "no Observation was read, and 1 input file could not be read: see the input problems"
    )
    assert why("Patient.ndjson").startswith("no Observation in the input")
    alone = why("Patient.ndjson", "Observation.002.ndjson")
    assert alone.startswith("1 patient had a result that counted, and none was below")
    assert why("Patient.ndjson", "Observation.002.ndjson", "Observation.001.ndjson.bz2") == (
        f"{alone}; and 1 input file could not be read: what it holds was not evaluated"
    )


# -- quoting input in output text --------------------------------------------------------------


def test_quoted_caps_and_says_so() -> None:
    assert quoted("short") == "short"
    text = "x" * (QUOTE_LIMIT + 1)
    assert quoted(text) == "x" * QUOTE_LIMIT + f"… [cut: {QUOTE_LIMIT + 1:,} characters in the input]"
    assert str(Problem("f.ndjson", "y" * 10_000, "Observation/" + "z" * 10_000)).count("[cut:") == 2


def test_huge_medication_text_is_quoted_in_part(
    tmp_path: Path, knowledge: Knowledge, profiles: ProfileSet
) -> None:
    size = 2_000_000
    med = {
        "resourceType": "MedicationStatement",
        "id": "ms-huge",
        "status": "active",
        "medicationCodeableConcept": {"text": "Methotrexate 2.5 MG Oral Tablet " + "a" * size},
        "subject": {"reference": "Patient/huge"},
        "effectiveDateTime": "2024-01-01",
    }
    path = tmp_path / "huge.ndjson"
    path.write_text(json.dumps(_wbc("huge")) + "\n" + json.dumps(med) + "\n", encoding="utf-8")
    done = fhir_leuko("evaluate", str(path), "--as-of", "2024-05-02")
    assert done.returncode == 0, done.stderr
    (issue,) = [json.loads(line) for line in done.stdout.splitlines()]
    assert issue["implicated"] == [{"reference": "MedicationStatement/ms-huge"}]
    assert f"[cut: {size + 32:,} characters in the input]" in issue["detail"]
    assert len(issue["detail"]) < 3_000
    assert len(done.stdout) < 10_000


def test_changed_patients_of_an_export_skip_deep_lines_and_corrupt_files(tmp_path: Path) -> None:
    """``run --bulk`` reads which patients an incremental export names before evaluating it: a
    line nested too deeply or a corrupt .gz is skipped there (the evaluation reports them)."""
    from fhir_leuko.job.bulk import _changed_patients

    good = tmp_path / "Observation.ndjson"
    good.write_bytes(_ndjson(_deep(_wbc("deep")), json.dumps(_wbc("named")).encode()))
    bad = tmp_path / "Condition.ndjson.gz"
    bad.write_bytes(_corrupt_gzip(json.dumps(_wbc("lost")).encode() * 20))
    assert _changed_patients([(good, None), (bad, None)]) == {"Patient/named"}


def test_a_birth_date_after_the_patients_results_is_a_problem_and_the_age_unknown(
    data_dir: Path, knowledge: Knowledge, profiles: ProfileSet
) -> None:
    """Firing case: born 2030, a WBC of 3.5 in 2024. Taken as given, the negative age matched no
    pediatric age band, so no lower limit was known and nothing was said; now the Patient is a
    problem and the count is graded with the limits for an unknown age (adult: grade 1).
    Near misses: a toddler and a baby whose first count carries the day before its birth date
    (a local date against a result in another offset) keep their ages and give no problem."""
    result = run_paths([data_dir / "birth-after-results.json"], knowledge, profiles)
    assert [(p.resource, p.reason) for p in result.problems] == [
        ("Patient/born-later", BORN_AFTER)
    ]
    found = by_patient(result)
    assert found[("born-later", "leukopenia")].severity == "low"
    assert ("toddler", "leukopenia") not in found
    # 5.0 is below the first week's limit of 9.0: the baby's age was kept.
    assert found[("born-that-day", "leukopenia")].severity == "low"
