"""The shipped profiles and knowledge files, tested like code.

They are read here with tomllib directly (not only through fhir-leuko's loader), so a loader bug
cannot hide a data bug: every code and number has a source, codes are well formed, band edges are
CTCAE v5.0 exactly, SNOMED CT codes are only those verified in clinical.md §3.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from fhir_leuko.core.knowledge import Knowledge
from fhir_leuko.core.model import Analyte
from fhir_leuko.core.profiles import ProfileSet
from fhir_leuko.files.documents import shipped_profiles_dir, validate_profile_dir

from .conftest import REPO

PROFILES = REPO / "profiles"
KNOWLEDGE = PROFILES / "knowledge"
PROFILE_FILES = sorted(PROFILES.glob("*.toml"))
SEMVER = re.compile(r"^\d+\.\d+\.\d+$")

# SNOMED CT codes verified in ../shared/knowledge/clinical.md §3 (the only ones profiles may use).
VERIFIED_SNOMED = {
    "84828003",  # Leukopenia
    "165517008",  # Neutropenia
    "303011007",  # Neutropenic disorder
    "17182001",  # Agranulocytosis
    "267538002",  # Agranulocytopenic disorder
    "47318007",  # Drug-induced neutropenia
    "56918001",  # Dose-related drug-induced neutropenia
    "3902000",  # Non dose-related drug-induced neutropenia
    "425229001",  # Chemotherapy-induced neutropenia
    "32092008",  # Toxic neutropenia
    "409089005",  # Febrile neutropenia
    "234423001",  # Chronic benign neutropenia
    "127034005",  # Pancytopenia
    "86406008",  # HIV infection
    "55464009",  # Systemic lupus erythematosus
    "306058006",  # Aplastic anemia
    "109995007",  # Myelodysplastic syndrome
}


def _toml(path: Path) -> dict[str, Any]:
    with path.open("rb") as stream:
        return tomllib.load(stream)


def _snomed_codes(value: Any) -> list[str]:
    """Every SNOMED CT code a profile document uses (evidence, terms[].snomed)."""
    found: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if key in ("evidence", "snomed") and isinstance(item, dict) and "code" in item:
                found.append(str(item["code"]))
            found.extend(_snomed_codes(item))
    elif isinstance(value, list):
        for item in value:
            found.extend(_snomed_codes(item))
    return found


def loinc_check_digit_ok(code: str) -> bool:
    """LOINC's mod-10 check digit (LOINC Users' Guide, "Calculating mod 10 check digits")."""
    body, check = code.split("-")
    total = 0
    for position, digit in enumerate(int(c) for c in reversed(body)):
        if position % 2 == 0:
            doubled = digit * 2
            total += doubled // 10 + doubled % 10
        else:
            total += digit
    return (10 - total % 10) % 10 == int(check)


# -- profiles ----------------------------------------------------------------------------------


def test_every_shipped_profile_loads(profiles: ProfileSet) -> None:
    assert [p.id for p in profiles.profiles] == ["clozapine", "pediatric", "adult-default"]
    shipped, errors = validate_profile_dir(shipped_profiles_dir(), profiles.knowledge)
    assert errors == []
    assert sorted(p.id for p in shipped) == ["adult-default", "clozapine", "pediatric"]


@pytest.mark.parametrize("path", PROFILE_FILES, ids=[p.stem for p in PROFILE_FILES])
def test_profile_file_basics(path: Path) -> None:
    doc = _toml(path)
    assert doc["id"] == path.stem
    assert SEMVER.match(doc["version"])
    assert doc["url"] == f"https://fhir-leuko.github.io/fhir/profiles/{doc['id']}"
    for key in ("title", "when", "then"):
        assert len(doc[key]) > 20
    changelog = (REPO / "CHANGELOG.md").read_text(encoding="utf-8")
    assert f"`{doc['id']}` {doc['version']}" in changelog, "a profile version must be in CHANGELOG.md"


@pytest.mark.parametrize("path", PROFILE_FILES, ids=[p.stem for p in PROFILE_FILES])
def test_every_snomed_code_is_verified(path: Path) -> None:
    codes = _snomed_codes(_toml(path))
    assert set(codes) <= VERIFIED_SNOMED
    if path.stem in ("adult-default", "clozapine"):
        assert codes  # the neutropenia rules carry their codes


def test_verified_snomed_codes_match_clinical_md(shared_fixtures: Path) -> None:
    clinical = shared_fixtures.parent / "knowledge" / "clinical.md"
    if not clinical.is_file():
        pytest.skip(f"{clinical} not found")
    text = clinical.read_text(encoding="utf-8")
    section = text[text.index("## 3. Conditions") : text.index("## 4. Thresholds")]
    in_table = set(re.findall(r"^\|[^|]+\| (\d{6,18}) \|", section, re.MULTILINE))
    assert in_table == VERIFIED_SNOMED


def test_every_number_in_a_profile_has_a_source(profiles: ProfileSet) -> None:
    for profile in profiles.profiles:
        assert len(profile.settings.source) > 10, profile.id
        for name, grading in profile.gradings.items():
            assert len(grading.source) > 10, (profile.id, name)
        for rule in profile.rules:
            assert len(rule.lower_limit.source) > 10, (profile.id, rule.finding)
            for band in rule.lower_limit.by_age:
                assert len(band.source) > 10, (profile.id, rule.finding, band.from_age)
            for term in rule.terms:
                assert len(term.source) > 10
            if rule.evidence is not None:
                assert "clinical.md §3" in rule.evidence.source
        for item in profile.monitoring:
            assert len(item.source) > 10


@pytest.mark.parametrize(
    ("grading", "edges"),
    [
        ("ctcae-v5-wbc", [3.0, 2.0, 1.0]),
        ("ctcae-v5-neutrophils", [1.5, 1.0, 0.5]),
        ("ctcae-v5-lymphocytes", [0.8, 0.5, 0.2]),
    ],
)
def test_ctcae_bands_are_clinical_md_4_1(grading: str, edges: list[float]) -> None:
    bands = _toml(PROFILES / "adult-default.toml")["gradings"][grading]["bands"]
    assert [b["below"] for b in bands] == ["lower-limit", *edges]
    assert [b["grade"] for b in bands] == ["1", "2", "3", "4"]
    assert [b["severity"] for b in bands] == ["low", "moderate", "high", "high"]
    assert all(b["label"] == f"CTCAE v5.0 grade {b['grade']}" for b in bands)


def test_bands_strictly_decrease_in_every_profile(profiles: ProfileSet) -> None:
    for profile in profiles.profiles:
        for name, grading in profile.gradings.items():
            assert grading.bands[0].below == "lower-limit", (profile.id, name)
            edges = [b.below for b in grading.bands[1:]]
            assert all(isinstance(e, float) for e in edges)
            assert edges == sorted(edges, reverse=True) and len(set(edges)) == len(edges)


def test_clozapine_tables_are_clinical_md_4_2() -> None:
    doc = _toml(PROFILES / "clozapine.toml")
    general = doc["gradings"]["clozapine-general"]["bands"]
    ben = doc["gradings"]["clozapine-ben"]["bands"]
    assert [(b["grade"], b["below"], b["severity"]) for b in general] == [
        ("mild", "lower-limit", "moderate"),
        ("moderate", 1.0, "high"),
        ("severe", 0.5, "high"),
    ]
    assert [(b["grade"], b["below"]) for b in ben] == [("BEN neutropenia", "lower-limit"), ("BEN severe neutropenia", 0.5)]
    limits = {tuple(r.get("when_flags", [])): r["lower_limit"]["value"] for r in doc["rules"]}
    assert limits == {("ben",): 1.0, (): 1.5}
    assert doc["rules"][0]["when_flags"] == ["ben"]  # the specific rule first
    assert all(b["recommendation"] for b in [*general, *ben])
    assert doc["applies"]["drugs"] == ["clozapine"]


def test_pediatric_wbc_age_bands_cover_0_to_18_years() -> None:
    doc = _toml(PROFILES / "pediatric.toml")
    assert doc["extends"] == "adult-default"
    assert doc["applies"] == {"max_age": "18y", "age_unknown": False}
    wbc = next(r for r in doc["rules"] if r["finding"] == "leukopenia")["lower_limit"]["by_age"]
    assert [(b["from"], b["to"], b["value"]) for b in wbc] == [
        ("0d", "7d", 9.0),
        ("7d", "14d", 5.0),
        ("14d", "1y", 5.0),
        ("1y", "4y", 4.0),
        ("4y", "18y", 4.0),
    ]


# -- knowledge files ---------------------------------------------------------------------------


def test_knowledge_versions_are_semver_and_changes_are_logged(knowledge: Knowledge) -> None:
    changelog = (REPO / "CHANGELOG.md").read_text(encoding="utf-8")
    assert set(knowledge.versions) == {"loinc", "units", "drugs", "conditions"}
    for name, version in knowledge.versions.items():
        assert SEMVER.match(version), name
        if version != "1.0.0":
            assert f"`{name}.toml` {version}" in changelog


def test_every_loinc_code_has_source_confidence_and_a_valid_check_digit() -> None:
    codes = _toml(KNOWLEDGE / "loinc.toml")["code"]
    assert len(codes) >= 40
    seen = set()
    for entry in codes:
        code = entry["code"]
        assert re.fullmatch(r"\d{3,5}-\d", code), code
        assert loinc_check_digit_ok(code), code
        assert entry["confidence"] in ("A", "B", "C"), code
        assert "clinical.md §1" in entry["source"], code
        assert entry["display"], code
        assert code not in seen
        seen.add(code)
    # never mapped (clinical.md §1): estimate, buffy coat, granulocytes (not neutrophils)
    assert not seen & {"49498-9", "92635-2", "30394-1", "30395-8", "19023-1"}


def test_every_analyte_has_count_and_fraction_codes() -> None:
    codes = _toml(KNOWLEDGE / "loinc.toml")["code"]
    for analyte in Analyte:
        measures = {e["measure"] for e in codes if e["analyte"] == analyte.value}
        assert "count" in measures, analyte
        if analyte is not Analyte.WBC:
            assert "fraction" in measures, analyte
    primary = {e["code"]: e for e in codes}
    for code, analyte, measure in [
        ("6690-2", "wbc", "count"), ("751-8", "neutrophils", "count"), ("770-8", "neutrophils", "fraction"),
        ("26505-8", "neutrophils", "fraction"), ("26508-2", "neutrophils", "fraction"),
        ("71676-1", "neutrophils", "fraction"), ("731-0", "lymphocytes", "count"), ("736-9", "lymphocytes", "fraction"),
        ("742-7", "monocytes", "count"), ("5905-5", "monocytes", "fraction"), ("711-2", "eosinophils", "count"),
        ("713-8", "eosinophils", "fraction"), ("704-7", "basophils", "count"), ("706-2", "basophils", "fraction"),
    ]:
        assert (primary[code]["analyte"], primary[code]["measure"]) == (analyte, measure), code
    assert primary["26505-8"]["form"] == "segmented" and primary["26508-2"]["form"] == "band"
    assert primary["71676-1"]["unitless"] == "decimal"


def test_every_drug_and_group_has_a_source() -> None:
    doc = _toml(KNOWLEDGE / "drugs.toml")
    for group in doc["group"]:
        assert len(group["source"]) > 10, group["id"]
        assert group["effects"], group["id"]
        for prefix in group.get("atc_prefixes", []):
            assert re.fullmatch(r"[A-Z]\d\d[A-Z]{0,2}", prefix), prefix
    for drug in doc["drug"]:
        assert len(drug["source"]) > 10, drug["id"]
        if drug.get("brands"):
            assert len(drug.get("brand_source", "")) > 10, drug["id"]
        for code in drug.get("rxnorm", []):
            assert code.isdigit(), (drug["id"], code)
        for code in drug.get("atc", []):
            assert re.fullmatch(r"[A-Z]\d\d[A-Z]{2}\d\d", code), (drug["id"], code)


@pytest.mark.parametrize(
    "name",
    [
        "clozapine", "bupropion", "minocycline", "valproate", "divalproex", "lamotrigine", "metronidazole",
        "sirolimus", "mycophenolate", "tacrolimus", "ciclosporin", "leflunomide", "etanercept", "infliximab",
        "adalimumab", "interferon beta-1a", "interferon beta-1b", "penicillin", "docetaxel", "oxaliplatin",
        "cisplatin", "paclitaxel", "cyclophosphamide", "methotrexate",
    ],
)
def test_every_seed_drug_is_known(knowledge: Knowledge, name: str) -> None:
    """The drugs of ../shared/seeds (issue 2 §4) are matched by name, on word boundaries."""
    hits = knowledge.match_drugs([], [f"{name.capitalize()} 10 MG Oral Tablet"])
    assert hits, name
    assert not knowledge.match_drugs([], [f"pre{name}x"])  # word boundaries


def test_conditions_use_verified_snomed_codes_and_name_their_sources() -> None:
    doc = _toml(KNOWLEDGE / "conditions.toml")
    for cause in doc["condition"]:
        assert set(cause.get("snomed", [])) <= VERIFIED_SNOMED, cause["id"]
        assert len(cause["source"]) > 5
    (ben,) = doc["flag"]
    assert ben["id"] == "ben"
    assert {(c["system"], c["code"]) for c in ben["codes"]} == {
        ("https://fhir-leuko.github.io/fhir/CodeSystem/patient-flag", "ben"),
        ("https://fhir-leuko.github.io/fhir/CodeSystem/patient-flag", "duffy-null"),
    }


def test_units_have_factors_and_plausibility_for_every_analyte(knowledge: Knowledge) -> None:
    doc = _toml(KNOWLEDGE / "units.toml")
    assert doc["count"]["10*3/uL"] == doc["count"]["10*9/L"] == 1.0
    assert doc["count"]["/uL"] == doc["count"]["cells/uL"] == 0.001
    assert doc["fraction"]["%"] == 0.01
    for analyte in Analyte:
        limits = doc["plausible"][analyte.value]
        assert 0 < limits["min_nonzero"] <= 0.001 < 1 < limits["max"]
    # a pediatric default lower limit must never be below what plausibility lets through
    assert knowledge.plausible[Analyte.BASOPHILS].min_nonzero < 0.007
