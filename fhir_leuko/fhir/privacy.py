"""What may reach a log: patients only as pseudonyms, a server's error text only scrubbed.

One mechanism for the scheduled job and the CDS service, so that no log line depends on each call
site taking care:

* :class:`LogScrubber`, a :class:`logging.Filter` the CLI puts on every handler it installs
  (:func:`install_log_scrubbing`; uvicorn's too, :func:`uvicorn_log_config`). It rewrites each
  record, its traceback and its JSON fields: a ``Patient/<id>`` reference (also inside a URL)
  becomes the patient's pseudonym, the bare ids of the patients in scope too, and a URL loses its
  query string (search parameters name patients). urllib3, which logs every request line with its
  query string, is silenced below WARNING.
* :func:`patients_in_scope`: the job (per group of patients) and the service (per hook call) say
  which patients are being worked on, so their bare ids are recognised in any text.
* :func:`scrub_server_text`: a server's ``OperationOutcome`` diagnostics may quote what it was sent
  or holds (a DetectedIssue's values, a name, a birth date). Only its shape is kept: lowercase words,
  FHIR type and element names, error codes; every quoted passage, number, date, reference, URL and
  capitalised word that is not a known FHIR or message word becomes ``…``.

A pseudonym is ``pt-`` and 10 hex digits of a SHA-256 of the server and the reference: stable, so
that the log lines of one patient can be followed, and not reversible (the job's state file holds
the real reference of a pending patient).
"""

from __future__ import annotations

import contextvars
import copy
import hashlib
import logging
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = [
    "LogScrubber",
    "enter_patients_scope",
    "install_log_scrubbing",
    "patients_in_scope",
    "pseudonym",
    "scrub_patients",
    "scrub_server_text",
    "uvicorn_log_config",
]


def pseudonym(server: str, patient: str) -> str:
    """A stable, non-reversible name for a patient (``Patient/<id>``) of a server, for logs."""
    return "pt-" + hashlib.sha256(f"{server}|{patient}".encode()).hexdigest()[:10]


# -- patients -------------------------------------------------------------------------------------

_SCOPE: contextvars.ContextVar[tuple[str, tuple[str, ...]]] = contextvars.ContextVar(
    "fhir_leuko_patients_in_scope", default=("", ())
)

# A Patient reference anywhere: relative, inside an absolute URL, before /_history/.
# (Not a pseudonym already: a text scrubbed twice names the patient the same way.)
_PATIENT_REF = re.compile(
    r"(?<![A-Za-z0-9])Patient/(?!pt-[0-9a-f]{10}(?![A-Za-z0-9\-.]))([A-Za-z0-9\-.]{1,64})"
)
# A URL's query string (search parameters name patients: patient=, subject=, _id=).
_QUERY = re.compile(
    r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s?#'\"<>]*|(?<![\w.])/[^\s?#'\"<>]*)"
    r"\?[^\s'\"<>]*?(?=[.,;:)]*(?:[\s'\"<>]|$))"
)
_BARE_ID_MIN = 3
"""Shorter ids (``1``, ``42``) are left alone in free text: they would replace every such number."""


@contextmanager
def patients_in_scope(server: str, patients: Iterable[str]) -> Iterator[None]:
    """While the block runs (in this thread or task, and in what it starts with the context
    copied), log lines name these patients (``Patient/<id>`` or bare ids) by their pseudonyms."""
    token = enter_patients_scope(server, patients)
    try:
        yield
    finally:
        _SCOPE.reset(token)


def enter_patients_scope(
    server: str, patients: Iterable[str]
) -> contextvars.Token[tuple[str, tuple[str, ...]]]:
    """Like :func:`patients_in_scope`, for the rest of the current context: for work that runs in
    a context of its own (a CDS Hooks call in its worker thread, whose error handler logs after the
    call returned)."""
    keys = tuple(p if p.startswith("Patient/") else f"Patient/{p}" for p in patients)
    return _SCOPE.set((server, keys))


def scrub_patients(text: str, server: str | None = None, patients: Iterable[str] = ()) -> str:
    """``text`` with every ``Patient/<id>`` and the bare ids of ``patients`` (and of the patients
    in scope) replaced by pseudonyms, and URLs without their query strings."""
    scope_server, scope_patients = _SCOPE.get()
    salt = scope_server if server is None else server
    text = _QUERY.sub(r"\1?…", text)
    text = _PATIENT_REF.sub(lambda m: "Patient/" + pseudonym(salt, f"Patient/{m[1]}"), text)
    for patient in (*patients, *scope_patients):
        key = patient if patient.startswith("Patient/") else f"Patient/{patient}"
        bare = key.removeprefix("Patient/")
        if len(bare) >= _BARE_ID_MIN and bare in text:
            pattern = rf"(?<![A-Za-z0-9\-.]){re.escape(bare)}(?![A-Za-z0-9\-])"
            text = re.sub(pattern, pseudonym(salt, key), text)
    return text


class LogScrubber(logging.Filter):
    """Rewrites every record that passes (message, traceback, JSON ``fields``) with
    :func:`scrub_patients`. Put it on handlers, so that it sees the records of every logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = scrub_patients(message)
        if clean != message:
            _rewrite(record, clean)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub_patients(record.exc_text)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            record.fields = {
                k: scrub_patients(v) if isinstance(v, str) else v for k, v in fields.items()
            }
        return True


def _rewrite(record: logging.LogRecord, clean: str) -> None:
    """Scrub a record's arguments one by one (some formatters use them: uvicorn's access log
    unpacks five), else make the scrubbed message the record's whole text."""
    if isinstance(record.args, tuple) and record.args:
        args = record.args
        record.args = tuple(
            a if isinstance(a, int | float) or scrub_patients(str(a)) == str(a)
            else scrub_patients(str(a))
            for a in args
        )
        record.msg = scrub_patients(str(record.msg))
        try:
            if record.getMessage() == clean:
                return
        except (TypeError, ValueError):
            pass
    record.msg, record.args = clean, ()


def install_log_scrubbing(logger: logging.Logger | None = None) -> None:
    """Put one :class:`LogScrubber` on each handler of ``logger`` (default: the root logger) and
    keep urllib3's request lines (full URLs with query strings, at DEBUG) out of the logs."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, LogScrubber) for f in handler.filters):
            handler.addFilter(LogScrubber())
    logging.getLogger("urllib3").setLevel(logging.WARNING)


def uvicorn_log_config(base: dict[str, Any]) -> dict[str, Any]:
    """uvicorn's logging configuration (``uvicorn.config.LOGGING_CONFIG``) with a
    :class:`LogScrubber` on each of its handlers."""
    config = copy.deepcopy(base)
    config.setdefault("filters", {})["scrub"] = {"()": f"{__name__}.LogScrubber"}
    for handler in config.get("handlers", {}).values():
        handler["filters"] = [*handler.get("filters", []), "scrub"]
    return config


# -- a server's error text ----------------------------------------------------------------------

_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"|“[^”]*”|‘[^’]*’|`[^`]*`|«[^»]*»")
_NESTED = re.compile(r"\{[^{}]*\}|\[[^\[\]]*\]|<[^<>]*>")
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://\S+")
_REFERENCE = re.compile(r"\b([A-Z][A-Za-z]+)/[A-Za-z0-9\-.]{1,64}(?:/_history/[A-Za-z0-9\-.]+)?")
_ERROR_CODE = re.compile(r"^[A-Z][A-Z0-9]*-\d+$")
_LOWER = re.compile(r"^[a-z][A-Za-z\-_']*$")
_PATH = re.compile(r"^([A-Z][A-Za-z]+)((?:\.[a-z][A-Za-z]*(?:\[x\])?)+)$")
_EDGE_PUNCT = "([{<.,;:!?)]}>"
_CUT = "…"

# FHIR names that may start with a capital in a diagnostics text (resource and data types).
_FHIR_NAMES_TEXT = """Bundle OperationOutcome CapabilityStatement Parameters Binary Patient Practitioner
    PractitionerRole Organization Encounter Observation DiagnosticReport DetectedIssue Device
    Medication MedicationRequest MedicationStatement MedicationAdministration MedicationDispense
    Condition Flag Specimen ServiceRequest Provenance AuditEvent SearchParameter StructureDefinition
    ValueSet CodeSystem ConceptMap Resource DomainResource Element BackboneElement Extension
    Reference CodeableConcept Coding Quantity Identifier Period Meta Narrative Timing Dosage Range
    Ratio HumanName Address ContactPoint Attachment Annotation"""
_FHIR_NAMES = frozenset(_FHIR_NAMES_TEXT.split())
# Words that open the sentences of servers' error messages (HAPI, Firely, Azure, Medplum,
# sekmet), and acronyms they use: kept. Any other capitalised word may be a name: cut.
_MESSAGE_WORDS_TEXT = """Failed Failure Error Errors Invalid Unknown Unable Cannot Can't Could Not No None Missing
    Duplicate Incorrect Expected Found Value Values Element Elements Resource Resources Reference
    References Search Parameter Parameters Multiple Conditional Precondition Version Unsupported
    Unprocessable Validation Constraint Rule Profile Code Type The This That A An It Only Must
    Should Request Response Body Content Header Headers Bad Forbidden Unauthorized Conflict Gone
    Internal Server Service Timeout Too Many Requests Already Exists Deleted Transaction Batch
    Entry Entries Operation Processing Processed Business Required Warning Information Note
    Either Neither Both Did Does Do Is Are Was Were Has Have Had Valid Allowed Supported Please
    Use See For In On At Of To With Without And Or But From By All Any Some Each Every Client
    Unexpected Illegal Malformed Empty Null True False Date Time String Integer Decimal Boolean
    Attribute Field Property Path Format Syntax Parse Parsing Unrecognized Unrecognised Permission
    Access Denied Scope Token Authorization Authentication Limit Maximum Minimum Page Paging Count
    Total Sort Offset Cursor Id ID JSON XML HTTP HTTPS URL URI
    UUID FHIR HAPI UCUM LOINC SNOMED RxNorm UTF-8 API SQL OK ETag If-Match If-None-Exist
    If-None-Match"""
_MESSAGE_WORDS = frozenset(_MESSAGE_WORDS_TEXT.split())


def scrub_server_text(text: str, limit: int = 300) -> str:
    """A server's free text (``OperationOutcome.issue.diagnostics``) without anything it may quote:
    see the module docstring. Words are kept only when they cannot be patient data."""
    text = _QUOTED.sub(_CUT, text.replace("\r", " ").replace("\n", " "))
    previous = None
    while previous != text:  # innermost first, until nothing nested is left
        previous, text = text, _NESTED.sub(_CUT, text)
    text = _URL.sub(_CUT, text)
    text = _REFERENCE.sub(lambda m: f"{m[1]}/{_CUT}" if m[1] in _FHIR_NAMES else _CUT, text)
    out: list[str] = []
    for token in text.split():
        core = token.strip(_EDGE_PUNCT)
        lead = token[: len(token) - len(token.lstrip(_EDGE_PUNCT))]
        trail = token[len(lead) + len(core) :]
        if core and not _keep(core):
            core = _CUT
        if core == _CUT and not lead and out and out[-1].endswith(_CUT):
            out[-1] += trail  # "… … …:" says no more than "…:"
            continue
        out.append(f"{lead}{core}{trail}")
    clean = " ".join(out)
    return clean if len(clean) <= limit else clean[: limit - 1].rstrip() + _CUT


def _keep(word: str) -> bool:
    if _CUT in word:
        return word.replace(_CUT, "").strip(_EDGE_PUNCT + "/") == "" or (
            word.split("/", 1)[0] in _FHIR_NAMES
        )
    if _LOWER.match(word) or _ERROR_CODE.match(word):
        return True
    if word in _FHIR_NAMES or word in _MESSAGE_WORDS:
        return True
    path = _PATH.match(word)
    return path is not None and path[1] in _FHIR_NAMES
