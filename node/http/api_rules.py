"""The rule dry run over HTTP: ``POST /api/v1/rules/test`` (permission ``api.read``: it changes nothing).

The body is either

* ``multipart/form-data`` with one or more DICOM files in fields named ``file`` (and optionally
  ``calling_ae``, the sender to assume for ``CallingAETitle`` rules): the files are written to a
  temporary directory outside the spool, dry-run (:func:`node.rules_check.check_files`) and removed;
  nothing enters the spool or the catalog. The request is limited to ``http.max_request_mb``;
* or ``application/json`` ``{"study_id": N}``: the catalog study's recorded series
  (:func:`node.rules_check.check_study`).

The answer is the :class:`node.rules_check.RuleReport` (routing attributes only, never patient name
or ID). Errors are problem+json: 400 (``bad-request``: no ``file`` field, a malformed multipart
body), 404 (``not-found``: unknown study), 408 (``timeout``: nothing received for
``http.timeout_seconds``), 413 (``too-large``), 415 (``unsupported-media-type``),
422 (``invalid-parameters``: JSON that is not ``{"study_id": N}``).
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from python_multipart.multipart import parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from node.http.context import NodeContext, node_context
from node.http.errors import Problem
from node.rules_check import RuleReport, UnknownStudy, check_files, check_study

PREFIX = "/api/v1"
router = APIRouter(prefix=PREFIX, tags=["api"])

Ctx = Annotated[NodeContext, Depends(node_context)]
MB = 1 << 20
MAX_JSON_BYTES = 64 * 1024
MAX_FILES = 10_000
CHUNK = 1 << 20


class RuleTestRequest(BaseModel):
    """A catalog study to dry-run the rules on."""

    model_config = ConfigDict(extra="forbid")
    study_id: int = Field(ge=1)


_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "multipart/form-data": {"schema": {
            "type": "object", "required": ["file"],
            "properties": {
                "file": {"type": "array", "items": {"type": "string", "format": "binary"},
                         "description": "DICOM Part 10 files (one or more)"},
                "calling_ae": {"type": "string", "description": "the sender to assume (CallingAETitle rules)"},
            }}},
        "application/json": {"schema": RuleTestRequest.model_json_schema()},
    },
}

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "no `file` field, or a malformed multipart body (problem+json)"},
    404: {"description": "no such study (problem+json, code not-found)"},
    408: {"description": "nothing received for http.timeout_seconds (problem+json)"},
    413: {"description": "over http.max_request_mb (problem+json)"},
    415: {"description": "neither multipart/form-data nor application/json (problem+json)"},
    422: {"description": "JSON that is not {\"study_id\": N} (problem+json)"},
}


class _ToDisk(MultiPartParser):
    """Starlette's form parser with every file part on disk from its first byte (anonymous temp
    files): a few hundred uploaded slices are not held in memory."""

    spool_max_size = 1


async def _limited(request: Request, limit: int, timeout: float) -> AsyncGenerator[bytes, None]:
    """The request body, failing with 413 once it passes ``limit`` bytes (Content-Length or chunked)
    and with 408 when nothing arrives for ``timeout`` seconds."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Problem(413, "too-large", f"the request is over {limit // MB or 1} MB")
    seen = 0
    stream = request.stream()
    while True:
        with anyio.move_on_after(timeout) as waited:
            chunk = await anext(stream, None)
        if waited.cancelled_caught:
            raise Problem(408, "timeout", "no data for http.timeout_seconds", headers={"Connection": "close"})
        if chunk is None:
            return
        seen += len(chunk)
        if seen > limit:
            raise Problem(413, "too-large", f"the request is over {limit // MB or 1} MB")
        yield chunk


async def _save(upload: UploadFile, target: Path) -> None:
    out = await anyio.open_file(target, "wb")
    async with out:
        while chunk := await upload.read(CHUNK):
            await out.write(chunk)


async def _test_files(request: Request, ctx: NodeContext) -> RuleReport:
    limit = ctx.settings.http.max_request_mb * MB
    body = _limited(request, limit, ctx.settings.http.timeout_seconds)
    parser = _ToDisk(request.headers, body, max_files=MAX_FILES, max_fields=10)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise Problem(400, "bad-request", str(exc)) from None
    try:
        uploads = [f for f in form.getlist("file") if isinstance(f, UploadFile)]
        if not uploads:
            raise Problem(400, "bad-request", "no DICOM file in a form field named 'file'")
        calling_ae = form.get("calling_ae")
        with tempfile.TemporaryDirectory(prefix="dicom-node-rules-") as tmp:
            files: list[tuple[Path, str]] = []
            for i, upload in enumerate(uploads):
                path = Path(tmp) / f"{i:05d}.dcm"  # never a path from the request
                await _save(upload, path)
                files.append((path, upload.filename or f"file {i + 1}"))
            return await run_in_threadpool(check_files, ctx.settings, files,
                                           calling_ae=calling_ae if isinstance(calling_ae, str) else None,
                                           catalog=ctx.catalog)
    finally:
        await form.close()


async def _test_study(request: Request, ctx: NodeContext) -> RuleReport:
    body = b"".join([chunk async for chunk in _limited(request, MAX_JSON_BYTES, ctx.settings.http.timeout_seconds)])
    try:
        wanted = RuleTestRequest.model_validate_json(body)
    except ValidationError as exc:
        where = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors())
        raise Problem(422, "invalid-parameters", where) from None
    try:
        return await run_in_threadpool(check_study, ctx.settings, ctx.catalog, wanted.study_id)
    except UnknownStudy as exc:
        raise Problem(404, "not-found", str(exc)) from None


@router.post("/rules/test", response_model=RuleReport, responses=_ERRORS, openapi_extra={"requestBody": _BODY},
             summary="Dry-run the routing rules on uploaded DICOM files or a catalog study (creates no job)")
async def test_rules(request: Request, ctx: Ctx) -> RuleReport:
    """Which rules match each series, which conditions failed and why, and the jobs and destinations
    routing would create (nothing is stored, no job is created)."""
    media_type = parse_options_header(request.headers.get("content-type", ""))[0].decode("latin-1").lower()
    if media_type == "multipart/form-data":
        return await _test_files(request, ctx)
    if media_type == "application/json":
        return await _test_study(request, ctx)
    raise Problem(415, "unsupported-media-type",
                  "send multipart/form-data with DICOM files in 'file', or application/json {\"study_id\": N}")
