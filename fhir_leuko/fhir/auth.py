"""Authentication to a FHIR server: none, HTTP basic, a static bearer token, OAuth2 client
credentials with a secret, and SMART Backend Services (``private_key_jwt``, RS384 or ES384).

Every auth here is a ``requests.auth.AuthBase`` that :class:`fhir_leuko.fhir.client.FhirClient`
(or any ``requests`` call) can use. The token-based ones also have ``invalidate()``, which the
client calls once on a 401 to get a fresh token.

Secrets are :class:`Secret` objects read from an environment variable or a file (re-read on each
new token, so a rotated file is picked up) and never appear in ``repr``, logs or error messages.

SMART Backend Services (https://hl7.org/fhir/smart-app-launch/backend-services.html): the token
endpoint is taken from ``[base]/.well-known/smart-configuration`` unless configured; the client
authenticates with a JWT assertion (``iss`` = ``sub`` = client id, ``aud`` = token URL, ``exp``
five minutes ahead at most, a unique ``jti``) signed with its private key (RS384 for RSA keys,
ES384 for EC P-384 keys, which Epic and Oracle Health require). Access tokens are reused until
shortly before they expire (``refresh_margin``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import jwt
import orjson
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ..errors import AuthError, FhirTemporaryError, UsageError
from .client import operation_outcome_text

__all__ = [
    "BearerTokenAuth",
    "ClientCredentialsAuth",
    "Secret",
    "SmartBackendAuth",
    "discover_token_endpoint",
    "load_private_key",
]

log = logging.getLogger(__name__)

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


@dataclass(frozen=True)
class Secret:
    """A secret value from an environment variable, a file, or (in tests) a literal.

    ``repr`` and ``str`` never show the value; :meth:`get` reads it (files are re-read each time,
    without the trailing newline).
    """

    env: str | None = None
    file: Path | None = None
    literal: str | None = None

    def get(self) -> str:
        if self.literal is not None:
            return self.literal
        if self.file is not None:
            try:
                return self.file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise UsageError(f"cannot read secret file {self.file}: {exc.strerror}") from None
        if self.env is not None:
            value = os.environ.get(self.env)
            if value is None:
                raise UsageError(f"environment variable {self.env} is not set")
            return value
        raise UsageError("no secret configured")

    def __repr__(self) -> str:
        where = f"file {self.file}" if self.file else f"${self.env}" if self.env else "literal"
        return f"Secret({where}, value hidden)"

    __str__ = __repr__


class BearerTokenAuth(requests.auth.AuthBase):
    """A static bearer token (``Authorization: Bearer ...``), e.g. from a token file."""

    def __init__(self, token: Secret) -> None:
        self.token = token
        self._value: str | None = None

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        if self._value is None:
            self._value = self.token.get()
        r.headers["Authorization"] = f"Bearer {self._value}"
        return r

    def invalidate(self) -> None:
        """Re-read the token on the next request (a token file may have been rotated)."""
        self._value = None

    def __repr__(self) -> str:
        return "BearerTokenAuth(token hidden)"


def discover_token_endpoint(
    session: requests.Session, base_url: str, *, timeout: float = 30, verify: bool | str = True
) -> str:
    """The ``token_endpoint`` from ``[base]/.well-known/smart-configuration``.

    Raises:
        AuthError: no SMART configuration or no token endpoint in it.
        FhirTemporaryError: the server could not be reached.
    """
    url = f"{base_url.rstrip('/')}/.well-known/smart-configuration"
    try:
        response = session.get(
            url, headers={"Accept": "application/json"}, timeout=timeout, verify=verify
        )
    except requests.RequestException as exc:
        raise FhirTemporaryError(
            f"GET {url}: {exc.__class__.__name__} (no response)", url=url
        ) from None
    if response.status_code >= 500 or response.status_code == 429:
        raise FhirTemporaryError(
            f"GET {url}: HTTP {response.status_code}", status=response.status_code
        )
    if response.status_code != 200:
        raise AuthError(
            f"GET {url}: HTTP {response.status_code}: the server publishes no SMART configuration; "
            "set the token URL explicitly (--token-url)",
            status=response.status_code,
            url=url,
        )
    try:
        endpoint = orjson.loads(response.content).get("token_endpoint")
    except (orjson.JSONDecodeError, AttributeError):
        endpoint = None
    if not isinstance(endpoint, str) or not endpoint:
        raise AuthError(f"GET {url}: no token_endpoint in the SMART configuration", url=url)
    return endpoint


def load_private_key(path: Path) -> tuple[Any, Literal["RS384", "ES384"]]:
    """A PEM private key and the JWT algorithm it signs with (RSA → RS384, EC P-384 → ES384)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read private key {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 2048:
            raise UsageError(f"{path}: RSA key of {key.key_size} bits; SMART needs >= 2048")
        return key, "RS384"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if key.curve.name != "secp384r1":
            raise UsageError(f"{path}: EC key on {key.curve.name}; ES384 needs P-384 (secp384r1)")
        return key, "ES384"
    raise UsageError(f"{path}: unsupported key type {type(key).__name__} (use RSA or EC P-384)")


class _TokenAuth(requests.auth.AuthBase):
    """An OAuth2 access token from a token endpoint, cached until shortly before it expires."""

    def __init__(
        self,
        *,
        token_url: str | None,
        base_url: str | None,
        scope: str | None,
        session: requests.Session | None,
        timeout: float,
        verify: bool | str,
        clock: Callable[[], float],
        refresh_margin: float,
    ) -> None:
        if token_url is None and base_url is None:
            raise UsageError("a token URL or the FHIR base URL (for SMART discovery) is needed")
        self.token_url = token_url
        self.base_url = base_url
        self.scope = scope
        self.session = session if session is not None else requests.Session()
        self.timeout = timeout
        self.verify = verify
        self.clock = clock
        self.refresh_margin = refresh_margin
        self._token: str | None = None
        self._expires = 0.0
        self._lock = threading.Lock()
        self.tokens_fetched = 0

    def _form(self, token_url: str) -> tuple[dict[str, str], requests.auth.AuthBase | None]:
        raise NotImplementedError

    def endpoint(self) -> str:
        if self.token_url is None:
            assert self.base_url is not None
            self.token_url = discover_token_endpoint(
                self.session, self.base_url, timeout=self.timeout, verify=self.verify
            )
        return self.token_url

    def _fetch(self) -> None:
        url = self.endpoint()
        form, auth = self._form(url)
        form["grant_type"] = "client_credentials"
        if self.scope:
            form["scope"] = self.scope
        try:
            response = self.session.post(
                url,
                data=form,
                auth=auth,
                headers={"Accept": "application/json"},
                timeout=self.timeout,
                verify=self.verify,
                allow_redirects=False,
            )
        except requests.RequestException as exc:
            raise FhirTemporaryError(
                f"POST {url}: {exc.__class__.__name__} (no response from the token endpoint)",
                url=url,
            ) from None
        if response.status_code >= 500 or response.status_code == 429:
            raise FhirTemporaryError(
                f"POST {url}: HTTP {response.status_code} from the token endpoint",
                status=response.status_code,
                url=url,
            )
        if response.status_code != 200:
            text = operation_outcome_text(response.content)
            raise AuthError(
                f"POST {url}: the token endpoint refused the client: HTTP {response.status_code}"
                + (f": {text}" if text else ""),
                status=response.status_code,
                url=url,
                outcome=text,
            )
        try:
            data = orjson.loads(response.content)
            token = data["access_token"]
            lifetime = float(data.get("expires_in") or 300)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            raise AuthError(
                f"POST {url}: the token endpoint's answer has no access_token"
            ) from None
        if not isinstance(token, str) or not token:
            raise AuthError(f"POST {url}: empty access_token")
        self.tokens_fetched += 1
        self._token = token
        # Reuse until shortly before expiry: the margin, but never more than half the lifetime.
        self._expires = self.clock() + lifetime - min(self.refresh_margin, lifetime / 2)
        log.info("access token obtained (valid %.0f s)", lifetime)

    def token(self) -> str:
        with self._lock:
            if self._token is None or self.clock() >= self._expires:
                self._fetch()
            assert self._token is not None
            return self._token

    def invalidate(self) -> None:
        """Forget the cached token: the next request gets a new one."""
        with self._lock:
            self._token = None

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        r.headers["Authorization"] = f"Bearer {self.token()}"
        return r

    def __repr__(self) -> str:
        return f"{type(self).__name__}(token_url={self.token_url!r}, credentials hidden)"


class ClientCredentialsAuth(_TokenAuth):
    """OAuth2 client credentials with a client secret (``client_secret_basic`` or ``_post``)."""

    def __init__(
        self,
        client_id: str,
        client_secret: Secret,
        *,
        token_url: str | None = None,
        base_url: str | None = None,
        scope: str | None = None,
        method: Literal["basic", "post"] = "basic",
        session: requests.Session | None = None,
        timeout: float = 30,
        verify: bool | str = True,
        clock: Callable[[], float] = time.monotonic,
        refresh_margin: float = 60,
    ) -> None:
        super().__init__(
            token_url=token_url,
            base_url=base_url,
            scope=scope,
            session=session,
            timeout=timeout,
            verify=verify,
            clock=clock,
            refresh_margin=refresh_margin,
        )
        self.client_id = client_id
        self.client_secret = client_secret
        self.method = method

    def _form(self, token_url: str) -> tuple[dict[str, str], requests.auth.AuthBase | None]:
        secret = self.client_secret.get()
        if self.method == "post":
            return {"client_id": self.client_id, "client_secret": secret}, None
        return {}, requests.auth.HTTPBasicAuth(self.client_id, secret)


class SmartBackendAuth(_TokenAuth):
    """SMART Backend Services: ``private_key_jwt`` client authentication (RS384 or ES384)."""

    def __init__(
        self,
        client_id: str,
        private_key_file: Path,
        *,
        key_id: str | None = None,
        algorithm: Literal["RS384", "ES384"] | None = None,
        token_url: str | None = None,
        base_url: str | None = None,
        scope: str | None = None,
        jku: str | None = None,
        session: requests.Session | None = None,
        timeout: float = 30,
        verify: bool | str = True,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        refresh_margin: float = 60,
    ) -> None:
        super().__init__(
            token_url=token_url,
            base_url=base_url,
            scope=scope,
            session=session,
            timeout=timeout,
            verify=verify,
            clock=clock,
            refresh_margin=refresh_margin,
        )
        self.client_id = client_id
        self.key, inferred = load_private_key(private_key_file)
        if algorithm is not None and algorithm != inferred:
            raise UsageError(
                f"{private_key_file}: algorithm {algorithm} does not fit the key ({inferred})"
            )
        self.algorithm = inferred
        self.key_id = key_id
        self.jku = jku
        self.wall_clock = wall_clock

    def assertion(self, token_url: str) -> str:
        """A signed client assertion for one token request (fresh ``jti`` each time)."""
        now = int(self.wall_clock())
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": token_url,
            "iat": now,
            # Backend Services: "exp ... no more than five minutes in the future".
            "exp": now + 240,
            "jti": str(uuid.uuid4()),
        }
        headers: dict[str, str] = {"typ": "JWT"}
        if self.key_id:
            headers["kid"] = self.key_id
        if self.jku:
            headers["jku"] = self.jku
        return jwt.encode(claims, self.key, algorithm=self.algorithm, headers=headers)

    def _form(self, token_url: str) -> tuple[dict[str, str], requests.auth.AuthBase | None]:
        return {
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": self.assertion(token_url),
        }, None
