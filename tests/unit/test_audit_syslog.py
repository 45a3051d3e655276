"""Audit records to syslog (node.syslog) against receivers on 127.0.0.1: RFC 5424 messages, one UDP
datagram each, RFC 5425 octet counting over TCP and TLS (a certificate made with ``cryptography``),
and a collector that is down never blocks the node."""

from __future__ import annotations

import json
import re
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.audit import AuditTrail
from node.config import parse_settings
from node.syslog import SEVERITY_NOTICE, SEVERITY_WARNING, SyslogSender, facility_number, format_message
from testkit.certs import make_pki

HEADER = re.compile(rb"^<(\d+)>1 (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z) (\S+) dicom-node (\d+) "
                    rb"dicom-audit - \xef\xbb\xbf")


def parse(message: bytes) -> tuple[int, dict[str, object]]:
    m = HEADER.match(message)
    assert m is not None, message[:120]
    return int(m.group(1)), json.loads(message[m.end():].decode("utf-8"))


def read_frames(conn: socket.socket, n: int) -> list[bytes]:
    """``n`` octet-counted frames (``LEN SP MSG``) from a stream."""
    buf, frames = b"", []
    conn.settimeout(10)
    while len(frames) < n:
        while b" " not in buf:
            buf += conn.recv(65536)
        length, _, rest = buf.partition(b" ")
        while len(rest) < int(length):
            rest += conn.recv(65536)
        frames.append(rest[:int(length)])
        buf = rest[int(length):]
    return frames


def test_format_and_facility() -> None:
    msg = format_message('{"a":"Zürich"}', facility=10, severity=SEVERITY_NOTICE, timestamp=0.5, hostname="node 1",
                         procid="42")
    assert msg == b'<85>1 1970-01-01T00:00:00.500000Z node1 dicom-node 42 dicom-audit - \xef\xbb\xbf' + \
        '{"a":"Zürich"}'.encode()
    assert facility_number("authpriv") == 10 and facility_number("local4") == 20 and facility_number(13) == 13
    with pytest.raises(ValueError):
        facility_number("nope")


def test_udp_one_datagram_per_record() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        server.settimeout(10)
        sender = SyslogSender("127.0.0.1", server.getsockname()[1], "udp", facility=13)
        sender.send('{"n":1}')
        sender.send('{"n":2}', SEVERITY_WARNING)
        first, second = server.recv(65536), server.recv(65536)
        sender.close()
    assert parse(first) == (13 * 8 + 5, {"n": 1})
    assert parse(second) == (13 * 8 + 4, {"n": 2})


@pytest.fixture
def tcp_server() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(10)
        yield server


def test_tcp_octet_counting(tcp_server: socket.socket) -> None:
    sender = SyslogSender("127.0.0.1", tcp_server.getsockname()[1], "tcp")
    for i in range(3):
        sender.send(json.dumps({"n": i, "text": "line\nbreak"}))  # framing, not newlines, delimits
    conn, _ = tcp_server.accept()
    with conn:
        frames = read_frames(conn, 3)
    sender.close()
    assert [parse(f)[1]["n"] for f in frames] == [0, 1, 2]
    assert sender.sent == 3 and sender.dropped == 0


def test_tls_with_a_trusted_ca(tmp_path: Path, tcp_server: socket.socket) -> None:
    pki = make_pki(tmp_path / "pki")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    got: list[bytes] = []

    def serve() -> None:
        conn, _ = tcp_server.accept()
        with context.wrap_socket(conn, server_side=True) as tls:
            got.extend(read_frames(tls, 2))

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    sender = SyslogSender("127.0.0.1", tcp_server.getsockname()[1], "tls", ca_file=pki.ca_cert)
    sender.send('{"n":1}')
    sender.send('{"n":2}')
    t.join(10)
    sender.close()
    assert [parse(f)[1] for f in got] == [{"n": 1}, {"n": 2}]


def test_tls_refuses_an_untrusted_collector(tmp_path: Path, tcp_server: socket.socket,
                                            caplog: pytest.LogCaptureFixture) -> None:
    pki = make_pki(tmp_path / "pki")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.rogue_cert, pki.rogue_key)  # self-signed: not under our CA

    def serve() -> None:
        conn, _ = tcp_server.accept()
        try:
            with context.wrap_socket(conn, server_side=True) as tls:
                tls.recv(10)
        except (ssl.SSLError, OSError):
            pass

    threading.Thread(target=serve, daemon=True).start()
    sender = SyslogSender("127.0.0.1", tcp_server.getsockname()[1], "tls", ca_file=pki.ca_cert)
    sender.send('{"n":1}')
    deadline = time.monotonic() + 10
    while "unreachable" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    sender.close(timeout=0.2)
    assert "unreachable" in caplog.text and sender.sent == 0


def test_a_collector_that_is_down_never_blocks_or_raises(caplog: pytest.LogCaptureFixture) -> None:
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]  # closed again: connections are refused
    sender = SyslogSender("127.0.0.1", port, "tcp", queue_size=5)
    t0 = time.monotonic()
    accepted = [sender.send(f'{{"n":{i}}}') for i in range(50)]
    assert time.monotonic() - t0 < 1.0
    assert sender.dropped >= 50 - 6 and accepted.count(False) == sender.dropped  # one may be in the thread's hands
    t0 = time.monotonic()
    sender.close(timeout=0.5)
    assert time.monotonic() - t0 < 2.0
    assert "queue full" in caplog.text


def test_trail_sends_each_record_to_syslog(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        server.settimeout(10)
        settings = parse_settings({"node": {"storage_dir": str(tmp_path)}, "audit": {"syslog": {
            "host": "127.0.0.1", "port": server.getsockname()[1], "protocol": "udp", "facility": "local4"}}})
        trail = AuditTrail.from_settings(settings)
        trail.application_started()
        trail.close()
        pri, record = parse(server.recv(65536))
    assert pri == 20 * 8 + 5
    assert record == json.loads((tmp_path / "audit" / "audit.log").read_text())
