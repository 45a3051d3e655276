"""STOW-RS: the streaming multipart parser, status mapping, the DICOM JSON response, and the route
on the node's HTTP service (a real uvicorn server on loopback, a fake Receiver behind it)."""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import logging
import socket
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi import Request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset

from node.catalog import Catalog
from node.config import Settings
from node.http import stow as stow_route
from node.receive.scp import Received, Receiver
from node.receive.stow import (
    FAILURE_STUDY_MISMATCH,
    MultipartError,
    StoreOutcome,
    multipart_body,
    parse_media_type,
    parse_multipart,
    store_response,
    stow_request,
)
from node.spool import Spool
from tests.dsfactory import ct_slice, encode
from tests.httpkit import NodeServer, serve

CT = "1.2.840.10008.5.1.4.1.1.2"
BINARY = b"\x00\r\n--\r\n--BOUNDAR\r\n--BOUNDARYx\r\n-- \xff\xfe--\r\n"
"""Payload noise: dashes, CRLFs and near-boundaries that must not end a part."""


def fake_part(i: int) -> bytes:
    return f"part-{i};".encode() + BINARY


def fake_store(data: bytes) -> StoreOutcome:
    """Even parts are stored, odd ones are out of resources, anything else cannot be parsed."""
    if not data.startswith(b"part-") or b";" not in data[:20]:
        return StoreOutcome(0xC210, None, None)
    i = int(data[5:data.index(b";")])
    return StoreOutcome(0x0000 if i % 2 == 0 else 0xA700, CT, f"1.2.3.{i}")


class FakeReceiver(Receiver):
    """Decides by ``decide`` on the bytes of the part's temp file; consumes the file like the real one."""

    decide: Callable[[bytes], StoreOutcome] = staticmethod(fake_store)
    calls: list[bytes]
    keep = True
    """Record the bytes of each call (False: an empty record, for the memory test)."""

    def receive_file(self, tmp: Path, source: str) -> Received:
        try:
            data = tmp.read_bytes()
        finally:
            tmp.unlink(missing_ok=True)
        o = self.decide(data)
        self.calls.append(data if self.keep else b"")
        del data
        return Received(o.status, o.sop_class_uid, o.sop_instance_uid)


def fake_receiver(root: Path) -> FakeReceiver:
    s = Settings.model_validate({"node": {"storage_dir": str(root), "min_free_mb": 0}})
    r = FakeReceiver(s, Catalog.for_storage(root), Spool(root), clock=time.time)
    r.calls = []
    return r


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeServer, FakeReceiver]]:
    r = fake_receiver(tmp_path_factory.mktemp("stow"))
    with serve(r, max_request_mb=1, timeout_seconds=5) as s:
        yield s, r


@pytest.fixture
def fake(stack: tuple[NodeServer, FakeReceiver]) -> Iterator[FakeReceiver]:
    r = stack[1]
    r.decide, r.calls = fake_store, []
    yield r
    r.decide = fake_store
    # no test leaves a temp file behind, whatever it sent
    wait_until(lambda: not list(r.spool.tmp.iterdir()), "temp files removed")


@pytest.fixture
def server(stack: tuple[NodeServer, FakeReceiver], fake: FakeReceiver) -> NodeServer:
    return stack[0]


def wait_until(predicate: Callable[[], object], what: str, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def dicomweb(server: NodeServer) -> str:
    return server.url + "/dicom-web"


def post(server: NodeServer, body: bytes, content_type: str, path: str = "/dicom-web/studies",
         method: str = "POST", headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": content_type, **server.auth, **(headers or {})})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def raw_exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes, read until the server closes (requests ask for Connection: close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)


def uids(module: dict[str, object], tag: str) -> list[str]:
    seq = module.get(tag, {"Value": []})
    assert isinstance(seq, dict)
    return [item["00081155"]["Value"][0] for item in seq["Value"]]


def split_feed(body: bytes, boundary: str, cuts: list[int]) -> list[tuple[dict[str, str], bytes]]:
    """Parse ``body`` fed in pieces cut at ``cuts`` (the streaming parser, as the route uses it)."""
    from node.receive.stow import MultipartStream

    parts: list[tuple[dict[str, str], bytes]] = []
    content = bytearray()

    def on_headers(h: dict[str, str]) -> None:
        parts.append((h, b""))
        content.clear()

    def on_end() -> None:
        parts[-1] = (parts[-1][0], bytes(content))

    stream = MultipartStream(boundary, on_headers, content.extend, on_end)
    edges = [0, *sorted(c % (len(body) + 1) for c in cuts), len(body)]
    for a, b in itertools.pairwise(edges):
        stream.feed(body[a:b])
    stream.close()
    return parts


# ---- parsing ---------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [
    'multipart/related; type="application/dicom"; boundary="BOUNDARY"',
    "Multipart/Related;type=application/dicom;boundary=BOUNDARY",
    'multipart/related ; boundary = BOUNDARY ; type = "application/dicom"',
])
def test_media_type_quoted_or_not(value: str) -> None:
    media, params = parse_media_type(value)
    assert (media, params["type"], params["boundary"]) == ("multipart/related", "application/dicom", "BOUNDARY")


def test_media_type_quoted_specials_and_absent() -> None:
    assert parse_media_type('multipart/related; boundary="a\\"b;c=d"')[1]["boundary"] == 'a"b;c=d'
    assert parse_media_type("") == ("", {})


PREAMBLE_BODY_PARTS = [b"\r\nstarts and ends with CRLF\r\n", BINARY, b"", b"--", b"\r\n"]


def preamble_body() -> bytes:
    body = b"preamble mentions --BOUNDARY inline\r\n--BOUNDARYnot-a-delimiter\r\n"
    for p in PREAMBLE_BODY_PARTS:
        body += b"\r\n--BOUNDARY  \t\r\nContent-Type: application/dicom\r\nX-Other:  a b \r\n\r\n" + p
    return body + b"\r\n--BOUNDARY--\r\nepilogue\r\n--BOUNDARY\r\nignored\r\n"


def test_multipart_preamble_epilogue_and_binary_parts() -> None:
    parts = parse_multipart(preamble_body(), "BOUNDARY")
    assert [p.content for p in parts] == PREAMBLE_BODY_PARTS
    assert parts[0].headers == {"content-type": "application/dicom", "x-other": "a b"}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0), max_size=12))
def test_multipart_any_chunking_gives_the_same_parts(cuts: list[int]) -> None:
    parts = split_feed(preamble_body(), "BOUNDARY", cuts)
    assert [c for _, c in parts] == PREAMBLE_BODY_PARTS


def test_multipart_byte_by_byte() -> None:
    body = preamble_body()
    assert [c for _, c in split_feed(body, "BOUNDARY", list(range(len(body))))] == PREAMBLE_BODY_PARTS


def test_multipart_boundary_at_start_and_part_without_headers() -> None:
    body = b"--B\r\n\r\npayload\r\n--B\r\ncontent-type: application/dicom\r\n\r\nx\r\n--B--"
    parts = parse_multipart(body, "B")
    assert [(p.headers, p.content) for p in parts] == [({}, b"payload"), ({"content-type": "application/dicom"}, b"x")]


@pytest.mark.parametrize("body", [
    b"--B\r\n\r\nno close delimiter",
    b"--B\r\n\r\ntruncated\r\n--B\r\n",
    b"--B\nContent-Type: application/dicom\n\npayload\n--B--\n",  # bare LF line ends
    b"no boundary at all",
    b"--B\r\nContent-Type: application/dicom\r\n--B--\r\n",  # headers without the empty line
    b"--B\r\nX-Folded: a\r\n b\r\n\r\nx\r\n--B--",  # obsolete header line folding
    b"--B\r\n" + b"X: y\r\n" * 40 + b"\r\nx\r\n--B--",  # too many header fields
    b"x" * 70_000 + b"\r\n--B\r\n\r\nx\r\n--B--",  # preamble over 64 KiB
])
def test_multipart_malformed(body: bytes) -> None:
    with pytest.raises(MultipartError):
        parse_multipart(body, "B")


def test_client_body_round_trips() -> None:
    files = [fake_part(0), BINARY, b""]
    body, content_type = multipart_body(files)
    media, params = parse_media_type(content_type)
    assert (media, params["type"]) == ("multipart/related", "application/dicom")
    assert [p.content for p in parse_multipart(body, params["boundary"])] == files


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=5), st.lists(st.integers(min_value=0), max_size=6))
def test_client_body_round_trips_any_bytes_and_chunking(files: list[bytes], cuts: list[int]) -> None:
    body, content_type = multipart_body(files)
    boundary = parse_media_type(content_type)[1]["boundary"]
    assert [c for _, c in split_feed(body, boundary, cuts)] == files


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from([b"--B", b"--", b"\r\n", b"\r", b"\n", b" ", b"x", b":", b"\xff",
                                 b"Content-Type: application/dicom"]), max_size=40))
def test_multipart_parser_only_raises_multipart_error(tokens: list[bytes]) -> None:
    with contextlib.suppress(MultipartError):
        parse_multipart(b"".join(tokens), "B")


# ---- status mapping and the response module ------------------------------------------------
def test_response_module_json() -> None:
    status, module = store_response([StoreOutcome(0, CT, "1.2.1"), StoreOutcome(0xA700, CT, "1.2.2"),
                                     StoreOutcome(0xC210, None, None), StoreOutcome(0xB000, CT, "1.2.4")])
    assert status == 202
    assert module == {
        "00081190": {"vr": "UR"},
        "00081198": {"vr": "SQ", "Value": [
            {"00081150": {"vr": "UI", "Value": [CT]}, "00081155": {"vr": "UI", "Value": ["1.2.2"]},
             "00081197": {"vr": "US", "Value": [0xA700]}},
            {"00081197": {"vr": "US", "Value": [0xC210]}}]},
        "00081199": {"vr": "SQ", "Value": [
            {"00081150": {"vr": "UI", "Value": [CT]}, "00081155": {"vr": "UI", "Value": ["1.2.1"]},
             "00081190": {"vr": "UR"}},
            {"00081150": {"vr": "UI", "Value": [CT]}, "00081155": {"vr": "UI", "Value": ["1.2.4"]},
             "00081196": {"vr": "US", "Value": [0xB000]}, "00081190": {"vr": "UR"}}]},
    }
    ds = Dataset.from_json(module)  # valid DICOM JSON for a DICOMweb client
    assert ds.FailedSOPSequence[0].FailureReason == 0xA700 and ds.ReferencedSOPSequence[1].WarningReason == 0xB000
    assert ds.RetrieveURL in (None, "")


@pytest.mark.parametrize(("statuses", "http_status"), [
    ([0, 0], 200), ([0, 0xB007], 202), ([0, 0xC211], 202), ([0xC210, 0xA700], 409), ([0xA900], 409),
    ([0xA700, 0xA701], 503),
])
def test_http_status_mapping(statuses: list[int], http_status: int) -> None:
    assert store_response([StoreOutcome(s, CT, "1.2") for s in statuses])[0] == http_status


# ---- over HTTP -------------------------------------------------------------------------------
def test_all_stored_200(server: NodeServer, fake: FakeReceiver) -> None:
    status, module = stow_request(dicomweb(server), [fake_part(0), fake_part(2)], token=server.token)
    assert status == 200 and uids(module, "00081199") == ["1.2.3.0", "1.2.3.2"] and "00081198" not in module
    assert fake.calls == [fake_part(0), fake_part(2)]  # each part reached the Receiver as a file, intact


def test_some_stored_202_and_none_409(server: NodeServer) -> None:
    status, module = stow_request(dicomweb(server), [fake_part(0), fake_part(1), b"garbage"], token=server.token)
    assert status == 202
    assert uids(module, "00081199") == ["1.2.3.0"]
    failed = module["00081198"]["Value"]
    assert [i["00081197"]["Value"][0] for i in failed] == [0xA700, 0xC210]
    assert "00081155" not in failed[1]  # unknown UIDs are left out
    assert stow_request(dicomweb(server), [fake_part(1), b"garbage"], token=server.token)[0] == 409


def test_all_out_of_resources_503_with_retry_after(server: NodeServer) -> None:
    body, content_type = multipart_body([fake_part(1), fake_part(3)])
    status, headers, payload = post(server, body, content_type)
    assert status == 503 and headers["retry-after"] == "60"
    assert headers["content-type"] == "application/dicom+json" and b'"00081198"' in payload


def test_untyped_request_needs_dicom_parts(server: NodeServer) -> None:
    body = b"--B\r\nContent-Type: application/dicom\r\n\r\n" + fake_part(0) + b"\r\n--B--\r\n"
    assert post(server, body, "multipart/related; boundary=B")[0] == 200
    untyped_part = b"--B\r\n\r\n" + fake_part(0) + b"\r\n--B--\r\n"
    assert post(server, untyped_part, "multipart/related; boundary=B")[0] == 415
    assert post(server, untyped_part, "multipart/related; type=application/dicom; boundary=B")[0] == 200


@pytest.mark.parametrize(("content_type", "body", "expected"), [
    ("application/dicom", fake_part(0), 415),
    ('multipart/related; type="application/dicom+json"; boundary=B', b"--B\r\n\r\n{}\r\n--B--", 415),
    ("multipart/related; boundary=B",
     b"--B\r\nContent-Type: application/dicom+xml\r\n\r\n<x/>\r\n--B--", 415),
    ('multipart/related; type="application/dicom"', b"--B\r\n\r\nx\r\n--B--", 400),
    ('multipart/related; type="application/dicom"; boundary=B', b"--B\r\n\r\nx\r\n--B", 400),
    ('multipart/related; type="application/dicom"; boundary=B', b"--B--\r\n", 400),
    ('multipart/related; type="application/dicom"; boundary=B', b"", 400),
    ('multipart/related; type="application/dicom"; boundary=B', b"--B\nx\n--B--", 400),
])
def test_request_errors(server: NodeServer, content_type: str, body: bytes, expected: int) -> None:
    status, headers, payload = post(server, body, content_type)
    assert status == expected
    assert headers["content-type"] == "application/problem+json" and b'"status":%d' % expected in payload


def test_a_later_part_that_is_not_dicom_is_415_and_earlier_parts_stay(server: NodeServer, fake: FakeReceiver) -> None:
    body = (b"--B\r\nContent-Type: application/dicom\r\n\r\n" + fake_part(0) +
            b"\r\n--B\r\nContent-Type: text/plain\r\n\r\nhello\r\n--B--\r\n")
    status, _, payload = post(server, body, "multipart/related; boundary=B")
    assert status == 415 and b"1 instance(s) before it were stored" in payload
    assert fake.calls == [fake_part(0)]


def test_paths_and_methods(server: NodeServer) -> None:
    body, content_type = multipart_body([fake_part(0)])
    for path in ("/dicom-web/series", "/studies", "/dicom-web/studies/1.2/series", "/dicom-web/studiesX"):
        assert post(server, body, content_type, path)[0] in (404, 405), path
    status, headers, _ = post(server, b"", "", "/dicom-web/studies", method="PUT")
    assert status == 405 and "POST" in headers["allow"]
    assert post(server, b"", "", "/dicom-web/studies/1.2.3", method="DELETE")[0] == 405
    assert post(server, body, content_type, "/dicom-web/studies/not-a-uid")[0] == 400
    assert post(server, body, content_type, "/dicom-web/studies/?x=1")[0] == 200
    assert post(server, body, content_type, headers={"Accept": "application/dicom+xml"})[0] == 406
    assert post(server, body, content_type, headers={"Accept": "application/dicom+json, */*"})[0] == 200


def test_route_is_in_the_openapi_document(server: NodeServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", "/openapi.json", headers=server.auth)
        doc = conn.getresponse().read()
    finally:
        conn.close()
    assert b'"/dicom-web/studies"' in doc and b'"/dicom-web/studies/{study}"' in doc


def test_body_too_large_413(server: NodeServer, fake: FakeReceiver) -> None:
    big = [fake_part(0) + b"x" * (1 << 20)]
    body, content_type = multipart_body(big)
    # Refused by Content-Length before any of the body is read: the test sends the headers only
    # (a client still writing the body when the 413 comes may see its connection reset instead).
    for expect in ((), (("Expect", "100-continue"),)):  # with 100-continue the client waits, as it should
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        try:
            conn.putrequest("POST", "/dicom-web/studies")
            for name, value in (("Content-Type", content_type), ("Content-Length", str(len(body))), *expect,
                                *server.auth.items()):
                conn.putheader(name, value)
            conn.endheaders()
            r = conn.getresponse()
            assert r.status == 413 and json.loads(r.read())["code"] == "too-large"
        finally:
            conn.close()
    assert fake.calls == []
    assert stow_request(dicomweb(server), [fake_part(0)], token=server.token)[0] == 200  # still serving


def test_chunked_body_over_the_limit_413_while_streaming(server: NodeServer, fake: FakeReceiver) -> None:
    parts = [fake_part(0), fake_part(2) + b"y" * 700_000, fake_part(4) + b"z" * 700_000]
    body, content_type = multipart_body(parts)

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(body), 32 * 1024):
            yield body[i:i + 32 * 1024]

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("POST", "/dicom-web/studies", body=chunks(), encode_chunked=True,
                     headers={"Content-Type": content_type, "Transfer-Encoding": "chunked", **server.auth})
        r = conn.getresponse()
        assert r.status == 413 and b"instance(s) before it were stored" in r.read()
    finally:
        conn.close()
    assert fake.calls[0] == fake_part(0)  # parts before the limit were stored; none after it
    assert len(fake.calls) <= 2


def test_length_required_and_chunked(server: NodeServer) -> None:
    body, content_type = multipart_body([fake_part(0), fake_part(4)])
    head = (f"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            f"Content-Type: {content_type}\r\n").encode() + server.auth_line
    assert raw_exchange(server.port, head + b"\r\n" + body).startswith(b"HTTP/1.1 411")
    chunked = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(c), c) for c in (body[:7], body[7:])) + b"0\r\n\r\n"
    reply = raw_exchange(server.port, head + b"Transfer-Encoding: chunked\r\n\r\n" + chunked)
    assert reply.startswith(b"HTTP/1.1 200") and b"1.2.3.4" in reply
    for bad in (b"-1\r\n", b"0x10\r\n", b"zz\r\n"):  # int() would take some of these
        reply = raw_exchange(server.port, head + b"Transfer-Encoding: chunked\r\n\r\n" + bad + body)
        assert reply.startswith(b"HTTP/1.1 400")
    for length in ("\u00b2", "1" * 5000, "-5"):
        reply = raw_exchange(server.port, head + f"Content-Length: {length}\r\n\r\n".encode("latin-1", "replace"))
        assert reply.startswith(b"HTTP/1.1 400"), length
    big_part = body[:body.index(b"\r\n\r\n") + 4] + b"x" * 1_200_000
    too_big = b"%x\r\n" % len(big_part) + big_part + b"\r\n0\r\n\r\n"
    assert raw_exchange(server.port, head + b"Transfer-Encoding: chunked\r\n\r\n" + too_big).startswith(
        b"HTTP/1.1 413")


def test_expect_100_continue(server: NodeServer) -> None:
    body, content_type = multipart_body([fake_part(0)])
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(f"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                     f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n".encode() + server.auth_line + b"\r\n")
        assert sock.recv(1024).startswith(b"HTTP/1.1 100")
        sock.sendall(body)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")


def test_no_token_is_refused_before_the_body(server: NodeServer, fake: FakeReceiver) -> None:
    """Authentication comes first: a client waiting for 100 Continue gets 401 and sends nothing."""
    body, content_type = multipart_body([fake_part(0)])
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(f"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                     f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n".encode())
        reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 401") and b"www-authenticate: bearer" in reply.lower()
    assert fake.calls == []


def test_keep_alive_serves_several_requests(server: NodeServer) -> None:
    body, content_type = multipart_body([fake_part(0)])
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        for _ in range(3):
            conn.request("POST", "/dicom-web/studies", body=body, headers={"Content-Type": content_type, **server.auth})
            r = conn.getresponse()
            assert r.status == 200 and r.read()
        conn.request("POST", "/dicom-web/studies", body=b"--B\r\n\r\nx", headers={  # refused, then served again
            "Content-Type": "multipart/related; type=application/dicom; boundary=B", **server.auth})
        r = conn.getresponse()
        assert r.status == 400 and r.read()
        conn.request("POST", "/dicom-web/studies", body=body, headers={"Content-Type": content_type, **server.auth})
        assert conn.getresponse().status == 200
    finally:
        conn.close()


def test_study_in_url(server: NodeServer, fake: FakeReceiver) -> None:
    fake.decide = lambda data: StoreOutcome(0, CT, "1.2.3.4.1")
    mine, other = encode(ct_slice("1.2.3", "1.2.3.4", "1.2.3.4.1")), encode(ct_slice("1.2.9", "1.2.9.4", "1.2.9.4.1"))
    status, module = stow_request(dicomweb(server), [mine, other, b"garbage"], study_uid="1.2.3", token=server.token)
    assert status == 202 and fake.calls == [mine]
    failed = module["00081198"]["Value"]
    assert [f["00081197"]["Value"][0] for f in failed] == [FAILURE_STUDY_MISMATCH, 0xC210]
    assert failed[0]["00081155"]["Value"] == ["1.2.9.4.1"]


def test_failures_do_not_stop_the_server(server: NodeServer, fake: FakeReceiver, monkeypatch: pytest.MonkeyPatch,
                                         caplog: pytest.LogCaptureFixture) -> None:
    def broken(data: bytes) -> StoreOutcome:
        raise OSError("disk on fire")

    fake.decide = broken
    status, module = stow_request(dicomweb(server), [fake_part(0)], token=server.token)
    assert status == 409 and module["00081198"]["Value"][0]["00081197"]["Value"] == [0x0110]
    fake.decide = fake_store
    monkeypatch.setattr(stow_route, "store_response", lambda outcomes: 1 / 0)
    status, module = stow_request(dicomweb(server), [fake_part(0)], token=server.token)
    assert status == 500 and module["code"] == "internal-error"
    monkeypatch.undo()
    assert b"400" in raw_exchange(server.port, b"\x16\x03\x01 not http at all\r\n\r\n")  # uvicorn's reply
    assert stow_request(dicomweb(server), [fake_part(0)], token=server.token)[0] == 200
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors and all("1.2.3" not in r.getMessage() for r in caplog.records if r.levelno >= logging.INFO)


def test_the_body_is_never_read_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """24 MiB streamed by the client from a generator: the server's Python allocations stay far below it."""
    async def no_body(self: Request) -> bytes:
        raise AssertionError("the STOW-RS route read the whole body")

    monkeypatch.setattr(Request, "body", no_body)
    receiver = fake_receiver(tmp_path)
    receiver.decide = lambda data: StoreOutcome(0 if len(data) == 256 * 1024 else 0xC210, CT, "1.2.3.9")
    receiver.keep = False
    n, boundary = 96, "8e2b4a0c"

    def body() -> Iterator[bytes]:
        for i in range(n):
            yield b"--%s\r\nContent-Type: application/dicom\r\n\r\n" % boundary.encode()
            for _ in range(16):
                yield bytes([i]) * (16 * 1024)
            yield b"\r\n"
        yield b"--%s--\r\n" % boundary.encode()

    with serve(receiver, max_request_mb=64) as s:
        tracemalloc.start()
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        try:
            conn.request("POST", "/dicom-web/studies", body=body(), encode_chunked=True, headers={
                "Content-Type": f"multipart/related; type=application/dicom; boundary={boundary}",
                "Transfer-Encoding": "chunked", **s.auth})
            r = conn.getresponse()
            payload = r.read()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            conn.close()
            tracemalloc.stop()
    assert r.status == 200, payload
    assert len(receiver.calls) == n and not list(receiver.spool.tmp.iterdir())
    assert peak < 4 * 2**20, f"peak {peak / 2**20:.1f} MiB for a {n / 4:.0f} MiB request"


def test_stalled_client_gets_408_and_is_dropped(tmp_path: Path) -> None:
    with serve(fake_receiver(tmp_path), max_request_mb=1, timeout_seconds=0.3) as s:
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
            sock.sendall(b"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/related; "
                         b"type=application/dicom; boundary=B\r\nContent-Length: 100\r\n" + s.auth_line
                         + b"\r\n--B\r\n\r\npart")
            started = time.monotonic()
            reply = b""
            while chunk := sock.recv(4096):
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 408")  # then closed by the server
            assert time.monotonic() - started < 5
        assert stow_request(s.url + "/dicom-web", [fake_part(0)], token=s.token)[0] == 200


def test_client_gone_mid_part_leaves_no_temp_file(server: NodeServer, fake: FakeReceiver) -> None:
    body, content_type = multipart_body([fake_part(0), fake_part(2) + b"p" * 300_000])
    cut = body.index(fake_part(2)) + 100_000
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(f"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                     f"Content-Length: {len(body)}\r\n".encode() + server.auth_line + b"\r\n" + body[:cut])
        wait_until(lambda: list(fake.spool.tmp.iterdir()), "the second part is being written")
    wait_until(lambda: not list(fake.spool.tmp.iterdir()), "temp file removed")
    assert fake.calls == [fake_part(0)]  # the finished part was stored, the cut one never reached the Receiver


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from([b"--B", b"--", b"\r\n", b"\r\n\r\n", b"Content-Type: application/dicom",
                                 b"Content-Type: text/plain", b"x", b":", b"\xff", b"part-2;", b"part-1;"]),
                max_size=30),
       st.sampled_from(["multipart/related; type=application/dicom; boundary=B", "multipart/related; boundary=B",
                        'multipart/related; boundary="B"; type="application/dicom"', "multipart/related",
                        "text/plain", ""]))
def test_fuzz_only_deliberate_answers(server: NodeServer, tokens: list[bytes], content_type: str) -> None:
    status, headers, _ = post(server, b"".join(tokens), content_type)
    assert status in (200, 202, 400, 409, 411, 415, 503)
    if status >= 400 and status != 409 and status != 503:
        assert headers["content-type"] == "application/problem+json"
