"""Helpers for testing fhir-leuko against real components: a FHIR server (sekmet-fhir) on loopback
and seeding it with resources. Used by the tests, the benchmarks and the demo; it may import the
rest of fhir-leuko but the CLI, and nothing in fhir-leuko imports it."""
