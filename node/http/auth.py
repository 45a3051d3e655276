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

A browser (the dashboard, :mod:`node.http.ui`) logs in once at ``/login`` with a token; the token is
then kept in an HttpOnly, SameSite=Strict cookie (:data:`SESSION_COOKIE`, Secure over HTTPS) that
every route accepts as well. A state-changing request authenticated by that cookie must come from
the node's own origin (``Origin``, else ``Referer``): 403 ``csrf`` otherwise. Dashboard pages
(:func:`require_page`) send a browser without a valid session to ``/login`` (303) instead of 401.

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
from urllib.parse import quote, urlsplit

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
OPEN_PATHS = ("/healthz", "/readyz", "/login", "/logout", "/ui/static/{name}")
"""The only routes without a permission: they carry no data (health, the login form, the dashboard's
own CSS and JavaScript)."""
SESSION_COOKIE = "dicom_node_session"
"""The browser session: the token given at ``/login`` (HttpOnly, SameSite=Strict)."""
LOGIN_PATH = "/login"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
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


def same_origin(request: Request) -> bool:
    """Whether the request says it comes from a page of this origin (``Origin``, else ``Referer``)."""
    source = request.headers.get("origin") or request.headers.get("referer")
    if not source or source == "null":
        return False
    parts = urlsplit(source)
    return parts.scheme == request.url.scheme and parts.netloc.lower() == request.headers.get("host", "").lower()


class RequirePermission:
    """The FastAPI dependency of one permission (one instance per permission: :func:`require`)."""

    page = False
    """Dashboard pages: a browser without a valid session is sent to ``/login``."""

    def __init__(self, permission: Permission) -> None:
        self.permission = permission
        self.basic = permission in BASIC_PERMISSIONS

    def _unauthorized(self, request: Request, detail: str, *, invalid: bool) -> Problem:
        if self.page and "text/html" in request.headers.get("accept", ""):
            target = quote(request.url.path + (f"?{request.url.query}" if request.url.query else ""), safe="")
            return Problem(303, "login-required", detail, headers={"Location": f"{LOGIN_PATH}?next={target}"})
        return _unauthorized(detail, invalid=invalid, basic=self.basic)

    def __call__(self, request: Request,
                 bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Principal:
        auth = request.app.state.auth
        assert isinstance(auth, Authenticator)
        token = bearer.credentials if bearer is not None else (_basic_password(request) if self.basic else None)
        from_cookie = False
        if not token:
            token = request.cookies.get(SESSION_COOKIE) or None
            from_cookie = token is not None
        if not token:
            raise self._unauthorized(request, "a bearer token is required", invalid=False)
        if from_cookie and request.method not in SAFE_METHODS and not same_origin(request):
            raise Problem(403, "csrf", "a request authenticated by the session cookie must come from this origin")
        try:
            principal = auth.authenticate(token)
        except InvalidToken as exc:
            log.debug("HTTP 401: %s", exc)
            raise self._unauthorized(request, str(exc), invalid=True) from None
        request.state.principal = principal
        if self.permission not in principal.permissions:
            raise Problem(403, "forbidden", f"role {principal.role or '(none)'!r} lacks permission {self.permission}")
        return principal


class RequirePage(RequirePermission):
    """:class:`RequirePermission` of a dashboard page (:func:`require_page`)."""

    page = True


@functools.cache
def require(permission: Permission) -> RequirePermission:
    """The dependency requiring ``permission`` (the same object each time)."""
    return RequirePermission(permission)


@functools.cache
def require_page(permission: Permission) -> RequirePermission:
    """The dependency of a dashboard page requiring ``permission``: like :func:`require`, but a browser
    (``Accept: text/html``) without a valid session is redirected to ``/login``."""
    return RequirePage(permission)


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
