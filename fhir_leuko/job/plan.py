"""What to write for one patient: the plan that makes the server say what the evaluation says.

Identity = the deterministic identifier of patient + finding kind (one DetectedIssue per patient and
finding). A new finding is a create; a changed finding updates the existing resource (``If-Match``
on its version, status ``amended``), keeping what people recorded on it; a finding that no longer
holds because a newer count is not low is *resolved*: the resource is kept with a ``mitigation``
"count recovered" and a first detail line saying so. Nothing else changes: an unchanged finding,
a DetectedIssue a person closed (until the finding itself changes), an old finding with no count in
the lookback (it ages out; no newer count says it recovered), and everything of a deceased patient
(``Patient.deceased[x]``): no new alert, and an open DetectedIssue is never amended or resolved
after a death: the record stays as it was when the patient died (issue 13 §5).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

import orjson

from ..core.detectedissue import (
    IDENTIFIER_SYSTEM,
    PROJECT_BASE,
    build_detected_issue,
    issue_id,
)
from ..core.evaluate import is_deceased, latest_result
from ..core.explain import UNIT, format_count, reference_of
from ..core.fhir_models import check_resource
from ..core.fhirtime import format_instant
from ..core.model import FINDING_ANALYTE, Finding, FindingKind, PatientRecord

if TYPE_CHECKING:
    from .runner import Job

__all__ = [
    "MITIGATION_SYSTEM",
    "RECOVERED_CODE",
    "Planner",
    "Write",
    "content",
    "for_update",
    "is_resolved",
    "version_of",
]

MITIGATION_SYSTEM = f"{PROJECT_BASE}/CodeSystem/mitigation"
"""fhir-leuko's code for the mitigation that marks a resolved finding."""
RECOVERED_CODE = "count-recovered"

# Elements compared to decide whether a DetectedIssue on the server says what a new evaluation
# says. Not compared: id, meta, text, status, identifiedDateTime (the time of each evaluation),
# author/contained (fhir-leuko's version), mitigation (handled as "resolved").
_COMPARED = ("code", "severity", "patient", "implicated", "evidence", "detail", "reference")
_HUMAN_CLOSED = frozenset({"entered-in-error", "cancelled"})
_DEFAULT_STATUSES = ("final", "amended", "corrected")

Action = Literal["create", "update", "resolve"]


@dataclass
class Write:
    patient: str
    kind: FindingKind
    action: Action
    resource: dict[str, Any]
    if_match: str | None = None

    @property
    def identifier(self) -> str:
        return issue_id(self.patient, self.kind)


def content(issue: dict[str, Any]) -> bytes:
    """What two versions of a DetectedIssue are compared by (see ``_COMPARED``)."""
    return orjson.dumps({k: issue.get(k) for k in _COMPARED}, option=orjson.OPT_SORT_KEYS)


def is_resolved(issue: dict[str, Any]) -> bool:
    """Whether fhir-leuko marked the DetectedIssue resolved (its "count recovered" mitigation)."""
    for mitigation in issue.get("mitigation") or []:
        action = mitigation.get("action") if isinstance(mitigation, dict) else None
        for coding in (action or {}).get("coding") or []:
            if coding.get("system") == MITIGATION_SYSTEM and coding.get("code") == RECOVERED_CODE:
                return True
    return False


def version_of(issue: dict[str, Any]) -> str | None:
    """``meta.versionId``, for ``If-Match``."""
    meta = issue.get("meta")
    version = meta.get("versionId") if isinstance(meta, dict) else None
    return version if isinstance(version, str) else None


def for_update(body: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """``body`` as an update of ``current``: its id, people's mitigations kept, ``amended``."""
    out = {k: v for k, v in body.items() if k not in ("meta", "text")}
    out["id"] = current["id"]
    # What people recorded on the DetectedIssue (a pharmacist's mitigation) is kept.
    theirs = [m for m in current.get("mitigation") or [] if not is_resolved({"mitigation": [m]})]
    ours = [m for m in out.get("mitigation") or [] if is_resolved({"mitigation": [m]})]
    if theirs or ours:
        out["mitigation"] = theirs + ours
    else:
        out.pop("mitigation", None)
    # R4 ObservationStatus "amended": modified after being final (new information).
    out["status"] = "amended"
    return out


class Planner:
    """The writes that make one patient's DetectedIssues on the server match their findings."""

    def __init__(self, job: Job, actions: Counter[str], as_of: datetime) -> None:
        self.profiles = job.profiles
        self.lookback = job.lookback
        self.write_mode = job.options.write_mode
        self.actions = actions
        self.as_of = as_of

    def plan(
        self,
        patient: str,
        record: PatientRecord,
        findings: list[Finding],
        existing: dict[str, list[dict[str, Any]]],
    ) -> list[Write]:
        if is_deceased(record, self.as_of):
            self.actions["deceased"] += 1
            return []
        if not findings and not existing:
            return []  # most patients: nothing found, nothing of ours (no ids to derive: 20 us)
        by_kind = {f.kind: f for f in findings}
        writes: list[Write] = []
        for kind in FindingKind:
            ident = issue_id(patient, kind)
            found = existing.get(ident, [])
            if len(found) > 1:
                raise ValueError(
                    f"{len(found)} DetectedIssues carry identifier {IDENTIFIER_SYSTEM}|{ident} "
                    "(merge them by hand; fhir-leuko never picks one)"
                )
            current = found[0] if found else None
            finding = by_kind.get(kind)
            if finding is not None:
                new = build_detected_issue(finding, identified=self.as_of)
                if current is None:
                    if self.write_mode == "put":
                        writes.append(Write(patient, kind, "create", new))
                    else:
                        body = {k: v for k, v in new.items() if k != "id"}
                        writes.append(Write(patient, kind, "create", body))
                    continue
                if content(current) == content(new) and not is_resolved(current):
                    # Nothing new. (A DetectedIssue a person closed, entered-in-error or
                    # cancelled, also stays closed until the finding itself changes.)
                    self.actions["unchanged"] += 1
                    continue
                writes.append(
                    Write(patient, kind, "update", for_update(new, current), version_of(current))
                )
                continue
            if current is None or is_resolved(current) or current.get("status") in _HUMAN_CLOSED:
                continue
            resolved = self.resolution(record, kind, current)
            if resolved is None:
                # No count in the lookback at all: an old finding ages out silently. It is NOT
                # called recovered (no newer count says so); the resource stays as it was.
                self.actions["unchanged"] += 1
                continue
            writes.append(Write(patient, kind, "resolve", resolved, version_of(current)))
        return writes

    def resolution(
        self, record: PatientRecord, kind: FindingKind, current: dict[str, Any]
    ) -> dict[str, Any] | None:
        """The resolved version of ``current`` when a newer valid count exists and is not low."""
        url = str(current.get("reference") or "").split("|", 1)[0]
        profile = next((p for p in self.profiles.profiles if p.url == url), None)
        lookback = timedelta(days=profile.settings.lookback_days) if profile else self.lookback
        statuses = tuple(profile.settings.statuses) if profile else _DEFAULT_STATUSES
        result = latest_result(record, kind, as_of=self.as_of, lookback=lookback, statuses=statuses)
        if result is None:
            return None
        analyte = FINDING_ANALYTE[kind]
        comparator = {"<": "< ", "<=": "≤ ", ">": "> ", ">=": "≥ "}.get(result.comparator or "", "")
        sources = ", ".join(reference_of(k) for k in result.evidence)
        day = self.as_of.date().isoformat()
        sentence = (
            f"Resolved on {day}: the latest {analyte.label}, {comparator}"
            f"{format_count(result.value)} {UNIT} (reported {result.reported}) on "
            f"{result.effective_text} [{sources}, status {result.status}], is no longer low. "
            "This record of the earlier finding is kept; its text follows."
        )
        body = for_update(current, current)
        previous = str(current.get("detail") or "")
        body["detail"] = f"{sentence}\n{previous}" if previous else sentence
        mitigations = list(body.get("mitigation") or [])
        mitigations.append(
            {
                "action": {
                    "coding": [
                        {
                            "system": MITIGATION_SYSTEM,
                            "code": RECOVERED_CODE,
                            "display": "Count recovered",
                        }
                    ],
                    "text": sentence.split(" This record")[0],
                },
                "date": format_instant(self.as_of),
            }
        )
        body["mitigation"] = mitigations
        return check_resource(body)
