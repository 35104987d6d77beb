"""The command-line contract, by running the real command (``python -m fhir_leuko``).

Other tools script against it: NDJSON or a transaction Bundle out, a summary and one line per
input problem on stderr, exit codes 0 (clean), 1 (input problems; the valid rest still written)
and 2 (usage or configuration error).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import DATA, fhir_leuko

AS_OF = "2024-05-02"


def _issues(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines()]


def test_ndjson_to_stdout_and_summary_to_stderr() -> None:
    done = fhir_leuko("evaluate", str(DATA / "clozapine.json"), "--as-of", AS_OF)
    assert done.returncode == 0, done.stderr
    issues = _issues(done.stdout)
    assert len(issues) == 14
    assert {i["resourceType"] for i in issues} == {"DetectedIssue"}
    assert done.stderr.splitlines() == [
        "fhir-leuko: read 1 file: 16 Observation, 1 Patient, 3 MedicationRequest, "
        "11 MedicationStatement, 1 Medication, 1 Condition, 3 Flag",
        "fhir-leuko: lab results used: 16 measured, 0 derived; patients evaluated: 15",
        "fhir-leuko: findings: 14 (leukopenia moderate 1; neutropenia high 5; neutropenia moderate 8)",
        "fhir-leuko: input problems: 0",
    ]


def test_output_file(tmp_path: Path) -> None:
    out = tmp_path / "issues.ndjson"
    done = fhir_leuko("evaluate", str(DATA / "pediatric.json"), "--as-of", AS_OF, "--output", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    issues = _issues(out.read_text(encoding="utf-8"))
    assert len(issues) == 8
    assert not list(tmp_path.glob(".issues.ndjson.*"))  # the temporary file was renamed


def test_output_into_a_missing_directory_is_a_usage_error(tmp_path: Path) -> None:
    done = fhir_leuko(
        "evaluate", str(DATA / "pediatric.json"), "--as-of", AS_OF, "-o", str(tmp_path / "no" / "x")
    )
    assert done.returncode == 2
    assert "does not exist" in done.stderr


def test_bundle_format_is_a_transaction_of_conditional_creates(tmp_path: Path) -> None:
    out = tmp_path / "tx.json"
    done = fhir_leuko(
        "evaluate", str(DATA / "derived-anc.json"), "--as-of", AS_OF, "--format", "bundle", "-o", str(out)
    )
    assert done.returncode == 0, done.stderr
    bundle = json.loads(out.read_text(encoding="utf-8"))
    assert bundle["resourceType"] == "Bundle"
    assert bundle["type"] == "transaction"
    assert len(bundle["entry"]) == 16
    for entry in bundle["entry"]:
        resource = entry["resource"]
        assert entry["fullUrl"] == f"urn:uuid:{resource['id']}"
        assert entry["request"] == {
            "method": "POST",
            "url": "DetectedIssue",
            "ifNoneExist": "identifier=https://fhir-leuko.github.io/fhir/sid/detectedissue|"
            + resource["id"],
        }


def test_input_problems_exit_1_and_the_valid_rest_is_written(tmp_path: Path) -> None:
    out = tmp_path / "issues.ndjson"
    problems = DATA / "problems"
    done = fhir_leuko("evaluate", str(problems), str(DATA / "pediatric.json"), "--as-of", AS_OF, "-o", str(out))
    assert done.returncode == 1
    issues = _issues(out.read_text(encoding="utf-8"))
    patients = {i["patient"]["reference"] for i in issues}  # type: ignore[index]
    assert {"Patient/prob-ok", "Patient/prob-last-ok", "Patient/ped-6d"} <= patients
    problem_lines = [line for line in done.stderr.splitlines() if line.startswith("problem: ")]
    assert len(problem_lines) == 13
    source = str(problems / "Observation.ndjson")
    assert f"problem: {source}:line 4: Observation/prob-bogus-status: invalid Observation.status 'bogus'" in problem_lines
    assert (
        f"problem: {source}:line 6: Observation/prob-implausible: implausible neutrophils count 450 "
        "10*3/uL for its declared unit (not graded; check the unit)"
    ) in problem_lines
    assert f"problem: {source}:line 2: Observation/prob-absent: no value: dataAbsentReason 'error'" in problem_lines
    assert all(line.startswith(f"problem: {source}:line ") for line in problem_lines)
    assert done.stderr.splitlines()[-1] == "fhir-leuko: input problems: 13"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["evaluate", "no/such/file.json", "--as-of", AS_OF], "no/such/file.json: no such file or directory"),
        (["evaluate", str(DATA / "units.ndjson"), "--as-of", "yesterday"], "--as-of 'yesterday': not an ISO 8601 date"),
        (["evaluate", str(DATA / "units.ndjson"), "--profiles", str(DATA / "units.ndjson")], "not a directory"),
        (["evaluate", str(DATA / "units.ndjson"), "--profile", "no-such-profile"], "no such profile (loaded: adult-default, clozapine, pediatric)"),
        (["evaluate", str(DATA / "units.ndjson"), "--profiles", str(DATA / "site-profiles-broken")], "rules[0].lower_limit.value"),
        (["evaluate", str(DATA / "units.ndjson"), "--format", "xml"], "invalid choice: 'xml'"),
        (["evaluate"], "the following arguments are required: PATH"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
    ids=["missing-path", "bad-as-of", "profiles-not-a-dir", "unknown-profile", "broken-site-profile", "bad-format", "no-path", "unknown-command"],
)
def test_usage_and_configuration_errors_exit_2(args: list[str], message: str) -> None:
    done = fhir_leuko(*args)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize("command", [[], ["evaluate"], ["profiles"], ["profiles", "list"], ["profiles", "validate"]])
def test_help_teaches_with_examples(command: list[str]) -> None:
    done = fhir_leuko(*command, "--help")
    assert done.returncode == 0
    text = done.stdout
    assert "usage: fhir-leuko" in text
    if command:
        assert "examples:" in text
    else:
        assert "exit codes:" in text
    if command == ["evaluate"]:
        for expected in ("--as-of", "--profiles DIR", "--format", "fhir-leuko evaluate export/", "exit codes:"):
            assert expected in text


def test_as_of_bare_date_is_the_end_of_that_day() -> None:
    done = fhir_leuko("evaluate", str(DATA / "bands" / "wbc-edges.ndjson"), "--as-of", "2024-05-01")
    issues = _issues(done.stdout)
    assert issues and {i["identifiedDateTime"] for i in issues} == {"2024-05-01T23:59:59Z"}
    with_zone = fhir_leuko(
        "evaluate", str(DATA / "bands" / "wbc-edges.ndjson"), "--as-of", "2024-05-01T10:00:00+02:00"
    )
    assert {i["identifiedDateTime"] for i in _issues(with_zone.stdout)} == {"2024-05-01T08:00:00Z"}
    # before the counts were taken there is nothing to find
    early = fhir_leuko("evaluate", str(DATA / "bands" / "wbc-edges.ndjson"), "--as-of", "2024-05-01T07:59:59Z")
    assert early.returncode == 0 and early.stdout == ""


def test_profile_option_selects_profiles() -> None:
    done = fhir_leuko("evaluate", str(DATA / "clozapine.json"), "--as-of", AS_OF, "--profile", "clozapine")
    assert done.returncode == 0, done.stderr
    issues = _issues(done.stdout)
    assert issues
    assert {i["reference"] for i in issues} == {"https://fhir-leuko.github.io/fhir/profiles/clozapine|1.0.0"}


# -- profiles list / validate ------------------------------------------------------------------


def test_profiles_list() -> None:
    done = fhir_leuko("profiles", "list")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for line in (
        "clozapine 1.0.0 [active, priority 20]",
        "pediatric 1.0.0 [active, priority 10]",
        "adult-default 1.0.0 [active, priority 0]",
        "  extends: adult-default",
        "  url:  https://fhir-leuko.github.io/fhir/profiles/clozapine",
    ):
        assert line in out
    assert out.index("clozapine 1.0.0") < out.index("pediatric 1.0.0") < out.index("adult-default 1.0.0")
    assert "  when: " in out and "  then: " in out
    assert out.splitlines()[-1].startswith("knowledge: loinc ")


@pytest.mark.parametrize("site", ["site-profiles", "site-profiles-yaml"], ids=["toml", "yaml"])
def test_site_profile_extends_and_overrides_the_lookback(site: str) -> None:
    directory = DATA / site
    validated = fhir_leuko("profiles", "validate", str(directory))
    assert validated.returncode == 0, validated.stderr
    assert validated.stdout == "ok: adult-local 2.1.0\n"
    listed = fhir_leuko("profiles", "list", "--profiles", str(directory))
    assert "adult-local 2.1.0 [active, priority 1]" in listed.stdout
    assert "  extends: adult-default" in listed.stdout

    lookback = str(DATA / "lookback.json")
    as_of = "2024-05-01T12:00:00Z"
    shipped = {i["patient"]["reference"]: i for i in _issues(fhir_leuko("evaluate", lookback, "--as-of", as_of).stdout)}  # type: ignore[index]
    site_run = fhir_leuko("evaluate", lookback, "--as-of", as_of, "--profiles", str(directory))
    assert site_run.returncode == 0, site_run.stderr
    local = {i["patient"]["reference"]: i for i in _issues(site_run.stdout)}  # type: ignore[index]
    # 30 days before as-of: in for adult-default, out for the 14-day site lookback
    assert "Patient/lb-in" in shipped and "Patient/lb-in" not in local
    # the site counts preliminary results: lb-prelim's latest (preliminary 5.0) has recovered
    assert "Patient/lb-prelim" in shipped and "Patient/lb-prelim" not in local
    assert local["Patient/lb-relapsed"]["reference"] == "https://hospital.example.org/fhir-leuko/adult-local|2.1.0"


def test_profiles_validate_names_file_and_field() -> None:
    directory = DATA / "site-profiles-broken"
    done = fhir_leuko("profiles", "validate", str(directory))
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        f"error: {directory / 'bad-limit.toml'}: rules[0].lower_limit.value: Input should be greater than 0",
        f"error: {directory / 'extends-rule.toml'}: rules[0].lower_limit.value: Input should be greater than 0",
        f"error: {directory / 'misspelt.toml'}: settings.lookback: unknown field (see profiles/README.md for the grammar)",
        f"error: {directory / 'unordered.yaml'}: gradings.ctcae-v5-wbc: Value error, band '3': edges must strictly decrease (got 3.0 after 2.0)",
    ]
    assert done.stderr.splitlines()[-1] == "4 error(s) in 4 invalid file(s)"


def test_profiles_validate_reports_every_error_of_every_file() -> None:
    directory = DATA / "site-profiles-errors"
    done = fhir_leuko("profiles", "validate", str(directory))
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    three, unknown = directory / "three-fields.toml", directory / "unknown-ids.toml"
    assert errors == [
        f"error: {three}: settings.lookback: unknown field (see profiles/README.md for the grammar)",
        f"error: {three}: gradings.simple.bands[0].grade: Input should be a valid string",
        f"error: {three}: rules[0].lower_limit.value: Input should be greater than 0",
        f"error: {unknown}: applies.drugs: unknown drug or group id 'clozapin'",
        f"error: {unknown}: rules[0].when_flags: unknown flag 'benign-ethnic'",
    ]
    assert done.stderr.splitlines()[-1] == "5 error(s) in 2 invalid file(s)"
    assert done.stdout == ""


def test_profiles_validate_one_file() -> None:
    good = fhir_leuko("profiles", "validate", str(DATA / "site-profiles" / "adult-local.toml"))
    assert (good.returncode, good.stdout) == (0, "ok: adult-local 2.1.0\n"), good.stderr
    bad = fhir_leuko("profiles", "validate", str(DATA / "site-profiles-errors" / "unknown-ids.toml"))
    assert bad.returncode == 2
    assert bad.stderr.splitlines()[-1] == "2 error(s) in 1 invalid file(s)"
    wrong = fhir_leuko("profiles", "validate", str(DATA / "units.ndjson"))
    assert wrong.returncode == 2
    assert "not a profile file (*.toml, *.yaml, *.yml)" in wrong.stderr


def test_profiles_validate_empty_directory_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a profile")
    done = fhir_leuko("profiles", "validate", str(tmp_path))
    assert done.returncode == 2
    assert f"profiles validate {tmp_path}: no profile files" in done.stderr
    assert done.stdout == ""


def test_profiles_validate_missing_directory() -> None:
    done = fhir_leuko("profiles", "validate", str(DATA / "no-such-dir"))
    assert done.returncode == 2
    assert "not a directory" in done.stderr


def test_version() -> None:
    from fhir_leuko import __version__

    done = fhir_leuko("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"fhir-leuko {__version__}"
