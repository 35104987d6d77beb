"""Property tests (hypothesis) of unit conversion, band edges and comparators.

Each example is the hand-written Observation tests/data/property-observation.json with its code,
value, unit and comparator replaced, run through the real reader-free pipeline (normalise +
evaluate) under the shipped profiles.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from fhir_leuko.core.fhirjson import Origin, convert_resource
from fhir_leuko.core.knowledge import Knowledge
from fhir_leuko.core.pipeline import evaluate_resources
from fhir_leuko.core.profiles import ProfileSet
from fhir_leuko.files.documents import load_knowledge, load_profiles

from .conftest import AS_OF, DATA

TEMPLATE = json.loads((DATA / "property-observation.json").read_text())
KNOWLEDGE: Knowledge = load_knowledge()
PROFILES: ProfileSet = load_profiles(KNOWLEDGE)
CODES = {"6690-2": "leukopenia", "751-8": "neutropenia", "731-0": "lymphopenia"}
THOUSANDS = ["10*3/uL", "10*9/L", "10*3/mm3", "K/uL", "G/L", "/nL"]  # factor 1
SINGLES = ["/uL", "/mm3", "cells/uL", "{cells}/uL", "{cells}/mm3", "10*6/L"]  # factor 0.001

Outcome = tuple[Any, ...] | None


def grade_of(
    code: str,
    value: float,
    unit: str,
    comparator: str | None = None,
    low: float | None = None,
) -> Outcome:
    """(grade index, grade, severity, term, value) of the one finding, None without one, or
    ("problem", reason)."""
    resource = copy.deepcopy(TEMPLATE)
    resource["code"]["coding"][0]["code"] = code
    quantity = {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit}
    if comparator:
        quantity["comparator"] = comparator
    resource["valueQuantity"] = quantity
    if low is not None:
        resource["referenceRange"] = [{"low": {"value": low, "unit": "10*3/uL", "code": "10*3/uL"}}]
    decoded = convert_resource(resource)
    assert decoded is not None
    result = evaluate_resources([(decoded, Origin("property"))], KNOWLEDGE, PROFILES, as_of=AS_OF)
    if result.problems:
        return ("problem", result.problems[0].reason.split(" ")[0])
    if not result.findings:
        return None
    (finding,) = result.findings
    assert finding.kind.value == CODES[code]
    profile = next(p for p in PROFILES.profiles if p.id == finding.profile_id)
    rule = next(r for r in profile.rules if r.finding is finding.kind)
    bands = [b.grade for b in profile.gradings[rule.grading].bands]
    return (bands.index(finding.grade), finding.grade, finding.severity, finding.term, finding.result.value)


def rank(outcome: Outcome) -> int:
    """How deep a finding is: -1 for none, else the band index (0 = mildest)."""
    assert outcome is None or outcome[0] != "problem", outcome
    return -1 if outcome is None else int(outcome[0])


codes = st.sampled_from(sorted(CODES))
# Every band edge and wording edge of the shipped profiles, in cells/uL: drawn often on purpose.
EDGES = [100, 200, 500, 800, 1000, 1500, 2000, 3000, 4000]
counts = st.one_of(st.sampled_from(EDGES), st.integers(min_value=20, max_value=6_000))
cells = st.integers(min_value=10, max_value=30_000)  # cells/uL, as labs report them


@settings(max_examples=150, deadline=None)
@given(code=codes, n=cells, thousands=st.sampled_from(THOUSANDS), singles=st.sampled_from(SINGLES))
def test_cells_per_ul_and_thousands_grade_identically(
    code: str, n: int, thousands: str, singles: str
) -> None:
    """n '/uL' and n/1000 '10*3/uL' (and every synonym of either) are the same count."""
    assert grade_of(code, float(n), singles) == grade_of(code, n / 1000, thousands)


@settings(max_examples=150, deadline=None)
@given(
    code=codes,
    a=counts,
    b=counts,
    low=st.one_of(st.none(), st.integers(min_value=100, max_value=5_000)),
)
def test_a_lower_value_never_gets_a_milder_grade(code: str, a: int, b: int, low: int | None) -> None:
    """Monotone grading: with the same lower limit, a lower count is at least as deep a grade."""
    lo, hi = sorted((a, b))
    limit = low / 1000 if low is not None else None
    assert rank(grade_of(code, lo / 1000, "10*3/uL", low=limit)) >= rank(
        grade_of(code, hi / 1000, "10*3/uL", low=limit)
    )


@settings(max_examples=150, deadline=None)
@given(code=codes, n=counts)
def test_less_than_is_graded_below_its_value(code: str, n: int) -> None:
    """"< v" grades exactly as a value a hair below v; "<= v" exactly as v itself."""
    v = n / 1000
    below = grade_of(code, round(v - 0.0001, 4), "10*3/uL")
    less = grade_of(code, v, "10*3/uL", "<")
    assert (less is None) == (below is None)
    if less is not None and below is not None:
        assert less[:4] == below[:4]  # same band, severity and wording (the value shown differs)
    at_most = grade_of(code, v, "10*3/uL", "<=")
    plain = grade_of(code, v, "10*3/uL")
    assert (at_most and at_most[:4]) == (plain and plain[:4])


@settings(max_examples=100, deadline=None)
@given(code=codes, n=st.integers(min_value=0, max_value=6_000), comparator=st.sampled_from([">", ">="]))
def test_a_lower_bound_is_never_low(code: str, n: int, comparator: str) -> None:
    """"> v" and ">= v" say only that the count is at least v: never a finding."""
    assert grade_of(code, n / 1000, "10*3/uL", comparator) is None
