"""fhir-leuko: low white-cell counts in FHIR R4 data, explained, linked to drugs, written once.

The public API is small: load the knowledge and profiles, read or receive resources, normalise,
evaluate, and build DetectedIssues. Everything takes its data and ``as_of`` as parameters; nothing
here reads the clock or does I/O except reading the paths it is given. :func:`normalise` and
:func:`evaluate_resources` take paths, resources already in memory (dicts from ``json.loads`` or
fhirpy, ``fhir.resources`` models, JSON bytes), or what :func:`read_paths` yields, mixed freely.

Example::

    from datetime import datetime, UTC
    from pathlib import Path
    import fhir_leuko as fl

    knowledge = fl.load_knowledge()
    profiles = fl.load_profiles(knowledge)
    dataset = fl.normalise(fl.read_paths([Path("examples")]), knowledge)
    as_of = datetime(2026, 11, 20, tzinfo=UTC)
    for record in dataset.patients.values():
        for finding in fl.evaluate(record, profiles, as_of=as_of):
            print(fl.build_detected_issue(finding, identified=as_of)["detail"])

    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [...]}  # or a model
    result = fl.evaluate_resources(bundle, knowledge, profiles, as_of=as_of)
"""

from ._version import __version__
from .core.detectedissue import build_detected_issue, to_ndjson, to_transaction_bundle
from .core.evaluate import evaluate
from .core.fhirjson import Origin
from .core.knowledge import Knowledge
from .core.model import Finding, FindingKind, LabResult, PatientRecord, Problem
from .core.normalise import Dataset
from .core.pipeline import Evaluation, evaluate_dataset
from .core.profiles import Profile, ProfileSet
from .errors import ExitCode, FhirLeukoError, InputError, ProfileError, UsageError
from .files.documents import load_knowledge, load_profiles
from .files.inputs import evaluate_resources, normalise
from .files.reader import read_paths

__all__ = [
    "Dataset",
    "Evaluation",
    "ExitCode",
    "FhirLeukoError",
    "Finding",
    "FindingKind",
    "InputError",
    "Knowledge",
    "LabResult",
    "Origin",
    "PatientRecord",
    "Problem",
    "Profile",
    "ProfileError",
    "ProfileSet",
    "UsageError",
    "__version__",
    "build_detected_issue",
    "evaluate",
    "evaluate_dataset",
    "evaluate_resources",
    "load_knowledge",
    "load_profiles",
    "normalise",
    "read_paths",
    "to_ndjson",
    "to_transaction_bundle",
]
