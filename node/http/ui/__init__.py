"""The web dashboard served by the node at ``/`` (server-rendered: FastAPI + Jinja2, a little vanilla
JavaScript for refresh and actions; every asset ships in this package, nothing from a CDN).

Pages (:mod:`.pages`, :mod:`.ops`; permission ``api.read``, a browser without a session goes to
``/login``): studies with their per-stage timeline (``/``), a study (``/studies/{id}``), failures
with their actions (``/failures``), operations: queues, workers, disk, peers, plots (``/ops``), the
rule dry run (``/rules``). :mod:`.public`: ``/login``, ``/logout`` and the static assets, open.
Actions are the REST API's (``POST /api/v1/...``), called by the page's JavaScript with the session
cookie; buttons show only for roles with ``api.actions``.
"""

from node.http.ui.ops import router as ops_router
from node.http.ui.pages import router as pages_router
from node.http.ui.public import router as public_router

__all__ = ["ops_router", "pages_router", "public_router"]
