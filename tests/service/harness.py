"""A CDS Hooks client for the tests, and the real servers they talk to.

* :class:`ClientKeys`: a CDS client's own ES384 (P-384) and RS384 (RSA 2048) keys and its JWK Set.
* :class:`LocalHttp`: a tiny stdlib HTTP server on 127.0.0.1 serving fixed answers (a JWKS, a FHIR
  server that must never be contacted, a slow FHIR server) and recording every hit.
* :class:`ServiceServer`: the service app under a real uvicorn server on a free loopback port.
* :class:`CdsClient`: signs JWTs, calls the service over HTTP, and checks every response with
  :func:`tests.service.invariants.check_response`.
"""

from __future__ import annotations

import base64
import html as htmllib
import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt
import requests
import uvicorn
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from fhir_leuko.testing.sekmet import free_port

from .invariants import check_response

DATA = Path(__file__).resolve().parent / "data"
REQUESTS = Path(__file__).resolve().parent / "requests"
AS_OF = datetime(2026, 11, 20, 12, 0, 0, tzinfo=UTC)
"""The time of every call in the tests (the scenarios in data/ are dated around it)."""

_UNSET: Any = object()


def load_json(path: Path) -> dict[str, Any]:
    """A hand-written JSON file, without its ``_comment``."""
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    data.pop("_comment", None)
    return data


def prefetch(name: str) -> dict[str, Any]:
    """The prefetch object of a scenario in data/ (``prefetch-<name>.json``)."""
    return load_json(DATA / f"prefetch-{name}.json")


class MutableClock:
    """The service's clock in the tests: fixed, movable."""

    def __init__(self, now: datetime = AS_OF) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


class ClientKeys:
    """A CDS client's signing keys: one ES384 and one RS384 key, each with its ``kid``."""

    def __init__(self, label: str) -> None:
        self.ec = ec.generate_private_key(ec.SECP384R1())
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec_kid = f"{label}-es384"
        self.rsa_kid = f"{label}-rs384"

    def jwks(self) -> dict[str, Any]:
        ec_jwk = ECAlgorithm.to_jwk(self.ec.public_key(), as_dict=True)
        rsa_jwk = RSAAlgorithm.to_jwk(self.rsa.public_key(), as_dict=True)
        return {
            "keys": [
                {**ec_jwk, "kid": self.ec_kid, "use": "sig", "alg": "ES384"},
                {**rsa_jwk, "kid": self.rsa_kid, "use": "sig", "alg": "RS384"},
            ]
        }

    def private(self, alg: str) -> tuple[Any, str]:
        return (self.ec, self.ec_kid) if alg == "ES384" else (self.rsa, self.rsa_kid)


@dataclass
class Hit:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class Answer:
    status: int = 200
    body: bytes = b"{}"
    content_type: str = "application/json"
    delay: float = 0.0


class LocalHttp:
    """A recording HTTP server on 127.0.0.1 with fixed answers by path (404 otherwise)."""

    def __init__(self, answers: dict[str, Answer] | None = None) -> None:
        self.answers: dict[str, Answer] = dict(answers or {})
        self.hits: list[Hit] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                outer.hits.append(Hit(self.command, self.path, dict(self.headers.items())))
                path = self.path.split("?")[0]
                answer = outer.answers.get(
                    path, Answer(404, b'{"resourceType":"OperationOutcome"}')
                )
                if answer.delay:
                    time.sleep(answer.delay)
                self.send_response(answer.status)
                self.send_header("Content-Type", answer.content_type)
                self.send_header("Content-Length", str(len(answer.body)))
                self.end_headers()
                self.wfile.write(answer.body)

            do_GET = _answer
            do_POST = _answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def serve_json(self, path: str, content: Any, **kwargs: Any) -> None:
        self.answers[path] = Answer(body=json.dumps(content).encode(), **kwargs)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class ServiceServer:
    """An ASGI app under a real uvicorn server on 127.0.0.1 (in a thread of the test process)."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=15)


@dataclass
class Result:
    status: int
    body: Any
    headers: Mapping[str, str]
    """Case-insensitive (``requests``' CaseInsensitiveDict)."""
    raw: bytes

    @property
    def cards(self) -> list[dict[str, Any]]:
        assert self.status == 200, (self.status, self.body)
        cards: list[dict[str, Any]] = self.body["cards"]
        return cards


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def page_url(base_url: str, card: Mapping[str, Any]) -> str:
    """A card's page link (``GET /cards/{uuid}?token=...``), on the test server: the link itself
    names the public base URL the service is configured with."""
    link = next(
        item["url"] for item in card["links"] if item["label"] == "Full explanation and trend plot"
    )
    parts = urlsplit(link)
    return f"{base_url}{parts.path}?{parts.query}"


def page_text(html: str) -> str:
    """The text of a page, one element a line, entities decoded."""
    text = htmllib.unescape(re.sub(r"<[^>]+>", "\n", html))
    return "\n".join(line.strip() for line in text.splitlines() if line.strip())


@dataclass
class CdsClient:
    """A CDS client (an EHR) calling the service under test; checks every answer it gets."""

    base_url: str
    """Where the service listens (http://127.0.0.1:PORT)."""
    audience_base: str
    """The service's configured public base URL: JWT ``aud`` is built from it."""
    keys: ClientKeys
    iss: str
    clock: Callable[[], datetime]
    jku: str | None = None
    session: requests.Session = field(default_factory=requests.Session)
    seen: list[Result] = field(default_factory=list)

    def token(
        self,
        path: str,
        *,
        alg: str = "ES384",
        keys: ClientKeys | None = None,
        kid: str | None = _UNSET,
        iss: str | None = _UNSET,
        aud: str | list[str] | None = _UNSET,
        jku: str | None = _UNSET,
        typ: str | None = "JWT",
        iat: float | None = _UNSET,
        exp: float | None = _UNSET,
        jti: str | None = _UNSET,
        claims: dict[str, Any] | None = None,
    ) -> str:
        """A signed JWT for ``path`` (``/cds-services/...``); every part can be spoiled."""
        now = self.clock().timestamp()
        payload: dict[str, Any] = {
            "iss": self.iss if iss is _UNSET else iss,
            "aud": f"{self.audience_base}{path}" if aud is _UNSET else aud,
            "exp": int(now + 300) if exp is _UNSET else exp,
            "iat": int(now) if iat is _UNSET else iat,
            "jti": str(uuid.uuid4()) if jti is _UNSET else jti,
            **(claims or {}),
        }
        payload = {k: v for k, v in payload.items() if v is not None}
        key, default_kid = (
            (keys or self.keys).private(alg) if alg in ("ES384", "RS384") else (None, "")
        )
        headers: dict[str, Any] = {"typ": typ, "kid": default_kid if kid is _UNSET else kid}
        chosen_jku = self.jku if jku is _UNSET else jku
        if chosen_jku is not None:
            headers["jku"] = chosen_jku
        headers = {k: v for k, v in headers.items() if v is not None or k == "typ"}
        if alg == "none":
            head = _b64(json.dumps({"alg": "none", **headers}).encode())
            return f"{head}.{_b64(json.dumps(payload).encode())}."
        if alg == "HS256":
            secret = b"a-shared-secret-that-is-long-enough-for-hmac-sha256!!"
            return jwt.encode(payload, secret, algorithm="HS256", headers=headers)
        return jwt.encode(payload, key, algorithm=alg, headers=headers)

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = _UNSET,
        headers: dict[str, str] | None = None,
        data: bytes | None = None,
        **token_args: Any,
    ) -> Result:
        all_headers = dict(headers or {})
        if token is _UNSET:
            token = self.token(path, **token_args)
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        if data is None and body is not None:
            data = json.dumps(body).encode()
            all_headers.setdefault("Content-Type", "application/json")
        response = self.session.request(
            method, f"{self.base_url}{path}", data=data, headers=all_headers, timeout=60
        )
        if method == "OPTIONS":  # a CORS preflight: Starlette answers plain text
            parsed: Any = response.text
        else:
            parsed = json.loads(response.content) if response.content else None
        result = Result(response.status_code, parsed, response.headers, response.content)
        if method != "OPTIONS":
            check_response(path, response.status_code, parsed)
        self.seen.append(result)
        return result

    def discovery(self, **kwargs: Any) -> Result:
        return self.request("GET", "/cds-services", **kwargs)

    def call(self, service_id: str, body: Any, **kwargs: Any) -> Result:
        return self.request("POST", f"/cds-services/{service_id}", body, **kwargs)

    def feedback(self, service_id: str, body: Any, **kwargs: Any) -> Result:
        return self.request("POST", f"/cds-services/{service_id}/feedback", body, **kwargs)


def hook_request(
    hook: str,
    patient_id: str,
    *,
    prefetch: dict[str, Any] | None = None,
    draft_orders: dict[str, Any] | None = None,
    selections: list[str] | None = None,
    fhir_server: str | None = None,
    token: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A CDS Hooks request body as an EHR sends it."""
    context: dict[str, Any] = {"userId": "Practitioner/dr-1", "patientId": patient_id}
    if draft_orders is not None:
        context["draftOrders"] = draft_orders
    if selections is not None:
        context["selections"] = selections
    body: dict[str, Any] = {"hook": hook, "hookInstance": str(uuid.uuid4()), "context": context}
    if fhir_server is not None:
        body["fhirServer"] = fhir_server
    if token is not None:
        body["fhirAuthorization"] = {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "patient/Patient.read patient/Observation.read patient/MedicationRequest.read",
            "subject": "fhir-leuko",
            "patient": patient_id,
        }
    if prefetch is not None:
        body["prefetch"] = prefetch
    body.update(extra)
    return body


def clozapine_draft(patient_id: str, order_id: str = "draft-cloz-1") -> dict[str, Any]:
    """A draftOrders Bundle with one clozapine MedicationRequest (as written by an EHR)."""
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {
                "resource": {
                    "resourceType": "MedicationRequest",
                    "id": order_id,
                    "status": "draft",
                    "intent": "order",
                    "medicationCodeableConcept": {
                        "coding": [
                            {
                                "system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                                "code": "197535",
                                "display": "Clozapine 100 MG Oral Tablet",
                            }
                        ],
                        "text": "Clozapine 100 MG Oral Tablet",
                    },
                    "subject": {"reference": f"Patient/{patient_id}"},
                    "dosageInstruction": [{"text": "25 mg at night, titrate"}],
                }
            }
        ],
    }
