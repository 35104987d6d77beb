"""fhir-leuko's own DetectedIssues in a Bulk Data export (``run --bulk``), for the planner.

A full pass exports our DetectedIssues with the data, so that it plans against them without a
search per patient. A health system may hold hundreds of thousands of them (a few KB of JSON
each, ten times that as Python objects: 800 MB for 100,000), so only where each one is is kept
(file, offset, length; 16 bytes and its patient key); a patient's are read and parsed when the
planner asks for them. Lines of a gzipped file, which cannot be read from an offset, are kept as
bytes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import msgspec
import orjson

from ..core.detectedissue import IDENTIFIER_SYSTEM
from ..core.fhirjson import decode_json
from ..core.model import Problem
from ..errors import InputError
from ..files.reader import READ_ERRORS, open_input
from .patients import patient_key

__all__ = ["ExportIssues"]


class _Identifier(msgspec.Struct):
    system: str | None = None
    value: str | None = None


class _PatientRef(msgspec.Struct):
    reference: str | None = None


class _IssueHead(msgspec.Struct):
    """What the writer needs of a DetectedIssue line: its type, patient and identifiers."""

    resourceType: str | None = None
    patient: _PatientRef | None = None
    identifier: list[_Identifier] | None = None


_ISSUE_HEAD = msgspec.json.Decoder(_IssueHead)

_Where = tuple[int, int, int] | bytes
"""(file, offset, length) of a line, or the line itself (gzipped files)."""


class ExportIssues(Mapping[str, dict[str, list[dict[str, Any]]]]):
    """Patient key -> identifier value -> our DetectedIssues with it (as ``Existing``), read from
    the export's files when asked. Use as a context manager: the files stay open until its end."""

    def __init__(self, files: Sequence[tuple[Path, str | None]], problems: list[Problem]) -> None:
        """Index the files. A line or file that cannot be read is a problem naming it, never the
        end of the pass: the writer's conditional create (``ifNoneExist`` on the identifier)
        still keeps the server from getting a second copy of an alert this export failed to
        show."""
        self._paths: list[Path] = []
        self._handles: dict[int, IO[bytes]] = {}
        self._where: dict[str, list[_Where]] = {}
        for path, _input in files:
            self._index(path, problems)

    def _index(self, path: Path, problems: list[Problem]) -> None:
        file = len(self._paths)
        self._paths.append(path)
        keep_lines = path.name.lower().endswith(".gz")
        number = offset = 0
        try:
            with open_input(path) as stream:
                for number, line in enumerate(stream, 1):
                    start, offset = offset, offset + len(line)
                    if not line.strip():
                        continue
                    try:
                        head = decode_json(_ISSUE_HEAD, line)
                    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                        why = f"not a readable DetectedIssue: {exc}"
                        problems.append(Problem(path.name, why, "", f"line {number}"))
                        continue
                    if head.resourceType != "DetectedIssue":
                        continue
                    patient = patient_key(head.patient.reference if head.patient else None)
                    ours = [i for i in head.identifier or [] if i.system == IDENTIFIER_SYSTEM]
                    if patient and ours:
                        where = bytes(line) if keep_lines else (file, start, len(line))
                        self._where.setdefault(patient, []).append(where)
        except READ_ERRORS as exc:
            problems.append(Problem(path.name, f"cannot be read: {exc}", "", f"line {number + 1}"))

    def _line(self, where: _Where) -> bytes:
        if isinstance(where, bytes):
            return where
        file, start, length = where
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = self._paths[file].open("rb")
        return os.pread(handle.fileno(), length, start)

    def __getitem__(self, patient: str) -> dict[str, list[dict[str, Any]]]:
        """A patient's DetectedIssues by identifier value.

        Raises:
            KeyError: none of ours for this patient.
            InputError: a file that cannot be read now or a line that changed since it was
                indexed (the planner fails this patient alone and names why).
        """
        by_id: dict[str, list[dict[str, Any]]] = {}
        for where in self._where[patient]:
            try:
                issue = orjson.loads(self._line(where))
            except (OSError, orjson.JSONDecodeError) as exc:
                name = self._paths[where[0]].name if isinstance(where, tuple) else "a gzipped file"
                raise InputError(
                    f"the export's {name} cannot be read again or changed since it was read "
                    f"({exc})"
                ) from None
            for ident in issue.get("identifier") or []:
                if isinstance(ident, dict) and ident.get("system") == IDENTIFIER_SYSTEM:
                    by_id.setdefault(str(ident.get("value")), []).append(issue)
        return by_id

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, patient: object) -> bool:
        return patient in self._where

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def __enter__(self) -> ExportIssues:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
