"""Reading input: formats, references, duplicates, units, and every input problem.

Hand-written files in tests/data: formats/ (NDJSON, .ndjson.gz, a .json holding NDJSON, a single
resource, searchset and batch Bundles), references.json (relative, absolute, urn:uuid and
contained #id references), duplicates/, no-ids/, units.ndjson and problems/.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fhir_leuko.core.knowledge import Knowledge
from fhir_leuko.core.pipeline import Evaluation
from fhir_leuko.core.profiles import ProfileSet
from fhir_leuko.files.reader import expand_paths

from .conftest import by_patient, run_paths

# -- formats ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def formats(data_dir: Path, knowledge: Knowledge, profiles: ProfileSet) -> Evaluation:
    return run_paths([data_dir / "formats"], knowledge, profiles)


@pytest.mark.parametrize(
    ("patient", "kind", "grade", "form"),
    [
        ("fmt-gz-1", "leukopenia", "3", "Observation.ndjson.gz (Bulk Data export)"),
        ("fmt-gz-2", "neutropenia", "1", "gzipped Observation + Patient.ndjson (child, age used)"),
        ("fmt-json-ndjson", "leukopenia", "2", ".json file holding NDJSON"),
        ("fmt-single", "leukopenia", "1", "a single resource, status amended, 3200 cells/µL"),
        ("fmt-search", "neutropenia", "3", "searchset Bundle, status corrected, date-only time"),
        ("fmt-batch", "lymphopenia", "3", "batch Bundle with a DELETE entry"),
    ],
    ids=["ndjson-gz", "ndjson-patient", "json-holding-ndjson", "single", "searchset", "batch"],
)
def test_every_input_form(
    formats: Evaluation, patient: str, kind: str, grade: str, form: str
) -> None:
    finding = by_patient(formats).get((patient, kind))
    assert finding is not None, form
    assert finding.grade == grade


def test_directory_walk_skips_hidden_and_non_fhir_files(data_dir: Path, formats: Evaluation) -> None:
    names = [p.relative_to(data_dir / "formats").as_posix() for p in expand_paths([data_dir / "formats"])]
    # sorted, files before subdirectories; .hidden-Observation.ndjson and README.txt are skipped
    assert names == [
        "batch.json",
        "ndjson-in-a.json",
        "searchset.json",
        "single-observation.json",
        "export/MedicationRequest.ndjson",
        "export/Observation.ndjson.gz",
        "export/Patient.ndjson",
    ]
    assert ("fmt-hidden", "leukopenia") not in by_patient(formats)
    assert formats.problems == []


def test_directory_walk_follows_links_to_directories_once(
    data_dir: Path, tmp_path: Path, knowledge: Knowledge, profiles: ProfileSet
) -> None:
    """``exports/latest`` pointing at the newest export: a link to a directory was not followed,
    so what it held was left out without a word. Now it is read, each real directory once: a link
    back up the tree ends, and a directory reached both by its name and by a link is read once."""
    import shutil

    exports = tmp_path / "exports"
    shutil.copytree(data_dir / "formats" / "export", tmp_path / "store" / "day-2")
    exports.mkdir()
    (exports / "latest").symlink_to(tmp_path / "store" / "day-2", target_is_directory=True)
    (tmp_path / "store" / "day-2" / "up").symlink_to(exports, target_is_directory=True)
    names = [p.relative_to(exports).as_posix() for p in expand_paths([exports])]
    assert names == [
        "latest/MedicationRequest.ndjson",
        "latest/Observation.ndjson.gz",
        "latest/Patient.ndjson",
    ]
    through = run_paths([exports], knowledge, profiles)
    direct = run_paths([tmp_path / "store" / "day-2"], knowledge, profiles)
    assert by_patient(through).keys() == by_patient(direct).keys() != set()
    (exports / "day-2").symlink_to(tmp_path / "store" / "day-2", target_is_directory=True)
    assert [p.name for p in expand_paths([exports])] == [
        "MedicationRequest.ndjson", "Observation.ndjson.gz", "Patient.ndjson",
    ]  # fmt: skip


def test_gzipped_export_implicates_its_medication(formats: Evaluation) -> None:
    finding = by_patient(formats)[("fmt-gz-1", "leukopenia")]
    assert [d.exposure.key for d in finding.implicated] == ["MedicationRequest/fmt-gz-1-mr"]
    assert finding.implicated[0].exposure.drugs[0].via == "RxNorm 3002"


# -- references ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def references(data_dir: Path, knowledge: Knowledge, profiles: ProfileSet) -> Evaluation:
    return run_paths([data_dir / "references.json"], knowledge, profiles)


URN = "urn:uuid:6f1d8a40-0c1e-4f0e-8d1a-2f3b4c5d6e"


@pytest.mark.parametrize(
    ("patient", "kind", "profile", "evidence", "implicated"),
    [
        # urn:uuid subject -> Patient with id: age known, pediatric limit 1.7 makes ANC 1.6 low
        ("Patient/ref-child", "neutropenia", "pediatric", ["Observation/ref-child-anc"], []),
        # absolute URL subject -> Patient/ref-abs
        ("Patient/ref-abs", "neutropenia", "pediatric", ["Observation/ref-abs-anc"], []),
        # a Patient without id, known only by its urn:uuid fullUrl, is still a child
        (f"{URN}08", "neutropenia", "pediatric", [f"{URN}09"], []),
        # DiagnosticReport.result -> urn:uuid Observation without id, subject or time; a
        # MedicationStatement -> urn:uuid Medication whose ingredient is RxNorm mycophenolate
        (f"{URN}03", "leukopenia", "adult-default", [f"{URN}04"], [f"{URN}07"]),
        # DiagnosticReport.result "#anc" -> contained Observation (cited by its container);
        # MedicationRequest.medicationReference "#med1" -> contained Medication (methotrexate)
        (
            "Patient/ref-contained",
            "neutropenia",
            "adult-default",
            ["DiagnosticReport/ref-contained-dr"],
            ["MedicationRequest/ref-contained-mr"],
        ),
    ],
    ids=["urn-uuid-patient", "absolute-url", "patient-without-id", "urn-uuid-result", "contained"],
)
def test_references_resolve_within_the_input(
    references: Evaluation,
    patient: str,
    kind: str,
    profile: str,
    evidence: list[str],
    implicated: list[str],
) -> None:
    issue = next(
        i
        for i in references.issues
        if i["patient"]["reference"] == patient and i["code"]["coding"][1]["code"] == kind
    )
    assert issue["reference"].split("/")[-1].startswith(profile)
    assert [d["reference"] for d in issue["evidence"][0]["detail"]] == evidence
    assert [i["reference"] for i in issue.get("implicated", [])] == implicated


def test_contained_observation_takes_the_reports_subject_and_time(references: Evaluation) -> None:
    finding = by_patient(references)[("ref-contained", "neutropenia")]
    assert finding.result.key == "DiagnosticReport/ref-contained-dr#anc"
    assert finding.result.effective_text == "2024-05-01T08:00:00Z"
    assert finding.grade == "4"
    assert references.problems == []


# -- duplicates and resources without ids ------------------------------------------------------


def test_duplicate_observation_in_two_files_counts_once(
    data_dir: Path, knowledge: Knowledge, profiles: ProfileSet
) -> None:
    result = run_paths([data_dir / "duplicates"], knowledge, profiles)
    assert result.counts["Observation"] == 2
    assert result.counts["results:used"] == 1
    assert len(result.issues) == 1
    assert result.issues[0]["evidence"][0]["detail"] == [{"reference": "Observation/dup-1"}]
    finding = result.findings[0]
    assert len(finding.trend) == 1


def test_same_file_twice_is_one_result(data_dir: Path, knowledge: Knowledge, profiles: ProfileSet) -> None:
    path = data_dir / "bands" / "wbc-edges.ndjson"
    once = run_paths([path], knowledge, profiles)
    twice = run_paths([path, path], knowledge, profiles)
    assert twice.issues == once.issues


def test_resources_without_id_in_different_files_are_different(
    data_dir: Path, knowledge: Knowledge, profiles: ProfileSet
) -> None:
    """Two id-less single-resource files used to share the key "Observation@": one was lost."""
    result = run_paths([data_dir / "no-ids"], knowledge, profiles)
    assert sorted(f.patient for f in result.findings) == ["Patient/noid-first", "Patient/noid-second"]
    for issue in result.issues:
        # an internal key is no FHIR reference: the evidence does not point at it
        assert "detail" not in issue["evidence"][0]
        assert "no-ids/" in issue["detail"]


# -- units -------------------------------------------------------------------------------------


UNIT_PATIENTS = [
    line.split('"subject":{"reference":"Patient/')[1].split('"')[0]
    for line in (Path(__file__).parent / "data" / "units.ndjson").read_text().splitlines()
]


@pytest.fixture(scope="module")
def units(data_dir: Path, knowledge: Knowledge, profiles: ProfileSet) -> Evaluation:
    return run_paths([data_dir / "units.ndjson"], knowledge, profiles)


@pytest.mark.parametrize("patient", UNIT_PATIENTS, ids=UNIT_PATIENTS)
def test_every_accepted_unit_spelling(units: Evaluation, patient: str) -> None:
    """Each file line is WBC 2.5 x10^9/L in another spelling (UCUM code or unit text)."""
    finding = by_patient(units)[(patient, "leukopenia")]
    assert finding.result.value == pytest.approx(2.5)
    assert finding.grade == "2"


def test_units_file_has_no_problems(units: Evaluation) -> None:
    assert units.problems == []
    assert len(UNIT_PATIENTS) == len(units.findings) >= 20


# -- problems ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def problems(data_dir: Path, knowledge: Knowledge, profiles: ProfileSet) -> Evaluation:
    return run_paths([data_dir / "problems"], knowledge, profiles)


PROBLEMS = [
    ("line 2", "Observation/prob-absent", "no value: dataAbsentReason 'error'"),
    ("line 3", "Observation/prob-no-value", "no numeric valueQuantity"),
    ("line 4", "Observation/prob-bogus-status", "invalid Observation.status 'bogus'"),
    ("line 5", "Observation/prob-unknown-unit", "unit 'furlongs' is not a known count unit for LOINC 751-8"),
    ("line 6", "Observation/prob-implausible", "implausible neutrophils count 450 10*3/uL for its declared unit (not graded; check the unit)"),
    ("line 7", "", "not valid JSON (Input data was truncated)"),
    ("line 8", "Observation/prob-malformed", "malformed (Expected `float | null`, got `str` - at `$.valueQuantity.value`)"),
    ("line 9", "Observation/prob-value-string", "no numeric valueQuantity (valueString '<0.1')"),
    ("line 10", "Observation/prob-bad-comparator", "invalid comparator '~'"),
    ("line 11", "Observation/prob-grams", "unit 'g/L' is not a known count unit for LOINC 6690-2"),
    ("line 12", "Observation/prob-count-unit-on-percent", "unit '10*3/uL' is not a known fraction unit for LOINC 770-8"),
    ("line 13", "Observation/prob-no-subject", "no subject (and no DiagnosticReport that names one)"),
    ("line 14", "Observation/prob-no-time", "no effective time (nor one from its DiagnosticReport)"),
]


@pytest.mark.parametrize(("position", "resource", "reason"), PROBLEMS, ids=[p[2].split(" (")[0][:40] for p in PROBLEMS])
def test_each_problem_names_file_position_resource_and_reason(
    problems: Evaluation, position: str, resource: str, reason: str
) -> None:
    found = [p for p in problems.problems if p.position == position]
    assert len(found) == 1
    problem = found[0]
    assert problem.source.endswith("problems/Observation.ndjson")
    assert problem.resource == resource
    assert problem.reason == reason
    text = str(problem)
    assert text.startswith(f"{problem.source}:{position}:")
    assert reason in text


def test_problems_never_lose_the_valid_rest(problems: Evaluation) -> None:
    assert len(problems.problems) == len(PROBLEMS)
    findings = by_patient(problems)
    # the valid first and last lines are still evaluated; nothing with a problem is graded
    assert findings[("prob-ok", "leukopenia")].grade == "2"
    assert findings[("prob-last-ok", "neutropenia")].grade == "4"
    assert {f.patient for f in problems.findings} == {"Patient/prob-ok", "Patient/prob-last-ok"}


@pytest.mark.parametrize(
    "patient",
    ["ignored-entered-in-error", "ignored-cancelled", "ignored-preliminary", "ignored-unmapped", "ignored-display-only"],
)
def test_ignored_without_a_problem(problems: Evaluation, patient: str) -> None:
    """Ignored statuses, granulocytes (not neutrophils) and display-only codes: silently skipped."""
    assert not [p for p in problems.problems if patient in p.resource]
    assert not [f for f in problems.findings if f.patient == f"Patient/{patient}"]
