"""Templates of the dashboard and the filters they use (times, durations, sizes)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from node.http.auth import Principal
from node.humanize import duration, size
from node.roles import Permission
from node.version import software_version

REFRESH_SECONDS = 5
"""How often a page reloads its live part."""
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
       "frame-ancestors 'none'; form-action 'self'; base-uri 'none'")
"""Only the node's own assets; no inline script or style (the charts are inline SVG markup)."""


def fmt_time(ts: float | None) -> str:
    """Local time of the node, to the second; "" for None."""
    if ts is None:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def since(a: float | None, b: float | None) -> float | None:
    """``b - a``, or None if either is missing."""
    return None if a is None or b is None else b - a


_env = Environment(loader=PackageLoader("node.http.ui", "templates"), autoescape=select_autoescape(["html"]),
                   undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
_env.filters.update(time=fmt_time, duration=lambda s: duration(s, none=""), bytes=lambda n: size(n, none=""))
_env.globals.update(since=since, version=software_version(), refresh_seconds=REFRESH_SECONDS)
templates = Jinja2Templates(env=_env)


def page(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    """Render template ``name`` with the caller (``principal``, ``can_act``) in its context."""
    principal = getattr(request.state, "principal", None)
    can_act = isinstance(principal, Principal) and Permission.API_ACTIONS in principal.permissions
    response = templates.TemplateResponse(request, name, {"principal": principal, "can_act": can_act, **context},
                                          status_code=status_code)
    response.headers["Cache-Control"] = "no-store"
    response.headers["Content-Security-Policy"] = CSP
    return response


def is_fragment(request: Request) -> bool:
    """The page's script asks for the live part only (``?fragment=1``)."""
    return request.query_params.get("fragment") == "1"
