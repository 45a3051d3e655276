"""STOW-RS receiver: multipart parsing, status mapping, the DICOM JSON response, HTTP edge cases."""

from __future__ import annotations

import contextlib
import http.client
import logging
import socket
import time
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset

from node.receive import stow
from node.receive.stow import (
    MultipartError,
    StoreOutcome,
    StowServer,
    multipart_body,
    parse_media_type,
    parse_multipart,
    store_response,
    stow_request,
)
from tests.dsfactory import ct_slice, encode

CT = "1.2.840.10008.5.1.4.1.1.2"
BINARY = b"\x00\r\n--\r\n--BOUNDAR\r\n--BOUNDARYx\r\n-- \xff\xfe--\r\n"
"""Payload noise: dashes, CRLFs and near-boundaries that must not end a part."""


def fake_part(i: int) -> bytes:
    return f"part-{i};".encode() + BINARY


def fake_store(data: bytes) -> StoreOutcome:
    """Even parts are stored, odd ones are out of resources, anything else cannot be parsed."""
    if not data.startswith(b"part-"):
        return StoreOutcome(0xC210, None, None)
    i = int(data[5:data.index(b";")])
    return StoreOutcome(0x0000 if i % 2 == 0 else 0xA700, CT, f"1.2.3.{i}")


@pytest.fixture
def server() -> Iterator[StowServer]:
    s = StowServer("127.0.0.1", 0, fake_store, max_body_bytes=64 * 1024, timeout_seconds=5)
    s.start()
    yield s
    s.stop()


def post(server: StowServer, body: bytes, content_type: str, path: str = "/dicom-web/studies",
         method: str = "POST", headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": content_type, **(headers or {})})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def raw_exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def uids(module: dict[str, object], tag: str) -> list[str]:
    seq = module.get(tag, {"Value": []})
    assert isinstance(seq, dict)
    return [item["00081155"]["Value"][0] for item in seq["Value"]]


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


def test_multipart_preamble_epilogue_and_binary_parts() -> None:
    parts_in = [b"\r\nstarts and ends with CRLF\r\n", BINARY, b"", b"--", b"\r\n"]
    body = b"preamble mentions --BOUNDARY inline\r\n--BOUNDARYnot-a-delimiter\r\n"
    for p in parts_in:
        body += b"\r\n--BOUNDARY  \t\r\nContent-Type: application/dicom\r\nX-Folded: a\r\n b\r\n\r\n" + p
    body += b"\r\n--BOUNDARY--\r\nepilogue\r\n--BOUNDARY\r\nignored\r\n"
    parts = parse_multipart(body, "BOUNDARY")
    assert [bytes(p.content) for p in parts] == parts_in
    assert parts[0].headers["content-type"] == "application/dicom"


def test_multipart_boundary_at_start_and_part_without_headers() -> None:
    body = b"--B\r\n\r\npayload\r\n--B\r\ncontent-type: application/dicom\r\n\r\nx\r\n--B--"
    parts = parse_multipart(body, "B")
    assert [(p.headers, bytes(p.content)) for p in parts] == [
        ({}, b"payload"), ({"content-type": "application/dicom"}, b"x")]


@pytest.mark.parametrize("body", [
    b"--B\r\n\r\nno close delimiter",
    b"--B\r\n\r\ntruncated\r\n--B\r\n",
    b"--B\nContent-Type: application/dicom\n\npayload\n--B--\n",  # bare LF line ends
    b"no boundary at all",
    b"--B\r\nContent-Type: application/dicom\r\n--B--\r\n",  # headers without the empty line
])
def test_multipart_malformed(body: bytes) -> None:
    with pytest.raises(MultipartError):
        parse_multipart(body, "B")


def test_client_body_round_trips() -> None:
    files = [fake_part(0), BINARY, b""]
    body, content_type = multipart_body(files)
    media, params = parse_media_type(content_type)
    assert (media, params["type"]) == ("multipart/related", "application/dicom")
    assert [bytes(p.content) for p in parse_multipart(body, params["boundary"])] == files


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=5))
def test_client_body_round_trips_any_bytes(files: list[bytes]) -> None:
    body, content_type = multipart_body(files)
    assert [bytes(p.content) for p in parse_multipart(body, parse_media_type(content_type)[1]["boundary"])] == files


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
def test_all_stored_200(server: StowServer) -> None:
    status, module = stow_request(server.url, [fake_part(0), fake_part(2)])
    assert status == 200 and uids(module, "00081199") == ["1.2.3.0", "1.2.3.2"] and "00081198" not in module


def test_some_stored_202_and_none_409(server: StowServer) -> None:
    status, module = stow_request(server.url, [fake_part(0), fake_part(1), b"garbage"])
    assert status == 202
    assert uids(module, "00081199") == ["1.2.3.0"]
    failed = module["00081198"]["Value"]
    assert [i["00081197"]["Value"][0] for i in failed] == [0xA700, 0xC210]
    assert "00081155" not in failed[1]  # unknown UIDs are left out
    assert stow_request(server.url, [fake_part(1), b"garbage"])[0] == 409


def test_all_out_of_resources_503_with_retry_after(server: StowServer) -> None:
    body, content_type = multipart_body([fake_part(1), fake_part(3)])
    status, headers, payload = post(server, body, content_type)
    assert status == 503 and headers["retry-after"] == "60"
    assert headers["content-type"] == "application/dicom+json" and b'"00081198"' in payload


def test_untyped_request_needs_dicom_parts(server: StowServer) -> None:
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
])
def test_request_errors(server: StowServer, content_type: str, body: bytes, expected: int) -> None:
    assert post(server, body, content_type)[0] == expected


def test_paths_and_methods(server: StowServer) -> None:
    body, content_type = multipart_body([fake_part(0)])
    for path in ("/dicom-web/series", "/studies", "/dicom-web/studies/1.2/series", "/dicom-web/studiesX"):
        assert post(server, body, content_type, path)[0] == 404
    status, headers, _ = post(server, b"", "", "/dicom-web/studies", method="GET")
    assert status == 405 and headers["allow"] == "POST"
    assert post(server, b"", "", "/dicom-web/studies/1.2.3", method="GET")[0] == 405
    assert post(server, body, content_type, "/dicom-web/studies/not-a-uid")[0] == 400
    assert post(server, body, content_type, "/dicom-web/studies/?x=1")[0] == 200
    assert post(server, body, content_type, headers={"Accept": "application/dicom+xml"})[0] == 406


def test_body_too_large_413(server: StowServer) -> None:
    body, content_type = multipart_body([fake_part(0) + b"x" * 70_000])
    status, module = stow_request(server.url, [fake_part(0) + b"x" * 70_000])
    assert (status, module) == (413, {})
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:  # a client that waits for 100 Continue is refused before it sends the body
        conn.putrequest("POST", "/dicom-web/studies")
        for name, value in (("Content-Type", content_type), ("Content-Length", str(len(body))),
                            ("Expect", "100-continue")):
            conn.putheader(name, value)
        conn.endheaders()
        assert conn.getresponse().status == 413
    finally:
        conn.close()
    assert stow_request(server.url, [fake_part(0)])[0] == 200  # still serving


def test_length_required_and_chunked(server: StowServer) -> None:
    body, content_type = multipart_body([fake_part(0), fake_part(4)])
    head = f"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n".encode()
    assert raw_exchange(server.port, head + b"\r\n" + body).startswith(b"HTTP/1.1 411")
    chunked = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(c), c) for c in (body[:7], body[7:])) + b"0\r\n\r\n"
    reply = raw_exchange(server.port, head + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunked)
    assert reply.startswith(b"HTTP/1.1 200") and b"1.2.3.4" in reply
    for bad in (b"-1\r\n", b"0x10\r\n", b"zz\r\n"):  # int() would take some of these
        reply = raw_exchange(server.port, head + b"Transfer-Encoding: chunked\r\n\r\n" + bad + body)
        assert reply.startswith(b"HTTP/1.1 400")
    for length in ("\u00b2", "1" * 5000, "-5"):
        reply = raw_exchange(server.port, head + f"Content-Length: {length}\r\n\r\n".encode("latin-1", "replace"))
        assert reply.startswith(b"HTTP/1.1 400")
    too_big = b"%x\r\n" % 70_000 + b"x" * 70_000 + b"\r\n0\r\n\r\n"
    assert raw_exchange(server.port, head + b"Transfer-Encoding: chunked\r\n\r\n" + too_big).startswith(
        b"HTTP/1.1 413")


def test_expect_100_continue(server: StowServer) -> None:
    body, content_type = multipart_body([fake_part(0)])
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(f"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                     f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n".encode())
        assert sock.recv(1024).startswith(b"HTTP/1.1 100")
        sock.sendall(body)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")


def test_keep_alive_serves_several_requests(server: StowServer) -> None:
    body, content_type = multipart_body([fake_part(0)])
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        for _ in range(3):
            conn.request("POST", "/dicom-web/studies", body=body, headers={"Content-Type": content_type})
            r = conn.getresponse()
            assert r.status == 200 and r.read()
    finally:
        conn.close()


def test_study_in_url(server: StowServer) -> None:
    calls: list[bytes] = []

    def store(data: bytes) -> StoreOutcome:
        calls.append(data)
        return StoreOutcome(0, CT, "1.2.3.4.1")

    server.store = store
    mine, other = encode(ct_slice("1.2.3", "1.2.3.4", "1.2.3.4.1")), encode(ct_slice("1.2.9", "1.2.9.4", "1.2.9.4.1"))
    status, module = stow_request(server.url, [mine, other, b"garbage"], study_uid="1.2.3")
    assert status == 202 and calls == [mine]
    failed = module["00081198"]["Value"]
    assert [f["00081197"]["Value"][0] for f in failed] == [stow.FAILURE_STUDY_MISMATCH, 0xC210]
    assert failed[0]["00081155"]["Value"] == ["1.2.9.4.1"]


def test_failures_do_not_stop_the_server(server: StowServer, monkeypatch: pytest.MonkeyPatch,
                                         caplog: pytest.LogCaptureFixture) -> None:
    def broken(data: bytes) -> StoreOutcome:
        raise OSError("disk on fire")

    server.store = broken
    status, module = stow_request(server.url, [fake_part(0)])
    assert status == 409 and module["00081198"]["Value"][0]["00081197"]["Value"] == [0x0110]
    server.store = fake_store
    monkeypatch.setattr(stow, "parse_multipart", lambda body, boundary: 1 / 0)
    assert stow_request(server.url, [fake_part(0)]) == (500, {})
    monkeypatch.undo()
    assert b"400" in raw_exchange(server.port, b"\x16\x03\x01 not http at all\r\n\r\n")  # http.server's reply
    assert stow_request(server.url, [fake_part(0)])[0] == 200
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors and all("1.2.3" not in r.getMessage() for r in caplog.records if r.levelno >= logging.INFO)


def test_stalled_client_is_dropped() -> None:
    s = StowServer("127.0.0.1", 0, fake_store, max_body_bytes=1024, timeout_seconds=0.3)
    s.start()
    try:
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
            sock.sendall(b"POST /dicom-web/studies HTTP/1.1\r\nContent-Type: multipart/related; boundary=B\r\n"
                         b"Content-Length: 100\r\n\r\n--B")
            started = time.monotonic()
            assert sock.recv(1024) == b""  # closed by the server, no response
            assert time.monotonic() - started < 5
    finally:
        s.stop()


def test_stop_closes_the_port() -> None:
    s = StowServer("127.0.0.1", 0, fake_store, max_body_bytes=1024, path_prefix="")
    s.start()
    port = s.port
    assert port and s.url.endswith(f":{port}")
    assert stow_request(s.url, [fake_part(0)])[0] == 200
    s.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
