"""OpenID Connect bearer tokens (``http.oidc``): a JWT is verified with PyJWT against the identity
provider's JWKS: the key named by the token's ``kid``, an algorithm of the allow-list (RS256, ES256;
never ``none`` or HMAC) that matches the key, ``iss``, ``aud``, ``exp`` and ``nbf``/``iat`` with a
small leeway. The roles claim (``roles_claim``, a dotted path) maps to node roles by ``role_map``.

The JWKS is read at start-up (``jwks_file``, or fetched from ``jwks_url``) and kept; a token naming an
unknown ``kid`` makes it read again, at most once a minute (key rotation). A provider unreachable at
start-up does not stop the node: OIDC tokens are refused until the keys can be fetched.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt

from models.errors import ConfigError
from node.config import OidcSettings
from node.roles import Role

log = logging.getLogger("node.http.auth")

REFRESH_INTERVAL_SECONDS = 60.0
"""The JWKS is read again on an unknown ``kid`` at most this often."""
MAX_JWKS_BYTES = 1 << 20
FETCH_TIMEOUT_SECONDS = 10.0


class InvalidToken(Exception):
    """The JWT is not acceptable; the message says why (never the token or its claims' values)."""


@dataclass(frozen=True)
class OidcIdentity:
    name: str
    roles: tuple[Role, ...]
    """The node roles its roles claim maps to (empty: none maps)."""


def _fetch_url(url: str, ca_file: str | None) -> bytes:
    context = ssl.create_default_context(cafile=ca_file) if url.startswith("https:") else None
    with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_SECONDS, context=context) as r:
        return bytes(r.read(MAX_JWKS_BYTES + 1))


def _parse_jwks(raw: bytes, source: str) -> dict[str | None, jwt.PyJWK]:
    """kid -> key of every signing key of the document (keys of other types or uses are skipped)."""
    if len(raw) > MAX_JWKS_BYTES:
        raise ValueError(f"{source}: JWKS larger than {MAX_JWKS_BYTES} bytes")
    doc = json.loads(raw)
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError(f"{source}: not a JWKS document (no 'keys' list)")
    keys: dict[str | None, jwt.PyJWK] = {}
    for entry in doc["keys"]:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        try:
            key = jwt.PyJWK(entry)
        except (jwt.PyJWTError, ValueError, KeyError, TypeError):  # a key type or curve PyJWT cannot use
            continue
        keys[entry.get("kid")] = key
    if not keys:
        raise ValueError(f"{source}: no usable signing key")
    return keys


def claim_at(claims: dict[str, Any], path: str) -> Any:
    """The value at a dotted path (``realm_access.roles``), or None."""
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


class OidcVerifier:
    def __init__(self, settings: OidcSettings, *, fetch: Callable[[str], bytes] | None = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        ca = str(settings.ca_file) if settings.ca_file is not None else None
        self._fetch = fetch or (lambda url: _fetch_url(url, ca))
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._keys: dict[str | None, jwt.PyJWK] = {}
        self._loaded_at = float("-inf")
        try:
            self._load()
        except (OSError, ValueError) as exc:
            if settings.jwks_file is not None:
                raise ConfigError(f"http.oidc.jwks_file: {exc}") from None
            log.error("http.oidc.jwks_url: cannot fetch the provider's keys (%s); OIDC tokens are refused "
                      "until they can be fetched", exc)

    def _load(self) -> None:
        self._loaded_at = self._monotonic()
        s = self.settings
        if s.jwks_file is not None:
            raw, source = s.jwks_file.read_bytes(), str(s.jwks_file)
        else:
            assert s.jwks_url is not None
            raw, source = self._fetch(s.jwks_url), "jwks_url"
        self._keys = _parse_jwks(raw, source)
        log.info("OIDC: %d signing key(s) of %s", len(self._keys), s.issuer)

    def _key(self, kid: str | None) -> jwt.PyJWK | None:
        with self._lock:
            key = self._lookup(kid)
            if key is None and self._monotonic() - self._loaded_at >= REFRESH_INTERVAL_SECONDS:
                try:
                    self._load()
                except (OSError, ValueError) as exc:
                    log.warning("OIDC: cannot read the provider's keys again: %s", exc)
                key = self._lookup(kid)
            return key

    def _lookup(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is None:  # a token without kid: only when the provider has a single key
            return next(iter(self._keys.values())) if len(self._keys) == 1 else None
        return self._keys.get(kid)

    def verify(self, token: str) -> OidcIdentity:
        """The caller a valid token names, with its mapped roles; :class:`InvalidToken` otherwise."""
        s = self.settings
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidToken("not a JWT") from None
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in s.algorithms:
            raise InvalidToken(f"signature algorithm {str(alg)[:16]!r} is not accepted")
        if kid is not None and not isinstance(kid, str):
            raise InvalidToken("invalid kid")
        key = self._key(kid)
        if key is None:
            raise InvalidToken("unknown signing key")
        if key.algorithm_name != alg:
            raise InvalidToken("the token's algorithm does not match its key")
        try:
            claims = jwt.decode(token, key.key, algorithms=[alg], audience=s.audience, issuer=s.issuer,
                                leeway=s.leeway_seconds, options={"require": ["exp", "iss", "aud"]})
        except jwt.ExpiredSignatureError:
            raise InvalidToken("the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise InvalidToken("the token is not valid yet") from None
        except jwt.InvalidAudienceError:
            raise InvalidToken("wrong audience") from None
        except jwt.InvalidIssuerError:
            raise InvalidToken("wrong issuer") from None
        except jwt.PyJWTError as exc:
            raise InvalidToken(f"invalid token ({type(exc).__name__})") from None
        name = claims.get(s.name_claim) or claims.get("sub")
        if not isinstance(name, str) or not name:
            raise InvalidToken(f"no {s.name_claim} claim")
        values = claim_at(claims, s.roles_claim)
        if isinstance(values, str):
            values = values.split()
        if not isinstance(values, list):
            values = []
        roles = tuple(dict.fromkeys(s.role_map[v] for v in values if isinstance(v, str) and v in s.role_map))
        return OidcIdentity(name[:128], roles)
