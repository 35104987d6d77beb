"""Helpers for testing fhir-leuko against real components (a FHIR server on loopback)."""
