"""The CDS Hooks service under load: patient-view with a realistic prefetch, over real HTTP.

``./dev bench cds [--calls 1000] [--clients 8] [--concurrent-calls 2000] [--check]``

1. Writes a service configuration (one trusted client with an ES384 key in a JWKS file, http
   allowed on loopback) and starts the real command, ``python -m fhir_leuko serve``, in a child
   process on a free port: uvicorn, JWT verification, prefetch decoding, the rule core, cards,
   the SQLite card store, exactly as deployed.
2. Workload (issue 4 §6): one patient-view request whose prefetch holds 200 lab Observations (20
   CBCs with differential over 6 months, the latest with a low ANC) and 20 MedicationRequests
   (clozapine among them), so every call evaluates, explains and answers one critical card.
   Dates are relative to now (the service evaluates as of now).
3. Latency: ``--calls`` sequential calls, each with its own freshly signed JWT (unique ``jti``),
   timed at the client; p50/p95/p99. Throughput: ``--clients`` threads, each with its own HTTP
   connection, sending ``--concurrent-calls`` calls in all.

Goal (issue 4 §6): p95 <= 25 ms on the development machine (CDS Hooks' budget for the whole round
trip is about 500 ms). ``--check`` exits 1 when the goal is missed. The client runs in this process,
so on a small machine client and server share the CPUs: the figures are an upper bound.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from fhir_leuko.testing.sekmet import free_port

__all__ = ["main"]

GOAL_P95_MS = 25.0
ISS = "https://bench-ehr.example.org"
SERVICE = "leuko-patient-view"
PATIENT = "bench-1"

# 10 results per CBC with differential: counts and percentages (LOINC, as knowledge/loinc.toml).
_PANEL = [
    ("6690-2", "Leukocytes [#/volume] in Blood by Automated count", "10*3/uL", 6.2),
    ("751-8", "Neutrophils [#/volume] in Blood by Automated count", "10*3/uL", 3.6),
    ("731-0", "Lymphocytes [#/volume] in Blood by Automated count", "10*3/uL", 1.8),
    ("742-7", "Monocytes [#/volume] in Blood by Automated count", "10*3/uL", 0.5),
    ("711-2", "Eosinophils [#/volume] in Blood by Automated count", "10*3/uL", 0.2),
    ("704-7", "Basophils [#/volume] in Blood by Automated count", "10*3/uL", 0.05),
    ("770-8", "Neutrophils/100 leukocytes in Blood by Automated count", "%", 58.0),
    ("736-9", "Lymphocytes/100 leukocytes in Blood by Automated count", "%", 29.0),
    ("5905-5", "Monocytes/100 leukocytes in Blood by Automated count", "%", 8.0),
    ("713-8", "Eosinophils/100 leukocytes in Blood by Automated count", "%", 3.0),
]
_MEDICATIONS = [
    ("2626", "clozapine"),
    ("6809", "metformin"),
    ("29046", "lisinopril"),
    ("83367", "atorvastatin"),
    ("17767", "amlodipine"),
    ("5640", "ibuprofen"),
    ("161", "acetaminophen"),
    ("4603", "furosemide"),
    ("8787", "propranolol"),
    ("6851", "methotrexate"),
    ("10582", "levothyroxine"),
    ("7646", "omeprazole"),
    ("36437", "sertraline"),
    ("42347", "bupropion"),
    ("32968", "clopidogrel"),
    ("11289", "warfarin"),
    ("6135", "ketoconazole"),
    ("2551", "ciprofloxacin"),
    ("723", "amoxicillin"),
    ("5492", "hydrochlorothiazide"),
]


def workload(now: datetime) -> dict[str, Any]:
    """The patient-view request: 200 Observations and 20 MedicationRequests in the prefetch."""
    observations = []
    for draw in range(20):
        when = now - timedelta(days=1 + 9 * (19 - draw), hours=3)
        latest = draw == 19
        for code, display, unit, value in _PANEL:
            if latest and code == "751-8":
                value = 0.8  # the latest ANC is low: a card on every call
            observations.append(
                {
                    "resourceType": "Observation",
                    "id": f"obs-{draw}-{code}",
                    "status": "final",
                    "category": [
                        {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                    "code": "laboratory",
                                }
                            ]
                        }
                    ],
                    "code": {
                        "coding": [{"system": "http://loinc.org", "code": code, "display": display}]
                    },
                    "subject": {"reference": f"Patient/{PATIENT}"},
                    "effectiveDateTime": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
                    "valueQuantity": {
                        "value": value,
                        "unit": unit,
                        "system": "http://unitsofmeasure.org",
                        "code": unit,
                    },
                }
            )
    medications = [
        {
            "resourceType": "MedicationRequest",
            "id": f"med-{index}",
            "status": "active" if index % 3 else "completed",
            "intent": "order",
            "medicationCodeableConcept": {
                "coding": [
                    {
                        "system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                        "code": code,
                        "display": name,
                    }
                ],
                "text": name,
            },
            "subject": {"reference": f"Patient/{PATIENT}"},
            "authoredOn": (now - timedelta(days=400 - 10 * index)).strftime("%Y-%m-%d"),
        }
        for index, (code, name) in enumerate(_MEDICATIONS)
    ]

    def searchset(resources: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(resources),
            "entry": [
                {
                    "fullUrl": f"https://ehr.example.org/fhir/{r['resourceType']}/{r['id']}",
                    "resource": r,
                    "search": {"mode": "match"},
                }
                for r in resources
            ],
        }

    return {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        "context": {"userId": "Practitioner/bench", "patientId": PATIENT},
        "prefetch": {
            "patient": {"resourceType": "Patient", "id": PATIENT, "birthDate": "1979-03-14"},
            "observations": searchset(observations),
            "medicationRequests": searchset(medications),
            "medicationStatements": searchset([]),
            "conditions": searchset([]),
            "flags": searchset([]),
        },
    }


class _Signer:
    def __init__(self, key: ec.EllipticCurvePrivateKey, audience: str) -> None:
        self.key = key
        self.audience = audience

    def token(self) -> str:
        now = int(time.time())
        payload = {
            "iss": ISS,
            "aud": self.audience,
            "iat": now,
            "exp": now + 600,
            "jti": str(uuid.uuid4()),
        }
        return jwt.encode(
            payload, self.key, algorithm="ES384", headers={"kid": "bench-es384", "typ": "JWT"}
        )


def _start(directory: Path, port: int) -> subprocess.Popen[bytes]:
    key = ec.generate_private_key(ec.SECP384R1())
    jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    (directory / "jwks.json").write_text(
        json.dumps({"keys": [{**jwk, "kid": "bench-es384", "use": "sig", "alg": "ES384"}]})
    )
    (directory / "key.pem").write_bytes(
        key.private_bytes(
            encoding=serialization.Encoding.PEM,
            format=serialization.PrivateFormat.PKCS8,
            encryption_algorithm=serialization.NoEncryption(),
        )
    )
    (directory / "service.toml").write_text(
        f"""[service]
public_base_url = "http://127.0.0.1:{port}"
feedback_database = "feedback.sqlite3"
[service.testing]
allow_http = true
[[service.clients]]
iss = "{ISS}"
jwks_file = "jwks.json"
"""
    )
    log = (directory / "serve.log").open("wb")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fhir_leuko",
            "serve",
            "--config",
            str(directory / "service.toml"),
            "--port",
            str(port),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _signer(directory: Path, audience: str) -> _Signer:
    key = serialization.load_pem_private_key((directory / "key.pem").read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return _Signer(key, audience)


def _wait_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"fhir-leuko serve exited:\n{log.read_text()}")
        try:
            requests.get(url, timeout=2)
            return
        except requests.ConnectionError:
            time.sleep(0.1)
    raise SystemExit("fhir-leuko serve did not start in 60 s")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def _call(session: requests.Session, url: str, body: bytes, token: str) -> float:
    started = time.perf_counter()
    response = session.post(
        url,
        data=body,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        timeout=30,
    )
    elapsed = (time.perf_counter() - started) * 1000
    if response.status_code != 200 or len(response.json()["cards"]) != 1:
        raise SystemExit(f"unexpected answer: HTTP {response.status_code} {response.text[:300]}")
    return elapsed


def _run_threads(clients: int, work: Callable[[int], list[float]]) -> list[float]:
    results: list[list[float]] = [[] for _ in range(clients)]

    def run(index: int) -> None:
        results[index] = work(index)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [value for chunk in results for value in chunk]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="./dev bench cds", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000, help="sequential calls (default 1000)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument(
        "--concurrent-calls", type=int, default=2000, help="calls by the clients in all"
    )
    parser.add_argument("--check", action="store_true", help=f"exit 1 if p95 > {GOAL_P95_MS:g} ms")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="fhir-leuko-bench-cds-") as tmp:
        directory = Path(tmp)
        port = free_port()
        process = _start(directory, port)
        base = f"http://127.0.0.1:{port}"
        url = f"{base}/cds-services/{SERVICE}"
        try:
            _wait_ready(f"{base}/openapi.json", process, directory / "serve.log")
            signer = _signer(directory, url)
            body = json.dumps(workload(datetime.now(UTC))).encode()
            print(
                f"workload: patient-view, prefetch of 200 Observations and 20 MedicationRequests "
                f"({len(body) / 1024:.0f} KiB), one critical card per answer"
            )
            session = requests.Session()
            for _ in range(30):  # warm-up: imports, JWKS, connection, SQLite
                _call(session, url, body, signer.token())
            tokens = [signer.token() for _ in range(args.calls)]
            started = time.perf_counter()
            latencies = [_call(session, url, body, token) for token in tokens]
            sequential_s = time.perf_counter() - started
            p50, p95, p99 = (_percentile(latencies, q) for q in (0.5, 0.95, 0.99))
            print(
                f"sequential: {args.calls} calls in {sequential_s:.2f} s: p50 {p50:.1f} ms, "
                f"p95 {p95:.1f} ms, p99 {p99:.1f} ms, max {max(latencies):.1f} ms, "
                f"mean {statistics.fmean(latencies):.1f} ms (goal p95 <= {GOAL_P95_MS:g} ms)"
            )
            per_client = max(1, args.concurrent_calls // args.clients)
            all_tokens = [[signer.token() for _ in range(per_client)] for _ in range(args.clients)]

            def client(index: int) -> list[float]:
                own = requests.Session()
                return [_call(own, url, body, token) for token in all_tokens[index]]

            started = time.perf_counter()
            loaded = _run_threads(args.clients, client)
            wall = time.perf_counter() - started
            print(
                f"concurrent: {args.clients} clients, {len(loaded)} calls in {wall:.2f} s: "
                f"{len(loaded) / wall:.0f} calls/s; latency p50 {_percentile(loaded, 0.5):.1f} ms, "
                f"p95 {_percentile(loaded, 0.95):.1f} ms"
            )
            print(f"machine: {os.cpu_count()} CPUs; client and server share them")
        finally:
            process.terminate()
            process.wait(timeout=30)
    if args.check and p95 > GOAL_P95_MS:
        print(f"FAILED: p95 {p95:.1f} ms > {GOAL_P95_MS:g} ms")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
