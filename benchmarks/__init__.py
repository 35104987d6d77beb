"""fhir-leuko benchmarks: speed and memory targets measured as ratios, never as timed tests."""
