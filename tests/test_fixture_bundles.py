"""The real HL7 R4 and US Core examples in ../shared/fixtures, end to end (skipped without them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fhir_leuko.core.knowledge import Knowledge
from fhir_leuko.core.model import Finding
from fhir_leuko.core.pipeline import Evaluation
from fhir_leuko.core.profiles import ProfileSet

from .conftest import run_paths, utc


def _hl7(shared: Path, name: str) -> Path:
    return shared / "hl7-fhir-r4-examples" / name


@pytest.fixture(scope="module")
def bundle_101(shared_fixtures: Path, knowledge: Knowledge, profiles: ProfileSet) -> Evaluation:
    return run_paths([_hl7(shared_fixtures, "Bundle-101.json")], knowledge, profiles, utc(2011, 3, 5))


@pytest.fixture(scope="module")
def bundle_ghp(shared_fixtures: Path, knowledge: Knowledge, profiles: ProfileSet) -> Evaluation:
    return run_paths([_hl7(shared_fixtures, "Bundle-ghp.json")], knowledge, profiles, utc(2015, 8, 17))


def _essence(finding: Finding) -> tuple[object, ...]:
    return (
        finding.patient,
        finding.kind.value,
        finding.grade,
        finding.severity,
        finding.result.value,
        finding.result.key,
        finding.lower_limit.value,
        finding.evidence_codes,
    )


def test_bundle_101_isolated_neutropenia_with_normal_wbc(bundle_101: Evaluation) -> None:
    """HL7 Bundle 101: ANC 0.9 10*9/L (LL, range 2.0-7.5) with WBC 4.6 (normal)."""
    kinds = {f.kind.value: f for f in bundle_101.findings}
    assert sorted(kinds) == ["lymphopenia", "neutropenia"]  # no leukopenia: WBC 4.6 >= 4.0
    neutropenia = kinds["neutropenia"]
    assert neutropenia.patient == "Patient/pat2"
    assert neutropenia.result.value == 0.9
    assert neutropenia.result.key == "Observation/r9"
    assert neutropenia.lower_limit.value == 2.0
    assert (neutropenia.grade, neutropenia.severity) == ("3", "high")
    assert neutropenia.implicated == ()
    # The Observations have no time of their own: it comes from DiagnosticReport/101.
    assert neutropenia.result.effective_text == "2011-03-04T08:30:00+11:00"
    # Lymphocytes 0.9 below the lab's 1.1: grade 1. Monocytes 0.9 (range 0.2-1.0), eosinophils and
    # basophils 0.92 (high) give nothing.
    lymphopenia = kinds["lymphopenia"]
    assert (lymphopenia.grade, lymphopenia.severity, lymphopenia.lower_limit.value) == ("1", "low", 1.1)
    assert bundle_101.problems == []


def test_bundle_101_measured_anc_beats_the_percentage(bundle_101: Evaluation) -> None:
    """r8 (770-8 20 %) x WBC 4.6 would give 0.92; the measured 751-8 (0.9) is the one used."""
    neutropenia = next(f for f in bundle_101.findings if f.kind.value == "neutropenia")
    assert not neutropenia.result.derived
    assert bundle_101.counts["results:derived"] == 0


def test_bundle_ghp_nested_has_member_gives_the_same_findings(
    bundle_101: Evaluation, bundle_ghp: Evaluation
) -> None:
    """General Health Panel: DiagnosticReport -> panel Observation p2 (58410-2) -> hasMember r1..r17."""
    assert sorted(map(_essence, bundle_ghp.findings)) == sorted(map(_essence, bundle_101.findings))
    neutropenia = next(f for f in bundle_ghp.findings if f.kind.value == "neutropenia")
    # time and subject come through the panel and the report
    assert neutropenia.result.effective_text == "2015-08-16T06:40:17Z"
    assert bundle_ghp.problems == []


def test_bundle_report_k_per_ul_leukocytosis_is_no_finding(
    shared_fixtures: Path, knowledge: Knowledge, profiles: ProfileSet
) -> None:
    """Bundle-report: WBC 26464-8 = 31.9 'K/ul' (unit text only, no UCUM code): read, high, no alert."""
    result = run_paths([_hl7(shared_fixtures, "Bundle-report.json")], knowledge, profiles, utc(2015, 1, 7))
    assert result.findings == []
    assert result.problems == []
    assert result.counts["results:used"] == 1


def test_us_core_neutrophil_percentage_alone_derives_nothing(
    shared_fixtures: Path, knowledge: Knowledge, profiles: ProfileSet
) -> None:
    """US Core neutrophils.json: 770-8 = 40 %, no WBC: no absolute count, so nothing to grade."""
    result = run_paths([shared_fixtures / "us-core" / "neutrophils.json"], knowledge, profiles, utc(2005, 7, 6))
    assert result.findings == []
    assert result.problems == []
    assert result.counts["results:used"] == 1
    assert result.counts["results:derived"] == 0


def test_us_core_directory(shared_fixtures: Path, knowledge: Knowledge, profiles: ProfileSet) -> None:
    """The whole US Core folder: WBC 10 (normal) on its specimen; the 40 % is from another
    specimen/time, so it is not combined with it."""
    result = run_paths([shared_fixtures / "us-core"], knowledge, profiles, utc(2005, 7, 6))
    assert result.findings == []
    assert result.problems == []
    assert result.counts["results:used"] == 2
    assert result.counts["results:derived"] == 0


def test_hl7_medication_examples_read_without_problems(
    shared_fixtures: Path, knowledge: Knowledge, profiles: ProfileSet
) -> None:
    """MedicationRequest/MedicationStatement examples (contained Medications, busulfan,
    capecitabine, an entered-in-error statement ...) are read without problems."""
    files = sorted((shared_fixtures / "hl7-fhir-r4-examples").glob("Medication*.json"))
    assert len(files) == 12
    result = run_paths(files, knowledge, profiles, utc(2015, 1, 1))
    assert result.problems == []
    assert result.findings == []  # no lab results in them


def _exposures(shared: Path, knowledge: Knowledge) -> dict[str, list[str]]:
    from fhir_leuko.core.normalise import normalise
    from fhir_leuko.files.reader import read_paths

    files = sorted((shared / "hl7-fhir-r4-examples").glob("Medication*.json"))
    data = normalise(read_paths(files), knowledge)
    return {
        e.key: [h.drug_id for h in e.drugs] for p in data.patients.values() for e in p.exposures
    }


def test_hl7_capecitabine_is_recognised_by_its_snomed_display(
    shared_fixtures: Path, knowledge: Knowledge
) -> None:
    exposures = _exposures(shared_fixtures, knowledge)
    assert exposures["MedicationRequest/medrx0309"] == ["capecitabine"]


def test_hl7_myleran_is_busulfan(shared_fixtures: Path, knowledge: Knowledge) -> None:
    exposures = _exposures(shared_fixtures, knowledge)
    assert "MedicationRequest/medrx0306" in exposures
