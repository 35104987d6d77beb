"""Real-world shapes that once gave no finding and no warning (issue 7 §1, §3, §4; issue 13 §6).

tests/data/never-silent/: each class has a firing case and its near miss, as FHIR JSON.

* cross-report.json: a WBC in a CBC report and the differential in a manual-differential report
  of the same collection time (also on clozapine); one of two results naming a specimen; two WBCs.
  Near misses: the differential 90 (or 5) minutes later, two different specimens.
* codes.ndjson: LOINC under its OID, with spaces, with a differently cased host; near misses: a
  system that is not LOINC's (``http://loinc.org/``, ``LN``, none) is reported, never guessed.
* components.json: a CBC as one Observation with components; near miss: a component without value.
* units.ndjson: spellings of US/EU lab systems; near miss: ``103/uL`` (a lost superscript).
* dropped.ndjson: a lower-case ``observation``, a local type, a malformed contained Medication whose
  valid parts name clozapine, a Medication not in the export; near misses: an Encounter, a local
  type with nothing to say, metformin, a MedicationAdministration (read since issue 13).
* versions.ndjson, lower-of-two.ndjson, brands.ndjson, ben-verification.ndjson: §4.
"""

from __future__ import annotations

import pytest

from fhir_leuko.core.knowledge import Knowledge
from fhir_leuko.core.pipeline import Evaluation
from fhir_leuko.core.profiles import ProfileSet

from .conftest import AS_OF, DATA, by_patient, fhir_leuko, run_paths

HERE = DATA / "never-silent"
FILES = sorted(p.name for p in HERE.iterdir())

FINDINGS = {
    # file: {(patient, kind): (value, grade, profile)}; every other (patient, kind) gives nothing
    "cross-report.json": {
        ("xr-fire", "leukopenia"): (2.0, "2", "adult-default"),
        ("xr-fire", "neutropenia"): (0.4, "4", "adult-default"),
        ("xr-later", "leukopenia"): (2.0, "2", "adult-default"),
        ("xr-one-specimen", "leukopenia"): (2.5, "2", "adult-default"),
        ("xr-one-specimen", "neutropenia"): (0.75, "3", "adult-default"),
        ("xr-two-specimens", "leukopenia"): (2.5, "2", "adult-default"),
        ("xr-two-wbc", "leukopenia"): (2.4, "2", "adult-default"),
        ("xr-two-wbc", "neutropenia"): (0.6, "3", "adult-default"),
        ("xr-cloz", "leukopenia"): (3.0, "1", "adult-default"),
        ("xr-cloz", "neutropenia"): (0.9, "moderate", "clozapine"),
        ("xr-cloz-later", "leukopenia"): (3.0, "1", "adult-default"),
    },
    "codes.ndjson": {
        ("code-oid", "leukopenia"): (1.8, "3", "adult-default"),
        ("code-spaces", "leukopenia"): (1.8, "3", "adult-default"),
        ("code-host-case", "neutropenia"): (0.8, "3", "adult-default"),
        ("code-system-spaces", "neutropenia"): (0.8, "3", "adult-default"),
    },
    "components.json": {
        ("comp-cbc", "leukopenia"): (2.2, "2", "adult-default"),
        ("comp-cbc", "neutropenia"): (0.45, "4", "adult-default"),
        ("comp-diff", "leukopenia"): (2.0, "2", "adult-default"),
        ("comp-diff", "neutropenia"): (0.4, "4", "adult-default"),
        ("comp-report", "leukopenia"): (1.9, "3", "adult-default"),
    },
    "units.ndjson": {
        (f"unit-{name}", "leukopenia"): (2.5, "2", "adult-default")
        for name in (
            "x10e3-ul",
            "x10e9-l",
            "k-mcl",
            "10-3-ul",
            "10-9-l",
            "thousand-ul",
            "thou-ul",
            "cmm",
            "10e3-mcl",
        )
    },
    "dropped.ndjson": {
        ("drop-malformed-med", "neutropenia"): (0.8, "moderate", "clozapine"),
        ("drop-unknown-med", "neutropenia"): (0.8, "3", "adult-default"),
    },
    "versions.ndjson": {
        ("ver-corrected", "leukopenia"): (1.6, "3", "adult-default"),
        ("ver-no-meta", "neutropenia"): (0.7, "3", "adult-default"),
    },
    "lower-of-two.ndjson": {
        ("two-values", "neutropenia"): (0.9, "3", "adult-default"),
        ("same-values", "neutropenia"): (0.9, "3", "adult-default"),
    },
    "brands.ndjson": {
        **{
            (f"brand-{name}", "neutropenia"): (0.8, "moderate", "clozapine")
            for name in ("leponex", "denzapine", "zaponex", "clopine", "clozitor", "clozapin")
        },
        ("brand-clopidogrel", "neutropenia"): (0.8, "3", "adult-default"),
    },
    "ben-verification.ndjson": {
        ("ben-none", "neutropenia"): (0.8, "BEN neutropenia", "clozapine"),
        ("ben-confirmed", "neutropenia"): (0.8, "BEN neutropenia", "clozapine"),
        **{
            (f"ben-{status}", "neutropenia"): (0.8, "moderate", "clozapine")
            for status in ("provisional", "unconfirmed", "differential", "refuted")
        },
    },
}

PROBLEMS = {
    # file: [(position, resource, a part of the reason)]; no other problem
    "codes.ndjson": [
        ("line 5", "Observation/code-path", "system 'http://loinc.org/', not LOINC's"),
        ("line 6", "Observation/code-ln", "system 'LN'"),
        ("line 7", "Observation/code-no-system", "comes with no system"),
    ],
    "components.json": [
        ("entry[4]", "Observation/comp-normal#component[1]", "dataAbsentReason 'error'"),
    ],
    "units.ndjson": [
        ("line 10", "Observation/unit-lost-superscript", "unit '103/uL' is not a known count unit"),
        ("line 11", "Observation/unit-no-volume", "unit 'x10E3' is not a known count unit"),
    ],
    "dropped.ndjson": [
        ("line 1", "observation/drop-lowercase", "case-sensitive: 'Observation'"),
        ("line 2", "LabResult/drop-local-type", "carries LOINC 751-8 (neutrophils)"),
        ("line 13", "Observation/drop-bad-system", "$.code.coding[0].system"),
        (
            "line 8",
            "MedicationRequest/drop-malformed-med-rx",
            "is malformed (Expected `str | null`, got `int` - at `$.code.coding[0].code`): its "
            "drug is recognised from what is valid: clozapine",
        ),
        ("line 10", "MedicationRequest/drop-unknown-med-rx", "its drug is unknown"),
        (
            "line 11",
            "MedicationRequest/drop-missing-med-rx",
            "its Medication 'Medication/not-exported' is not in its source: its drug is unknown",
        ),
    ],
}


@pytest.fixture(scope="module")
def results(knowledge: Knowledge, profiles: ProfileSet) -> dict[str, Evaluation]:
    return {name: run_paths([HERE / name], knowledge, profiles) for name in FILES}


@pytest.mark.parametrize("name", FILES)
def test_findings(results: dict[str, Evaluation], name: str) -> None:
    got = {
        key: (round(f.result.value, 6), f.grade, f.profile_id)
        for key, f in by_patient(results[name]).items()
    }
    assert got == FINDINGS[name]


@pytest.mark.parametrize("name", FILES)
def test_problems(results: dict[str, Evaluation], name: str) -> None:
    problems = results[name].problems
    expected = PROBLEMS.get(name, [])
    assert len(problems) == len(expected), [str(p) for p in problems]
    for position, resource, reason in expected:
        assert any(
            p.position == position
            and p.resource == resource
            and reason in p.reason
            and p.source == str(HERE / name)
            for p in problems
        ), (position, resource, reason, [str(p) for p in problems])


def _detail(result: Evaluation, patient: str, kind: str) -> str:
    finding = by_patient(result)[(patient, kind)]
    issue = next(i for i in result.issues if i["id"] == _id(result, finding.patient, kind))
    return str(issue["detail"])


def _id(result: Evaluation, patient: str, kind: str) -> str:
    return next(
        str(i["id"])
        for i in result.issues
        if i["patient"]["reference"] == patient  # type: ignore[index]
        and i["code"]["coding"][1]["code"] == kind  # type: ignore[index]
    )


# -- §1 one blood draw in two reports ---------------------------------------------------------------


def test_a_manual_differential_in_its_own_report_gives_the_anc(
    results: dict[str, Evaluation],
) -> None:
    result = results["cross-report.json"]
    finding = by_patient(result)[("xr-fire", "neutropenia")]
    assert finding.result.sources == ("Observation/xr-fire-wbc", "Observation/xr-fire-neut")
    detail = _detail(result, "xr-fire", "neutropenia")
    assert (
        "Derived from one blood draw, matched by the same collection time "
        "(2024-05-01T08:00:00Z, 2 reports): WBC 2 10*3/uL (Observation/xr-fire-wbc) x 20 % "
        "(neutrophils, Observation/xr-fire-neut)." in detail
    )
    issue = next(
        i for i in result.issues if i["id"] == _id(result, "Patient/xr-fire", "neutropenia")
    )
    assert [d["reference"] for d in issue["evidence"][0]["detail"]] == [  # type: ignore[index]
        "Observation/xr-fire-wbc",
        "Observation/xr-fire-neut",
    ]


def test_the_wbc_chosen_among_several_is_named(results: dict[str, Evaluation]) -> None:
    detail = _detail(results["cross-report.json"], "xr-two-wbc", "neutropenia")
    assert (
        "WBC 2.4 10*3/uL (Observation/xr-two-wbc-poc-wbc; chosen of 2 WBC counts of this draw: "
        "the lowest)" in detail
    )


def test_clozapine_monitoring_with_a_manual_differential(results: dict[str, Evaluation]) -> None:
    """The usual clozapine shape: segs + bands in a manual differential; the label's table."""
    finding = by_patient(results["cross-report.json"])[("xr-cloz", "neutropenia")]
    assert finding.profile_id == "clozapine"
    assert [d.exposure.key for d in finding.implicated] == ["MedicationStatement/xr-cloz-ms"]
    assert "+ 5 % (band neutrophils, Observation/xr-cloz-bands)" in finding.result.derivation


# -- §3 codes, components ---------------------------------------------------------------------------


def test_a_component_is_cited_by_its_observation(results: dict[str, Evaluation]) -> None:
    result = results["components.json"]
    issue = next(
        i for i in result.issues if i["id"] == _id(result, "Patient/comp-cbc", "neutropenia")
    )
    assert issue["evidence"][0]["detail"] == [{"reference": "Observation/comp-cbc"}]  # type: ignore[index]
    finding = by_patient(result)[("comp-cbc", "neutropenia")]
    assert finding.lower_limit.value == 1.8  # the component's own reference range
    # A report listing the Observation gives its components the report's subject and time.
    assert by_patient(result)[("comp-report", "leukopenia")].result.effective_text == (
        "2024-05-01T08:00:00Z"
    )


# -- §4 which result counts ------------------------------------------------------------------------


def test_the_lower_of_two_results_is_graded_and_both_are_named(
    results: dict[str, Evaluation],
) -> None:
    result = results["lower-of-two.ndjson"]
    assert by_patient(result)[("two-values", "neutropenia")].result.key == "Observation/two-manual"
    detail = _detail(result, "two-values", "neutropenia")
    assert (
        "Also at this time: 1.6 ×10⁹/L (Observation/two-auto); the lower value is graded (a missed "
        "low is worse than a noisy one)." in detail
    )
    assert "Also at this time" not in _detail(result, "same-values", "neutropenia")


def test_a_ben_condition_not_confirmed_is_named_and_not_applied(
    results: dict[str, Evaluation],
) -> None:
    result = results["ben-verification.ndjson"]
    detail = _detail(result, "ben-provisional", "neutropenia")
    assert (
        "Not applied: benign ethnic neutropenia (Duffy-null associated neutrophil count), "
        "documented (Condition/ben-provisional-cond: verificationStatus provisional) (only a "
        "confirmed Condition or an active Flag changes the thresholds)." in detail
    )
    assert "Not applied" not in _detail(result, "ben-confirmed", "neutropenia")


# -- the command ------------------------------------------------------------------------------------


def test_evaluate_names_every_problem_and_still_writes_the_findings() -> None:
    done = fhir_leuko("evaluate", str(HERE), "--as-of", AS_OF.isoformat())
    assert done.returncode == 1
    assert done.stdout.count("\n") == sum(len(f) for f in FINDINGS.values())
    problem_lines = [line for line in done.stderr.splitlines() if line.startswith("problem: ")]
    assert len(problem_lines) == sum(len(p) for p in PROBLEMS.values())
    assert (
        f"problem: {HERE / 'dropped.ndjson'}:line 1: observation/drop-lowercase: resourceType "
        "'observation' is not a FHIR type (type names are case-sensitive: 'Observation'), so it is "
        "not read; it carries LOINC 6690-2 (wbc)" in problem_lines
    )


def test_a_result_lost_after_it_was_read_is_still_named(knowledge: Knowledge) -> None:
    """The last safety net (LabResults.account) counts every mapped Observation read, those kept
    only as a result included: one that a future bug drops between reading and placing is named,
    never silently gone (a result carries its version; no dict of all versions is kept)."""
    from fhir_leuko.core.normalise import Normaliser

    lines = (DATA / "units.ndjson").read_bytes().splitlines()[:2]
    normaliser = Normaliser(knowledge)
    normaliser.feed_lines(lines, "units.ndjson")
    labs = normaliser.sources.shard(None, None).labs
    assert len(labs.results) == 2 and not labs.versions
    del labs.results["Observation/unit-code-10_9_L"]  # what a bug elsewhere would do
    dataset = normaliser.run()
    assert [(p.resource, p.reason) for p in dataset.problems] == [
        ("1 lab Observation(s)", "read but neither used nor reported (please report)")
    ]
    assert [r.key for r in dataset.patients["Patient/unit-code-10_3_uL"].results] == [
        "Observation/unit-code-10_3_uL"
    ]
