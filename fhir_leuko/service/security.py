"""Authentication of CDS clients: the JWT bearer token of CDS Hooks 2.0 §Trusting CDS Clients.

Every request (discovery, service, feedback) carries ``Authorization: Bearer <JWT>``. A token is
accepted only if all of these hold (CDS Hooks 2.0 and its best-practices page; cds-hooks.md §1.7):

* header ``typ`` is ``JWT``; ``alg`` is ES384 or RS384 (never ``none``, never a symmetric ``HS*``);
  ``kid`` is present;
* ``iss`` is a configured client; a ``jku``, when present, is one registered for that client
  (an unregistered ``jku`` is never fetched); otherwise the client's ``jwks_url`` or ``jwks_file``;
* the signature verifies with the key of that ``kid`` (JWKS cached; an unknown ``kid`` triggers one
  rate-limited refetch, so clients can rotate keys); the key's type matches ``alg``;
* ``aud`` is the exact endpoint URL, built from the configured public base URL (never from the Host
  header); ``exp`` is in the future and ``iat`` not in the future, with at most 60 s of leeway;
  ``exp - iat`` is within the configured maximum lifetime;
* ``tenant`` is allowed when the client lists tenants; ``jti`` was not seen before (replay cache,
  kept until the token expires).

Any failure is :class:`~fhir_leuko.errors.AuthenticationError` (HTTP 401 without detail). The reason
is logged with ``iss``, ``kid`` and ``jti`` only: never the token.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import orjson
import requests

from ..errors import AuthenticationError
from .replay import ReplayStore
from .settings import ClientSettings, ServiceSettings

__all__ = [
    "ALLOWED_ALGORITHMS",
    "REJECTION_REASONS",
    "Caller",
    "JwksCache",
    "JwtVerifier",
    "ReplayCache",
    "keys_from_jwks",
]

logger = logging.getLogger("fhir_leuko.service.security")

ALLOWED_ALGORITHMS = frozenset({"ES384", "RS384"})
"""CDS Hooks 2.0: ES384 and RS384 are RECOMMENDED; ``none`` and symmetric algorithms SHALL NOT be
used. fhir-leuko trusts exactly these two."""

_MIN_RSA_BITS = 2048


@dataclass(frozen=True, slots=True)
class Caller:
    """Who called, once authenticated: the client's ``iss`` and what it may let us contact."""

    iss: str | None
    """``None`` only when JWT checking is disabled for tests."""
    tenant: str | None
    jti: str | None
    fhir_servers: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Key:
    alg: str
    key: Any


@dataclass(slots=True)
class _KeySet:
    keys: dict[str, _Key]
    fetched: float
    """``time.monotonic()`` of the fetch (or of the last failed attempt)."""


def keys_from_jwks(document: Any) -> dict[str, _Key]:
    """Usable signature keys of a JWK Set, by ``kid``: EC P-384 (ES384) and RSA >= 2048 (RS384)."""
    found: dict[str, _Key] = {}
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        return found
    for jwk in entries:
        if not isinstance(jwk, dict):
            continue
        kid, kty = jwk.get("kid"), jwk.get("kty")
        if not isinstance(kid, str) or not kid or jwk.get("use", "sig") != "sig":
            continue
        if kty == "EC" and jwk.get("crv") == "P-384":
            alg = "ES384"
        elif kty == "RSA":
            alg = "RS384"
        else:
            continue  # other curves, symmetric ("oct") and unknown key types are never trusted
        if jwk.get("alg", alg) != alg:
            continue
        try:
            key = jwt.PyJWK(jwk, algorithm=alg).key
        except jwt.PyJWTError:
            continue
        if alg == "RS384" and getattr(key, "key_size", 0) < _MIN_RSA_BITS:
            continue
        found[kid] = _Key(alg, key)
    return found


class JwksCache:
    """JWK Sets by location (URL or file), cached; an unknown ``kid`` refetches at most once per
    ``refetch_seconds`` per location, so a client can rotate keys without a restart while a flood of
    bad tokens cannot make the service hammer the client's JWKS endpoint."""

    def __init__(
        self,
        *,
        session: requests.Session | None = None,
        cache_seconds: float = 300.0,
        refetch_seconds: float = 30.0,
        timeout: float = 5.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._session = session or requests.Session()
        self._cache_seconds = cache_seconds
        self._refetch_seconds = refetch_seconds
        self._timeout = timeout
        self._monotonic = monotonic
        self._sets: dict[str, _KeySet] = {}
        self._lock = threading.Lock()

    def key(self, location: str, kid: str) -> _Key | None:
        """The key ``kid`` of the JWK Set at ``location`` (``https://…`` or ``file:PATH``)."""
        now = self._monotonic()
        with self._lock:
            cached = self._sets.get(location)
        if cached is not None:
            fresh = now - cached.fetched < self._cache_seconds
            if kid in cached.keys and fresh:
                return cached.keys[kid]
            if fresh and now - cached.fetched < self._refetch_seconds:
                return cached.keys.get(kid)  # fetched moments ago: do not refetch yet
        return self._refresh(location, cached, now).get(kid)

    def usable(self, location: str) -> bool:
        """Whether the JWK Set at ``location`` has a usable key: cached while fresh, else loaded
        again (at most once per ``refetch_seconds``; kept keys count through an outage)."""
        now = self._monotonic()
        with self._lock:
            cached = self._sets.get(location)
        if cached is not None:
            age = now - cached.fetched
            if (cached.keys and age < self._cache_seconds) or age < self._refetch_seconds:
                return bool(cached.keys)
        return bool(self._refresh(location, cached, now))

    def _refresh(self, location: str, cached: _KeySet | None, now: float) -> dict[str, _Key]:
        keys = self._load(location)
        with self._lock:
            if keys is None:
                # Keep serving the old keys through an outage, and wait before retrying.
                old = cached.keys if cached is not None else {}
                self._sets[location] = _KeySet(old, now)
                return old
            self._sets[location] = _KeySet(keys, now)
        return keys

    def _load(self, location: str) -> dict[str, _Key] | None:
        try:
            if location.startswith("file:"):
                data: Any = orjson.loads(Path(location[5:]).read_bytes())
            else:
                response = self._session.get(
                    location,
                    timeout=self._timeout,
                    allow_redirects=False,
                    headers={"Accept": "application/json"},
                )
                if response.status_code != 200:
                    logger.warning("JWKS %s: HTTP %s", location, response.status_code)
                    return None
                data = orjson.loads(response.content)
        except (OSError, requests.RequestException, orjson.JSONDecodeError) as exc:
            logger.warning("JWKS %s: cannot load (%s)", location, type(exc).__name__)
            return None
        return keys_from_jwks(data)


class ReplayCache:
    """``jti`` values already used, per issuer, kept until their token can no longer be accepted."""

    def __init__(self, max_entries: int = 200_000) -> None:
        self._seen: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()
        self._max = max_entries

    def first_use(self, iss: str, jti: str, keep_until: float, now: float) -> bool:
        """Record ``jti``; ``False`` if it was used before (or the cache is full of live tokens)."""
        key = (iss, jti)
        with self._lock:
            if key in self._seen:
                return False
            if len(self._seen) >= self._max:
                self._seen = {k: t for k, t in self._seen.items() if t >= now}
                if len(self._seen) >= self._max:
                    logger.warning("JWT replay cache full of live tokens: refusing new tokens")
                    return False
            self._seen[key] = keep_until
            return True


REJECTION_REASONS = (
    "missing",
    "malformed",
    "header",
    "algorithm",
    "issuer",
    "jku",
    "key",
    "signature",
    "audience",
    "claims",
    "expired",
    "not_yet_valid",
    "lifetime",
    "tenant",
    "replay",
)
"""The reasons a JWT is refused, as counted in ``fhir_leuko_cds_jwt_rejections_total{reason}``."""


class _Rejected(Exception):
    """Internal: why a token was rejected (logged, never sent); ``reason`` is one of
    :data:`REJECTION_REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _reason(exc: jwt.PyJWTError) -> str:
    """The rejection reason of a PyJWT error."""
    if isinstance(exc, jwt.InvalidSignatureError):
        return "signature"
    if isinstance(exc, jwt.InvalidAudienceError):
        return "audience"
    if isinstance(exc, jwt.InvalidIssuerError):
        return "issuer"
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return "claims"
    return "malformed"


def _number(claims: dict[str, Any], name: str) -> float:
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Rejected("claims", f"'{name}' missing or not a number")
    return float(value)


def _bearer(authorization: str | None) -> str:
    if not authorization:
        raise _Rejected("missing", "no Authorization header")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _Rejected("missing", "Authorization is not a Bearer token")
    return token.strip()


class JwtVerifier:
    """Checks the JWT of each request against the configured clients (see module docstring)."""

    def __init__(
        self,
        settings: ServiceSettings,
        *,
        jwks: JwksCache,
        clock: Callable[[], float],
        replay: ReplayStore | None = None,
        on_reject: Callable[[str], None] | None = None,
    ) -> None:
        """``on_reject(reason)`` is called for each refused token (metrics)."""
        self._disabled = settings.testing.disable_jwt
        self._clients = {c.iss: c for c in settings.clients}
        self._all_servers = tuple(
            dict.fromkeys(s for c in settings.clients for s in c.fhir_servers)
        )
        self._jwks = jwks
        self._clock = clock
        self._replay = replay or ReplayCache()
        self._on_reject = on_reject
        self._leeway = settings.jwt_leeway_seconds
        self._max_lifetime = settings.jwt_max_lifetime_seconds

    def verify(self, authorization: str | None, audience: str) -> Caller:
        """The authenticated caller of a request to the endpoint ``audience``.

        Raises:
            AuthenticationError: the token is missing or fails any check (module docstring).
        """
        if self._disabled:
            return Caller(None, None, None, self._all_servers)
        claims: dict[str, Any] = {}
        header: dict[str, Any] = {}
        try:
            token = _bearer(authorization)
            return self._verify(token, audience, header, claims)
        except (_Rejected, jwt.PyJWTError) as exc:
            if self._on_reject is not None:
                self._on_reject(exc.reason if isinstance(exc, _Rejected) else _reason(exc))
            logger.info(
                "JWT rejected (%s): iss=%r kid=%r jti=%r aud=%s",
                exc if isinstance(exc, _Rejected) else type(exc).__name__,
                str(claims.get("iss"))[:200] if "iss" in claims else None,
                str(header.get("kid"))[:100] if "kid" in header else None,
                str(claims.get("jti"))[:100] if "jti" in claims else None,
                audience,
            )
            raise AuthenticationError("authentication failed") from None

    def _verify(
        self, token: str, audience: str, header: dict[str, Any], claims: dict[str, Any]
    ) -> Caller:
        header.update(jwt.get_unverified_header(token))
        typ, alg, kid, jku = (
            header.get("typ"),
            header.get("alg"),
            header.get("kid"),
            header.get("jku"),
        )
        if not isinstance(typ, str) or typ.upper() != "JWT":
            raise _Rejected("header", f"typ {typ!r} is not JWT")
        if alg not in ALLOWED_ALGORITHMS:
            raise _Rejected("algorithm", f"alg {alg!r} is not ES384 or RS384")
        if not isinstance(kid, str) or not kid:
            raise _Rejected("header", "no kid")
        unverified = jwt.decode(token, options={"verify_signature": False})
        if not isinstance(unverified, dict):
            raise _Rejected("malformed", "payload is not an object")
        claims.update(unverified)
        iss = claims.get("iss")
        client = self._clients.get(iss) if isinstance(iss, str) else None
        if client is None:
            raise _Rejected("issuer", "iss is not a configured client")
        location = self._key_location(client, jku)
        key = self._jwks.key(location, kid)
        if key is None:
            raise _Rejected("key", "kid not found in the client's JWK Set")
        if key.alg != alg:
            raise _Rejected("algorithm", f"alg {alg} does not match the key type ({key.alg})")
        verified = jwt.decode(
            token,
            key.key,
            algorithms=[alg],
            audience=audience,
            issuer=iss,
            options={
                "verify_exp": False,  # checked below against the injected clock
                "verify_iat": False,
                "verify_nbf": False,
                "require": ["iss", "aud", "exp", "iat", "jti"],
            },
        )
        now = self._clock()
        leeway = self._leeway
        exp, iat = _number(verified, "exp"), _number(verified, "iat")
        if exp <= now - leeway:
            raise _Rejected("expired", "expired")
        if iat > now + leeway:
            raise _Rejected("not_yet_valid", "iat is in the future")
        if "nbf" in verified and _number(verified, "nbf") > now + leeway:
            raise _Rejected("not_yet_valid", "not yet valid (nbf)")
        if exp - iat > self._max_lifetime:
            raise _Rejected("lifetime", f"lifetime exp - iat exceeds {self._max_lifetime} s")
        tenant = verified.get("tenant")
        if client.tenants and tenant not in client.tenants:
            raise _Rejected("tenant", "tenant not allowed for this client")
        jti = verified.get("jti")
        if not isinstance(jti, str) or not jti:
            raise _Rejected("claims", "jti missing")
        if not self._replay.first_use(client.iss, jti, exp + leeway, now):
            raise _Rejected("replay", "jti replayed")
        return Caller(
            client.iss,
            tenant if isinstance(tenant, str) else None,
            jti,
            tuple(client.fhir_servers),
        )

    def key_locations(self) -> list[str]:
        """Where the configured clients' keys are (readiness); none when JWT checking is off."""
        if self._disabled:
            return []
        found: list[str] = []
        for client in self._clients.values():
            if client.jwks_url:
                found.append(client.jwks_url)
            elif client.jwks_file is not None:
                found.append(f"file:{client.jwks_file}")
            else:
                found.extend(client.jku)
        return list(dict.fromkeys(found))

    @staticmethod
    def _key_location(client: ClientSettings, jku: object) -> str:
        if jku is not None:
            if not isinstance(jku, str) or jku not in client.jku:
                raise _Rejected("jku", "jku is not registered for this client")
            return jku
        if client.jwks_url:
            return client.jwks_url
        if client.jwks_file is not None:
            return f"file:{client.jwks_file}"
        if len(client.jku) == 1:
            return client.jku[0]  # the one registered key set, used without naming it
        raise _Rejected("key", "no jku and no jwks_url/jwks_file for this client")
