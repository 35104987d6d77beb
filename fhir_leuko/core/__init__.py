"""The rule core: FHIR JSON decoding, the data model, knowledge and profiles compiled from documents
already read, normalising resources into per-patient records, evaluating the rules, explaining a
finding and building its DetectedIssue. Everything here takes its data and ``as_of`` as parameters
and returns data: no file, network or database I/O, no clock, no environment. It may import the
standard library, third-party libraries, :mod:`fhir_leuko.errors` and :mod:`fhir_leuko._version`;
it must not import any other part of fhir-leuko (the file readers, the FHIR client, the job, the
service, the CLI): they are the edges that feed it (contracts in pyproject.toml, ``lint-imports``).
"""

from .detectedissue import build_detected_issue, to_ndjson, to_transaction_bundle
from .evaluate import evaluate
from .fhirjson import Origin, Resource, Sourced, decode_resource, iter_document
from .knowledge import Knowledge, compile_knowledge
from .model import Finding, FindingKind, LabResult, PatientRecord, Problem
from .normalise import Dataset, Normaliser, normalise
from .pipeline import Evaluation, evaluate_dataset, evaluate_resources
from .profiles import Profile, ProfileSet, build_profiles

__all__ = [
    "Dataset",
    "Evaluation",
    "Finding",
    "FindingKind",
    "Knowledge",
    "LabResult",
    "Normaliser",
    "Origin",
    "PatientRecord",
    "Problem",
    "Profile",
    "ProfileSet",
    "Resource",
    "Sourced",
    "build_detected_issue",
    "build_profiles",
    "compile_knowledge",
    "decode_resource",
    "evaluate",
    "evaluate_dataset",
    "evaluate_resources",
    "iter_document",
    "normalise",
    "to_ndjson",
    "to_transaction_bundle",
]
