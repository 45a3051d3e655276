"""Authentication and authorisation of the HTTP service: every route but ``/healthz`` and ``/readyz``
requires one :class:`node.roles.Permission`, applied per router (``include_router(...,
dependencies=[Depends(require(p))])`` in :mod:`node.http.app`), so no route can be forgotten.

A caller presents ``Authorization: Bearer <token>``: an API token (``dicom-node token create``,
checked against its hash in the catalog, :mod:`node.tokens`) or, with ``http.oidc``, a JWT of the
identity provider (:mod:`node.http.oidc`). No or a bad, expired or revoked token: 401 with
``WWW-Authenticate: Bearer``; a valid token whose role lacks the permission: 403. With no token
created and no OIDC configured every protected route answers 401: the node refuses, it never opens up.

The docs (``/docs``, its assets, ``/openapi.json``) also take the token as the password of HTTP
Basic authentication (any user name), so that a person's browser can open them (it asks once);
the page's Authorize button then sends it as a bearer token with the requests it tries.

The caller is put in ``request.state.principal`` (:class:`Principal`: name, role, kind) for the
audit trail, also when it is refused with 403.
"""

from __future__ import annotations

import base64
import binascii
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.dependencies.models import Dependant
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from node.catalog import Catalog
from node.config import HttpSettings
from node.http.errors import Problem
from node.http.oidc import InvalidToken, OidcVerifier
from node.roles import ROLE_PERMISSIONS, Permission, Role, permissions_of
from node.tokens import TokenVerifier, create_token, list_tokens

log = logging.getLogger("node.http.auth")

REALM = "dicom-node"
OPEN_PATHS = ("/healthz", "/readyz")
"""The only routes without a permission: they carry no data."""
BASIC_PERMISSIONS = frozenset({Permission.DOCS})
"""Permissions whose routes also accept the token as an HTTP Basic password (a browser asks for it)."""

_bearer = HTTPBearer(auto_error=False, description="an API token (`dicom-node token create`) or an OIDC JWT")


@dataclass(frozen=True)
class Principal:
    """Who made a request (``request.state.principal``)."""

    name: str
    """The token's name, or the OIDC token's ``name_claim`` (``sub``)."""
    role: str
    """Its role; for an OIDC caller whose claims map to several roles, them joined by ``+``; ``""``: none."""
    kind: Literal["token", "oidc"]
    permissions: frozenset[Permission]


class Authenticator:
    """Turns a presented token into a :class:`Principal` (``app.state.auth``)."""

    def __init__(self, settings: HttpSettings, catalog: Catalog, clock: Callable[[], float] = time.time, *,
                 oidc: OidcVerifier | None = None) -> None:
        self.tokens = TokenVerifier(catalog)
        self.oidc = oidc if oidc is not None or settings.oidc is None else OidcVerifier(settings.oidc)
        self.clock = clock

    def authenticate(self, token: str) -> Principal:
        """The caller ``token`` stands for; :class:`InvalidToken` when it stands for none."""
        if token.count(".") == 2 and self.oidc is not None:  # a JWT; our own tokens have no dots
            who = self.oidc.verify(token)
            return Principal(who.name, "+".join(who.roles), "oidc", permissions_of(who.roles))
        found = self.tokens.verify(token, self.clock())
        if found is None:
            raise InvalidToken("unknown or revoked token")
        return Principal(found.name, found.role.value, "token", ROLE_PERMISSIONS[found.role])


def _unauthorized(detail: str, *, invalid: bool, basic: bool) -> Problem:
    bearer = f'Bearer realm="{REALM}"' + (', error="invalid_token"' if invalid else "")
    challenges = ([("WWW-Authenticate", f'Basic realm="{REALM}", charset="UTF-8"')] if basic else [])
    return Problem(401, "unauthorized", detail, repeated=[*challenges, ("WWW-Authenticate", bearer)])


def _basic_password(request: Request) -> str | None:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return decoded.partition(":")[2] or None


class RequirePermission:
    """The FastAPI dependency of one permission (one instance per permission: :func:`require`)."""

    def __init__(self, permission: Permission) -> None:
        self.permission = permission
        self.basic = permission in BASIC_PERMISSIONS

    def __call__(self, request: Request,
                 bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Principal:
        auth = request.app.state.auth
        assert isinstance(auth, Authenticator)
        token = bearer.credentials if bearer is not None else (_basic_password(request) if self.basic else None)
        if not token:
            raise _unauthorized("a bearer token is required", invalid=False, basic=self.basic)
        try:
            principal = auth.authenticate(token)
        except InvalidToken as exc:
            log.debug("HTTP 401: %s", exc)
            raise _unauthorized(str(exc), invalid=True, basic=self.basic) from None
        request.state.principal = principal
        if self.permission not in principal.permissions:
            raise Problem(403, "forbidden", f"role {principal.role or '(none)'!r} lacks permission {self.permission}")
        return principal


@functools.cache
def require(permission: Permission) -> RequirePermission:
    """The dependency requiring ``permission`` (the same object each time)."""
    return RequirePermission(permission)


def _permission_in(dependant: Dependant) -> Permission | None:
    for dep in dependant.dependencies:
        if isinstance(dep.call, RequirePermission):
            return dep.call.permission
        found = _permission_in(dep)
        if found is not None:
            return found
    return None


@dataclass(frozen=True)
class RouteInfo:
    path: str
    methods: frozenset[str]
    permission: Permission | None
    """None: no permission is required (or the route is not a FastAPI route at all)."""


def app_routes(app: FastAPI) -> list[RouteInfo]:
    """Every route the app serves, with the permission it requires (routers included with
    dependencies are flattened: FastAPI >= 0.16x keeps them nested in ``app.routes``)."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # earlier FastAPI: app.routes are the routes, dependencies merged in
        routes: list[Any] = list(app.routes)
    else:
        routes = list(iter_route_contexts(app.routes))
    out = []
    for route in routes:
        dependant = getattr(route, "dependant", None)
        permission = _permission_in(dependant) if isinstance(dependant, Dependant) else None
        out.append(RouteInfo(str(getattr(route, "path", "")), frozenset(getattr(route, "methods", None) or ()),
                             permission))
    return out


def issue_token(catalog: Catalog, role: Role | str, name: str | None = None, now: float | None = None) -> str:
    """A new API token of ``role`` (named ``name``, or ``<role>-<n>``), for tests and tools with the
    catalog in hand; ``dicom-node token create`` does the same for a configuration."""
    if name is None:
        taken = {t.name for t in list_tokens(catalog)}
        prefix = Role(role).value
        name = next(f"{prefix}-{n}" for n in range(1, len(taken) + 2) if f"{prefix}-{n}" not in taken)
    return create_token(catalog, name, role, time.time() if now is None else now)
