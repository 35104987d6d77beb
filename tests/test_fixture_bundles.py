"""The real HL7 R4 example Bundles, end to end."""

from __future__ import annotations

from pathlib import Path

from fhir_leuko.knowledge import Knowledge
from fhir_leuko.pipeline import evaluate_resources
from fhir_leuko.profiles import ProfileSet
from fhir_leuko.reader import read_paths

from .conftest import utc


def test_bundle_101_isolated_neutropenia_with_normal_wbc(
    shared_fixtures: Path, knowledge: Knowledge, profiles: ProfileSet
) -> None:
    """HL7 Bundle 101: ANC 0.9 10*9/L (LL, range 2.0-7.5) with WBC 4.6 (normal)."""
    path = shared_fixtures / "hl7-fhir-r4-examples" / "Bundle-101.json"
    result = evaluate_resources(read_paths([path]), knowledge, profiles, as_of=utc(2011, 3, 5))
    kinds = {f.kind.value: f for f in result.findings}
    assert "leukopenia" not in kinds
    neutropenia = kinds["neutropenia"]
    assert neutropenia.result.value == 0.9
    assert neutropenia.result.key == "Observation/r9"
    assert neutropenia.lower_limit.value == 2.0
    assert neutropenia.grade == "3"
    assert neutropenia.severity == "high"
    # The Observations have no time of their own: it comes from DiagnosticReport/101.
    assert neutropenia.result.effective_text == "2011-03-04T08:30:00+11:00"
    assert result.problems == []
