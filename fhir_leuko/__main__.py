from fhir_leuko.cli import run

run()
