"""E-mail notifications to a real SMTP server (aiosmtpd on loopback): STARTTLS with the CA file, login
with the password file, the subject and plain-text body; an SMTP server that is down is retried."""

from __future__ import annotations

import email
import email.policy
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from node.catalog import Catalog
from node.config import Settings, check_files
from node.notify import Notifier
from node.schema import JobState
from testkit.certs import make_pki
from testkit.harness import free_port
from tests.unit.test_notify_detect import PATIENT_ID, STUDY_UID, Clock, add_job


class Inbox:
    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], email.message.EmailMessage]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), msg))
        return "250 OK"


def _authenticate(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
    ok = isinstance(data, LoginPassword) and (data.login, data.password) == (b"node", b"smtp-pass")
    return AuthResult(success=ok)


@contextmanager
def smtp_server(port: int, tls: ssl.SSLContext | None = None) -> Iterator[Inbox]:
    inbox = Inbox()
    kw: dict[str, Any] = {}
    if tls is not None:
        kw = {"tls_context": tls, "require_starttls": True, "auth_required": True, "authenticator": _authenticate}
    controller = Controller(inbox, hostname="127.0.0.1", port=port, **kw)
    controller.start()
    try:
        yield inbox
    finally:
        controller.stop()


def _settings(tmp_path: Path, port: int, **smtp: Any) -> Settings:
    return Settings.model_validate({
        "node": {"storage_dir": str(tmp_path / "storage"), "ae_title": "AI-NODE"},
        "notifications": {
            "targets": [{"name": "admins", "type": "email", "events": ["job-failed"],
                         "to": ["pacs-admin@hospital.example", "it@hospital.example"]}],
            "smtp": {"host": "127.0.0.1", "port": port, "from": "ai-node@hospital.example", "timeout_seconds": 5,
                     **smtp},
            "retry_initial_seconds": 10,
        },
    })


def _failed_job(notifier: Notifier, catalog: Catalog, clock: Clock) -> int:
    notifier.detect_tick()
    job = add_job(catalog, clock.t, model="ct-lung-nodules")
    catalog.finish_job(job, JobState.FAILED, clock.t, error="ModelError: broken bundle")
    return job


def test_email_over_starttls_with_login(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(pki.server_cert, pki.server_key)
    password = tmp_path / "smtp.pass"
    password.write_text("smtp-pass\n")
    password.chmod(0o600)
    port = free_port()
    settings = _settings(tmp_path, port, security="starttls", username="node", password_file=str(password),
                         ca_file=str(pki.ca_cert))
    check_files(settings)
    clock = Clock()
    catalog = Catalog.for_storage(settings.node.storage_dir)
    notifier = Notifier(settings, catalog, clock)
    with smtp_server(port, tls) as inbox:
        job = _failed_job(notifier, catalog, clock)
        assert notifier.tick() == 1
    [(sender, rcpts, msg)] = inbox.messages
    assert sender == "ai-node@hospital.example"
    assert rcpts == ["pacs-admin@hospital.example", "it@hospital.example"]
    assert msg["Subject"] == "[dicom-node AI-NODE] job failed: ct-lung-nodules on study #1"
    assert msg["X-Dicom-Node-Event"] == "job-failed"
    body = msg.get_content().replace("\r\n", "\n")
    assert body.startswith("job failed: ct-lung-nodules on study #1\n")
    assert f"job.id: {job}\n" in body and "job.error: ModelError: broken bundle\n" in body
    assert "study.path: /studies/1\n" in body
    assert STUDY_UID not in msg.as_string() and PATIENT_ID not in msg.as_string()


def test_smtp_server_down_then_up_is_retried(tmp_path: Path) -> None:
    port = free_port()
    settings = _settings(tmp_path, port, security="none")
    clock = Clock()
    catalog = Catalog.for_storage(settings.node.storage_dir)
    notifier = Notifier(settings, catalog, clock)
    _failed_job(notifier, catalog, clock)
    assert notifier.tick() == 0  # nothing listens on the port
    [(_, _, state, attempts, error, _)] = notifier.outbox.rows()
    assert state == "pending" and attempts == 1 and error is not None and error.startswith(f"SMTP 127.0.0.1:{port}")
    with smtp_server(port) as inbox:
        clock.t += 10
        assert notifier.send_tick() == 1
    assert len(inbox.messages) == 1
    assert [r[2] for r in notifier.outbox.rows()] == ["sent"]
