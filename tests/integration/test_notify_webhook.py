"""Webhooks against a real HTTP(S) receiver on loopback: signed with the key file, retried after a 500
and after a timeout, the same delivery id on every attempt; and the node service's notify loops."""

from __future__ import annotations

import hashlib
import hmac
import json
import queue
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from models.errors import NotificationError
from node.catalog import Catalog
from node.config import Settings
from node.notify import Notifier, send_test
from node.schema import JobState
from node.service import NodeService
from testkit.certs import make_pki
from testkit.harness import free_port, wait_for
from tests.unit.test_notify_detect import PATIENT_ID, STUDY_UID, Clock, add_job


@dataclass
class Receiver:
    url: str
    statuses: queue.Queue[int]
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    hold: threading.Event = field(default_factory=threading.Event)
    """While a status of 0 is next, the handler waits on this (a receiver that never answers)."""


@contextmanager
def webhook_receiver(*statuses: int, tls: ssl.SSLContext | None = None) -> Iterator[Receiver]:
    """A tiny HTTP(S) server that records each POST and answers the given statuses in turn (then 200)."""
    q: queue.Queue[int] = queue.Queue()
    for s in statuses:
        q.put(s)
    rec = Receiver("", q)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            rec.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
            status = 200 if q.empty() else q.get()
            if status == 0:
                rec.hold.wait(10)
                return
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    rec.url = f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}/hooks/dicom"
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield rec
    finally:
        rec.hold.set()
        server.shutdown()
        server.server_close()


def _settings(tmp_path: Path, url: str, **target: Any) -> Settings:
    return Settings.model_validate({
        "node": {"storage_dir": str(tmp_path / "storage"), "ae_title": "AI-NODE", "host": "127.0.0.1",
                 "port": free_port()},
        "http": {"enabled": False},
        "notifications": {"targets": [{"name": "hook", "type": "webhook", "url": url, **target}],
                          "retry_initial_seconds": 10, "poll_seconds": 0.05},
    })


def _key(tmp_path: Path) -> Path:
    key = tmp_path / "hook.key"
    key.write_text("whsec-test-key\n")
    key.chmod(0o600)
    return key


def _verify(headers: dict[str, str], body: bytes, key: bytes) -> None:
    ts = headers["x-dicom-node-timestamp"]
    expected = "sha256=" + hmac.new(key, ts.encode() + b"." + body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["x-dicom-node-signature"], expected)


def test_signed_https_webhook_retried_after_a_500(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(pki.server_cert, pki.server_key)
    key = _key(tmp_path)
    with webhook_receiver(500, tls=tls) as rec:
        settings = _settings(tmp_path, rec.url, secret_file=str(key), ca_file=str(pki.ca_cert))
        clock = Clock()
        catalog = Catalog.for_storage(settings.node.storage_dir)
        notifier = Notifier(settings, catalog, clock, usage=lambda: (1, 0, 1, 0.0))
        notifier.detect_tick()
        job = add_job(catalog, clock.t)
        catalog.finish_job(job, JobState.FAILED, clock.t, error="ModelError: broken bundle")
        assert notifier.tick() == 0  # the receiver answered 500
        [(_, _, state, attempts, error, _)] = notifier.outbox.rows()
        assert (state, attempts, error) == ("pending", 1, "HTTP 500 from the webhook")
        clock.t += 9
        assert notifier.send_tick() == 0 and len(rec.requests) == 1  # backoff: not due yet
        clock.t += 1
        assert notifier.send_tick() == 1
        assert [r[2] for r in notifier.outbox.rows()] == ["sent"]
    assert len(rec.requests) == 2
    (h1, b1), (h2, b2) = rec.requests
    for headers, body in rec.requests:
        assert headers["content-type"] == "application/json"
        assert headers["x-dicom-node-event"] == "job-failed"
        _verify(headers, body, b"whsec-test-key")
    assert h1["x-dicom-node-delivery"] == h2["x-dicom-node-delivery"]  # receiver-side dedup
    assert b1 == b2 and int(h2["x-dicom-node-timestamp"]) - int(h1["x-dicom-node-timestamp"]) == 10
    doc = json.loads(b2)
    assert doc["event"] == "job-failed" and doc["job"]["id"] == job
    assert doc["job"]["error"] == "ModelError: broken bundle"
    assert STUDY_UID not in b2.decode() and PATIENT_ID not in b2.decode()


def test_a_receiver_that_does_not_answer_is_retried(tmp_path: Path) -> None:
    with webhook_receiver(0) as rec:  # the first request hangs
        settings = _settings(tmp_path, rec.url, timeout_seconds=0.5, events=["disk-high"])
        clock = Clock()
        notifier = Notifier(settings, Catalog.for_storage(settings.node.storage_dir), clock,
                            usage=lambda: (100, 99, 1, 99.0))
        assert notifier.tick() == 0
        [(_, _, state, attempts, error, _)] = notifier.outbox.rows()
        assert state == "pending" and attempts == 1 and error is not None and "Timeout" in error
        clock.t += 10
        assert notifier.send_tick() == 1
    assert [h["x-dicom-node-event"] for h, _ in rec.requests] == ["disk-high", "disk-high"]
    assert "x-dicom-node-signature" not in rec.requests[0][0]  # no secret_file: unsigned
    assert json.loads(rec.requests[1][1])["disk"]["used_percent"] == 99.0


def test_the_node_service_runs_the_notify_loops(tmp_path: Path) -> None:
    with webhook_receiver() as rec:
        settings = _settings(tmp_path, rec.url, secret_file=str(_key(tmp_path)), events=["job-failed"])
        service = NodeService(settings)
        assert service.notifier is not None
        service.start()
        try:
            wait_for(lambda: service.notifier and service.notifier.outbox.mark("since"), 10, 0.05,
                     "the notifier's first scan")
            job = add_job(service.catalog, service.clock())
            service.catalog.finish_job(job, JobState.FAILED, service.clock(), error="boom")
            wait_for(lambda: rec.requests, 10, 0.05, "the webhook")
        finally:
            service.stop()
    [(headers, body)] = rec.requests
    _verify(headers, body, b"whsec-test-key")
    assert json.loads(body)["job"]["id"] == job


def test_send_test_reaches_the_receiver_or_says_why_not(tmp_path: Path) -> None:
    with webhook_receiver(503) as rec:
        settings = _settings(tmp_path, rec.url, secret_file=str(_key(tmp_path)))
        with pytest.raises(NotificationError, match="HTTP 503"):
            send_test(settings, "hook")
        doc = send_test(settings, "hook")
        with pytest.raises(KeyError, match="no notification target 'nope'"):
            send_test(settings, "nope")
    assert [h["x-dicom-node-event"] for h, _ in rec.requests] == ["test", "test"]
    _verify(*rec.requests[1], b"whsec-test-key")
    assert json.loads(rec.requests[1][1]) == doc and doc["summary"] == "test notification to hook"
