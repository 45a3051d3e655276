"""DICOMweb STOW-RS (PS3.18 §10.5 Store Transaction): what the node's STOW-RS route
(:mod:`node.http.stow`) and its tests share, without HTTP: the media types, a streaming
``multipart/related`` parser, the per-instance outcome and the Store Instances Response, and a
small client (``multipart_body``, ``stow_request``) for tests and benchmarks.

The response is the Store Instances Response Module (PS3.18 Annex I) in ``application/dicom+json``:
Referenced SOP Sequence (0008,1199) / Failed SOP Sequence (0008,1198) items with Referenced SOP
Class/Instance UID (left out when unknown) and Warning (0008,1196) / Failure Reason (0008,1197).
Retrieve URL (0008,1190) is Type 2 (Table I.1-1), so it is sent empty.

HTTP status for the instances of a request (PS3.18 Table 10.5.3-1):

    200  all stored        202  some stored, others failed, or stored with a warning (0001/Bxxx)
    409  none stored, for any mix of reasons (the response says why, per instance)
    503  none stored and every failure is 0xA7xx Out of Resources: temporary, so Retry-After is
         sent and senders retry later, as they do for DIMSE A700, instead of seeing a conflict

An instance of another study than the URL's gets Failure Reason 0xC409 and is not stored: Table
I.2-2 has no code for it (A9xx means "does not conform to its SOP Class"), allows implementation
codes, and 0xC409 is dcm4chee-arc's. A store that raises gives 0x0110.
"""

from __future__ import annotations

import email.message
import email.utils
import json
import logging
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, MultipartState

from models.errors import InputError

FAILURE_PROCESSING = 0x0110
FAILURE_STUDY_MISMATCH = 0xC409
FAILURE_CANNOT_PARSE = 0xC210
FAILURE_OUT_OF_RESOURCES = 0xA700
DICOM_JSON = "application/dicom+json"
ACCEPTABLE = (DICOM_JSON, "application/json", "application/*", "*/*")
"""Accept values a STOW-RS response satisfies (anything else: 406)."""
MAX_PREAMBLE = 64 * 1024
"""Bytes before the first boundary that are skipped (RFC 2046 preamble); more is a malformed body."""

# python-multipart logs each malformed body at WARNING; the route answers 400 and logs it once itself.
logging.getLogger("python_multipart").setLevel(logging.ERROR)


@dataclass(frozen=True)
class StoreOutcome:
    """What the node decided for one instance (a DICOM C-STORE status)."""

    status: int
    sop_class_uid: str | None
    sop_instance_uid: str | None
    study_uid: str | None = None

    @property
    def stored(self) -> bool:
        """Success (0000) or a warning (0001, Bxxx)."""
        return self.status in (0x0000, 0x0001) or 0xB000 <= self.status <= 0xBFFF


class MultipartError(InputError):
    """The multipart body is malformed (HTTP 400)."""


def parse_media_type(value: str) -> tuple[str, dict[str, str]]:
    """``type/subtype`` (lower-cased, '' if absent) and its parameters (names lower-cased, unquoted)."""
    if not value.strip():
        return "", {}
    msg = email.message.Message()
    msg["content-type"] = value
    params = msg.get_params() or []
    return msg.get_content_type(), {k.lower(): email.utils.collapse_rfc2231_value(v) for k, v in params[1:]}


def valid_boundary(boundary: str) -> bool:
    return 0 < len(boundary) <= 200 and boundary.isascii() and boundary.isprintable()


class MultipartStream:
    """A push parser for a ``multipart/related`` body (RFC 2046, CRLF line ends), fed chunk by chunk.

    python-multipart's ``MultipartParser`` does the parsing; this class adds what a multipart/related
    body may have and form-data has not: a preamble and transport padding before the first boundary
    (skipped), and a check at :meth:`close` that the close delimiter came (a truncated body is an
    error). For each part: ``on_headers(headers)`` (names lower-cased), ``on_data(chunk)`` any number
    of times (the chunk is only valid during the call), ``on_end()``. Exceptions the callbacks raise
    pass through :meth:`feed`; a malformed body raises :class:`MultipartError`.
    """

    def __init__(self, boundary: str, on_headers: Callable[[dict[str, str]], None],
                 on_data: Callable[[memoryview], None], on_end: Callable[[], None]) -> None:
        if not valid_boundary(boundary):
            raise MultipartError("missing or invalid multipart boundary")
        self._dash_boundary = b"--" + boundary.encode("ascii")
        self._on_headers, self._on_data, self._on_end = on_headers, on_data, on_end
        self._head = bytearray()  # the body until its first delimiter line is seen
        self._started = self._closed = False
        self._field = bytearray()
        self._value = bytearray()
        self._headers: dict[str, str] = {}
        self.parts = 0
        """Parts whose end was seen."""
        self._parser = MultipartParser(self._dash_boundary[2:], {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda data, start, end: self._field.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._value.extend(data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": lambda: self._on_headers(dict(self._headers)),
            "on_part_data": lambda data, start, end: self._on_data(memoryview(data)[start:end]),
            "on_part_end": self._part_end,
        }, max_header_count=32)

    def _part_begin(self) -> None:
        self._headers = {}
        self._field.clear()
        self._value.clear()

    def _header_end(self) -> None:
        self._headers[self._field.decode("latin-1").strip().lower()] = self._value.decode("latin-1").strip()
        self._field.clear()
        self._value.clear()

    def _part_end(self) -> None:
        self.parts += 1
        self._on_end()

    def _first_delimiter(self) -> tuple[int, int, bool] | None:
        """(offset of the first delimiter line, offset after it, is a close delimiter) once it is in ``_head``."""
        head, delim = self._head, self._dash_boundary
        at = 0 if head.startswith(delim) else head.find(b"\r\n" + delim) + 2
        while at >= 2 or (at == 0 and head.startswith(delim)):
            k = at + len(delim)
            if head[k:k + 2] == b"--":
                return at, k + 2, True
            while head[k:k + 1] in (b" ", b"\t"):  # transport padding
                k += 1
            if head[k:k + 2] == b"\r\n":
                return at, k + 2, False
            if k + 2 > len(head):
                return None  # the rest of the line has not arrived yet
            at = head.find(b"\r\n" + delim, at) + 2  # the boundary followed by other text: not a delimiter
        return None

    def feed(self, data: bytes) -> None:
        if self._closed:
            return  # the epilogue
        if not self._started:
            self._head += data
            found = self._first_delimiter()
            if found is None or found[0] > MAX_PREAMBLE:
                if len(self._head) > MAX_PREAMBLE:
                    raise MultipartError("no multipart boundary at the start of the body")
                return
            _, after, close = found
            rest, self._head = bytes(self._head[after:]), bytearray()
            self._started = True
            if close:
                self._closed = True
                return
            data = self._dash_boundary + b"\r\n" + rest
        try:
            self._parser.write(data)
        except FormParserError as exc:
            raise MultipartError(f"malformed multipart body: {exc}") from None
        if self._parser.state == MultipartState.END:
            self._closed = True

    def close(self) -> None:
        """The body ended: raises :class:`MultipartError` unless its close delimiter was seen."""
        if not self._started:
            raise MultipartError("no multipart boundary in the body")
        if not self._closed:
            raise MultipartError("missing close delimiter (truncated body?)")


@dataclass(frozen=True)
class Part:
    headers: dict[str, str]
    """Names lower-cased."""
    content: bytes


def parse_multipart(body: bytes, boundary: str) -> list[Part]:
    """Every part of a whole multipart body held in memory (tests, small bodies)."""
    parts: list[Part] = []
    headers: dict[str, str] = {}
    content = bytearray()

    def on_headers(h: dict[str, str]) -> None:
        nonlocal headers
        headers = h
        content.clear()

    def on_end() -> None:
        parts.append(Part(headers, bytes(content)))

    stream = MultipartStream(boundary, on_headers, content.extend, on_end)
    stream.feed(body)
    stream.close()
    return parts


def header_uids(path: Path) -> tuple[str | None, str | None, str | None]:
    """(Study, SOP Class, SOP Instance UID) of a Part 10 file; raises if it cannot be read."""
    ds = pydicom.dcmread(path, stop_before_pixels=True,
                         specific_tags=["StudyInstanceUID", "SOPClassUID", "SOPInstanceUID"])
    study, sop_class, sop_uid = (ds.get(k) for k in ("StudyInstanceUID", "SOPClassUID", "SOPInstanceUID"))
    return (str(study) if study else None, str(sop_class) if sop_class else None, str(sop_uid) if sop_uid else None)


def _item(outcome: StoreOutcome, reason_tag: str | None) -> dict[str, Any]:
    item: dict[str, Any] = {}
    if outcome.sop_class_uid:
        item["00081150"] = {"vr": "UI", "Value": [outcome.sop_class_uid]}
    if outcome.sop_instance_uid:
        item["00081155"] = {"vr": "UI", "Value": [outcome.sop_instance_uid]}
    if reason_tag:
        item[reason_tag] = {"vr": "US", "Value": [outcome.status]}
    return item


def store_response(outcomes: list[StoreOutcome]) -> tuple[int, dict[str, Any]]:
    """HTTP status and Store Instances Response Module (DICOM JSON) for the per-part outcomes."""
    stored = [o for o in outcomes if o.stored]
    failed = [o for o in outcomes if not o.stored]
    module: dict[str, Any] = {"00081190": {"vr": "UR"}}  # Retrieve URL: Type 2, empty
    if failed:
        module["00081198"] = {"vr": "SQ", "Value": [_item(o, "00081197") for o in failed]}
    if stored:
        module["00081199"] = {"vr": "SQ", "Value": [
            {**_item(o, "00081196" if o.status else None), "00081190": {"vr": "UR"}} for o in stored]}
    if not stored:
        return (503 if failed and all(0xA700 <= o.status <= 0xA7FF for o in failed) else 409), module
    return (202 if failed or any(o.status for o in stored) else 200), module


def multipart_body(files: list[bytes]) -> tuple[bytes, str]:
    """A ``multipart/related; type="application/dicom"`` body and its Content-Type value."""
    boundary = uuid.uuid4().hex
    while any(boundary.encode() in f for f in files):
        boundary = uuid.uuid4().hex
    chunks: list[bytes] = []
    for data in files:
        chunks += [b"--", boundary.encode(), b"\r\nContent-Type: application/dicom\r\n\r\n", data, b"\r\n"]
    chunks += [b"--", boundary.encode(), b"--\r\n"]
    return b"".join(chunks), f'multipart/related; type="application/dicom"; boundary={boundary}'


def stow_request(url: str, files: list[bytes], study_uid: str | None = None,
                 timeout: float = 120.0, token: str | None = None) -> tuple[int, dict[str, Any]]:
    """POST Part 10 ``files`` to ``{url}/studies[/{study_uid}]``: (HTTP status, response DICOM JSON or {});
    ``token``: sent as ``Authorization: Bearer``."""
    body, content_type = multipart_body(files)
    target = url.rstrip("/") + "/studies" + (f"/{study_uid}" if study_uid else "")
    headers = {"Content-Type": content_type, "Accept": DICOM_JSON}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(target, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, payload = int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            status, payload = exc.code, exc.read()
    try:
        parsed = json.loads(payload) if payload else {}
    except ValueError:
        parsed = {}
    return status, parsed if isinstance(parsed, dict) else {}
