"""The version of fhir-leuko (also written into every DetectedIssue's author Device)."""

__version__ = "0.1.0"
