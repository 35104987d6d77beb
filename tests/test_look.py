"""fhir-leuko for people (issue 14 §1): the table and CSV, the line that says why nothing was
found, ``--as-of latest`` and ``fhir-leuko explain`` — all from the core's findings and decisions.

``tests/data/trend.json`` is hand-written: ``trend-cloz`` (clozapine since 2024-01-15; WBC, ANC and
lymphocytes falling to 3.1 / 0.8 / 0.7 on 2024-05-01, plus an older ANC, a preliminary one, one with
an unknown unit and one entered in error), ``trend-mtx`` (methotrexate stopped 2024-04-20; WBC 2.4,
ANC 1.2 on 2024-04-30) and the near miss ``trend-ok`` (normal counts).
"""

from __future__ import annotations

import csv
import io
import json
import os
import pty
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from fhir_leuko.core.decision import NotUsed, Outcome
from fhir_leuko.core.pipeline import trace_patient
from fhir_leuko.files.bulkread import normalise_paths

from .conftest import DATA, REPO, fhir_leuko

TREND = str(DATA / "trend.json")
AS_OF = "2024-05-02"


def test_table_is_the_default_on_a_terminal() -> None:
    main, child = pty.openpty()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "fhir_leuko", "evaluate", TREND, "--as-of", AS_OF],
            stdout=child,
            stderr=subprocess.PIPE,
            env={**os.environ, "COLUMNS": "200"},
            timeout=60,
            check=False,
        )
        os.close(child)
        child = -1
        out = b""
        while True:
            try:
                chunk = os.read(main, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(main)
        if child >= 0:
            os.close(child)
    assert done.returncode == 1  # the unit problem of trend-cloz-anc-badunit
    lines = out.decode().replace("\r\n", "\n").splitlines()
    assert lines[0].split() == [
        "PATIENT",
        "FINDING",
        "SEVERITY",
        "VALUE",
        "DATE",
        "TREND",
        "DRUG",
        "PROFILE",
    ]
    first = lines[2]
    # Most severe first: the clozapine patient's ANC 0.8 (high), with its trend and drug.
    assert first.startswith("Patient/trend-cloz")
    for text in (
        "neutropenia (moderate)",
        "high",
        "0.8 ×10⁹/L",
        "2024-05-01",
        "3.0 → 2.1 → 1.6 → 0.8 falling",
        "clozapine (active)",
        "clozapine 1.0.0",
    ):
        assert text in first
    at = lines[0].index("SEVERITY")
    assert [line[at:].split()[0] for line in lines[2:]] == [
        "high",
        "moderate",
        "moderate",
        "moderate",
        "low",
    ]


def test_ndjson_stays_the_default_in_a_pipe() -> None:
    done = fhir_leuko("evaluate", TREND, "--as-of", AS_OF)
    issues = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(issues) == 5
    assert {i["resourceType"] for i in issues} == {"DetectedIssue"}


def test_csv_has_the_table_columns_and_defuses_formulas() -> None:
    done = fhir_leuko("evaluate", TREND, "--as-of", AS_OF, "--format", "csv")
    rows = list(csv.reader(io.StringIO(done.stdout)))
    assert rows[0] == [
        "patient",
        "finding",
        "severity",
        "value",
        "date",
        "trend",
        "drug",
        "profile",
    ]
    assert rows[1] == [
        "Patient/trend-cloz",
        "neutropenia (moderate)",
        "high",
        "0.8 ×10⁹/L",
        "2024-05-01",
        "3.0 → 2.1 → 1.6 → 0.8 falling",
        "clozapine (active)",
        "clozapine 1.0.0",
    ]
    assert rows[2][6] == "methotrexate (stopped 2024-04-20 (10 days before))"
    assert len(rows) == 6


def test_csv_cell_that_looks_like_a_formula_gets_an_apostrophe() -> None:
    from fhir_leuko.present.rows import Row
    from fhir_leuko.present.table import render_csv

    row = Row("=HYPERLINK(1)", "f", "high", "1", "d", "", "@drug", "p")
    assert render_csv([row]).splitlines()[1] == "'=HYPERLINK(1),f,high,1,d,,'@drug,p"


def test_nothing_found_says_why_and_what_to_try() -> None:
    done = fhir_leuko("evaluate", TREND, "--as-of", "2026-11-29", "--format", "csv")
    assert done.stdout.splitlines() == ["patient,finding,severity,value,date,trend,drug,profile"]
    assert (
        "fhir-leuko: why: no lab result within the 30-day lookback before as-of 2026-11-29; the "
        "latest is from 2024-05-01: try --as-of 2024-05-02 or --as-of latest"
    ) in done.stderr.splitlines()


def test_nothing_found_before_any_result() -> None:
    done = fhir_leuko("evaluate", TREND, "--as-of", "2020-01-01")
    assert (
        "fhir-leuko: why: every lab result is after as-of 2020-01-01 (the earliest is from "
        "2023-10-02): try --as-of latest"
    ) in done.stderr.splitlines()


def test_nothing_low_says_so(tmp_path: Path) -> None:
    bundle = json.loads((DATA / "trend.json").read_text(encoding="utf-8"))
    bundle["entry"] = [
        e for e in bundle["entry"] if "trend-ok" in json.dumps(e["resource"].get("subject", e))
    ]
    near_miss = tmp_path / "ok.json"
    near_miss.write_text(json.dumps(bundle), encoding="utf-8")
    done = fhir_leuko("evaluate", str(near_miss), "--as-of", AS_OF)
    assert done.returncode == 0, done.stderr
    assert (
        "fhir-leuko: why: 1 patient had a result that counted, and none was below its lower "
        "limit: 'fhir-leuko explain PATIENT PATH...' shows why for one patient"
    ) in done.stderr.splitlines()


def test_as_of_latest_evaluates_each_patient_at_their_latest_result() -> None:
    done = fhir_leuko("evaluate", TREND, "--as-of", "latest")
    issues = [json.loads(line) for line in done.stdout.splitlines()]
    identified = {i["patient"]["reference"]: i["identifiedDateTime"] for i in issues}
    assert identified == {
        "Patient/trend-cloz": "2024-05-01T20:00:00Z",  # its latest result: the preliminary ANC
        "Patient/trend-mtx": "2024-04-30T08:00:00Z",
    }
    assert len(issues) == 5


def test_explain_lists_every_result_and_why() -> None:
    done = fhir_leuko("explain", "trend-cloz", TREND, "--as-of", AS_OF)
    assert done.returncode == 1, done.stderr  # the input has one unit problem
    text = done.stdout
    assert text.startswith("Patient/trend-cloz as of 2024-05-02T23:59:59Z, born 1979-06-02\n")
    for line in (
        "Observation/trend-cloz-anc-4: COUNTED",
        "Observation/trend-cloz-anc-3: superseded by the result that counted",
        "Observation/trend-cloz-anc-old: before the 30-day lookback",
        "Observation/trend-cloz-anc-prelim: status preliminary is not accepted by clozapine",
        "Observation/trend-cloz-anc-badunit: unit 'cells' is not a known count unit for LOINC 751-8",
        "Observation/trend-cloz-anc-eie: status entered-in-error: never counts",
        "passed over pediatric 1.0.0: the patient's age is outside its applies",
        "decided by Clozapine ANC monitoring",
    ):
        assert line in text, line
    assert text.rstrip().endswith(
        "decision: 3 findings: leukopenia (CTCAE v5.0 grade 1, low); neutropenia (moderate "
        "neutropenia (500-999/uL) per the clozapine label, high); lymphopenia (CTCAE v5.0 grade 2, "
        "moderate)"
    )


def test_explain_answers_why_no_alert() -> None:
    done = fhir_leuko("explain", "Patient/trend-ok", TREND, "--as-of", AS_OF)
    assert "neutropenia: no finding: the result that counted is not low" in done.stdout
    assert "lower limit: 1.5 ×10⁹/L" in done.stdout
    assert done.stdout.rstrip().endswith("decision: no finding (each kind above says why)")


def test_explain_unknown_patient_is_a_usage_error() -> None:
    done = fhir_leuko("explain", "nobody", TREND, "--as-of", AS_OF)
    assert done.returncode == 2
    assert "no patient 'nobody'" in done.stderr


def test_explain_uses_the_decisions_the_evaluator_made() -> None:
    """The trace is the evaluator's own output: its findings are exactly evaluate's."""
    from fhir_leuko.core.evaluate import evaluate
    from fhir_leuko.files.documents import load_knowledge, load_profiles

    knowledge = load_knowledge()
    profiles = load_profiles(knowledge, [])
    dataset = normalise_paths([DATA / "trend.json"], knowledge)
    as_of = datetime(2024, 5, 2, 23, 59, 59, tzinfo=UTC)
    for key, record in dataset.patients.items():
        _when, findings, decisions = trace_patient(record, profiles, as_of=as_of)
        assert findings == evaluate(record, profiles, as_of=as_of), key
        assert [d.finding for d in decisions if d.finding] == findings
    _, _, decisions = trace_patient(dataset.patients["Patient/trend-cloz"], profiles, as_of=as_of)
    neutro = next(d for d in decisions if d.kind.value == "neutropenia")
    assert neutro.outcome is Outcome.FINDING
    assert [u.reason for u in neutro.uses] == [
        NotUsed.BEFORE_LOOKBACK,
        NotUsed.BEFORE_LOOKBACK,
        NotUsed.BEFORE_LOOKBACK,
        NotUsed.BEFORE_LOOKBACK,
        NotUsed.SUPERSEDED,
        None,
        NotUsed.STATUS,
    ]
    assert [u.key for u in dataset.unused["Patient/trend-cloz"]] == [
        "Observation/trend-cloz-anc-badunit",
        "Observation/trend-cloz-anc-eie",
    ]
    assert REPO.is_dir()
