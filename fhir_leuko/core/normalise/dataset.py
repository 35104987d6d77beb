"""The :class:`Dataset` normalising builds, and :class:`Problems`, where its rooms report problems."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ..fhirjson import Origin
from ..model import PatientRecord, Problem, UnusedResult

__all__ = ["Dataset", "Problems", "Where"]

Where = Origin | int
"""Where a resource was read: its Origin, or the line number of the NDJSON being fed."""


@dataclass
class Dataset:
    """The normalised input: one record per patient, and every problem found."""

    patients: dict[str, PatientRecord] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    """Resources read by type, and what happened to lab results (``results:used`` …)."""
    unused: dict[str, list[UnusedResult]] = field(default_factory=dict)
    merged: dict[str, str] = field(default_factory=dict)
    """Patient.link: the key of each retired patient record → the key of the record that replaced
    it (whose patient the retired record's resources count for)."""
    """By patient key: the lab Observations of that patient that could not be used at all."""

    def patient(self, key: str) -> PatientRecord:
        record = self.patients.get(key)
        if record is None:
            record = self.patients[key] = PatientRecord(key)
        return record


class Problems:
    """The problems of a :class:`Dataset`, each naming the file (or URL, or prefetch key), the
    position and the resource where it was found.

    Shared by every room of normalising. :meth:`Normaliser.feed_lines` passes a line number instead
    of an :class:`Origin` (one Origin per NDJSON line would cost as much as the rest of reading an
    Observation); :attr:`lines_source` names the file those lines come from.
    """

    __slots__ = ("found", "lines_source")

    def __init__(self, found: list[Problem]) -> None:
        self.found = found
        self.lines_source = ""

    def origin_of(self, where: Where) -> Origin:
        """The Origin of a resource, also when only its line number was passed."""
        if isinstance(where, int):
            return Origin(self.lines_source, f"line {where}")
        return where

    def report(self, where: Where, key: str, reason: str, kind: str = "input") -> None:
        origin = self.origin_of(where)
        self.found.append(Problem(origin.source, reason, key, origin.position, kind))
