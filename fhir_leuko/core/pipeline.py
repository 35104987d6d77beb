"""The rule core end to end, without I/O: resources in, findings and DetectedIssues out.

The scheduled job, the CDS service and ``fhir-leuko evaluate`` are thin edges around these calls.
"""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from .decision import Decision, Silence, latest_result_time, silence_of
from .detectedissue import build_detected_issue
from .evaluate import evaluate, is_deceased
from .fhirjson import Sourced
from .knowledge import Knowledge
from .model import Finding, PatientRecord, Problem
from .normalise import Dataset, normalise
from .profiles import ProfileSet

__all__ = [
    "LATEST",
    "AsOf",
    "Evaluation",
    "as_of_for",
    "evaluate_dataset",
    "evaluate_resources",
    "trace_patient",
]

LATEST: Literal["latest"] = "latest"
AsOf = datetime | Literal["latest"]
"""An instant, or ``"latest"``: each patient as of their own latest white-cell result."""


def as_of_for(record: PatientRecord, as_of: AsOf) -> datetime | None:
    """The instant a patient is evaluated as of (``None``: ``latest`` and no result at all)."""
    if isinstance(as_of, datetime):
        return as_of
    return latest_result_time(record)


def trace_patient(
    record: PatientRecord, profiles: ProfileSet, *, as_of: AsOf
) -> tuple[datetime | None, list[Finding], list[Decision]]:
    """One patient's findings with the evaluator's decisions (:mod:`.decision`), as evaluated."""
    when = as_of_for(record, as_of)
    decisions: list[Decision] = []
    if when is None:
        return None, [], decisions
    return when, evaluate(record, profiles, as_of=when, trace=decisions), decisions


@dataclass
class Evaluation:
    """What one evaluation produced."""

    findings: list[Finding] = field(default_factory=list)
    issues: list[dict[str, Any]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    patients: int = 0
    as_of: AsOf | None = None
    as_of_by_patient: dict[str, datetime] = field(default_factory=dict)
    """With ``as_of="latest"``: the instant each evaluated patient was evaluated as of."""
    silence: Silence | None = None
    """When nothing was found: why, in numbers (:func:`.decision.silence_of`)."""

    def summary(self) -> Counter[tuple[str, str]]:
        """Findings by (kind, severity)."""
        return Counter((f.kind.value, f.severity) for f in self.findings)


def evaluate_dataset(dataset: Dataset, profiles: ProfileSet, *, as_of: AsOf) -> Evaluation:
    """Evaluate every patient of a normalised dataset and build their DetectedIssues.

    ``as_of="latest"`` evaluates each patient as of their own latest white-cell result (what a
    historical or research export needs). When nothing is found, :attr:`Evaluation.silence` says
    why (the decisions are traced again then, only then).
    """
    out = Evaluation(problems=list(dataset.problems), counts=Counter(dataset.counts), as_of=as_of)
    latest = not isinstance(as_of, datetime)
    # A large dataset is millions of long-lived objects: with the cyclic collector on, every
    # collection triggered while evaluating would rescan all of them (see normalise()).
    collecting = gc.isenabled()
    gc.disable()
    try:
        for key in sorted(dataset.patients):
            record = dataset.patients[key]
            out.patients += 1
            when = as_of if isinstance(as_of, datetime) else latest_result_time(record)
            if when is None:
                continue
            if latest:
                out.as_of_by_patient[key] = when
            if is_deceased(record, when):
                # No alert for a deceased patient; counted, so that it is never silent.
                out.counts["patients:deceased"] += 1
                continue
            for finding in evaluate(record, profiles, as_of=when):
                out.findings.append(finding)
                out.issues.append(build_detected_issue(finding, identified=when))
        if not out.findings:
            out.silence = silence_of(
                (
                    (record, trace_patient(record, profiles, as_of=as_of)[2])
                    for record in dataset.patients.values()
                ),
                as_of if isinstance(as_of, datetime) else None,
            )
    finally:
        if collecting:
            gc.enable()
    return out


def evaluate_resources(
    items: Iterable[Sourced | Problem],
    knowledge: Knowledge,
    profiles: ProfileSet,
    *,
    as_of: AsOf,
) -> Evaluation:
    """Normalise resources and evaluate them (``items`` as :func:`reader.read_paths` yields)."""
    return evaluate_dataset(normalise(items, knowledge), profiles, as_of=as_of)
