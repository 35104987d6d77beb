"""Configuration of the scheduled job (``fhir-leuko run`` / ``watch``), with pydantic-settings.

Precedence: command-line flags > ``FHIR_LEUKO_<TABLE>_<KEY>`` environment variables > the TOML
file given with ``--config`` > defaults. The TOML file has four tables (a ``[service]`` table, the
CDS Hooks service's, is ignored here)::

    [fhir]
    server = "https://ehr.example.org/fhir"   # FHIR_LEUKO_FHIR_SERVER
    ca_bundle = "/etc/ssl/hospital-ca.pem"    # FHIR_LEUKO_FHIR_CA_BUNDLE
    timeout = 60                              # read timeout, seconds
    [auth]
    method = "smart-backend"                  # none | basic | bearer | client-credentials | smart-backend
    client_id = "fhir-leuko"                  # FHIR_LEUKO_AUTH_CLIENT_ID
    private_key_file = "/run/secrets/fhir-leuko.pem"
    [run]
    overlap = "5m"
    patients_per_request = 25
    metrics_textfile = "/var/lib/node_exporter/textfile/fhir-leuko.prom"
    [state]
    dir = "/var/lib/fhir-leuko"                # FHIR_LEUKO_STATE_DIR (state.sqlite3 in it)

Secrets are never flags (a command line is visible to every user of the machine): they come from
``FHIR_LEUKO_AUTH_PASSWORD`` / ``_TOKEN`` / ``_CLIENT_SECRET`` or from files (``password_file``,
``token_file``, ``client_secret_file``, ``private_key_file``); they are ``SecretStr`` and never
printed.
"""

from __future__ import annotations

import logging
import re
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pydantic
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from ..configfile import layer_sources, read_toml
from ..core.fhirjson import INPUT_TYPES
from ..errors import UsageError
from .state import STATE_FILE, default_state_path, legacy_state_path

if TYPE_CHECKING:
    from ..fhir.auth import Secret

log = logging.getLogger(__name__)

__all__ = [
    "AuthConfig",
    "FhirConfig",
    "JobConfig",
    "RunConfig",
    "StateConfig",
    "build_auth",
    "load_job_config",
    "parse_interval",
]

AuthMethod = Literal["none", "basic", "bearer", "client-credentials", "smart-backend"]

_INTERVAL = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_interval(text: str) -> timedelta:
    """``90s``, ``15m``, ``1h30m``, ``2d`` (or a bare number of seconds) as a timedelta.

    Raises:
        ValueError: not of that form.
    """
    value = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return timedelta(seconds=float(value))
    pos = 0
    total = 0.0
    for match in _INTERVAL.finditer(value):
        if value[pos : match.start()].strip():
            break
        total += float(match[1]) * _UNIT_SECONDS[match[2]]
        pos = match.end()
    if pos == 0 or value[pos:].strip():
        raise ValueError(f"{text!r} is not a duration like '30s', '15m', '1h30m' or '2d'")
    return timedelta(seconds=total)


class _Table(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")


class FhirConfig(_Table):
    server: str | None = None
    """The FHIR R4 base URL (``.../fhir``, ``.../fhir/R4``)."""
    timeout: float = pydantic.Field(default=60.0, gt=0)
    connect_timeout: float = pydantic.Field(default=10.0, gt=0)
    verify: bool = True
    """TLS certificate verification. Leave it on; use ``ca_bundle`` for a private CA."""
    ca_bundle: Path | None = None
    headers: dict[str, str] = {}
    """Extra headers on every FHIR request (e.g. ``Prefer = "handling=strict"``)."""
    page_size: int = pydantic.Field(default=500, ge=1, le=5000)
    retry_attempts: int = pydantic.Field(default=6, ge=1)
    retry_total: float = pydantic.Field(default=120.0, ge=0)
    """Seconds one request may spend waiting between retries in total."""

    @pydantic.field_validator("server")
    @classmethod
    def _http(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s]+", value, re.IGNORECASE):
            raise ValueError("must be an http(s) URL, e.g. https://ehr.example.org/fhir")
        return value.rstrip("/") if value else value


class AuthConfig(_Table):
    method: AuthMethod = "none"
    username: str | None = None
    password: pydantic.SecretStr | None = None
    password_file: Path | None = None
    token: pydantic.SecretStr | None = None
    token_file: Path | None = None
    client_id: str | None = None
    client_secret: pydantic.SecretStr | None = None
    client_secret_file: Path | None = None
    client_auth: Literal["basic", "post"] = "basic"
    """How a client secret is sent: ``client_secret_basic`` (default) or ``client_secret_post``."""
    private_key_file: Path | None = None
    key_id: str | None = None
    algorithm: Literal["RS384", "ES384"] | None = None
    """Inferred from the key when absent: RSA → RS384, EC P-384 → ES384."""
    jku: str | None = None
    token_url: str | None = None
    """Default: discovered from ``[base]/.well-known/smart-configuration``."""
    scope: str = " ".join(
        [
            *(f"system/{rtype}.read" for rtype in INPUT_TYPES),
            "system/DetectedIssue.read",
            "system/DetectedIssue.write",
        ]
    )
    """Read on every type the profiles need (:data:`~fhir_leuko.core.fhirjson.INPUT_TYPES`),
    read and write on DetectedIssue."""
    refresh_margin: float = pydantic.Field(default=60.0, ge=0)
    """Seconds before expiry at which a cached access token is replaced."""


class RunConfig(_Table):
    overlap: str = "5m"
    """Look this far before the watermark again (server clock skew, slow commits)."""
    patients_per_request: int = pydantic.Field(default=25, ge=1, le=200)
    write_mode: Literal["conditional", "put"] = "conditional"
    transactions: Literal["auto", "never"] = "auto"
    max_changes: int = pydantic.Field(default=10_000, ge=1)
    """Changed resources handled per batch (bounded memory; the run continues batch by batch)."""
    profiles: list[Path] = []
    profile: list[str] = []
    log_format: Literal["text", "json"] = "text"
    every: str | None = None
    cron: str | None = None
    stale_lock_after: str = "30m"
    bulk: bool = False
    """``run --bulk``: the pass's patients come from a Bulk Data export (docs/population.md)."""
    bulk_dir: Path | None = None
    """Where ``run --bulk`` keeps the export while a pass runs (default: beside the state file)."""
    metrics_textfile: Path | None = None
    """After each pass, its outcome in Prometheus text format for node_exporter (``*.prom``)."""
    metrics_pushgateway: str | None = None
    """After each pass, push its outcome to this Prometheus Pushgateway URL."""
    metrics_listen: str | None = None
    """``watch``: serve the metrics at ``[HOST:]PORT`` (``/metrics``)."""

    @pydantic.field_validator("overlap", "stale_lock_after", "every")
    @classmethod
    def _interval(cls, value: str | None) -> str | None:
        if value is not None:
            parse_interval(value)
        return value


class ScaleConfig(_Table):
    """Population scale (``evaluate`` and ``run --bulk``; docs/population.md): where the shards
    go and who evaluates them."""

    workers: int = pydantic.Field(default=1, ge=1, le=512)
    """Local worker processes (``--workers``)."""
    dask_scheduler: str | None = None
    """A ``dask.distributed`` scheduler (``tcp://host:8786``): one task per shard there."""
    work_dir: Path | None = None
    """Where the shards are written (default: a temporary directory; with Dask a directory every
    worker can read, e.g. a shared file system)."""


class StateConfig(_Table):
    path: Path | None = None
    """The state file; default ``state.sqlite3`` in ``dir``."""
    dir: Path | None = None
    """The state directory shared with the service (``FHIR_LEUKO_STATE_DIR``); default
    ``$XDG_STATE_HOME/fhir-leuko`` (``configfile.state_dir``)."""


class JobConfig(BaseSettings):
    """The whole job configuration (see the module docstring)."""

    model_config = SettingsConfigDict(
        env_prefix="FHIR_LEUKO_",
        env_nested_delimiter="_",
        env_nested_max_split=1,
        case_sensitive=False,
        extra="ignore",
    )

    fhir: FhirConfig = FhirConfig()
    auth: AuthConfig = AuthConfig()
    run: RunConfig = RunConfig()
    state: StateConfig = StateConfig()
    scale: ScaleConfig = ScaleConfig()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Flags > environment > the TOML file > defaults, layered by configfile.layer_sources.
        return (init_settings,)

    def overlap(self) -> timedelta:
        return parse_interval(self.run.overlap)

    def stale_lock_after(self) -> timedelta:
        return parse_interval(self.run.stale_lock_after)


_TABLES = ("fhir", "auth", "run", "state", "scale")


def _read_tables(path: Path) -> dict[str, Any]:
    data = read_toml(path, f"--config {path}")
    unknown = sorted(k for k in data if k not in (*_TABLES, "service"))
    if unknown:
        raise UsageError(
            f"--config {path}: unknown table(s) {', '.join(unknown)} "
            f"(the job reads [{'], ['.join(_TABLES)}])"
        )
    return {k: v for k, v in data.items() if k in _TABLES}


def resolve_state_path(config: JobConfig) -> Path:
    """The state file: ``[state] path``, else ``state.sqlite3`` in ``[state] dir``, else in the
    default state directory, unless only fhir-leuko 0.1.0's default file exists (then that one,
    with a warning, so an upgrade never starts over as a first pass)."""
    if config.state.path is not None:
        return config.state.path
    if config.state.dir is not None:
        return config.state.dir / STATE_FILE
    path = default_state_path()
    legacy = legacy_state_path()
    if not path.exists() and legacy.exists():
        log.warning(
            "using the state file at its old place %s; move it to %s (or give --state)", legacy, path
        )
        return legacy
    return path


def load_job_config(flags: dict[str, Any], config_file: Path | None = None) -> JobConfig:
    """Build the configuration from flags (nested dict of the flags actually given), the
    environment and the optional TOML file.

    Raises:
        UsageError: an invalid value; the message names the table and key (never a secret).
    """
    file_values = _read_tables(config_file) if config_file else {}
    try:
        return JobConfig(**layer_sources(JobConfig, file_values, flags))
    except pydantic.ValidationError as exc:
        raise UsageError(_validation_message(exc, config_file)) from None


def _validation_message(exc: pydantic.ValidationError, config_file: Path | None) -> str:
    lines = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"])
        table, _, key = where.partition(".")
        env = f"FHIR_LEUKO_{table}_{key}".upper().replace(".", "_") if key else ""
        lines.append(f"[{table}] {key or ''}: {error['msg']} (flag, {env} or --config)".strip())
    origin = f" (config file {config_file})" if config_file else ""
    return "invalid configuration" + origin + ":\n  " + "\n  ".join(lines)


def _secret(
    value: pydantic.SecretStr | None, file: Path | None, env: str, what: str, flag: str
) -> Secret:
    # The auth module (requests, PyJWT, cryptography) only when a command builds auth: `evaluate`
    # reads this configuration too (its [scale] table) and talks to no server.
    from ..fhir.auth import Secret

    if file is not None:
        return Secret(file=file)
    if value is not None:
        return Secret(literal=value.get_secret_value())
    raise UsageError(f"{what} is needed: set {env} or give {flag} FILE")


def build_auth(config: JobConfig) -> Any:
    """The ``requests`` auth object for the configured method (``None`` for ``none``).

    Raises:
        UsageError: a needed value is missing.
    """
    from ..fhir.auth import BearerTokenAuth, ClientCredentialsAuth, SmartBackendAuth

    auth = config.auth
    fhir = config.fhir
    verify: bool | str = str(fhir.ca_bundle) if fhir.ca_bundle else fhir.verify
    if auth.method == "none":
        return None
    if auth.method == "basic":
        if not auth.username:
            raise UsageError("auth method basic needs a user name (--username)")
        password = _secret(
            auth.password,
            auth.password_file,
            "FHIR_LEUKO_AUTH_PASSWORD",
            "a password",
            "--password-file",
        )
        from requests.auth import HTTPBasicAuth

        return HTTPBasicAuth(auth.username, password.get())
    if auth.method == "bearer":
        return BearerTokenAuth(
            _secret(auth.token, auth.token_file, "FHIR_LEUKO_AUTH_TOKEN", "a token", "--token-file")
        )
    if not auth.client_id:
        raise UsageError(f"auth method {auth.method} needs a client id (--client-id)")
    if auth.method == "client-credentials":
        return ClientCredentialsAuth(
            auth.client_id,
            _secret(
                auth.client_secret,
                auth.client_secret_file,
                "FHIR_LEUKO_AUTH_CLIENT_SECRET",
                "a client secret",
                "--client-secret-file",
            ),
            token_url=auth.token_url,
            base_url=fhir.server,
            scope=auth.scope or None,
            method=auth.client_auth,
            timeout=fhir.timeout,
            verify=verify,
            refresh_margin=auth.refresh_margin,
        )
    if auth.private_key_file is None:
        raise UsageError("auth method smart-backend needs a private key (--private-key-file)")
    return SmartBackendAuth(
        auth.client_id,
        auth.private_key_file,
        key_id=auth.key_id,
        algorithm=auth.algorithm,
        token_url=auth.token_url,
        base_url=fhir.server,
        scope=auth.scope or None,
        jku=auth.jku,
        timeout=fhir.timeout,
        verify=verify,
        refresh_margin=auth.refresh_margin,
    )
