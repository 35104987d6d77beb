"""Shared fixtures. Real FHIR JSON only: the HL7/Synthea/US Core files in ../shared/fixtures (skipped
with a reason where that folder is absent) and hand-written files in tests/data."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from fhir_leuko.knowledge import Knowledge, load_knowledge
from fhir_leuko.profiles import ProfileSet, load_profiles

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
SHARED_FIXTURES = REPO.parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def knowledge() -> Knowledge:
    """The shipped knowledge files, compiled."""
    return load_knowledge()


@pytest.fixture(scope="session")
def profiles(knowledge: Knowledge) -> ProfileSet:
    """The shipped profiles."""
    return load_profiles(knowledge)


@pytest.fixture(scope="session")
def shared_fixtures() -> Path:
    """../shared/fixtures (HL7 R4 examples, Synthea, US Core, the R4 JSON schema)."""
    if not SHARED_FIXTURES.is_dir():
        pytest.skip(
            f"shared fixtures not found at {SHARED_FIXTURES} (CI has ../shared beside the checkout)"
        )
    return SHARED_FIXTURES


def utc(*args: int) -> datetime:
    """A UTC datetime, for as-of values in tests."""
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]
