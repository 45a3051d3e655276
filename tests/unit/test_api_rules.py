"""``POST /api/v1/rules/test`` on the real app over loopback: uploaded files or a catalog study in,
the dry-run report out; nothing stored, no job created, the temp files gone; problem+json for bad input."""

from __future__ import annotations

import http.client
import json
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from node.roles import Role
from node.schema import Instance, Job
from tests.dsfactory import ct_slice, encode
from tests.httpkit import bearer, serve
from tests.unit.api_helpers import PHI, ApiNode, api_node

PATH = "/api/v1/rules/test"


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ApiNode]:
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))  # where the route's temp directory goes
    (tmp_path / "node").mkdir()
    with api_node(tmp_path / "node") as n:
        yield n


def _rows(node: ApiNode) -> tuple[int, int, int]:
    with node.catalog.session() as s:
        jobs = s.scalar(select(func.count()).select_from(Job)) or 0
        instances = s.scalar(select(func.count()).select_from(Instance)) or 0
    files = sum(1 for p in node.spool.root.rglob("*") if p.is_file())
    return jobs, instances, files


def _problem(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json" and r.json()["code"] == code


def _slice(series: str, i: int, **attrs: str) -> bytes:
    ds = ct_slice("1.2.826.0.1.88.1", series, f"{series}.{i}", z=float(i))
    ds.PatientName, ds.PatientID = "Quimby^Wilhelmina", "PID-4711-XQ"
    for k, v in attrs.items():
        setattr(ds, k, v)
    return encode(ds)


def test_uploaded_files_are_dry_run_and_nothing_is_kept(node: ApiNode, tmp_path: Path) -> None:
    before = _rows(node)
    files = [("file", (f"slice{i}.dcm", _slice("1.2.826.0.1.88.1.1", i), "application/dicom")) for i in range(3)]
    files.append(("file", ("mr.dcm", _slice("1.2.826.0.1.88.1.2", 1, Modality="MR"), "application/dicom")))
    files.append(("file", ("readme.txt", b"hello", "text/plain")))
    r = httpx.post(f"{node.server.url}{PATH}", files=files, data={"calling_ae": "SCANNER"},
                   headers=bearer(node.tokens[Role.VIEWER]), timeout=30)
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["source"] == "files" and report["rules"] == 1
    by_key = {s["key"]: s for s in report["series"]}
    ct, mr = by_key["1.2.826.0.1.88.1.1"], by_key["1.2.826.0.1.88.1.2"]
    assert ct["instances"] == 3 and ct["attributes"]["CallingAETitle"] == "SCANNER"
    assert ct["rules"][0]["matched"] is True
    assert mr["rules"][0]["conditions"][0]["reason"] == "Modality is 'MR', rule wants 'CT'"
    assert [(j["series"], j["model"], j["rule"], j["destinations"]) for j in report["jobs"]] == [
        ("1.2.826.0.1.88.1.1", "ct-hu-segmentation", "ct", ["pacs", "web"])]
    assert report["skipped"] == [{"path": "readme.txt", "reason": "not a DICOM file (no DICM preamble)"}]
    assert not any(p in r.text for p in (*PHI, "PID-4711-XQ"))  # routing attributes only
    assert _rows(node) == before  # no job, no instance row, no spool file
    assert list((tmp_path / "tmp").iterdir()) == []  # the uploads are removed


def test_a_catalog_study_by_id(node: ApiNode) -> None:
    before = _rows(node)
    r = node.post(PATH, json={"study_id": node.study_id})
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["source"] == "study" and report["study_id"] == node.study_id and report["study_state"] == "routed"
    assert report["notes"] == ["the study is already routed: these are the jobs routing would create now "
                               "(a rerun routes it again)"]
    [series] = report["series"]
    assert series["attributes"]["Modality"] == "CT" and series["attributes"]["NumberOfInstances"] == 2
    assert [(j["model"], j["destinations"], j["awaits_prior"]) for j in report["jobs"]] == [
        ("ct-hu-segmentation", ["pacs", "web"], False)]
    assert not any(p in r.text for p in PHI)
    assert _rows(node) == before
    _problem(node.post(PATH, json={"study_id": 999}), 404, "not-found")


def test_bad_input_is_a_problem(node: ApiNode) -> None:
    for body in ({}, {"study_id": "seven"}, {"study_id": 1, "extra": 2}, [1]):
        _problem(node.post(PATH, json=body), 422, "invalid-parameters")
    r = httpx.post(f"{node.server.url}{PATH}", content=b"{not json", timeout=10,
                   headers={"Content-Type": "application/json", **node.auth})
    _problem(r, 422, "invalid-parameters")
    r = httpx.post(f"{node.server.url}{PATH}", content=b"x", headers={"Content-Type": "text/plain", **node.auth},
                   timeout=10)
    _problem(r, 415, "unsupported-media-type")
    r = httpx.post(f"{node.server.url}{PATH}", data={"calling_ae": "X"}, files=[("other", ("a", b"a"))],
                   headers=node.auth, timeout=10)
    _problem(r, 400, "bad-request")
    r = httpx.post(f"{node.server.url}{PATH}", content=b"--x\r\nbroken", timeout=10,
                   headers={"Content-Type": "multipart/form-data", **node.auth})
    _problem(r, 400, "bad-request")


def test_roles(node: ApiNode) -> None:
    _problem(httpx.post(f"{node.server.url}{PATH}", json={"study_id": node.study_id}, timeout=10), 401,
             "unauthorized")
    _problem(httpx.post(f"{node.server.url}{PATH}", json={"study_id": node.study_id}, timeout=10,
                        headers=bearer(node.tokens[Role.SENDER])), 403, "forbidden")
    assert httpx.post(f"{node.server.url}{PATH}", json={"study_id": node.study_id}, timeout=10,
                      headers=bearer(node.tokens[Role.VIEWER])).status_code == 200


def test_over_max_request_mb_413_and_a_stalled_client_408(node: ApiNode) -> None:
    body = b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.dcm\"\r\n\r\n" + b"x" * 1_200_000
    with serve(node.receiver, role=Role.VIEWER, max_request_mb=1, timeout_seconds=0.5) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        try:  # by Content-Length: refused before the body is read (the test sends the headers only)
            conn.putrequest("POST", PATH)
            for name, value in (("Content-Type", "multipart/form-data; boundary=b"),
                                ("Content-Length", str(len(body))), *server.auth.items()):
                conn.putheader(name, value)
            conn.endheaders()
            r = conn.getresponse()
            assert r.status == 413 and json.loads(r.read())["code"] == "too-large"
        finally:
            conn.close()
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        try:  # chunked: refused once the body passes the limit
            conn.request("POST", PATH, body=iter([body[i:i + 65536] for i in range(0, len(body), 65536)]),
                         encode_chunked=True, headers={"Content-Type": "multipart/form-data; boundary=b",
                                                       "Transfer-Encoding": "chunked", **server.auth})
            r = conn.getresponse()
            assert r.status == 413 and json.loads(r.read())["code"] == "too-large"
        finally:
            conn.close()
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                         "Content-Length: 5000\r\n".encode() + server.auth_line + b"\r\n" + body[:1000])
            reply = b""  # the rest never comes; the node answers and closes
            while chunk := sock.recv(65536):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 408") and b'"code":"timeout"' in reply


def test_documented_in_openapi(node: ApiNode) -> None:
    doc = node.get("/openapi.json").json()
    op = doc["paths"][PATH]["post"]
    assert set(op["requestBody"]["content"]) == {"multipart/form-data", "application/json"}
    assert op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/RuleReport")
    assert {"400", "404", "413", "415", "422"} <= set(op["responses"])
