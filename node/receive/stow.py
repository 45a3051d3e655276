"""DICOMweb STOW-RS receiver (PS3.18 §10.5 Store Transaction): the node's second door.

``POST {prefix}/studies[/{StudyInstanceUID}]`` with a ``multipart/related; type="application/dicom"``
body (Content-Length or chunked), one DICOM Part 10 file per part. Each part goes to ``store`` (the
node's Receiver: validate, fsync to the spool, catalog); this module never touches files. The body
is read whole (refused before reading when over ``max_body_bytes``), parsed, and only then stored:
a 4xx other than 409 means nothing was stored.

HTTP status (PS3.18 Table 10.5.3-1; §8.5 for the general codes):

    200  all stored        202  some stored, others failed, or stored with a warning (0001/Bxxx)
    409  none stored, for any mix of reasons (the response says why, per instance)
    503  none stored and every failure is 0xA7xx Out of Resources: temporary, so Retry-After is
         sent and senders retry later, as they do for DIMSE A700, instead of seeing a conflict
    400  malformed multipart body, no part, no boundary, invalid UID in the URL
    404  other paths    405  other methods on /studies    406  Accept excludes DICOM JSON
    411  no Content-Length and not chunked    413  body over max_body_bytes
    415  not multipart/related, or a part that is not application/dicom (metadata + bulkdata
         STOW, application/dicom+json or +xml, is not supported)
    500  unexpected error: logged without tag values, the server keeps serving
    501  a transfer coding other than chunked    503  also while the server is stopping

The response is the Store Instances Response Module (PS3.18 Annex I) in ``application/dicom+json``:
Referenced SOP Sequence (0008,1199) / Failed SOP Sequence (0008,1198) items with Referenced SOP
Class/Instance UID (left out when unknown) and Warning (0008,1196) / Failure Reason (0008,1197).
Retrieve URL (0008,1190) is Type 2 (Table I.1-1), so it is sent empty: the node is not a WADO-RS server.

An instance of another study than the URL's gets Failure Reason 0xC409 and never reaches
``store``: Table I.2-2 has no code for it (A9xx means "does not conform to its SOP Class"), allows
implementation codes, and 0xC409 is dcm4chee-arc's. A ``store`` that raises gives 0x0110.
"""

from __future__ import annotations

import contextlib
import email.message
import email.parser
import email.utils
import io
import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

import pydicom

from models.errors import InputError
from node.spool import is_valid_uid

log = logging.getLogger("node.receive.stow")

FAILURE_PROCESSING = 0x0110
FAILURE_STUDY_MISMATCH = 0xC409
FAILURE_CANNOT_PARSE = 0xC210
DICOM_JSON = "application/dicom+json"
_ACCEPTABLE = (DICOM_JSON, "application/json", "application/*", "*/*")
_TEXT = "text/plain; charset=utf-8"


@dataclass(frozen=True)
class StoreOutcome:
    """What the node's store function decided for one instance (a DICOM C-STORE status)."""

    status: int
    sop_class_uid: str | None
    sop_instance_uid: str | None

    @property
    def stored(self) -> bool:
        """Success (0000) or a warning (0001, Bxxx)."""
        return self.status in (0x0000, 0x0001) or 0xB000 <= self.status <= 0xBFFF


class _Received(Protocol):
    @property
    def status(self) -> int: ...
    @property
    def sop_class_uid(self) -> str | None: ...
    @property
    def sop_instance_uid(self) -> str | None: ...


class InstanceSink(Protocol):
    """What stores an instance: the node's ``Receiver`` (validate, fsync to the spool, catalog)."""

    def receive(self, encoded: bytes, source: str, request: tuple[str, str] | None = None) -> _Received: ...


def receiver_store(receiver: InstanceSink, source: str = "STOW-RS") -> Callable[[bytes], StoreOutcome]:
    """The ``store`` callable for a StowServer in front of the node's Receiver."""

    def store(encoded: bytes) -> StoreOutcome:
        r = receiver.receive(encoded, source)
        return StoreOutcome(r.status, r.sop_class_uid, r.sop_instance_uid)

    return store


class MultipartError(InputError):
    """The multipart body is malformed (HTTP 400)."""


@dataclass(frozen=True)
class Part:
    headers: dict[str, str]
    """Names lower-cased."""
    content: memoryview


def parse_media_type(value: str) -> tuple[str, dict[str, str]]:
    """``type/subtype`` (lower-cased, '' if absent) and its parameters (names lower-cased, unquoted)."""
    if not value.strip():
        return "", {}
    msg = email.message.Message()
    msg["content-type"] = value
    params = msg.get_params() or []
    return msg.get_content_type(), {k.lower(): email.utils.collapse_rfc2231_value(v) for k, v in params[1:]}


def _delimiter_end(body: bytes, delim: bytes, at: int) -> tuple[int, bool] | None:
    """If ``delim`` at ``at`` starts a boundary line: (offset after the line, is close delimiter)."""
    k = at + len(delim)
    if body[k:k + 2] == b"--":
        return k + 2, True
    while body[k:k + 1] in (b" ", b"\t"):  # transport padding
        k += 1
    return (k + 2, False) if body[k:k + 2] == b"\r\n" else None


def _next_delimiter(body: bytes, delim: bytes, start: int) -> tuple[int, int, bool]:
    """(offset of CRLF--boundary, offset after its line, is close delimiter)."""
    needle = b"\r\n" + delim
    while (j := body.find(needle, start)) >= 0:
        if (end := _delimiter_end(body, delim, j + 2)) is not None:
            return j, *end
        start = j + 1  # the boundary followed by other text is not a delimiter
    raise MultipartError("missing boundary (truncated body?)")


def parse_multipart(body: bytes, boundary: str) -> list[Part]:
    """Split a multipart body (RFC 2046: CRLF line ends; preamble and epilogue ignored)."""
    delim = b"--" + boundary.encode("latin-1")
    first = _delimiter_end(body, delim, 0) if body.startswith(delim) else None
    pos, close = first if first else _next_delimiter(body, delim, 0)[1:]
    view, parts = memoryview(body), []
    while not close:
        end, after, close = _next_delimiter(body, delim, pos)
        if body[pos:pos + 2] == b"\r\n":  # no header fields
            headers, start = {}, pos + 2
        elif (h := body.find(b"\r\n\r\n", pos, end + 2)) >= 0:
            fields = email.parser.BytesHeaderParser().parsebytes(body[pos:h])
            headers, start = {k.lower(): str(v) for k, v in fields.items()}, h + 4
        else:
            raise MultipartError("part header fields not ended by an empty line")
        parts.append(Part(headers, view[start:end]))
        pos = after
    return parts


def _header_uids(data: bytes) -> tuple[str | None, str | None, str | None]:
    """(Study, SOP Class, SOP Instance UID) from the data set; raises if it cannot be read."""
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True,
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
    module: dict[str, Any] = {"00081190": {"vr": "UR"}}  # Retrieve URL: Type 2, empty (no WADO-RS)
    if failed:
        module["00081198"] = {"vr": "SQ", "Value": [_item(o, "00081197") for o in failed]}
    if stored:
        module["00081199"] = {"vr": "SQ", "Value": [
            {**_item(o, "00081196" if o.status else None), "00081190": {"vr": "UR"}} for o in stored]}
    if not stored:
        return (503 if failed and all(0xA700 <= o.status <= 0xA7FF for o in failed) else 409), module
    return (202 if failed or any(o.status for o in stored) else 200), module


class _Refusal(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 64
    stow: StowServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("STOW-RS connection error from %s", client_address[0], exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "dicom-node-stow"
    sys_version = ""
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.stow.timeout_seconds)
        self._replied = self._body_read = False

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.client_address[0], *args)

    def _target(self) -> str:
        """'' for /studies, the UID for /studies/{uid}; refuses (404, 400) anything else."""
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).rstrip("/")
        base = self.server.stow.path_prefix + "/studies"
        if path == base:
            return ""
        uid = path[len(base) + 1:]
        if not path.startswith(base + "/") or "/" in uid:
            raise _Refusal(404, "not found")
        if not is_valid_uid(uid):
            raise _Refusal(400, "invalid Study Instance UID in the URL")
        return uid

    def _check(self) -> tuple[str, str, int | None, bool]:
        """Before the body: (study or '', boundary, Content-Length or None if chunked, type given)."""
        stow = self.server.stow
        if stow.stopping:
            raise _Refusal(503, "shutting down", {"Retry-After": str(stow.retry_after_seconds)})
        target = self._target()
        if self.command != "POST":
            raise _Refusal(405, "only POST (STOW-RS) is supported", {"Allow": "POST"})
        media, params = parse_media_type(self.headers.get("Content-Type", ""))
        kind = parse_media_type(params.get("type", ""))[0]
        if media != "multipart/related" or kind not in ("", "application/dicom"):
            raise _Refusal(415, 'expected multipart/related; type="application/dicom"')
        boundary = params.get("boundary", "")
        if not 0 < len(boundary) <= 200 or not (boundary.isascii() and boundary.isprintable()):
            raise _Refusal(400, "missing or invalid multipart boundary")
        accept = self.headers.get("Accept")
        if accept and not any(parse_media_type(a)[0] in _ACCEPTABLE for a in accept.split(",")):
            raise _Refusal(406, "responses are application/dicom+json")
        coding = self.headers.get("Transfer-Encoding", "").strip().lower()
        if coding:
            if coding != "chunked":
                raise _Refusal(501, "unsupported transfer coding")
            return target, boundary, None, bool(kind)
        length = self.headers.get("Content-Length")
        if length is None:
            raise _Refusal(411, "Content-Length required")
        if not (length := length.strip()).isascii() or not length.isdigit() or len(length) > 18:
            raise _Refusal(400, "invalid Content-Length")
        if int(length) > stow.max_body_bytes:
            raise _Refusal(413, f"body over {stow.max_body_bytes} bytes")
        return target, boundary, int(length), bool(kind)

    def handle_expect_100(self) -> bool:
        """Refuse before the client sends the body (413, 415, ...), else 100 Continue."""
        try:
            self._check()
        except _Refusal as refusal:
            self._refuse(refusal)
            return False
        return super().handle_expect_100()

    def _reply(self, status: int, body: bytes, content_type: str, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in {"Content-Type": content_type, "Content-Length": str(len(body)), **headers}.items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self._replied = True

    def _body_pending(self) -> bool:
        length = self.headers.get("Content-Length", "0").strip()
        return not self._body_read and ("Transfer-Encoding" in self.headers or length != "0")

    def _refuse(self, refusal: _Refusal) -> None:
        """Reply; with the body unread, close after a short linger so the client reads the reply."""
        pending = self._body_pending()
        self.close_connection = self.close_connection or pending
        self._reply(refusal.status, (refusal.message + "\n").encode(), _TEXT, refusal.headers)
        if pending:
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_WR)
                self.connection.settimeout(0.5)
                deadline = time.monotonic() + 2.0
                while time.monotonic() < deadline and self.connection.recv(65536):
                    pass

    def _read_body(self, length: int | None) -> bytes:
        if length is not None:
            body = self.rfile.read(length)
            if len(body) != length:
                raise ConnectionError("body truncated")
            return body
        limit, total, chunks = self.server.stow.max_body_bytes, 0, list[bytes]()
        while True:
            line = self.rfile.readline(1024)
            if not line.endswith(b"\n"):
                raise ConnectionError("chunked body truncated")
            token = line.split(b";", 1)[0].strip()
            if not 0 < len(token) <= 16 or token.strip(b"0123456789abcdefABCDEF"):
                raise _Refusal(400, "malformed chunked body")
            size = int(token, 16)
            if size == 0:
                while self.rfile.readline(1024).strip():  # trailer fields
                    pass
                return b"".join(chunks)
            if (total := total + size) > limit:
                raise _Refusal(413, f"body over {limit} bytes")
            chunks.append(self.rfile.read(size))
            if len(chunks[-1]) != size or self.rfile.read(2) != b"\r\n":
                raise _Refusal(400, "malformed chunked body")

    def _store_part(self, part: Part, target: str) -> StoreOutcome:
        data = bytes(part.content)
        if target:
            try:
                study, sop_class, sop_uid = _header_uids(data)
            except Exception:
                return StoreOutcome(FAILURE_CANNOT_PARSE, None, None)
            if study != target:
                return StoreOutcome(FAILURE_STUDY_MISMATCH, sop_class, sop_uid)
        try:
            return self.server.stow.store(data)
        except Exception as exc:
            log.error("STOW-RS store function failed: %s", type(exc).__name__)
            log.debug("store function failure", exc_info=True)
            return StoreOutcome(FAILURE_PROCESSING, None, None)

    def _post(self) -> None:
        started = time.monotonic()
        target, boundary, length, typed = self._check()
        body = self._read_body(length)
        self._body_read = True
        try:
            parts = parse_multipart(body, boundary)
        except MultipartError as exc:
            raise _Refusal(400, f"malformed multipart body: {exc}") from None
        if not parts:
            raise _Refusal(400, "no part in the multipart body")
        for part in parts:
            media = parse_media_type(part.headers.get("content-type", ""))[0]
            if media != "application/dicom" and (media or not typed):
                raise _Refusal(415, "only application/dicom parts are supported")
        outcomes = [self._store_part(p, target) for p in parts]
        status, module = store_response(outcomes)
        headers = {"Retry-After": str(self.server.stow.retry_after_seconds)} if status == 503 else {}
        self._reply(status, json.dumps(module, separators=(",", ":")).encode(), DICOM_JSON, headers)
        failures = Counter(f"0x{o.status:04X}" for o in outcomes if not o.stored)
        log.info("STOW-RS from %s: HTTP %d, %d instance(s), %d stored%s, %.1f MB in %.0f ms",
                 self.client_address[0], status, len(parts), len(parts) - failures.total(),
                 "".join(f", {k} x{n}" for k, n in sorted(failures.items())), len(body) / 1e6,
                 (time.monotonic() - started) * 1000)

    def _handle(self) -> None:
        self._replied = self._body_read = False
        stow = self.server.stow
        stow._enter()
        try:
            self._post()
        except _Refusal as refusal:
            self._refuse(refusal)
        except (ConnectionError, TimeoutError) as exc:
            log.info("STOW-RS client %s: %s", self.client_address[0], type(exc).__name__)
            self.close_connection = True
        except Exception as exc:
            log.error("STOW-RS request failed: %s", type(exc).__name__)
            log.debug("STOW-RS request failure", exc_info=True)
            self.close_connection = True
            if not self._replied:
                with contextlib.suppress(OSError):
                    self._reply(500, b"internal error\n", _TEXT, {})
        finally:
            stow._leave()

    do_POST = do_GET = do_HEAD = do_PUT = do_DELETE = do_PATCH = _handle


class StowServer:
    """STOW-RS origin server; ``store`` is called from several threads at once."""

    def __init__(self, host: str, port: int, store: Callable[[bytes], StoreOutcome], max_body_bytes: int,
                 path_prefix: str = "/dicom-web", *, timeout_seconds: float = 60.0,
                 retry_after_seconds: int = 60) -> None:
        self.host, self.store, self.max_body_bytes = host, store, max_body_bytes
        self.path_prefix = "/" + path_prefix.strip("/") if path_prefix.strip("/") else ""
        self.timeout_seconds = timeout_seconds
        """Socket timeout: a client that sends nothing for this long loses its connection."""
        self.retry_after_seconds = retry_after_seconds
        self.stopping = False
        self._port = port
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._busy = 0
        self._idle = threading.Condition()

    @property
    def port(self) -> int:
        """The bound port once started (a free one when constructed with 0)."""
        return self._port

    @property
    def url(self) -> str:
        """The DICOMweb service root, e.g. ``http://127.0.0.1:8080/dicom-web``."""
        return f"http://{f'[{self.host}]' if ':' in self.host else self.host}:{self._port}{self.path_prefix}"

    def start(self) -> None:
        """Bind and listen; returns once listening, serves from a daemon thread."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        httpd = type("_Server", (_HTTPServer,), {"address_family": family})((self.host, self._port), _Handler)
        httpd.stow = self
        self._httpd, self._port, self.stopping = httpd, int(httpd.server_address[1]), False
        self._thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), name="stow-rs", daemon=True)
        self._thread.start()
        log.info("STOW-RS listening on %s:%d%s/studies", self.host, self._port, self.path_prefix)

    def stop(self, drain_seconds: float = 30.0) -> None:
        """Stop listening, answer 503 on open connections, wait for requests in flight."""
        self.stopping = True
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._idle:
            self._idle.wait_for(lambda: self._busy == 0, timeout=drain_seconds)

    def _enter(self) -> None:
        with self._idle:
            self._busy += 1

    def _leave(self) -> None:
        with self._idle:
            self._busy -= 1
            self._idle.notify_all()


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
                 timeout: float = 120.0) -> tuple[int, dict[str, Any]]:
    """POST Part 10 ``files`` to ``{url}/studies[/{study_uid}]``: (HTTP status, response DICOM JSON or {})."""
    body, content_type = multipart_body(files)
    target = url.rstrip("/") + "/studies" + (f"/{study_uid}" if study_uid else "")
    request = urllib.request.Request(target, data=body, method="POST",
                                     headers={"Content-Type": content_type, "Accept": DICOM_JSON})
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
