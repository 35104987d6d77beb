"""GET /metrics of the service (issue 11 §1): requests by service, hook and status, latency
histograms, cards by indicator, JWT rejections by reason, prefetch fetches and 412s, FHIR fetch
errors; no patient data; optionally behind a bearer token or on a port of its own."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import requests
from prometheus_client.parser import text_string_to_metric_families

from fhir_leuko.testing.sekmet import free_port

from .conftest import FHIR_TOKEN, CdsClient, ServiceEnv
from .harness import hook_request, prefetch


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return sum(v for (n, found), v in samples.items() if n == name and set(labels.items()) <= found)


def _scrape(base: str, **kwargs: Any) -> dict[Any, float]:
    answer = requests.get(f"{base}/metrics", timeout=10, **kwargs)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    return _samples(answer.text)


def test_metrics_count_what_the_service_does(env: ServiceEnv, ehr: CdsClient) -> None:
    before = _scrape(env.server.url)
    # a critical card from the prefetch
    assert ehr.call("leuko-patient-view", hook_request("patient-view", "pt-cloz-severe", prefetch=prefetch("clozapine-severe"))).status == 200
    # the data fetched from the client's FHIR server (no prefetch), then a 412 (no token to fetch)
    body = hook_request("patient-view", "pt-neutro", fhir_server=env.sekmet.base_url, token=FHIR_TOKEN)
    assert ehr.call("leuko-patient-view", body).status == 200
    assert ehr.call("leuko-patient-view", hook_request("patient-view", "pt-neutro")).status == 412
    # a fetch that fails: a token the FHIR server refuses
    refused = hook_request("patient-view", "pt-neutro", fhir_server=env.sekmet.base_url, token="wrong-token")
    assert ehr.call("leuko-patient-view", refused).status == 412
    # JWT refusals: none, replayed
    assert ehr.call("leuko-patient-view", {}, token=None).status == 401
    jti = str(uuid.uuid4())
    good = hook_request("patient-view", "pt-normal", prefetch=prefetch("normal"))
    assert ehr.call("leuko-patient-view", good, jti=jti).status == 200
    assert ehr.call("leuko-patient-view", good, jti=jti).status == 401
    # an unknown service id is counted as "unknown", never by the id sent
    assert ehr.call("no-such-service-" + uuid.uuid4().hex, good).status in (401, 404)

    text = requests.get(f"{env.server.url}/metrics", timeout=10).text
    after = _samples(text)

    def grew(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    view = {"service": "leuko-patient-view", "hook": "patient-view"}
    assert grew("fhir_leuko_cds_requests_total", **view, status="200") == 3
    assert grew("fhir_leuko_cds_requests_total", **view, status="412") == 2
    assert grew("fhir_leuko_cds_requests_total", **view, status="401") == 2
    assert grew("fhir_leuko_cds_requests_total", service="unknown", hook="unknown") == 1
    assert grew("fhir_leuko_cds_request_duration_seconds_count", **view) == 7
    assert grew("fhir_leuko_cds_request_duration_seconds_bucket", **view, le="+Inf") == 7
    # one card for each of the two patients with low counts, none for the normal one
    assert grew("fhir_leuko_cds_cards_total", service="leuko-patient-view") == 2
    assert grew("fhir_leuko_cds_cards_total", service="leuko-patient-view", indicator="critical") >= 1
    assert grew("fhir_leuko_cds_jwt_rejections_total", reason="missing") == 1
    assert grew("fhir_leuko_cds_jwt_rejections_total", reason="replay") == 1
    assert grew("fhir_leuko_cds_prefetch_fetches_total", resource_type="Patient", outcome="ok") == 1
    assert grew("fhir_leuko_cds_prefetch_fetches_total", resource_type="Observation", outcome="ok") == 1
    assert grew("fhir_leuko_cds_prefetch_fetches_total", outcome="error") >= 1
    assert grew("fhir_leuko_cds_fhir_fetch_errors_total", kind="http") >= 1
    assert grew("fhir_leuko_cds_prefetch_unavailable_total", key="observations") == 2
    assert _value(after, "fhir_leuko_build_info") == 1
    # No patient, token or configuration detail in the metrics.
    for secret in ("pt-cloz-severe", "pt-neutro", FHIR_TOKEN, "wrong-token", jti, "no-such-service", "https://ehr.example.org"):
        assert secret not in text


def test_metrics_behind_a_bearer_token(make_service: Any, tmp_path: Path) -> None:
    token_file = tmp_path / "metrics-token"
    token_file.write_text("s3cret-metrics-token-0123456789\n")
    server, _, _ = make_service(metrics_token_file=token_file)
    assert requests.get(f"{server.url}/metrics", timeout=10).status_code == 401
    wrong = {"Authorization": "Bearer not-it"}
    assert requests.get(f"{server.url}/metrics", headers=wrong, timeout=10).status_code == 401
    right = {"Authorization": "Bearer s3cret-metrics-token-0123456789"}
    assert "fhir_leuko_build_info" in requests.get(f"{server.url}/metrics", headers=right, timeout=10).text
    assert requests.get(f"{server.url}/healthz", timeout=10).status_code == 200  # probes stay open


def test_metrics_on_a_port_of_their_own(make_service: Any) -> None:
    port = free_port()
    server, _, _ = make_service(metrics_port=port)
    assert requests.get(f"{server.url}/metrics", timeout=10).status_code == 404
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    assert "fhir_leuko_cds_requests_total" in text or "fhir_leuko_cds_requests" in text


def test_metrics_off(make_service: Any) -> None:
    server, _, _ = make_service(metrics=False)
    assert requests.get(f"{server.url}/metrics", timeout=10).status_code == 404


def test_swagger_ui_is_off_by_default(make_service: Any) -> None:
    server, _, _ = make_service()
    assert requests.get(f"{server.url}/docs", timeout=10).status_code == 404
    assert requests.get(f"{server.url}/openapi.json", timeout=10).status_code == 200
    on, _, _ = make_service(docs=True)
    page = requests.get(f"{on.url}/docs", timeout=10)
    assert page.status_code == 200 and "swagger" in page.text.lower()
