"""The dashboard's open routes: the login form (``/login``: paste an API token, ``dicom-node token
create``, or an OIDC JWT), ``/logout``, and its own CSS and JavaScript (``/ui/static/{name}``).

A valid token is kept in the browser as the session cookie (:data:`node.http.auth.SESSION_COOKIE`:
HttpOnly, SameSite=Strict, Secure over HTTPS, 12 h); the token is checked again on every request, so
revoking it ends the session. A login from another origin is refused (403); a bad token is a 401
(the audit trail records it)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from node.http.auth import SESSION_COOKIE, Authenticator, same_origin
from node.http.errors import Problem
from node.http.oidc import InvalidToken
from node.http.ui.render import page
from node.roles import Permission

router = APIRouter(include_in_schema=False)

STATIC = Path(__file__).parent / "static"
STATIC_TYPES = {".css": "text/css", ".js": "text/javascript", ".svg": "image/svg+xml"}
SESSION_SECONDS = 12 * 3600


def safe_next(target: str | None) -> str:
    """Where to go after login: a path on this node only (never another host)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str = "/") -> HTMLResponse:
    return page(request, "login.html", next=safe_next(next), error="", title="Log in")


@router.post("/login", response_model=None)
def login(request: Request, token: Annotated[str, Form(max_length=8192)],
          next: Annotated[str, Form(max_length=2048)] = "/") -> Response:
    if request.headers.get("origin") is not None and not same_origin(request):
        raise Problem(403, "csrf", "log in from this node's own page")
    auth = request.app.state.auth
    assert isinstance(auth, Authenticator)
    try:
        principal = auth.authenticate(token.strip())
    except InvalidToken:
        return page(request, "login.html", 401, next=safe_next(next), error="This token is not valid (unknown, "
                    "expired or revoked).", title="Log in")
    request.state.principal = principal
    if Permission.API_READ not in principal.permissions:
        return page(request, "login.html", 403, next=safe_next(next),
                    error=f"The role {principal.role or '(none)'!r} may not open the dashboard.", title="Log in")
    response = RedirectResponse(safe_next(next), status_code=303)
    response.set_cookie(SESSION_COOKIE, token.strip(), max_age=SESSION_SECONDS, path="/", httponly=True,
                        samesite="strict", secure=request.url.scheme == "https")
    return response


@router.post("/logout")
def logout() -> RedirectResponse:
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return response


@router.get("/ui/static/{name}")
def static(name: str) -> FileResponse:
    """The package's own assets, by name (no path is built from the request beyond a known file)."""
    files = {p.name: p for p in STATIC.iterdir() if p.is_file()}
    if name not in files:
        raise Problem(404, "not-found")
    return FileResponse(files[name], media_type=STATIC_TYPES.get(files[name].suffix),
                        headers={"Cache-Control": "public, max-age=300"})
