"""Who may do what on the HTTP service, as data: permissions, roles, and each role's permissions.

Every route of the HTTP app requires exactly one :class:`Permission` (applied per router by
:mod:`node.http.auth`); a caller holds the permissions of its role. ``/healthz`` and ``/readyz``
are the only open routes.

    role       permissions
    viewer     dicomweb.read (QIDO-RS, WADO-RS), api.read, metrics, docs (/docs, /openapi.json)
    sender     dicomweb.store (STOW-RS)
    operator   viewer's + api.actions (retry, rerun, pause/resume)
    admin      every permission, admin included (API tokens)
    worker     jobs.work (the remote workers' API, /api/v1/worker)

No imports beyond the standard library: the configuration (OIDC ``role_map``), the token store and
the CLI read it without the HTTP stack.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import StrEnum
from types import MappingProxyType


class Permission(StrEnum):
    DICOMWEB_READ = "dicomweb.read"
    """QIDO-RS searches and WADO-RS retrievals (patient data)."""
    DICOMWEB_STORE = "dicomweb.store"
    """STOW-RS."""
    API_READ = "api.read"
    """``GET /api/v1/...``: studies, jobs, deliveries, destinations, models."""
    API_ACTIONS = "api.actions"
    """``POST /api/v1/...``: retry a job or a delivery, rerun a study, pause or resume a destination."""
    METRICS = "metrics"
    """``/metrics``."""
    DOCS = "docs"
    """``/docs`` (and its assets) and ``/openapi.json``."""
    ADMIN = "admin"
    """API tokens (``/api/v1/tokens``)."""
    WORKER = "jobs.work"
    """``/api/v1/worker``: a remote worker claims jobs, fetches their inputs and returns results."""


class Role(StrEnum):
    VIEWER = "viewer"
    SENDER = "sender"
    OPERATOR = "operator"
    ADMIN = "admin"
    WORKER = "worker"


_VIEWER = frozenset({Permission.DICOMWEB_READ, Permission.API_READ, Permission.METRICS, Permission.DOCS})

ROLE_PERMISSIONS: Mapping[Role, frozenset[Permission]] = MappingProxyType({
    Role.VIEWER: _VIEWER,
    Role.SENDER: frozenset({Permission.DICOMWEB_STORE}),
    Role.OPERATOR: _VIEWER | {Permission.API_ACTIONS},
    Role.ADMIN: frozenset(Permission),
    Role.WORKER: frozenset({Permission.WORKER}),
})
"""The role table: what each role may do."""


def permissions_of(roles: Iterable[Role]) -> frozenset[Permission]:
    """The union of the roles' permissions."""
    out: frozenset[Permission] = frozenset()
    for role in roles:
        out |= ROLE_PERMISSIONS[role]
    return out
