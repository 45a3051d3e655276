"""STOW-RS (PS3.18 §10.5 Store Transaction): ``POST /dicom-web/studies[/{StudyInstanceUID}]``.

The body, ``multipart/related; type="application/dicom"`` (Content-Length or chunked), is never
held in memory: the route reads it from the ASGI channel chunk by chunk (what arrived since the
last read; uvicorn stops reading the socket past 64 KiB) and hands each chunk to a worker thread,
where :class:`node.receive.stow.MultipartStream` (python-multipart) splits it. Each part is
written to a temp file in the spool's ``tmp/`` as it arrives and, when it ends, validated and
stored from that file by the Receiver (:meth:`node.receive.scp.Receiver.receive_file`: the
C-STORE checks, fsync, link into the spool, catalog row) on a store thread of the request, in
order, while the next parts arrive. The response comes after every store: success for an
instance still means durable.

HTTP status (PS3.18 Table 10.5.3-1; §8.5 for the general codes); the instances' outcomes are the
Store Instances Response in ``application/dicom+json`` (:func:`node.receive.stow.store_response`),
everything else is problem+json:

    200  all stored        202  some stored, others failed, or stored with a warning
    409  none stored (the response says why, per instance)
    503  none stored and every failure is 0xA7xx (disk below ``node.min_free_mb``, or above the high
         storage watermark with nothing to purge, :mod:`node.lifecycle`): Retry-After
    400  not a well-formed multipart body, no part, missing boundary, invalid UID in the URL
    406  Accept excludes DICOM JSON      408  nothing received for ``http.timeout_seconds``
    411  neither Content-Length nor chunked
    413  over ``http.max_request_mb``: by Content-Length before reading, or once a chunked body passes it
    415  not multipart/related of application/dicom, or a part that is not application/dicom
         (metadata + bulkdata STOW, application/dicom+json or +xml, is not supported)

Parts are stored as they arrive, so a request that fails part way (400, 408, 413 or 415 found in
the body, or a client that disconnects) keeps the instances stored before the failure (each was
durable when stored; sending it again is a success, not a duplicate) and removes the part in
flight. A disk that fails a write fails that part with 0xA700. An instance of another study than
the URL's gets 0xC409 and is not stored.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from models.errors import InputError
from node.http.audit import requestor_of
from node.http.context import NodeContext, node_context
from node.http.errors import Problem, problem_response
from node.receive.scp import InstancesReceived
from node.receive.stow import (
    ACCEPTABLE,
    DICOM_JSON,
    FAILURE_CANNOT_PARSE,
    FAILURE_OUT_OF_RESOURCES,
    FAILURE_PROCESSING,
    FAILURE_STUDY_MISMATCH,
    MultipartError,
    MultipartStream,
    StoreOutcome,
    header_uids,
    parse_media_type,
    store_response,
    valid_boundary,
)
from node.spool import is_valid_uid

log = logging.getLogger("node.http.stow")

router = APIRouter(tags=["dicomweb"])

SOURCE = "STOW-RS"
"""The calling "AE title" of instances received by STOW-RS (a routing attribute)."""
RETRY_AFTER_SECONDS = 60
MB = 1 << 20
STORE_AHEAD = 2
"""Finished parts that may wait for their store (fsync, catalog) while the next ones arrive."""


class UnsupportedPart(InputError):
    """A part that is not ``application/dicom`` (HTTP 415)."""


class ClientGone(Exception):
    """The client closed the connection before the whole body arrived."""


class PartFiles:
    """The parts of one request, each streamed to a temp file of the spool as it arrives, then
    stored from it by the Receiver on a store thread of the request's own, in order, while the next
    parts arrive (at most STORE_AHEAD finished parts wait).

    ``stream.feed`` and :meth:`finish` are called from one worker thread at a time, never at once.
    """

    def __init__(self, ctx: NodeContext, boundary: str, typed: bool, study: str) -> None:
        self.received = 0
        """Body bytes received so far."""
        self._spool, self._receiver = ctx.spool, ctx.receiver
        self._typed, self._study = typed, study
        self._path: Path | None = None
        self._file: IO[bytes] | None = None
        self._failure: StoreOutcome | None = None
        self._results: list[Future[StoreOutcome]] = []
        self._storer: ThreadPoolExecutor | None = None
        self.stream = MultipartStream(boundary, self._begin, self._data, self._end)

    @property
    def outcomes(self) -> list[StoreOutcome]:
        """Per part, in order; waits for the parts still being stored."""
        return [f.result() for f in self._results]

    def finish(self) -> None:
        """The body ended: waits for every store; raises :class:`MultipartError` if the body was
        truncated or had no part."""
        self.stream.close()
        if not self.outcomes:
            raise MultipartError("no part in the multipart body")

    def settle(self) -> None:
        """The request ends (whichever way): remove the part in flight, finish storing the others."""
        self._drop_in_flight()
        for f in self._results:
            f.result()
        if self._storer is not None:
            self._storer.shutdown()

    def _drop_in_flight(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
        if self._path is not None:
            with contextlib.suppress(OSError):
                self._path.unlink(missing_ok=True)
            self._path = None

    def _done(self, outcome: StoreOutcome) -> None:
        f: Future[StoreOutcome] = Future()
        f.set_result(outcome)
        self._results.append(f)

    def _begin(self, headers: dict[str, str]) -> None:
        media = parse_media_type(headers.get("content-type", ""))[0]
        if media != "application/dicom" and (media or not self._typed):
            raise UnsupportedPart("only application/dicom parts are supported")
        self._failure = None
        if not self._receiver.has_room():
            log.warning("refusing instance: storage full (node.min_free_mb, or storage watermarks)")
            self._failure = StoreOutcome(FAILURE_OUT_OF_RESOURCES, None, None)
            return
        self._path = self._spool.new_temp()
        try:
            self._file = os.fdopen(os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640), "wb",
                                   buffering=256 * 1024)
        except OSError as exc:
            self._write_failed(exc)

    def _data(self, chunk: memoryview) -> None:
        if self._file is not None:
            try:
                self._file.write(chunk)
            except OSError as exc:
                self._write_failed(exc)

    def _write_failed(self, exc: OSError) -> None:
        log.error("spool error while receiving a STOW-RS part: %s", exc.strerror or type(exc).__name__)
        self._drop_in_flight()
        self._failure = StoreOutcome(FAILURE_OUT_OF_RESOURCES, None, None)

    def _end(self) -> None:
        path, file = self._path, self._file
        if path is None or file is None:  # refused or failed at its start
            self._done(self._failure or StoreOutcome(FAILURE_OUT_OF_RESOURCES, None, None))
            return
        try:
            file.close()
        except OSError as exc:
            self._write_failed(exc)
            self._done(StoreOutcome(FAILURE_OUT_OF_RESOURCES, None, None))
            return
        self._file = self._path = None
        if self._storer is None:
            self._storer = ThreadPoolExecutor(1, thread_name_prefix="stow-store")
        self._results.append(self._storer.submit(self._store, path))
        waiting = [f for f in self._results if not f.done()]
        if len(waiting) > STORE_AHEAD:
            waiting[0].result()

    def _store(self, path: Path) -> StoreOutcome:
        try:
            if self._study:
                try:
                    study, sop_class, sop_uid = header_uids(path)
                except Exception:  # anything the parser throws is the sender's fault
                    return StoreOutcome(FAILURE_CANNOT_PARSE, None, None)
                if study != self._study:
                    return StoreOutcome(FAILURE_STUDY_MISMATCH, sop_class, sop_uid)
            r = self._receiver.receive_file(path, SOURCE)
            return StoreOutcome(r.status, r.sop_class_uid, r.sop_instance_uid, r.study_uid)
        except Exception as exc:
            log.error("STOW-RS: storing an instance failed: %s", type(exc).__name__)
            log.debug("STOW-RS store failure", exc_info=True)
            return StoreOutcome(FAILURE_PROCESSING, None, None)
        finally:
            path.unlink(missing_ok=True)  # gone already once stored


def _check(request: Request, ctx: NodeContext) -> tuple[str, bool]:
    """Before the body: (boundary, whether the request names type=application/dicom)."""
    headers = request.headers
    media, params = parse_media_type(headers.get("content-type", ""))
    kind = parse_media_type(params.get("type", ""))[0]
    if media != "multipart/related" or kind not in ("", "application/dicom"):
        raise Problem(415, "unsupported-media-type", 'expected multipart/related; type="application/dicom"')
    boundary = params.get("boundary", "")
    if not valid_boundary(boundary):
        raise Problem(400, "bad-multipart", "missing or invalid multipart boundary")
    accept = headers.get("accept")
    if accept and not any(parse_media_type(a)[0] in ACCEPTABLE for a in accept.split(",")):
        raise Problem(406, "not-acceptable", "responses are application/dicom+json")
    if "transfer-encoding" not in headers:
        length = headers.get("content-length")
        if length is None:
            raise Problem(411, "length-required", "Content-Length or chunked transfer coding required")
        if not length.strip().isdigit() or len(length.strip()) > 18:
            raise Problem(400, "bad-request", "invalid Content-Length")
        if int(length) > ctx.settings.http.max_request_mb * MB:
            raise Problem(413, "too-large", f"request over http.max_request_mb ({ctx.settings.http.max_request_mb} MB)")
    return boundary, bool(kind)


async def _pump(request: Request, parts: PartFiles, limit_mb: int, timeout: float) -> None:
    """Read the body into ``parts`` until it ends; raises what ends it early."""
    more = True
    while more:  # each message holds what arrived since the last (uvicorn pauses the socket past 64 KiB)
        with anyio.fail_after(timeout):
            message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        body, more = message.get("body", b""), bool(message.get("more_body", False))
        parts.received += len(body)
        if parts.received > limit_mb * MB:
            raise Problem(413, "too-large", f"request over http.max_request_mb ({limit_mb} MB)")
        if body:
            await run_in_threadpool(parts.stream.feed, body)
    await run_in_threadpool(parts.finish)


async def _stow(request: Request, ctx: NodeContext, study: str) -> Response:
    started = time.monotonic()
    client = request.client.host if request.client else "?"
    boundary, typed = _check(request, ctx)
    parts = PartFiles(ctx, boundary, typed, study)
    refusal: Problem | None = None
    try:
        await _pump(request, parts, ctx.settings.http.max_request_mb, ctx.settings.http.timeout_seconds)
    except ClientGone:
        refusal = Problem(400, "client-gone")
    except TimeoutError:
        log.info("STOW-RS client %s sent nothing for %.0f s", client, ctx.settings.http.timeout_seconds)
        refusal = Problem(408, "timeout", "no data for http.timeout_seconds", headers={"Connection": "close"})
    except MultipartError as exc:
        refusal = Problem(400, "bad-multipart", str(exc))
    except UnsupportedPart as exc:
        refusal = Problem(415, "unsupported-media-type", str(exc))
    except Problem as exc:
        refusal = exc
    finally:
        with anyio.CancelScope(shield=True):  # also when the request is cancelled
            await run_in_threadpool(parts.settle)
    outcomes = parts.outcomes
    stored = sum(o.stored for o in outcomes)
    with anyio.CancelScope(shield=True):  # reported also when the client went away
        await run_in_threadpool(_report, request, ctx, outcomes, refusal is not None)  # the audit trail may fsync
    if refusal is not None:
        if refusal.code == "client-gone":
            log.info("STOW-RS client %s disconnected after %d part(s), %d stored, %.1f MB", client, len(outcomes),
                     stored, parts.received / 1e6)
            return Response(status_code=400)  # nobody reads it
        if stored:
            refusal = Problem(refusal.status, refusal.code,
                              f"{refusal.detail} ({stored} instance(s) before it were stored)", headers=refusal.headers)
        raise refusal
    status, module = store_response(outcomes)
    failures = Counter(f"0x{o.status:04X}" for o in outcomes if not o.stored)
    log.info("STOW-RS from %s: HTTP %d, %d instance(s), %d stored%s, %.1f MB in %.0f ms",
             client, status, len(outcomes), stored, "".join(f", {k} x{n}" for k, n in sorted(failures.items())),
             parts.received / 1e6, (time.monotonic() - started) * 1000)
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if status == 503 else None
    return Response(json.dumps(module, separators=(",", ":")).encode(), status_code=status,
                    media_type=DICOM_JSON, headers=headers)


def _report(request: Request, ctx: NodeContext, outcomes: list[StoreOutcome], cut_short: bool = False) -> None:
    """What the request stored, per study, to the receiver's ``on_received`` hook (the audit trail, early
    completion); ``cut_short``: the request ended in a refusal (like an aborted association)."""
    if not outcomes:
        return
    studies: dict[str, Counter[str]] = {}
    for o in outcomes:
        if o.stored and o.study_uid:
            studies.setdefault(o.study_uid, Counter())[o.sop_class_uid or ""] += 1
    who = requestor_of(request.scope)
    ctx.receiver.report_received(InstancesReceived(
        "stow", who.name or SOURCE, who.address or "", {uid: dict(c) for uid, c in studies.items()},
        sum(not o.stored for o in outcomes), who.kind, aborted=cut_short))


async def _guarded(request: Request, ctx: NodeContext, study: str) -> Response:
    try:
        return await _stow(request, ctx, study)
    except Problem:
        raise
    except Exception as exc:  # logged without tag values; the server keeps serving
        log.error("STOW-RS request failed: %s", type(exc).__name__)
        log.debug("STOW-RS request failure", exc_info=True)
        return problem_response(500, "internal-error")


_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {
    'multipart/related; type="application/dicom"': {"schema": {"type": "string", "format": "binary"}}}}}
_DICOM_JSON: dict[str, Any] = {"content": {DICOM_JSON: {}}}
_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {**_DICOM_JSON, "description": "every instance stored (Store Instances Response)"},
    202: {**_DICOM_JSON, "description": "some stored, or stored with warnings"},
    409: {**_DICOM_JSON, "description": "none stored; Failure Reason per instance"},
    503: {**_DICOM_JSON, "description": "none stored, disk below the floor or storage full (Retry-After)"},
    400: {"description": "malformed multipart body, no part, invalid UID"},
    406: {"description": "Accept excludes application/dicom+json"},
    408: {"description": "the client stalled"},
    411: {"description": "no Content-Length and not chunked"},
    413: {"description": "over http.max_request_mb"},
    415: {"description": "not multipart/related of application/dicom parts"},
}


@router.post("/dicom-web/studies", summary="Store instances (STOW-RS)", response_class=Response,
             responses=_RESPONSES, openapi_extra=_BODY)
@router.post("/dicom-web/studies/", include_in_schema=False)
async def store_instances(request: Request, ctx: Annotated[NodeContext, Depends(node_context)]) -> Response:
    return await _guarded(request, ctx, "")


@router.post("/dicom-web/studies/{study}", summary="Store instances of one study (STOW-RS)",
             response_class=Response, responses=_RESPONSES, openapi_extra=_BODY)
async def store_study_instances(study: str, request: Request,
                                ctx: Annotated[NodeContext, Depends(node_context)]) -> Response:
    if not is_valid_uid(study):
        raise Problem(400, "invalid-uid", "invalid Study Instance UID in the URL")
    return await _guarded(request, ctx, study)
