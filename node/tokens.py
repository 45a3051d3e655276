"""API tokens of the HTTP service, kept in the catalog (table ``tokens``) as SHA-256 hashes only.

A token is ``dnt_`` + 32 random bytes (``secrets.token_urlsafe``); it is shown once, when created
(``dicom-node token create``), and never stored, logged or listed. Verifying hashes the presented
token and compares it with :func:`hmac.compare_digest`. A token is checked against the catalog on
every request, so a revocation (from the CLI, another process) takes effect at once.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
from dataclasses import dataclass

from sqlalchemy import select, update

from models.errors import ConfigError
from node.catalog import Catalog
from node.roles import Role
from node.schema import ApiToken

TOKEN_PREFIX = "dnt_"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
TOUCH_INTERVAL_SECONDS = 60.0
"""``last_used_at`` is written at most this often per token (a write per request would contend
with C-STORE commits)."""


@dataclass(frozen=True)
class TokenInfo:
    """A token as listed: never the token nor its hash."""

    name: str
    role: Role
    created_at: float
    revoked_at: float | None
    last_used_at: float | None


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def _info(row: ApiToken) -> TokenInfo:
    return TokenInfo(row.name, Role(row.role), row.created_at, row.revoked_at, row.last_used_at)


def create_token(catalog: Catalog, name: str, role: Role | str, now: float) -> str:
    """Store a new token's hash under ``name`` and return the token (the only time it exists).
    A name may be reused once its earlier token is revoked."""
    if not NAME_PATTERN.match(name):
        raise ConfigError(f"token name {name!r}: 1-64 letters, digits, '_', '.', '@' or '-'")
    try:
        role = Role(role)
    except ValueError:
        raise ConfigError(f"unknown role {role!r}; roles: {', '.join(Role)}") from None
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with catalog.session() as s:
        taken = s.scalar(select(ApiToken.id).where(ApiToken.name == name, ApiToken.revoked_at.is_(None)))
        if taken is not None:
            raise ConfigError(f"a token named {name!r} exists; revoke it first")
        s.add(ApiToken(name=name, role=role.value, token_hash=hash_token(token), created_at=now))
    return token


def list_tokens(catalog: Catalog) -> list[TokenInfo]:
    """Every token, revoked ones included, oldest first."""
    with catalog.reading() as s:
        return [_info(r) for r in s.scalars(select(ApiToken).order_by(ApiToken.id))]


def revoke_token(catalog: Catalog, name: str, now: float) -> bool:
    """Revoke the active token ``name``; False when there is none."""
    with catalog.session() as s:
        res = s.execute(update(ApiToken).where(ApiToken.name == name, ApiToken.revoked_at.is_(None))
                        .values(revoked_at=now))
        return bool(res.rowcount)  # type: ignore[attr-defined]


class TokenVerifier:
    """Finds the active token a request presents; remembers when each was last written as used."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._touched: dict[int, float] = {}
        self._lock = threading.Lock()

    def verify(self, token: str, now: float) -> TokenInfo | None:
        """The token's name and role, or None (unknown, revoked, or not one of ours)."""
        if not token.startswith(TOKEN_PREFIX) or len(token) > 256:
            return None
        digest = hash_token(token)
        with self.catalog.reading() as s:  # no write lock: a read per request
            row = s.scalar(select(ApiToken).where(ApiToken.token_hash == digest))
            if row is None or row.revoked_at is not None or not hmac.compare_digest(row.token_hash, digest):
                return None
            row_id, info = row.id, _info(row)
        with self._lock:
            due = now - self._touched.get(row_id, float("-inf")) >= TOUCH_INTERVAL_SECONDS
            if due:
                self._touched[row_id] = now
        if due:
            with self.catalog.session() as s:
                s.execute(update(ApiToken).where(ApiToken.id == row_id).values(last_used_at=now))
        return info
