"""Patients as the job names them: the ``Patient/<id>`` key of a reference, a pseudonym for logs.

The job keys everything it does by ``Patient/<id>`` (a server's references may be relative, absolute
or versioned); logs and reports name a patient only by a stable, non-reversible pseudonym.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

__all__ = ["as_patient", "patient_key", "pseudonym", "scrub"]


def pseudonym(server: str, patient: str) -> str:
    """A stable, non-reversible name for a patient in logs (the state file has the reference)."""
    return "pt-" + hashlib.sha256(f"{server}|{patient}".encode()).hexdigest()[:10]


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
    """A server's message without the patients' references (logs carry no patient data)."""
    for patient in patients:
        alias = pseudonym(server, patient)
        text = text.replace(patient, alias)
        pid = patient.split("/", 1)[-1]
        text = text.replace(pid, alias) if len(pid) >= 6 else text
    return text
