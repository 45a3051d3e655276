"""STOW-RS sender: results to a DICOMweb service as ``multipart/related; type="application/dicom"``.

One HTTP connection per batch of files; files are grouped into requests of at most
``max_request_mb``, and a request the service refuses as too large (413) is split in halves.
The answer is read per PS3.18 10.5.3: 200 (all stored), 202 (some failed: the Failed SOP
Sequence of the response names them), 409 (none stored); other codes fail the whole request.
Only the UIDs the service confirms (on a 200, every file of the request) count as sent;
everything else stays pending and is retried by ``node.send.deliver``.

The transport is a seam: tests pass ``httpx.MockTransport``; production uses httpx's own.
"""

from __future__ import annotations

import io
import json
import logging
import ssl
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import httpx
import pydicom

from models.errors import DestinationUnreachable
from node.config import DicomwebDestination
from node.schema import BINARY_VARIANT, LABELMAP_VARIANT
from node.send.base import SendReport

log = logging.getLogger("node.send.stow")

DICOM_JSON = "application/dicom+json"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_SEQUENCE = "00081199"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"
WARNING_REASON = "00081196"
MB = 1024 * 1024


def _read_secret(path: Path, what: str) -> str:
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise DestinationUnreachable(f"cannot read {what} {path}: {exc.strerror}") from None
    if not value:
        raise DestinationUnreachable(f"{what} {path} is empty")
    return value


def multipart_body(parts: Sequence[bytes], boundary: str) -> bytes:
    """A ``multipart/related`` body of Part 10 files, each part ``Content-Type: application/dicom``."""
    out = io.BytesIO()
    for part in parts:
        out.write(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii"))
        out.write(part)
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode("ascii"))
    return out.getvalue()


def _uids(response: httpx.Response) -> tuple[set[str], dict[str, str]] | None:
    """(stored UIDs, failed UID -> reason) from a DICOM JSON STOW response; None if unreadable."""
    if "json" not in response.headers.get("content-type", ""):  # application/dicom+json (or plain json)
        return None
    try:
        body = json.loads(response.content)
    except ValueError:
        return None
    if isinstance(body, list) and len(body) == 1:  # some servers wrap the dataset in an array
        body = body[0]
    if not isinstance(body, dict):
        return None

    def items(tag: str) -> Iterator[dict[str, object]]:
        element = body.get(tag)
        values = element.get("Value", []) if isinstance(element, dict) else []
        yield from (v for v in values if isinstance(v, dict))

    def value(item: dict[str, object], tag: str) -> object:
        element = item.get(tag)
        values = element.get("Value") if isinstance(element, dict) else None
        return values[0] if isinstance(values, list) and values else None

    stored = {str(uid) for i in items(REFERENCED_SOP_SEQUENCE) if (uid := value(i, REFERENCED_SOP_INSTANCE_UID))}
    failed: dict[str, str] = {}
    for i in items(FAILED_SOP_SEQUENCE):
        if uid := value(i, REFERENCED_SOP_INSTANCE_UID):
            reason = value(i, FAILURE_REASON)
            failed[str(uid)] = f"status 0x{reason:04X}" if isinstance(reason, int) else "failed (no reason given)"
    return stored, failed


class StowSender:
    def __init__(self, destination: DicomwebDestination, timeout_seconds: float,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.destination = destination
        self.timeout = timeout_seconds
        self.transport = transport

    def _client(self) -> httpx.Client:
        d = self.destination
        auth: httpx.Auth | None = None
        headers = {"Accept": DICOM_JSON}
        if d.username is not None and d.password_file is not None:
            auth = httpx.BasicAuth(d.username, _read_secret(d.password_file, "password_file"))
        elif d.token_file is not None:
            headers["Authorization"] = f"Bearer {_read_secret(d.token_file, 'token_file')}"
        # an SSL context, not a CA path: httpx 0.28 deprecates ``verify=<str>``
        verify: bool | ssl.SSLContext = ssl.create_default_context(cafile=d.ca_file) if d.ca_file is not None else True
        return httpx.Client(auth=auth, headers=headers, timeout=self.timeout, verify=verify,
                            transport=self.transport, follow_redirects=False)

    def send(self, files: Sequence[Path], variants: Mapping[Path, str] | None = None) -> SendReport:
        variants = variants or {}
        report = SendReport()
        skip = BINARY_VARIANT if self.destination.accepts_labelmap else LABELMAP_VARIANT
        todo: list[tuple[Path, str, bytes]] = []
        for path in files:
            if variants.get(path) == skip:
                report.not_needed.append(path)
                continue
            try:
                data = path.read_bytes()
                uid = str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)
            except Exception as exc:  # a result file we cannot read is reported, not fatal
                report.failed[path] = f"unreadable: {type(exc).__name__}"
                continue
            todo.append((path, uid, data))
        if not todo:
            return report
        with self._client() as client:
            for batch in self._batches(todo):
                try:
                    self._post(client, batch, report)
                except httpx.TransportError as exc:
                    reason = f"{self.destination.name} unreachable ({type(exc).__name__})"
                    if not report.sent:
                        raise DestinationUnreachable(reason) from None
                    for path, _, _ in todo:
                        if path not in report.sent and path not in report.failed:
                            report.failed[path] = reason
                    break
        return report

    def _batches(self, todo: list[tuple[Path, str, bytes]]) -> Iterator[list[tuple[Path, str, bytes]]]:
        limit = self.destination.max_request_mb * MB
        batch: list[tuple[Path, str, bytes]] = []
        size = 0
        for item in todo:
            if batch and size + len(item[2]) > limit:
                yield batch
                batch, size = [], 0
            batch.append(item)
            size += len(item[2])
        if batch:
            yield batch

    def _post(self, client: httpx.Client, batch: list[tuple[Path, str, bytes]], report: SendReport) -> None:
        boundary = uuid.uuid4().hex
        response = client.post(
            f"{self.destination.url.rstrip('/')}/studies",
            content=multipart_body([data for _, _, data in batch], boundary),
            headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'},
        )
        code = response.status_code
        if code == 413 and len(batch) > 1:  # Payload Too Large: the service's limit is below ours
            half = len(batch) // 2
            log.debug("STOW-RS to %s: request too large, splitting %d files", self.destination.name, len(batch))
            self._post(client, batch[:half], report)
            self._post(client, batch[half:], report)
            return
        parsed = _uids(response) if code in (200, 202, 409) else None
        stored, failed = parsed if parsed is not None else (set(), {})
        for path, uid, _ in batch:
            if uid in failed:
                report.failed[path] = failed[uid]
            elif code == 200 or uid in stored:  # 200: all stored; 202: only those it lists as stored
                report.sent.append(path)
            else:
                report.failed[path] = f"HTTP {code} {response.reason_phrase}".strip()
        if code not in (200, 202):
            log.debug("STOW-RS to %s answered HTTP %d", self.destination.name, code)
