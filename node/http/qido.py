"""QIDO-RS (PS3.18 10.6 Search Transaction): the studies, series and instances of the catalog,
received ones and our result objects alike, as ``application/dicom+json``.

    GET /dicom-web/studies                                   GET /dicom-web/series
    GET /dicom-web/studies/{study}/series                    GET /dicom-web/instances
    GET /dicom-web/studies/{study}/instances
    GET /dicom-web/studies/{study}/series/{series}/instances

Matching keys by keyword or tag (``PatientID=X``, ``00100020=X``), ``includefield`` (repeated,
comma-separated, ``all``), ``limit`` (at most 1000, also the default) and ``offset``;
``fuzzymatching=true`` is accepted and ignored (literal matching, said in a ``Warning`` header).
No match is ``200`` with an empty array (dicomweb-client and OHIF read both that and 204 as "none");
a page followed by more results carries ``Warning: 299 ... additional results``. An unknown
attribute, or one the node does not match on at that level, is 400 problem+json.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from models.errors import InputError
from node.dicomweb.payload import parse_accept
from node.dicomweb.query import Level, parse_query, returned_keywords
from node.dicomweb.search import add_derived, search, to_dicom_json
from node.http.context import NodeContext, node_context
from node.http.errors import Problem
from node.spool import is_valid_uid

router = APIRouter(prefix="/dicom-web", tags=["dicomweb"])

DICOM_JSON = "application/dicom+json"
FUZZY_WARNING = ('299 dicom-node: "The fuzzymatching parameter is not supported. '
                 'Only literal matching has been performed."')
MORE_WARNING = '299 dicom-node: "There are additional results that can be requested."'
_JSON_TYPES = ("*/*", "application/*", DICOM_JSON, "application/json")

Ctx = Annotated[NodeContext, Depends(node_context)]


def dicomweb_base(request: Request) -> str:
    """``http://host:port/dicom-web`` as the client reached us (RetrieveURL, BulkDataURI): the Host
    header, with the port the connection came to when the header names none (dicomweb-client sends
    ``Host`` without its port)."""
    base = request.base_url
    server = request.scope.get("server")
    if base.port is None and server and server[1] and int(server[1]) != {"https": 443}.get(base.scheme, 80):
        base = base.replace(port=int(server[1]))
    return str(base).rstrip("/") + "/dicom-web"


def check_uids(*uids: str | None) -> None:
    for uid in uids:
        if uid is not None and not is_valid_uid(uid):
            raise Problem(400, "invalid-uid", "a UID in the path is not a valid DICOM UID")


def _search(ctx: NodeContext, request: Request, level: Level, study: str | None = None,
            series: str | None = None) -> JSONResponse:
    check_uids(study, series)
    accept = parse_accept(request.headers.getlist("accept"))
    if accept and not any(mr.media_type in _JSON_TYPES for mr in accept):
        raise Problem(406, "not-acceptable", f"QIDO-RS answers {DICOM_JSON}")
    items = [(k, v) for k, v in request.query_params.multi_items() if k != "accept"]
    try:
        query = parse_query(level, items)
    except InputError as exc:
        raise Problem(400, "invalid-query", str(exc)) from None
    hits, more = search(ctx.catalog, query, study_uid=study, series_uid=series)
    add_derived(ctx.catalog, hits)
    keywords = returned_keywords(query, scoped_to_study=study is not None, scoped_to_series=series is not None)
    base = dicomweb_base(request)
    warnings = [w for w, on in ((FUZZY_WARNING, query.fuzzy), (MORE_WARNING, more)) if on]
    headers = {"Warning": ", ".join(warnings)} if warnings else None
    return JSONResponse([to_dicom_json(h, keywords, base) for h in hits], media_type=DICOM_JSON, headers=headers)


_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {DICOM_JSON: {}}, "description": "matches (possibly none: [])"},
    400: {"description": "unknown or unsupported attribute, bad limit/offset"},
}


@router.get("/studies", summary="QIDO-RS: search for studies", responses=_RESPONSES)
def search_studies(ctx: Ctx, request: Request) -> JSONResponse:
    return _search(ctx, request, Level.STUDY)


@router.get("/series", summary="QIDO-RS: search for series", responses=_RESPONSES)
def search_all_series(ctx: Ctx, request: Request) -> JSONResponse:
    return _search(ctx, request, Level.SERIES)


@router.get("/instances", summary="QIDO-RS: search for instances", responses=_RESPONSES)
def search_all_instances(ctx: Ctx, request: Request) -> JSONResponse:
    return _search(ctx, request, Level.INSTANCE)


@router.get("/studies/{study}/series", summary="QIDO-RS: search for a study's series", responses=_RESPONSES)
def search_series(ctx: Ctx, request: Request, study: str) -> JSONResponse:
    return _search(ctx, request, Level.SERIES, study)


@router.get("/studies/{study}/instances", summary="QIDO-RS: search for a study's instances", responses=_RESPONSES)
def search_study_instances(ctx: Ctx, request: Request, study: str) -> JSONResponse:
    return _search(ctx, request, Level.INSTANCE, study)


@router.get("/studies/{study}/series/{series}/instances", summary="QIDO-RS: search for a series' instances",
            responses=_RESPONSES)
def search_series_instances(ctx: Ctx, request: Request, study: str, series: str) -> JSONResponse:
    return _search(ctx, request, Level.INSTANCE, study, series)
