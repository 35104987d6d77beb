"""Patients as the job names them: the ``Patient/<id>`` key of a reference, a pseudonym for logs.

The job keys everything it does by ``Patient/<id>`` (a server's references may be relative, absolute
or versioned); logs and reports name a patient only by a stable, non-reversible pseudonym.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..fhir.privacy import pseudonym, scrub_patients

__all__ = ["as_patient", "patient_key", "pseudonym", "scrub"]


def patient_key(reference: str | None) -> str | None:
    """``Patient/<id>`` for a Patient reference (relative, absolute, versioned); else ``None``."""
    if not reference or reference.startswith(("#", "urn:")):
        return None
    parts = reference.split("/_history/")[0].rstrip("/").split("/")
    if len(parts) >= 2 and parts[-2] == "Patient" and parts[-1]:
        return f"Patient/{parts[-1]}"
    return None


def as_patient(text: str) -> str | None:
    """The patient a ``--patient`` value names: a reference, or a bare id."""
    text = text.strip()
    if not text:
        return None
    return patient_key(text) or (f"Patient/{text}" if "/" not in text else None)


def scrub(text: str, server: str, patients: Iterable[str]) -> str:
    """A text for a report or a log line with patients as pseudonyms (the one mechanism the logs
    use too: :func:`fhir_leuko.fhir.privacy.scrub_patients`)."""
    return scrub_patients(text, server, patients)
