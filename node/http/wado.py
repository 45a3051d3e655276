"""WADO-RS (PS3.18 10.4 Retrieve Transaction) from the spool: received instances and our results.

    GET /dicom-web/studies/{study}[/series/{series}[/instances/{instance}]]            instances
    GET /dicom-web/studies/{study}[/series/{series}[/instances/{instance}]]/metadata   DICOM JSON
    GET .../instances/{instance}/frames/{n[,m...]}                                     frames
    GET .../instances/{instance}/rendered, .../frames/{n}/rendered                     JPEG / PNG
    GET .../instances/{instance}/bulkdata/{tag}                                         bulk data

Instances are ``multipart/related; type="application/dicom"`` streamed from the spool files in the
transfer syntax they were stored in; when the Accept header names only other transfer syntaxes and
one of them is Explicit (or Implicit) VR Little Endian, compressed pixel data is decompressed with
pydicom, else 406. ``transfer-syntax=*`` (or none) means "as stored". Metadata carries no bulk data:
Pixel Data and other large binary elements are BulkDataURIs to the bulkdata route. Frames are
``multipart/related; type="application/octet-stream"``, uncompressed, 1-based (404 past the last).
Rendered: ``image/jpeg`` by default, ``image/png`` when asked (Accept or ``accept=``), the image's
window (``window=center,width[,function]`` overrides it), ``viewport=width,height``, ``quality``;
an Encapsulated PDF renders as its ``application/pdf`` document. Unknown UIDs: 404 problem+json.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from models.errors import InputError, UnreadableInput
from node.dicomweb.payload import (
    ENCAPSULATED_DOCUMENT,
    PIXEL_DATA,
    MediaRange,
    NotAcceptable,
    accepts,
    choose_transfer_syntax,
    element_bytes,
    encode_as,
    frame_bytes,
    metadata,
    multipart,
    multipart_type,
    new_boundary,
    number_of_frames,
    parse_accept,
    parse_viewport,
    parse_window,
    pixel_data_bytes,
    read_chunks,
    render,
)
from node.dicomweb.search import StoredInstance, stored_instances
from node.http.context import NodeContext, node_context
from node.http.errors import Problem
from node.http.qido import DICOM_JSON, check_uids, dicomweb_base

log = logging.getLogger("node.http.wado")

router = APIRouter(prefix="/dicom-web", tags=["dicomweb"])

Ctx = Annotated[NodeContext, Depends(node_context)]
EXPLICIT_LE = "1.2.840.10008.1.2.1"
OCTET = "application/octet-stream"
PDF_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.104.1"
_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "unknown study, series, instance or frame"},
                                               406: {"description": "no acceptable representation"}}


def _accept(request: Request) -> list[MediaRange]:
    return parse_accept([*request.headers.getlist("accept"), *request.query_params.getlist("accept")])


def _instances(ctx: NodeContext, study: str, series: str | None = None, sop: str | None = None) -> list[StoredInstance]:
    check_uids(study, series, sop)
    found = stored_instances(ctx.catalog, study, series, sop)
    if not found:
        raise Problem(404, "not-found", "no such " + ("instance" if sop else "series" if series else "study"))
    missing = [i for i in found if not ctx.spool.path(i.path).is_file()]
    if missing:
        log.error("%d catalogued file(s) missing from the spool", len(missing))
        raise Problem(500, "storage-error", "a stored file is missing from the spool")
    return found


def _retrieve(ctx: NodeContext, request: Request, found: list[StoredInstance]) -> StreamingResponse:
    accept = _accept(request)
    try:
        targets = [choose_transfer_syntax(accept, i.transfer_syntax_uid) for i in found]
    except NotAcceptable as exc:
        raise Problem(406, "not-acceptable", str(exc)) from None

    def parts() -> Iterator[tuple[str, Callable[[], Iterable[bytes]]]]:
        for inst, ts in zip(found, targets, strict=True):
            path = ctx.spool.path(inst.path)
            if ts == inst.transfer_syntax_uid:
                yield f"application/dicom; transfer-syntax={ts}", partial(read_chunks, path)
            else:
                yield f"application/dicom; transfer-syntax={ts}", partial(_transcoded, path, ts)

    boundary = new_boundary()
    return StreamingResponse(multipart(parts(), boundary), media_type=multipart_type("application/dicom", boundary))


def _transcoded(path: Any, ts: str) -> list[bytes]:
    try:
        return [encode_as(path, ts)]
    except UnreadableInput:
        log.warning("an instance could not be transcoded mid-response; the response is cut short")
        raise


def _metadata(ctx: NodeContext, request: Request, found: list[StoredInstance]) -> JSONResponse:
    base = dicomweb_base(request)
    accept = _accept(request)
    if accept and not any(mr.media_type in ("*/*", "application/*", DICOM_JSON, "application/json") for mr in accept):
        raise Problem(406, "not-acceptable", f"metadata is {DICOM_JSON}")
    out = []
    for inst in found:
        bulk = f"{base}/studies/{inst.study_uid}/series/{inst.series_uid}/instances/{inst.sop_uid}/bulkdata"
        try:
            out.append(metadata(ctx.spool.path(inst.path), bulk, inst.transfer_syntax_uid))
        except UnreadableInput:
            log.error("a stored file could not be read for metadata")
            raise Problem(500, "storage-error", "a stored file could not be read") from None
    return JSONResponse(out, media_type=DICOM_JSON)


# ---- instances ------------------------------------------------------------------------------------
@router.get("/studies/{study}", summary="WADO-RS: retrieve a study", responses=_NOT_FOUND)
def retrieve_study(ctx: Ctx, request: Request, study: str) -> StreamingResponse:
    return _retrieve(ctx, request, _instances(ctx, study))


@router.get("/studies/{study}/series/{series}", summary="WADO-RS: retrieve a series", responses=_NOT_FOUND)
def retrieve_series(ctx: Ctx, request: Request, study: str, series: str) -> StreamingResponse:
    return _retrieve(ctx, request, _instances(ctx, study, series))


@router.get("/studies/{study}/series/{series}/instances/{instance}", summary="WADO-RS: retrieve an instance",
            responses=_NOT_FOUND)
def retrieve_instance(ctx: Ctx, request: Request, study: str, series: str, instance: str) -> StreamingResponse:
    return _retrieve(ctx, request, _instances(ctx, study, series, instance))


# ---- metadata -------------------------------------------------------------------------------------
@router.get("/studies/{study}/metadata", summary="WADO-RS: a study's metadata", responses=_NOT_FOUND)
def study_metadata(ctx: Ctx, request: Request, study: str) -> JSONResponse:
    return _metadata(ctx, request, _instances(ctx, study))


@router.get("/studies/{study}/series/{series}/metadata", summary="WADO-RS: a series' metadata",
            responses=_NOT_FOUND)
def series_metadata(ctx: Ctx, request: Request, study: str, series: str) -> JSONResponse:
    return _metadata(ctx, request, _instances(ctx, study, series))


@router.get("/studies/{study}/series/{series}/instances/{instance}/metadata",
            summary="WADO-RS: an instance's metadata", responses=_NOT_FOUND)
def instance_metadata(ctx: Ctx, request: Request, study: str, series: str, instance: str) -> JSONResponse:
    return _metadata(ctx, request, _instances(ctx, study, series, instance))


# ---- frames, bulk data ----------------------------------------------------------------------------
def _frame_numbers(frames: str) -> list[int]:
    try:
        numbers = [int(f) for f in frames.split(",")]
    except ValueError:
        raise Problem(400, "invalid-frames", "frames must be a comma-separated list of frame numbers") from None
    if not numbers or min(numbers) < 1:
        raise Problem(400, "invalid-frames", "frame numbers start at 1")
    return numbers


def _octet_parts(chunks: list[bytes]) -> Response:
    boundary = new_boundary()
    body = b"".join(multipart(((f"{OCTET}; transfer-syntax={EXPLICIT_LE}", partial(lambda c: [c], c))
                               for c in chunks), boundary))
    return Response(body, media_type=multipart_type(OCTET, boundary))


def _frames_of(ctx: NodeContext, inst: StoredInstance, numbers: list[int]) -> list[bytes]:
    path = ctx.spool.path(inst.path)
    count = number_of_frames(path)
    if max(numbers) > count:
        raise Problem(404, "not-found", f"the instance has {count} frame(s)")
    try:
        return [frame_bytes(path, n, inst.transfer_syntax_uid) for n in numbers]
    except NotAcceptable as exc:
        raise Problem(406, "not-acceptable", str(exc)) from None
    except UnreadableInput as exc:
        raise Problem(500, "storage-error", str(exc)) from None


@router.get("/studies/{study}/series/{series}/instances/{instance}/frames/{frames}",
            summary="WADO-RS: frames, uncompressed", responses=_NOT_FOUND)
def retrieve_frames(ctx: Ctx, request: Request, study: str, series: str, instance: str, frames: str) -> Response:
    numbers = _frame_numbers(frames)
    if not accepts(_accept(request), OCTET, multipart=True):
        raise Problem(406, "not-acceptable", f"frames are sent as {OCTET} (uncompressed)")
    [inst] = _instances(ctx, study, series, instance)
    return _octet_parts(_frames_of(ctx, inst, numbers))


@router.get("/studies/{study}/series/{series}/instances/{instance}/bulkdata/{tag}",
            summary="WADO-RS: a bulk data element (Pixel Data uncompressed)", responses=_NOT_FOUND)
def retrieve_bulkdata(ctx: Ctx, request: Request, study: str, series: str, instance: str, tag: str) -> Response:
    try:
        number = int(tag, 16)
    except ValueError:
        raise Problem(400, "invalid-tag", "the bulk data tag is 8 hex digits") from None
    [inst] = _instances(ctx, study, series, instance)
    accept = _accept(request)
    if number == PIXEL_DATA:
        if not number_of_frames(ctx.spool.path(inst.path)):
            raise Problem(404, "not-found", "the instance has no pixel data")
        try:
            return _octet_parts([pixel_data_bytes(ctx.spool.path(inst.path), inst.transfer_syntax_uid)])
        except NotAcceptable as exc:
            raise Problem(406, "not-acceptable", str(exc)) from None
        except UnreadableInput as exc:
            raise Problem(500, "storage-error", str(exc)) from None
    try:
        value, mime = element_bytes(ctx.spool.path(inst.path), number)
    except KeyError:
        raise Problem(404, "not-found", "the instance has no such bulk data element") from None
    if number == ENCAPSULATED_DOCUMENT and mime and any(mr.media_type == mime for mr in accept):
        return Response(value, media_type=mime)
    return _octet_parts([value])


# ---- rendered -------------------------------------------------------------------------------------
def _rendered_type(accept: list[MediaRange], pdf: bool) -> str:
    offered = ("application/pdf",) if pdf else ("image/jpeg", "image/png")
    if not accept:
        return offered[0]
    for mr in accept:
        if mr.media_type in offered:
            return mr.media_type
        if mr.media_type == "*/*" or mr.media_type == offered[0].split("/")[0] + "/*":
            return offered[0]
    raise Problem(406, "not-acceptable", "rendered as " + " or ".join(offered))


def _rendered(ctx: NodeContext, request: Request, inst: StoredInstance, frame: int) -> Response:
    path = ctx.spool.path(inst.path)
    params = request.query_params
    pdf = inst.sop_class_uid == PDF_SOP_CLASS
    media_type = _rendered_type(_accept(request), pdf)
    if pdf:
        return Response(element_bytes(path, ENCAPSULATED_DOCUMENT)[0], media_type=media_type)
    count = number_of_frames(path)
    if count == 0:
        raise Problem(406, "not-acceptable", "the instance has no pixel data to render")
    if frame > count:
        raise Problem(404, "not-found", f"the instance has {count} frame(s)")
    try:
        quality = int(params.get("quality", "90"))
    except ValueError:
        raise Problem(400, "invalid-parameters", "quality must be an integer") from None
    try:
        body = render(path, frame, media_type, inst.transfer_syntax_uid, window=parse_window(params.get("window")),
                      viewport=parse_viewport(params.get("viewport")), quality=quality)
    except NotAcceptable as exc:
        raise Problem(406, "not-acceptable", str(exc)) from None
    except UnreadableInput as exc:
        raise Problem(500, "storage-error", str(exc)) from None
    except InputError as exc:
        raise Problem(400, "invalid-parameters", str(exc)) from None
    return Response(body, media_type=media_type)


@router.get("/studies/{study}/series/{series}/instances/{instance}/rendered",
            summary="WADO-RS: an instance rendered (first frame)", responses=_NOT_FOUND)
def instance_rendered(ctx: Ctx, request: Request, study: str, series: str, instance: str) -> Response:
    [inst] = _instances(ctx, study, series, instance)
    return _rendered(ctx, request, inst, 1)


@router.get("/studies/{study}/series/{series}/instances/{instance}/frames/{frame}/rendered",
            summary="WADO-RS: a frame rendered", responses=_NOT_FOUND)
def frame_rendered(ctx: Ctx, request: Request, study: str, series: str, instance: str, frame: str) -> Response:
    numbers = _frame_numbers(frame)
    if len(numbers) != 1:
        raise Problem(400, "invalid-frames", "one frame is rendered at a time")
    [inst] = _instances(ctx, study, series, instance)
    return _rendered(ctx, request, inst, numbers[0])
