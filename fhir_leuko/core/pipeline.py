"""The rule core end to end, without I/O: resources in, findings and DetectedIssues out.

The scheduled job, the CDS service and ``fhir-leuko evaluate`` are thin edges around these calls.
"""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .detectedissue import build_detected_issue
from .evaluate import evaluate
from .fhirjson import Sourced
from .knowledge import Knowledge
from .model import Finding, Problem
from .normalise import Dataset, normalise
from .profiles import ProfileSet

__all__ = ["Evaluation", "evaluate_dataset", "evaluate_resources"]


@dataclass
class Evaluation:
    """What one evaluation produced."""

    findings: list[Finding] = field(default_factory=list)
    issues: list[dict[str, Any]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    patients: int = 0

    def summary(self) -> Counter[tuple[str, str]]:
        """Findings by (kind, severity)."""
        return Counter((f.kind.value, f.severity) for f in self.findings)


def evaluate_dataset(dataset: Dataset, profiles: ProfileSet, *, as_of: datetime) -> Evaluation:
    """Evaluate every patient of a normalised dataset and build their DetectedIssues."""
    out = Evaluation(problems=list(dataset.problems), counts=Counter(dataset.counts))
    # A large dataset is millions of long-lived objects: with the cyclic collector on, every
    # collection triggered while evaluating would rescan all of them (see normalise()).
    collecting = gc.isenabled()
    gc.disable()
    try:
        for key in sorted(dataset.patients):
            record = dataset.patients[key]
            out.patients += 1
            for finding in evaluate(record, profiles, as_of=as_of):
                out.findings.append(finding)
                out.issues.append(build_detected_issue(finding, identified=as_of))
    finally:
        if collecting:
            gc.enable()
    return out


def evaluate_resources(
    items: Iterable[Sourced | Problem],
    knowledge: Knowledge,
    profiles: ProfileSet,
    *,
    as_of: datetime,
) -> Evaluation:
    """Normalise resources and evaluate them (``items`` as :func:`reader.read_paths` yields)."""
    return evaluate_dataset(normalise(items, knowledge), profiles, as_of=as_of)
