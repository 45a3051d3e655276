"""Sending one notification: a signed JSON POST (webhook) or a plain-text e-mail (SMTP).

Webhook requests carry, like GitHub's and Stripe's:

- ``X-Dicom-Node-Event``: the event (``job-failed``, ...);
- ``X-Dicom-Node-Delivery``: the outbox row's id, the same on every retry (receiver-side dedup);
- ``X-Dicom-Node-Timestamp``: Unix seconds of this attempt;
- ``X-Dicom-Node-Signature``: ``sha256=`` + hex HMAC-SHA256, keyed with the target's ``secret_file``
  (its content, surrounding whitespace stripped), over ``<timestamp>.<body>``.

A receiver verifies with ``hmac.compare_digest(expected, header)`` where ``expected = "sha256=" +
hmac.new(key, f"{timestamp}.".encode() + body, "sha256").hexdigest()`` and rejects timestamps more
than a few minutes old (replays). Any 2xx answer is delivered; anything else (or no answer within
``timeout_seconds``) is retried.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import smtplib
import ssl
from collections.abc import Callable
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any, Protocol

import httpx

from models.errors import NotificationError
from node.config_ops import EmailTarget, SmtpSettings, WebhookTarget
from node.notify.events import text_body
from node.version import software_version


class NotificationSender(Protocol):
    def send(self, event: str, outbox_id: int, doc: dict[str, Any]) -> None:
        """Deliver ``doc``; raise :class:`NotificationError` (retried) when it was not taken."""


def signature(key: bytes, timestamp: str, body: bytes) -> str:
    """``sha256=<hex HMAC-SHA256 of "<timestamp>.<body>">`` (header ``X-Dicom-Node-Signature``)."""
    return "sha256=" + hmac.new(key, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def _read_secret(key: str, path: Path) -> bytes:
    """A secret file's content (stripped); read at each send so a rotated key is picked up."""
    try:
        return path.read_bytes().strip()
    except OSError as exc:
        raise NotificationError(f"{key}: cannot read {path}: {exc.strerror}") from None


class WebhookSender:
    def __init__(self, target: WebhookTarget, clock: Callable[[], float]) -> None:
        self.target = target
        self.clock = clock

    def send(self, event: str, outbox_id: int, doc: dict[str, Any]) -> None:
        t = self.target
        body = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
        timestamp = str(int(self.clock()))
        headers = {"Content-Type": "application/json", "User-Agent": f"dicom-ai-node/{software_version()}",
                   "X-Dicom-Node-Event": event, "X-Dicom-Node-Delivery": str(outbox_id),
                   "X-Dicom-Node-Timestamp": timestamp}
        if t.secret_file is not None:
            key = _read_secret(f"notifications.targets[{t.name}].secret_file", t.secret_file)
            headers["X-Dicom-Node-Signature"] = signature(key, timestamp, body)
        verify: bool | ssl.SSLContext = ssl.create_default_context(cafile=t.ca_file) if t.ca_file is not None else True
        try:
            with httpx.Client(timeout=t.timeout_seconds, verify=verify, follow_redirects=False) as client:
                r = client.post(t.url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise NotificationError(f"{type(exc).__name__}: {exc}") from None
        if not 200 <= r.status_code < 300:
            raise NotificationError(f"HTTP {r.status_code} from the webhook")


class EmailSender:
    def __init__(self, target: EmailTarget, smtp: SmtpSettings, ae_title: str) -> None:
        self.target = target
        self.smtp = smtp
        self.ae_title = ae_title

    def message(self, event: str, outbox_id: int, doc: dict[str, Any]) -> EmailMessage:
        msg = EmailMessage()
        msg["Subject"] = f"[dicom-node {self.ae_title}] {doc.get('summary', event)}"
        msg["From"] = self.smtp.sender
        msg["To"] = ", ".join(self.target.to)
        msg["Date"] = formatdate(usegmt=True)
        msg["Message-ID"] = make_msgid(idstring=f"notify-{outbox_id}")
        msg["X-Dicom-Node-Event"] = event
        msg["X-Dicom-Node-Delivery"] = str(outbox_id)
        msg.set_content(text_body(doc))
        return msg

    def send(self, event: str, outbox_id: int, doc: dict[str, Any]) -> None:
        sm = self.smtp
        msg = self.message(event, outbox_id, doc)
        context = ssl.create_default_context(cafile=sm.ca_file)
        try:
            client = (smtplib.SMTP_SSL(sm.host, sm.port, timeout=sm.timeout_seconds, context=context)
                      if sm.security == "tls" else smtplib.SMTP(sm.host, sm.port, timeout=sm.timeout_seconds))
            with client:
                if sm.security == "starttls":
                    client.starttls(context=context)
                if sm.username is not None:
                    password = (_read_secret("notifications.smtp.password_file", sm.password_file).decode()
                                if sm.password_file is not None else "")
                    client.login(sm.username, password)
                client.send_message(msg)
        except (smtplib.SMTPException, OSError) as exc:
            raise NotificationError(f"SMTP {sm.host}:{sm.port}: {type(exc).__name__}: {exc}") from None


def make_sender(target: WebhookTarget | EmailTarget, smtp: SmtpSettings | None, ae_title: str,
                clock: Callable[[], float]) -> NotificationSender:
    if isinstance(target, WebhookTarget):
        return WebhookSender(target, clock)
    assert smtp is not None  # NotificationSettings requires it with e-mail targets
    return EmailSender(target, smtp, ae_title)
