"""The HTML report (issue 14 §2): one self-contained file, tested as HTML and in a real browser.

In the browser (Debian's chromium through Playwright, one launch for this module): every flagged
patient has its rendered plot, the page makes no request but for its own file and logs no error (a
Content-Security-Policy violation would be one). The screenshot, tests/out/report.png, is for a
person to look at.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .browser import chromium, screenshot, visit
from .conftest import DATA, fhir_leuko

TREND = str(DATA / "trend.json")
AS_OF = "2024-05-02"


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, set[str]]:
    """The report of tests/data/trend.json, and the patients the NDJSON output flags."""
    out = tmp_path_factory.mktemp("report") / "report.html"
    done = fhir_leuko("evaluate", TREND, "--as-of", AS_OF, "--format", "html", "-o", str(out))
    assert done.returncode == 1, done.stderr  # one input problem (an unknown unit)
    issues = fhir_leuko("evaluate", TREND, "--as-of", AS_OF).stdout.splitlines()
    flagged = {json.loads(line)["patient"]["reference"] for line in issues}
    return out, flagged


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as launched:
        yield launched


def test_report_is_self_contained(report: tuple[Path, set[str]]) -> None:
    path, flagged = report
    html = path.read_text(encoding="utf-8")
    # Nothing is loaded from anywhere: every src is a data: URI, every href an anchor in the page.
    assert re.findall(r'\b(?:src|href)="(?!data:|#)[^"]*"', html) == []
    assert "<script" not in html
    assert "default-src 'none'" in html
    for patient in flagged:
        assert f'data-patient="{patient}"' in html
    assert html.count('<img class="trend" src="data:image/svg+xml;base64,') == len(flagged)
    # Problems grouped by reason, with the count.
    assert "unit &#39;cells&#39; is not a known count unit for LOINC 751-8" in html


def test_report_is_the_same_bytes_for_the_same_input(
    report: tuple[Path, set[str]], tmp_path: Path
) -> None:
    again = tmp_path / "again.html"
    fhir_leuko("evaluate", TREND, "--as-of", AS_OF, "--format", "html", "-o", str(again))
    assert again.read_bytes() == report[0].read_bytes()


def test_input_text_is_escaped(tmp_path: Path) -> None:
    bundle = json.loads((DATA / "trend.json").read_text(encoding="utf-8"))
    for entry in bundle["entry"]:
        if entry["resource"]["resourceType"] == "MedicationStatement":
            entry["resource"]["medicationCodeableConcept"]["text"] = (
                'Clozapine <script>alert("x")</script> & <img src=https://evil.example/x>'
            )
    source = tmp_path / "bundle.json"
    source.write_text(json.dumps(bundle), encoding="utf-8")
    out = tmp_path / "report.html"
    fhir_leuko("evaluate", str(source), "--as-of", AS_OF, "--format", "html", "-o", str(out))
    html = out.read_text(encoding="utf-8")
    assert "<script" not in html and "<img src=https" not in html
    assert "Clozapine &lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &amp; &lt;img" in html


def test_every_flagged_patient_has_its_plot_and_nothing_is_fetched(
    browser: Any, report: tuple[Path, set[str]]
) -> None:
    path, flagged = report
    with visit(browser, path.as_uri()) as seen:
        shown = seen.page.eval_on_selector_all(
            "article.patient",
            "els => els.map(e => [e.dataset.patient,"
            " (e.querySelector('img.trend') || {naturalWidth: 0}).naturalWidth])",
        )
        assert {patient for patient, _ in shown} == flagged
        assert all(width > 0 for _, width in shown), shown  # each SVG decoded and drawn
        screenshot(seen.page, "report.png")
    assert seen.requests == [path.as_uri()]
    assert seen.errors == []
