"""Resources fhir-leuko does not read, looked into so that nothing it needs is lost in silence.

A resource whose ``resourceType`` is no FHIR R4 type (``observation``: type names are
case-sensitive; a misspelt or local type) is not read. Each one that carries what the evaluation
needs is named as a problem with its file, position, id and reason: an
analyte's LOINC code in its ``code`` or a ``component.code`` (whatever the system: it is not read
either way), or a medication (``medicationCodeableConcept`` / ``medicationReference``). Anything
else of such a type is skipped like the R4 types fhir-leuko has no use for (Encounter, Claim …).
"""

from __future__ import annotations

from typing import Any

import orjson

from ..fhirjson import Origin, Unread
from ..knowledge import Knowledge
from ..model import quoted
from .dataset import Problems

__all__ = ["UnreadResources"]

# The types read (fhirjson.Resource), by their case-folded name, to say what was meant.
_READ_TYPES = {
    name.lower(): name
    for name in (
        "Observation",
        "Patient",
        "Medication",
        "MedicationRequest",
        "MedicationStatement",
        "DiagnosticReport",
        "Condition",
        "Flag",
        "DetectedIssue",
        "Bundle",
    )
}


class UnreadResources:
    """Looks into each :class:`~fhir_leuko.core.fhirjson.Unread` resource as it is read."""

    def __init__(self, knowledge: Knowledge, problems: Problems) -> None:
        self.knowledge = knowledge
        self.problems = problems

    def look(self, unread: Unread, origin: Origin) -> None:
        try:
            obj = orjson.loads(unread.data)
        except orjson.JSONDecodeError:
            return  # cannot happen: it decoded as far as its resourceType
        if not isinstance(obj, dict):
            return
        rtype = unread.resource_type
        rid = obj.get("id")
        key = f"{rtype}/{rid}" if isinstance(rid, str) else rtype
        carries = [*self._analytes(obj), *self._medication(obj)]
        if not carries:
            return
        meant = _READ_TYPES.get(rtype.strip().lower())
        if meant is not None:
            why = (
                f"resourceType {quoted(rtype)!r} is not a FHIR type (type names are "
                f"case-sensitive: {meant!r}), so it is not read"
            )
        else:
            why = f"resourceType {quoted(rtype)!r} is not a FHIR R4 resource type: not read"
        self.problems.report(origin, quoted(key), f"{why}; it carries {', '.join(carries)}")

    def _analytes(self, obj: dict[str, Any]) -> list[str]:
        concepts = [obj.get("code")]
        components = obj.get("component")
        if isinstance(components, list):
            concepts += [c.get("code") for c in components if isinstance(c, dict)]
        found: list[str] = []
        for concept in concepts:
            codings = concept.get("coding") if isinstance(concept, dict) else None
            for coding in codings if isinstance(codings, list) else ():
                code = coding.get("code") if isinstance(coding, dict) else None
                info = self.knowledge.loinc.get(code.strip()) if isinstance(code, str) else None
                if info is not None:
                    found.append(f"LOINC {info.code} ({info.analyte.value})")
        return list(dict.fromkeys(found))

    def _medication(self, obj: dict[str, Any]) -> list[str]:
        concept = obj.get("medicationCodeableConcept")
        reference = obj.get("medicationReference")
        if concept is None and reference is None:
            return []
        texts: list[str] = []
        codings: list[tuple[str | None, str | None]] = []
        for part in (concept, reference):
            if not isinstance(part, dict):
                continue
            for name in ("text", "display"):
                if isinstance(part.get(name), str):
                    texts.append(part[name])
            for coding in part.get("coding") or []:
                if isinstance(coding, dict):
                    system, code = coding.get("system"), coding.get("code")
                    codings.append(
                        (
                            system if isinstance(system, str) else None,
                            code if isinstance(code, str) else None,
                        )
                    )
                    if isinstance(coding.get("display"), str):
                        texts.append(coding["display"])
        hits = self.knowledge.match_drugs(codings, texts)
        if hits:
            return [f"a medication ({', '.join(dict.fromkeys(h.label for h in hits))})"]
        return ["a medication"]
