"""The CDS Hooks service under test, with real parts: uvicorn on loopback, a JWKS served over HTTP
(and one in a file), a sekmet FHIR server behind a bearer token, and recording HTTP servers that
prove which hosts the service contacts."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from fhir_leuko.core.knowledge import Knowledge
from fhir_leuko.core.profiles import ProfileSet
from fhir_leuko.service import ServiceSettings, create_app
from fhir_leuko.testing.postgres import PostgresServer, find_bin
from fhir_leuko.testing.sekmet import SekmetServer

from .harness import (
    DATA,
    CdsClient,
    ClientKeys,
    LocalHttp,
    MutableClock,
    ServiceServer,
    load_json,
)

PUBLIC_BASE = "https://cds.example.org"
"""The service's configured public base URL: different from where it listens, on purpose."""
EHR_ISS = "https://ehr.example.org"
FILE_ISS = "https://file-keys.example.org"
TENANT_ISS = "https://tenants.example.org"
FHIR_TOKEN = "fhir-access-token-4f9c2e71"


@dataclass
class ServiceEnv:
    server: ServiceServer
    settings: ServiceSettings
    clock: MutableClock
    keys: ClientKeys
    file_keys: ClientKeys
    tenant_keys: ClientKeys
    jwks_http: LocalHttp
    forbidden_fhir: LocalHttp
    other_client_fhir: LocalHttp
    sekmet: SekmetServer
    app: Any

    def client(
        self, keys: ClientKeys | None = None, iss: str = EHR_ISS, **kwargs: Any
    ) -> CdsClient:
        return CdsClient(
            base_url=self.server.url,
            audience_base=PUBLIC_BASE,
            keys=keys or self.keys,
            iss=iss,
            clock=self.clock,
            **kwargs,
        )

    @property
    def database(self) -> Path:
        return self.settings.feedback_database


def seed(fhir: SekmetServer, names: list[str]) -> None:
    """Load the resources of data/prefetch-<name>.json into the FHIR server (PUT, keeping ids)."""
    resources: list[dict[str, Any]] = []
    for name in names:
        for value in load_json(DATA / f"prefetch-{name}.json").values():
            if value.get("resourceType") == "Bundle":
                resources.extend(e["resource"] for e in value.get("entry", []))
            else:
                resources.append(value)
    resources.sort(key=lambda r: r["resourceType"] != "Patient")  # patients first
    headers = {"Authorization": f"Bearer {FHIR_TOKEN}", "Content-Type": "application/fhir+json"}
    for resource in resources:
        url = f"{fhir.base_url}/{resource['resourceType']}/{resource['id']}"
        response = requests.put(url, data=json.dumps(resource), headers=headers, timeout=30)
        assert response.status_code in (200, 201), (url, response.status_code, response.text[:500])


@pytest.fixture(scope="session")
def sekmet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SekmetServer]:
    """A real FHIR server (sekmet-fhir 0.1.1) that accepts only FHIR_TOKEN, seeded with every
    scenario of data/."""
    server = SekmetServer(
        tmp_path_factory.mktemp("sekmet"),
        settings={"server_auth": {"types": ["bearer"], "tokens": [FHIR_TOKEN]}},
    )
    server.start()
    try:
        seed(
            server,
            [
                "clozapine-severe",
                "clozapine-stale",
                "clozapine-dispensed",
                "neutropenia",
                "normal",
                "oid-coded",
            ],
        )
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def env(
    tmp_path_factory: pytest.TempPathFactory,
    knowledge: Knowledge,
    profiles: ProfileSet,
    sekmet: SekmetServer,
) -> Iterator[ServiceEnv]:
    """The service as an EHR meets it, with three trusted clients:

    * EHR_ISS: keys published at a JWKS URL (also its one registered ``jku``); may call sekmet;
    * FILE_ISS: keys in a JWKS file; may call ``other_client_fhir`` only;
    * TENANT_ISS: keys at a JWKS URL; tokens must carry tenant ``tenant-a``.
    """
    tmp = tmp_path_factory.mktemp("service")
    keys, file_keys, tenant_keys = ClientKeys("ehr"), ClientKeys("file"), ClientKeys("tenant")
    jwks_http = LocalHttp()
    jwks_http.serve_json("/jwks.json", keys.jwks())
    jwks_http.serve_json("/tenant-jwks.json", tenant_keys.jwks())
    jwks_http.serve_json("/unregistered-jwks.json", keys.jwks())
    jwks_file = tmp / "file-client-jwks.json"
    jwks_file.write_text(json.dumps(file_keys.jwks()), encoding="utf-8")
    forbidden_fhir = LocalHttp()
    other_client_fhir = LocalHttp()
    settings = ServiceSettings(
        public_base_url=PUBLIC_BASE,
        clients=[
            {
                "iss": EHR_ISS,
                "jwks_url": jwks_http.url("/jwks.json"),
                "jku": [jwks_http.url("/jwks.json")],
                "fhir_servers": [sekmet.base_url],
            },
            {
                "iss": FILE_ISS,
                "jwks_file": jwks_file,
                "fhir_servers": [other_client_fhir.url("/fhir")],
            },
            {
                "iss": TENANT_ISS,
                "jwks_url": jwks_http.url("/tenant-jwks.json"),
                "tenants": ["tenant-a"],
            },
        ],
        cors_origins=["https://ehr.example.org"],
        max_body_bytes=2_000_000,
        feedback_database=tmp / "feedback.sqlite3",
        jwks_refetch_seconds=0,
        testing={"allow_http": True},
    )
    clock = MutableClock()
    app = create_app(settings, knowledge=knowledge, profiles=profiles, clock=clock)
    server = ServiceServer(app)
    try:
        yield ServiceEnv(
            server,
            settings,
            clock,
            keys,
            file_keys,
            tenant_keys,
            jwks_http,
            forbidden_fhir,
            other_client_fhir,
            sekmet,
            app,
        )
    finally:
        server.stop()
        jwks_http.stop()
        forbidden_fhir.stop()
        other_client_fhir.stop()


@pytest.fixture
def ehr(env: ServiceEnv) -> CdsClient:
    """The main CDS client (ES384 tokens without jku; its keys come from its jwks_url)."""
    return env.client()


@pytest.fixture
def make_service(tmp_path: Path, knowledge: Knowledge, profiles: ProfileSet) -> Iterator[Any]:
    """Start another service (its own settings and injected parts) under uvicorn; stopped after
    the test. Returns ``(server, settings, keys)``: ``keys`` sign for ``FILE_ISS`` (JWKS file)."""
    started: list[ServiceServer] = []
    keys = ClientKeys("extra")
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps(keys.jwks()), encoding="utf-8")

    def start(
        fhir_servers: list[str] | None = None, **overrides: Any
    ) -> tuple[ServiceServer, ServiceSettings, ClientKeys]:
        create_kwargs = {k: overrides.pop(k) for k in ("fetcher", "clock") if k in overrides}
        client = {"iss": FILE_ISS, "jwks_file": jwks_file, "fhir_servers": fhir_servers or []}
        values: dict[str, Any] = {
            "public_base_url": PUBLIC_BASE,
            "clients": [client],
            "feedback_database": tmp_path / f"feedback-{len(started)}.sqlite3",
            **overrides,
        }
        settings = ServiceSettings(**values)
        app = create_app(
            settings,
            knowledge=knowledge,
            profiles=profiles,
            clock=create_kwargs.pop("clock", MutableClock()),
            **create_kwargs,
        )
        server = ServiceServer(app)
        started.append(server)
        return server, settings, keys

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """A real PostgreSQL server for the session (started once, about 3 s)."""
    bin_dir = find_bin()
    if bin_dir is None:
        pytest.skip(
            "no PostgreSQL server programs (initdb): ./dev test installs Debian's postgresql when "
            "run as root; else apt-get install postgresql"
        )
    pytest.importorskip("psycopg", reason="the postgres extra is not installed")
    with PostgresServer(bin_dir) as server:
        yield server.dsn
