"""The HTTP side of the audit trail: :class:`AuditMiddleware` (an ASGI middleware of the app) tells
the node, once a response has been sent, what an auditable request was and who made it, as a typed
:class:`HttpAudited` event through ``NodeContext.on_audit`` (the node service passes
``node.audit.AuditTrail.http`` in; this module does not import it).

Audited: every 401 (``unauthenticated``) and 403 (``forbidden``) of any route; QIDO-RS searches
(``query``: the names of the matching keys, never their values); WADO-RS retrievals (``retrieve``);
``GET /api/v1/studies/{id}/dicom`` (``access``: the only API route with patient attributes); the
API's actions (``action``: retry, rerun, pause, resume, API tokens). STOW-RS requests are reported
by their route, with what they stored (``Receiver.report_received``). Other reads (``/api/v1``
listings, ``/metrics``, health, docs) carry no patient data and are not audited.

Who: ``request.state.principal`` (set by the auth dependency of :mod:`node.http.auth`, also when it
answers 403: name, role, kind), and the client's address.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qsl

import anyio
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from node.spool import is_valid_uid

log = logging.getLogger("node.http.audit")

HttpKind = Literal["query", "retrieve", "access", "action", "unauthenticated", "forbidden"]
QUERY_CONTROL = frozenset({"limit", "offset", "includefield", "fuzzymatching", "accept"})
"""QIDO-RS parameters that are not matching keys."""
_KEY = re.compile(r"^[A-Za-z0-9.]{1,64}$")
_LEVELS = {"studies": "STUDY", "series": "SERIES", "instances": "IMAGE"}

ACTIONS: Mapping[str, tuple[str, str | None, str | None]] = {
    "node.http.api_actions.retry_job": ("job-retry", "job", "job_id"),
    "node.http.api_actions.retry_delivery": ("delivery-retry", "delivery", "delivery_id"),
    "node.http.api_actions.rerun_study": ("study-rerun", None, None),
    "node.http.api_actions.pause_destination": ("destination-pause", "destination", "name"),
    "node.http.api_actions.resume_destination": ("destination-resume", "destination", "name"),
    "node.http.admin.create": ("token-create", None, None),
    "node.http.admin.revoke": ("token-revoke", "token", "name"),
}
"""Action endpoints (module.function): the action's name, and the object it acts on (kind, path
parameter naming it). A study's UID is added from ``study_id`` (or the job's study)."""


@dataclass(frozen=True)
class Requestor:
    """Who made a request: the authenticated principal (if any) and the client address."""

    name: str | None
    role: str | None
    kind: str | None
    """``token``, ``oidc`` (:class:`node.http.auth.Principal`)."""
    address: str | None


@dataclass(frozen=True)
class HttpAudited:
    """An auditable HTTP request, after its response (typed event for ``NodeContext.on_audit``)."""

    kind: HttpKind
    method: str
    route: str
    """The route's path template (``/dicom-web/studies/{study}``), or the path if no route matched."""
    status: int
    requestor: Requestor
    study_uids: tuple[str, ...] = ()
    query_keys: tuple[str, ...] = ()
    """QIDO-RS: the names of the matching keys (values are never kept)."""
    level: str | None = None
    """QIDO-RS: STUDY, SERIES or IMAGE."""
    action: str | None = None
    target: tuple[str, str] | None = None
    """An action's object: (kind, name), e.g. ("job", "12")."""


def requestor_of(scope: Scope) -> Requestor:
    """The principal of ``request.state`` (None fields when unauthenticated) and the client's address."""
    principal = (scope.get("state") or {}).get("principal")
    client = scope.get("client")

    def field(name: str) -> str | None:
        value = getattr(principal, name, None)
        return str(value) if value not in (None, "") else None

    return Requestor(field("name"), field("role"), field("kind"), str(client[0]) if client else None)


def _endpoint(scope: Scope) -> str:
    endpoint = scope.get("endpoint")
    return f"{getattr(endpoint, '__module__', '')}.{getattr(endpoint, '__name__', '')}" if endpoint else ""


def _query_keys(scope: Scope) -> tuple[str, ...]:
    raw = scope.get("query_string", b"").decode("latin-1")
    names = {k for k, _ in parse_qsl(raw, keep_blank_values=True)} - QUERY_CONTROL
    return tuple(sorted(n if _KEY.match(n) else "?" for n in names))


def describe(scope: Scope, status: int, study_of: Callable[[str, int], str | None] | None = None) -> HttpAudited | None:
    """The audit event of a finished request, or None if it is not audited. ``study_of(kind, id)``:
    the Study Instance UID of a catalog ``study`` or ``job`` id (None if unknown)."""
    route = getattr(scope.get("route"), "path", None) or scope.get("path", "")
    method = str(scope.get("method", ""))
    who = requestor_of(scope)
    params: dict[str, Any] = dict(scope.get("path_params") or {})
    study = params.get("study")
    uids = (str(study),) if isinstance(study, str) and is_valid_uid(study) else ()
    base: dict[str, Any] = {"method": method, "route": route, "status": status, "requestor": who}
    if status == 401:
        return HttpAudited("unauthenticated", **base)
    if status == 403:
        return HttpAudited("forbidden", **base, study_uids=uids)
    endpoint = _endpoint(scope)
    module = endpoint.rpartition(".")[0]

    def catalog_study(kind: str, key: str) -> tuple[str, ...]:
        value = params.get(key)
        if study_of is None or value is None:
            return ()
        try:
            uid = study_of(kind, int(value))
        except (TypeError, ValueError):
            return ()
        return (uid,) if uid else ()

    if module == "node.http.qido" and method == "GET":
        level = _LEVELS.get(route.rstrip("/").rsplit("/", 1)[-1])
        return HttpAudited("query", **base, study_uids=uids, query_keys=_query_keys(scope), level=level)
    if module == "node.http.wado" and method == "GET":
        return HttpAudited("retrieve", **base, study_uids=uids)
    if endpoint == "node.http.api.get_study_dicom":
        return HttpAudited("access", **base, study_uids=catalog_study("study", "study_id"))
    if endpoint in ACTIONS:
        action, target_kind, param = ACTIONS[endpoint]
        target = (target_kind, str(params[param])) if target_kind and param and param in params else None
        found = catalog_study("study", "study_id") or catalog_study("job", "job_id")
        return HttpAudited("action", **base, study_uids=found, action=action, target=target)
    return None


class AuditMiddleware:
    """Reports each auditable request to ``app.state.node.on_audit`` once its response is sent (or
    failed); the report runs on a worker thread and never delays or breaks the response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            with anyio.CancelScope(shield=True):  # also when the client went away
                await self._report(scope, status)

    async def _report(self, scope: Scope, status: int) -> None:
        app = scope.get("app")
        ctx = getattr(getattr(app, "state", None), "node", None)
        hook = getattr(ctx, "on_audit", None)
        if hook is None:
            return
        try:
            if describe(scope, status) is None:  # cheap, on the loop: most requests are not audited
                return
        except Exception:
            log.exception("audit: cannot describe an HTTP request")
            return
        catalog = getattr(ctx, "catalog", None)

        def study_of(kind: str, row_id: int) -> str | None:
            if catalog is None:
                return None
            if kind == "job":
                job = catalog.get_job(row_id)
                if job is None:
                    return None
                row_id = job.study_id
            study = catalog.get_study(row_id)
            return str(study.study_uid) if study is not None else None

        def report() -> None:
            try:
                event = describe(scope, status, study_of)
                if event is not None:
                    hook(event)
            except Exception:  # the audit never breaks a response
                log.exception("audit: cannot report an HTTP request")

        await run_in_threadpool(report)
