"""Syslog delivery of audit records: RFC 5424 messages over UDP (RFC 5426, one datagram each), TCP
or TLS (RFC 5425 framing: octet counting, ``LEN SP MSG``).

:class:`SyslogSender` never blocks its caller and never raises into it: :meth:`SyslogSender.send`
puts the message on a bounded queue that one background thread drains. When the collector is down the
thread keeps the message it holds and retries with backoff (1 s doubling to 30 s), the queue fills,
and further messages are dropped: counted in :attr:`SyslogSender.dropped` and logged (the first drop,
then every ``DROP_LOG_EVERY``-th). The local audit file is the record of truth; syslog is a copy.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import logging
import os
import queue
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Literal

log = logging.getLogger("node.audit.syslog")

Protocol = Literal["udp", "tcp", "tls"]
BOM = b"\xef\xbb\xbf"
"""RFC 5424 6.4: MSG-UTF8 starts with the byte order mark."""
DROP_LOG_EVERY = 1000
RETRY_MAX_SECONDS = 30.0
FACILITIES = {"kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6, "news": 7, "uucp": 8,
              "cron": 9, "authpriv": 10, "ftp": 11, "ntp": 12, "security": 13, "console": 14, "solaris-cron": 15,
              **{f"local{i}": 16 + i for i in range(8)}}
"""RFC 5424 Table 1 facility names (``security`` = 13, log audit)."""
SEVERITY_WARNING = 4
SEVERITY_NOTICE = 5


def facility_number(facility: int | str) -> int:
    """A facility by number (0-23) or by name (``authpriv``, ``local4``)."""
    if isinstance(facility, int) or facility.isdigit():
        n = int(facility)
        if 0 <= n <= 23:
            return n
    elif facility.lower() in FACILITIES:
        return FACILITIES[facility.lower()]
    raise ValueError(f"unknown syslog facility {facility!r}; use 0-23 or one of {', '.join(FACILITIES)}")


def _header_field(value: str, limit: int) -> str:
    """A header field: printable US-ASCII without spaces, at most ``limit`` characters, ``-`` if empty."""
    clean = "".join(c for c in value if "!" <= c <= "~")[:limit]
    return clean or "-"


def format_message(msg: str, *, facility: int, severity: int, timestamp: float | None = None,
                   hostname: str | None = None, app_name: str = "dicom-node", procid: str | None = None,
                   msgid: str = "dicom-audit") -> bytes:
    """One RFC 5424 message: ``<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - BOM MSG`` (no
    structured data; the audit record is the MSG, UTF-8)."""
    when = dt.datetime.fromtimestamp(time.time() if timestamp is None else timestamp, dt.UTC)
    stamp = when.isoformat(timespec="microseconds").replace("+00:00", "Z")
    header = " ".join((
        f"<{facility * 8 + severity}>1", stamp, _header_field(hostname or socket.gethostname(), 255),
        _header_field(app_name, 48), _header_field(procid or str(os.getpid()), 128), _header_field(msgid, 32), "-",
    ))
    return header.encode("ascii") + b" " + BOM + msg.encode("utf-8")


def octet_counted(message: bytes) -> bytes:
    """RFC 5425 4.3 / RFC 6587 3.4.1 framing: ``MSG-LEN SP SYSLOG-MSG``."""
    return str(len(message)).encode("ascii") + b" " + message


class SyslogSender:
    """Sends messages to one collector from a background thread (see the module docstring)."""

    def __init__(self, host: str, port: int, protocol: Protocol = "tls", *, facility: int = 10,
                 ca_file: Path | None = None, cert_file: Path | None = None, key_file: Path | None = None,
                 queue_size: int = 10000, timeout: float = 5.0, app_name: str = "dicom-node") -> None:
        self.host, self.port, self.protocol = host, port, protocol
        self.facility = facility
        self.timeout = timeout
        self.app_name = app_name
        self.hostname = socket.getfqdn() or socket.gethostname()
        self.dropped = 0
        """Messages dropped because the queue was full (the collector is down or slow)."""
        self.sent = 0
        self._context: ssl.SSLContext | None = None
        if protocol == "tls":
            self._context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
            if cert_file is not None:
                self._context.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=queue_size)
        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        self._failing_since: float | None = None
        self._thread = threading.Thread(target=self._run, name="audit-syslog", daemon=True)
        self._thread.start()

    def send(self, msg: str, severity: int = SEVERITY_NOTICE, timestamp: float | None = None) -> bool:
        """Queue one message; False (and counted, logged) when the queue is full. Never blocks or raises."""
        data = format_message(msg, facility=self.facility, severity=severity, timestamp=timestamp,
                              hostname=self.hostname, app_name=self.app_name)
        try:
            self._queue.put_nowait(data)
            return True
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % DROP_LOG_EVERY == 0:
                log.error("audit syslog %s:%d: queue full, %d record(s) dropped so far (they stay in the audit file)",
                          self.host, self.port, self.dropped)
            return False

    def close(self, timeout: float = 2.0) -> None:
        """Send what is queued for at most ``timeout`` seconds, then stop the thread."""
        deadline = time.monotonic() + timeout
        while not self._queue.empty() and self._failing_since is None and time.monotonic() < deadline:
            time.sleep(0.01)
        self._stop.set()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        self._thread.join(max(0.1, deadline - time.monotonic()))
        left = self._queue.qsize()
        if left:
            log.warning("audit syslog %s:%d: %d record(s) not sent at shutdown", self.host, self.port, left)
        self._disconnect()

    # ---- the sending thread ------------------------------------------------------------------
    def _connect(self) -> socket.socket:
        if self.protocol == "udp":
            family = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM)[0][0]
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.connect((self.host, self.port))
            return sock
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._context is not None:
            try:
                sock = self._context.wrap_socket(sock, server_hostname=self.host)
            except BaseException:
                sock.close()
                raise
        return sock

    def _disconnect(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def _deliver(self, data: bytes) -> None:
        if self._sock is None:
            self._sock = self._connect()
        if self.protocol == "udp":
            self._sock.send(data)
        else:
            self._sock.sendall(octet_counted(data))

    def _run(self) -> None:
        delay = 1.0
        while True:
            data = self._queue.get()
            if data is None:
                return
            while True:
                try:
                    self._deliver(data)
                except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                    self._disconnect()
                    if self._failing_since is None:
                        self._failing_since = time.monotonic()
                        log.warning("audit syslog %s:%d (%s) unreachable: %s; retrying in the background",
                                    self.host, self.port, self.protocol, exc)
                    if self.protocol == "udp" and isinstance(exc, OSError) and exc.errno == errno.EMSGSIZE:
                        log.error("audit syslog: a record too large for one UDP datagram was dropped")
                        self.dropped += 1
                        break
                    if self._stop.wait(delay):
                        return
                    delay = min(RETRY_MAX_SECONDS, delay * 2)
                    continue
                if self._failing_since is not None:
                    log.info("audit syslog %s:%d reachable again after %.0f s", self.host, self.port,
                             time.monotonic() - self._failing_since)
                    self._failing_since = None
                delay = 1.0
                self.sent += 1
                break
