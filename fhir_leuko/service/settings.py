"""Configuration of the CDS Hooks service: a ``[service]`` TOML table and ``FHIR_LEUKO_SERVICE_*``.

Sources of :func:`load_settings`, highest precedence first: keyword arguments, environment
variables ``FHIR_LEUKO_SERVICE_<FIELD>`` (nested with ``__``, e.g.
``FHIR_LEUKO_SERVICE_TESTING__ALLOW_HTTP=true``; lists and tables as JSON), then the ``[service]``
table of the file given to :func:`load_settings` (``fhir-leuko serve --config FILE``). The scheduled
job reads ``FHIR_LEUKO_*`` without ``SERVICE`` and the tables ``[fhir]``, ``[auth]``, ``[run]`` and
``[state]``, so one file can configure both. Relative paths in the file are relative to the file.

Every key is documented in docs/cds-hooks.md; examples/cds/service.toml is a complete example.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import pydantic
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from ..configfile import layer_sources, read_toml, state_dir
from ..errors import UsageError

__all__ = [
    "ClientSettings",
    "CodingSettings",
    "ServiceSettings",
    "TestingSettings",
    "load_settings",
]

ENV_PREFIX = "FHIR_LEUKO_SERVICE_"

Text = Annotated[str, pydantic.StringConstraints(strip_whitespace=True, min_length=1)]


class _Table(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)


class ClientSettings(_Table):
    """One trusted CDS client (an EHR), identified by the ``iss`` of its JWTs."""

    iss: Text
    """The JWT ``iss`` this client signs with (CDS Hooks 2.0 §Trusting CDS Clients)."""
    jwks_url: str | None = None
    """Where its JWK Set is published; used when a token carries no ``jku``."""
    jwks_file: Path | None = None
    """Its JWK Set exchanged out of band, as a file; used when a token carries no ``jku``."""
    jku: list[str] = []
    """The ``jku`` URLs its tokens may name. A token naming any other ``jku`` is rejected, and an
    unregistered ``jku`` is never fetched."""
    fhir_servers: list[str] = []
    """The FHIR base URLs (``fhirServer``) of this client the service may call with its
    ``fhirAuthorization``. Any other ``fhirServer`` is never contacted."""
    tenants: list[str] = []
    """If given, the JWT ``tenant`` claim must be one of these."""

    @pydantic.model_validator(mode="after")
    def _has_keys(self) -> ClientSettings:
        if not (self.jwks_url or self.jwks_file or self.jku):
            raise ValueError(f"client {self.iss!r}: give jwks_url, jwks_file or jku")
        if self.jwks_url and self.jwks_file:
            raise ValueError(f"client {self.iss!r}: give jwks_url or jwks_file, not both")
        return self


class TestingSettings(_Table):
    """Switches for local tests only. Each one weakens the service; all are off by default."""

    __test__ = False  # not a pytest test class

    disable_jwt: bool = False
    """Accept requests without a JWT (every configured ``fhir_servers`` entry is then allowed)."""
    allow_http: bool = False
    """Accept ``http://`` URLs (public base URL, JWKS, ``fhirServer``); CDS Hooks requires https."""
    allow_cors_wildcard: bool = False
    """Allow ``cors_origins = ["*"]``."""
    as_of: pydantic.AwareDatetime | None = None
    """Evaluate every call as of this fixed time instead of now (reproducible demos and tests;
    JWT times are checked against it too)."""


class CodingSettings(_Table):
    system: Text
    code: Text
    display: Text


# The CBC order a card suggests. LOINC 57021-8 "CBC W Auto Differential panel - Blood" is the
# orderable CBC with differential (clinical.md §1.2: healthassure LOINC copy "ACTIVE, Order";
# CIBMTR value sets; a US lab catalogue's "CBC w/ auto diff"). Sites map it to their own orderable.
DEFAULT_CBC_ORDER = CodingSettings(
    system="http://loinc.org", code="57021-8", display="CBC W Auto Differential panel - Blood"
)

OVERRIDE_REASON_SYSTEM = "https://fhir-leuko.github.io/fhir/CodeSystem/cds-override-reason"
"""fhir-leuko's own code system of card override reasons (CDS Hooks 2.0 leaves the set open)."""

DEFAULT_OVERRIDE_REASONS = (
    CodingSettings(
        system=OVERRIDE_REASON_SYSTEM,
        code="benefit-outweighs-risk",
        display="Benefit outweighs the risk for this patient",
    ),
    CodingSettings(
        system=OVERRIDE_REASON_SYSTEM,
        code="recent-count-elsewhere",
        display="A recent blood count exists outside this record",
    ),
    CodingSettings(
        system=OVERRIDE_REASON_SYSTEM,
        code="count-already-ordered",
        display="A blood count is already ordered",
    ),
    CodingSettings(
        system=OVERRIDE_REASON_SYSTEM,
        code="haematology-involved",
        display="Haematology is already involved",
    ),
    CodingSettings(
        system=OVERRIDE_REASON_SYSTEM, code="not-relevant", display="Not relevant for this patient"
    ),
)


FEEDBACK_FILE = "cds-feedback.sqlite3"


def _default_database() -> Path:
    """``cds-feedback.sqlite3`` in the state directory shared with the job (``state_dir``)."""
    return state_dir() / FEEDBACK_FILE


def _check_url(value: str, field: str, allow_http: bool) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.netloc:
        raise ValueError(f"{field}: {value!r} is not an absolute http(s) URL")
    if parts.scheme == "http" and not allow_http:
        raise ValueError(
            f"{field}: {value!r} must use https (set [service.testing] allow_http = true for "
            "local tests only)"
        )
    return value


class ServiceSettings(BaseSettings):
    """Everything ``fhir-leuko serve`` and :func:`create_app` read. See docs/cds-hooks.md.

    :func:`load_settings` layers the environment and the file under its arguments; constructed
    directly, the settings hold exactly the values given (tests do this)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", frozen=True
    )

    public_base_url: str | None = None
    """The base URL clients call (``{public_base_url}/cds-services``). JWT ``aud`` is checked
    against URLs built from it, never from the Host header. Required unless JWT is disabled."""
    host: str = "127.0.0.1"
    port: int = pydantic.Field(default=8080, ge=1, le=65535)
    clients: list[ClientSettings] = []
    cors_origins: list[str] = []
    """Browser origins allowed by CORS (e.g. an EHR's web client); none by default."""
    max_body_bytes: int = pydantic.Field(default=8 * 1024 * 1024, gt=0)
    request_timeout_seconds: float = pydantic.Field(default=10.0, gt=0)
    """A hook call not answered within this time gets 503 with an OperationOutcome."""
    fetch_timeout_seconds: float = pydantic.Field(default=5.0, gt=0)
    """Connect and read timeout of each call to a client's FHIR server."""
    fetch_max_pages: int = pydantic.Field(default=20, ge=1)
    fetch_workers: int = pydantic.Field(default=16, ge=1, le=128)
    """Threads fetching missing prefetch keys (in parallel), shared by all requests."""
    jwt_leeway_seconds: int = pydantic.Field(default=60, ge=0, le=60)
    """Clock skew allowed on ``exp``, ``iat`` and ``nbf`` (at most 60 s)."""
    jwt_max_lifetime_seconds: int = pydantic.Field(default=3600, gt=0)
    """Longest ``exp - iat`` accepted (CDS Hooks best practices: no more than an hour)."""
    jwks_cache_seconds: float = pydantic.Field(default=300.0, gt=0)
    jwks_refetch_seconds: float = pydantic.Field(default=30.0, ge=0)
    """At most one JWKS refetch per key set in this time when a token names an unknown ``kid``."""
    jwks_timeout_seconds: float = pydantic.Field(default=5.0, gt=0)
    store: Literal["sqlite", "postgresql"] = "sqlite"
    """Where the JWT replay cache (and, with PostgreSQL, the issued cards and feedback) live:
    ``sqlite`` (the embedded default, one machine: ``feedback_database``; every process on it,
    ``--workers N`` included, shares the file) or ``postgresql`` (several replicas)."""
    database_url: pydantic.SecretStr | None = None
    """``store = "postgresql"``: ``postgresql://user@host/db`` (``FHIR_LEUKO_SERVICE_DATABASE_URL``;
    it may hold a password: prefer the environment or ``database_url_file``)."""
    database_url_file: Path | None = None
    state_dir: Path | None = None
    """The state directory shared with the job (``serve --state-dir``, ``[state] dir`` of the
    same file, ``FHIR_LEUKO_STATE_DIR``; default ``$XDG_STATE_HOME/fhir-leuko``)."""
    feedback_database: Path = pydantic.Field(default_factory=_default_database)
    """Default: ``cds-feedback.sqlite3`` in the state directory."""
    issued_card_retention_days: int = pydantic.Field(default=90, ge=0)
    """Days the issued cards are kept for matching feedback (0: forever)."""
    card_page_days: int = pydantic.Field(default=7, ge=0)
    """Days a card's page link (``GET /cards/{uuid}?token=...``: the full explanation and the
    trend plot) works, at most the retention; 0: cards get no page link. Needs
    ``public_base_url``."""
    snooze_after_override_hours: float = pydantic.Field(default=0.0, ge=0, le=24 * 365)
    """After a clinician overrides a card, the same finding for that patient is not shown again
    by that service for this long, unless it worsens (a deeper grade or a lower value); 0: off.
    A profile's ``[card] snooze_after_override_hours`` takes precedence for its findings."""
    silent_services: list[str] = []
    """Services (ids, e.g. ``leuko-patient-view``) in silent mode: cards are computed, stored
    and logged but not returned (a pilot); review them with ``fhir-leuko cards list``."""
    profiles: list[Path] = []
    """Site profile directories, as ``fhir-leuko evaluate --profiles``."""
    profile_ids: list[str] = []
    """Evaluate only these profiles (default: all active ones)."""
    documentation_url: str = "https://fhir-leuko.github.io/"
    """Absolute link on every card to the documentation."""
    cbc_order: CodingSettings = DEFAULT_CBC_ORDER
    override_reasons: list[CodingSettings] = pydantic.Field(
        default_factory=lambda: list(DEFAULT_OVERRIDE_REASONS)
    )
    openapi: bool = True
    """Serve the OpenAPI document at /openapi.json."""
    workers: int = pydantic.Field(default=1, ge=1, le=64)
    """``serve``'s worker processes (``--workers``); they share the store and the metrics."""
    log_format: Literal["text", "json"] = "text"
    """``serve``'s log lines: text, or one JSON object per line (``--log-format``)."""
    docs: bool = False
    """Serve the Swagger UI viewer at /docs. Off by default: its scripts and styles load from a
    public CDN, so on an air-gapped network it renders blank (and the browser calls out)."""
    metrics: bool = True
    """Serve Prometheus metrics at GET /metrics (no patient data; ``fhir_leuko.service.metrics``)."""
    metrics_port: int | None = pydantic.Field(default=None, ge=1, le=65535)
    """Serve /metrics on this port of ``metrics_host`` instead of the service's own port."""
    metrics_host: str = "127.0.0.1"
    metrics_token_file: Path | None = None
    """If given, /metrics needs ``Authorization: Bearer <the file's content>``."""
    testing: TestingSettings = TestingSettings()

    @pydantic.model_validator(mode="before")
    @classmethod
    def _database_in_state_dir(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("state_dir") and not data.get("feedback_database"):
            data = {**data, "feedback_database": Path(data["state_dir"]) / FEEDBACK_FILE}
        return data

    @pydantic.model_validator(mode="after")
    def _consistent(self) -> ServiceSettings:
        allow_http = self.testing.allow_http
        if self.public_base_url is not None:
            url = _check_url(self.public_base_url, "public_base_url", allow_http)
            object.__setattr__(self, "public_base_url", url.rstrip("/"))
        elif not self.testing.disable_jwt:
            raise ValueError(
                "public_base_url is required: the URL clients call, e.g. "
                "'https://cds.example.org' (JWT 'aud' is checked against it)"
            )
        if not self.testing.disable_jwt and not self.clients:
            raise ValueError(
                "no [[service.clients]]: configure at least one trusted CDS client (iss and its "
                "keys), see docs/cds-hooks.md"
            )
        seen: set[str] = set()
        for index, client in enumerate(self.clients):
            where = f"clients[{index}]"
            if client.iss in seen:
                raise ValueError(f"{where}: iss {client.iss!r} is configured twice")
            seen.add(client.iss)
            if client.jwks_url:
                _check_url(client.jwks_url, f"{where}.jwks_url", allow_http)
            for jku in client.jku:
                _check_url(jku, f"{where}.jku", allow_http)
            servers = [
                _check_url(s, f"{where}.fhir_servers", allow_http).rstrip("/")
                for s in client.fhir_servers
            ]
            object.__setattr__(client, "fhir_servers", servers)
        _check_url(self.documentation_url, "documentation_url", allow_http=False)
        if self.workers > 1 and self.metrics_port is not None:
            raise ValueError(
                "metrics_port: with workers > 1, /metrics is served on the service's own port"
            )
        if self.store == "postgresql" and not (self.database_url or self.database_url_file):
            raise ValueError(
                'store = "postgresql" needs FHIR_LEUKO_SERVICE_DATABASE_URL or database_url_file'
            )
        if "*" in self.cors_origins and not self.testing.allow_cors_wildcard:
            raise ValueError(
                "cors_origins: '*' is allowed only with [service.testing] allow_cors_wildcard; "
                "list the EHR origins instead"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Keyword arguments > environment > the file's [service] table > defaults, layered by
        # configfile.layer_sources in load_settings.
        return (init_settings,)


def _resolve_paths(table: dict[str, Any], base: Path) -> dict[str, Any]:
    """Relative paths in the file are relative to the file's directory."""

    def rel(value: Any) -> Any:
        if isinstance(value, str) and value and not Path(value).is_absolute():
            return str(base / value)
        return value

    out = dict(table)
    for key in ("feedback_database", "state_dir", "metrics_token_file", "database_url_file"):
        if key in out:
            out[key] = rel(out[key])
    if isinstance(out.get("profiles"), list):
        out["profiles"] = [rel(p) for p in out["profiles"]]
    if isinstance(out.get("clients"), list):
        out["clients"] = [
            {**c, "jwks_file": rel(c["jwks_file"])}
            if isinstance(c, dict) and "jwks_file" in c
            else c
            for c in out["clients"]
        ]
    return out


def _field_path(loc: tuple[int | str, ...]) -> str:
    text = ""
    for item in loc:
        text += f"[{item}]" if isinstance(item, int) else (f".{item}" if text else str(item))
    return text


def load_settings(config_file: Path | None = None, **overrides: Any) -> ServiceSettings:
    """The service settings from ``config_file``'s ``[service]`` table, the environment and
    ``overrides``.

    Raises:
        UsageError: the file cannot be read or parsed, has no ``[service]`` table, or a value is
            invalid; the message names the file and the field.
    """
    table: dict[str, Any] = {}
    where = str(config_file) if config_file else f"no --config FILE, {ENV_PREFIX}* variables only"
    if config_file is not None:
        document = read_toml(config_file, str(config_file))
        service = document.get("service")
        if not isinstance(service, dict):
            raise UsageError(f"{config_file}: no [service] table (see examples/cds/service.toml)")
        shared = document.get("state")
        if isinstance(shared, dict) and "dir" in shared and "state_dir" not in service:
            # One state directory for the job and the service: the job's [state] dir.
            service = {**service, "state_dir": shared["dir"]}
        table = _resolve_paths(service, config_file.resolve().parent)
    try:
        return ServiceSettings(**layer_sources(ServiceSettings, table, overrides))
    except pydantic.ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        field = _field_path(tuple(first["loc"]))
        message = str(first["msg"]).removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            message = "unknown setting (see docs/cds-hooks.md)"
        prefix = f"[service] {field}: " if field else ""
        raise UsageError(f"{where}: {prefix}{message}") from None


def database_url(settings: ServiceSettings) -> str:
    """The PostgreSQL connection string (``database_url``, else the file's first line).

    Raises:
        UsageError: the file cannot be read.
    """
    if settings.database_url is not None:
        return settings.database_url.get_secret_value()
    assert settings.database_url_file is not None
    try:
        return settings.database_url_file.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise UsageError(f"{settings.database_url_file}: cannot read: {exc.strerror}") from None
