"""STOW-RS sender against httpx.MockTransport (the transport seam): request format, authentication,
the PS3.18 response codes, variants, batching. Real Orthanc: tests/integration/test_send_stow.py."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest

from models.errors import DestinationUnreachable
from node.config import ConfigError, DicomwebDestination, parse_settings
from node.receive.stow import StoreOutcome, parse_media_type, parse_multipart, store_response
from node.schema import BINARY_VARIANT, LABELMAP_VARIANT
from node.send.deliver import default_sender_factory
from node.send.dimse import DimseSender
from node.send.stow import StowSender
from tests.dsfactory import ct_slice, encode

URL = "http://pacs.example:8042/dicom-web"


def dest(**kw: Any) -> DicomwebDestination:
    return DicomwebDestination.model_validate({"name": "web", "type": "dicomweb", "url": URL, **kw})


def files(tmp_path: Path, n: int, rows: int = 16) -> list[Path]:
    out = []
    for i in range(n):
        path = tmp_path / f"f{i}.dcm"
        path.write_bytes(encode(ct_slice("1.2.3", "1.2.3.4", f"1.2.3.4.{i + 1}", z=float(i), rows=rows, cols=rows)))
        out.append(path)
    return out


def uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


class Pacs:
    """A STOW-RS service answering with the node's own Store Instances Response builder."""

    def __init__(self, status_of: dict[str, int] | None = None, http: int | None = None) -> None:
        self.status_of = status_of or {}
        self.http = http
        self.requests: list[httpx.Request] = []
        self.received: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.http is not None:
            return httpx.Response(self.http, text="no")
        media, params = parse_media_type(request.headers["content-type"])
        assert media == "multipart/related" and params["type"] == "application/dicom"
        outcomes = []
        for part in parse_multipart(request.content, params["boundary"]):
            assert part.headers["content-type"] == "application/dicom"
            ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(bytes(part.content)))
            uid = str(ds.SOPInstanceUID)
            status = self.status_of.get(uid, 0)
            if status == 0:
                self.received.append(uid)
            outcomes.append(StoreOutcome(status, str(ds.SOPClassUID), uid))
        code, body = store_response(outcomes)
        return httpx.Response(code, content=json.dumps(body).encode(),
                              headers={"content-type": "application/dicom+json"})


def test_posts_part10_files_as_multipart_related_and_reads_200(tmp_path: Path) -> None:
    pacs = Pacs()
    paths = files(tmp_path, 3)
    report = StowSender(dest(), 5, httpx.MockTransport(pacs)).send(paths)
    assert sorted(report.sent) == sorted(paths) and not report.failed
    [request] = pacs.requests
    assert request.method == "POST" and str(request.url) == f"{URL}/studies"
    assert request.headers["accept"] == "application/dicom+json"
    assert "authorization" not in request.headers
    assert pacs.received == [uid_of(p) for p in paths]


def test_202_marks_only_the_failed_sop_instances_failed(tmp_path: Path) -> None:
    paths = files(tmp_path, 3)
    pacs = Pacs(status_of={uid_of(paths[1]): 0xA900})
    report = StowSender(dest(), 5, httpx.MockTransport(pacs)).send(paths)
    assert sorted(report.sent) == sorted([paths[0], paths[2]])
    assert report.failed == {paths[1]: "status 0xA900"}


def test_409_fails_everything_with_the_reasons_given(tmp_path: Path) -> None:
    paths = files(tmp_path, 2)
    pacs = Pacs(status_of={uid_of(p): 0xC000 for p in paths})
    report = StowSender(dest(), 5, httpx.MockTransport(pacs)).send(paths)
    assert report.sent == [] and report.failed == {p: "status 0xC000" for p in paths}


@pytest.mark.parametrize("code", [400, 401, 403, 404, 413, 415, 500, 503])  # 413: one file, nothing to split
def test_other_http_codes_fail_the_request_without_raising(tmp_path: Path, code: int) -> None:
    paths = files(tmp_path, 1)
    report = StowSender(dest(), 5, httpx.MockTransport(Pacs(http=code))).send(paths)
    assert report.sent == []
    assert set(report.failed) == set(paths)
    assert all(r.startswith(f"HTTP {code}") for r in report.failed.values())


def test_a_request_too_large_for_the_service_is_split(tmp_path: Path) -> None:
    paths = files(tmp_path, 5, rows=256)  # ~130 kB each; the service takes at most 300 kB
    pacs = Pacs()

    def limited(request: httpx.Request) -> httpx.Response:
        return httpx.Response(413) if len(request.content) > 300_000 else pacs(request)

    report = StowSender(dest(), 5, httpx.MockTransport(limited)).send(paths)
    assert sorted(report.sent) == sorted(paths) and not report.failed
    assert sorted(pacs.received) == sorted(uid_of(p) for p in paths)


def test_202_without_a_readable_body_confirms_nothing(tmp_path: Path) -> None:
    paths = files(tmp_path, 2)
    transport = httpx.MockTransport(lambda r: httpx.Response(202, text="<xml/>",
                                                             headers={"content-type": "application/dicom+xml"}))
    report = StowSender(dest(), 5, transport).send(paths)
    assert report.sent == [] and set(report.failed) == set(paths)


def test_200_with_an_empty_body_means_all_stored(tmp_path: Path) -> None:
    paths = files(tmp_path, 2)
    report = StowSender(dest(), 5, httpx.MockTransport(lambda r: httpx.Response(200))).send(paths)
    assert sorted(report.sent) == sorted(paths)


def test_connection_refused_raises_unreachable(tmp_path: Path) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(DestinationUnreachable, match="web unreachable"):
        StowSender(dest(), 5, httpx.MockTransport(refuse)).send(files(tmp_path, 2))


def test_a_dropped_connection_after_a_stored_batch_keeps_the_rest_pending(tmp_path: Path) -> None:
    paths = files(tmp_path, 4, rows=256)  # ~130 kB each
    pacs = Pacs()

    def flaky(request: httpx.Request) -> httpx.Response:
        if pacs.requests:
            raise httpx.ReadTimeout("timed out", request=request)
        return pacs(request)

    report = StowSender(dest(max_request_mb=0.3), 5, httpx.MockTransport(flaky)).send(paths)
    assert report.sent == paths[:2]
    assert set(report.failed) == set(paths[2:]) and "ReadTimeout" in report.failed[paths[2]]


def test_batches_by_request_size(tmp_path: Path) -> None:
    paths = files(tmp_path, 5, rows=256)
    pacs = Pacs()
    report = StowSender(dest(max_request_mb=0.3), 5, httpx.MockTransport(pacs)).send(paths)
    assert sorted(report.sent) == sorted(paths)
    assert [len(parse_multipart(r.content, parse_media_type(r.headers["content-type"])[1]["boundary"]))
            for r in pacs.requests] == [2, 2, 1]


@pytest.mark.parametrize("accepts_labelmap", [False, True])
def test_sends_one_variant_as_configured(tmp_path: Path, accepts_labelmap: bool) -> None:
    paths = files(tmp_path, 3)
    variants = {paths[0]: LABELMAP_VARIANT, paths[1]: BINARY_VARIANT}
    pacs = Pacs()
    report = StowSender(dest(accepts_labelmap=accepts_labelmap), 5, httpx.MockTransport(pacs)).send(paths, variants)
    wanted = paths[0] if accepts_labelmap else paths[1]
    assert sorted(report.sent) == sorted([wanted, paths[2]])
    assert report.not_needed == [paths[1] if accepts_labelmap else paths[0]]


def test_basic_auth_reads_the_password_file(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    pacs = Pacs()
    StowSender(dest(username="node", password_file=str(secret)), 5, httpx.MockTransport(pacs)).send(files(tmp_path, 1))
    assert pacs.requests[0].headers["authorization"] == "Basic " + base64.b64encode(b"node:s3cret").decode()


def test_bearer_token_is_read_at_each_send(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("first")
    pacs = Pacs()
    sender = StowSender(dest(token_file=str(token)), 5, httpx.MockTransport(pacs))
    paths = files(tmp_path, 1)
    sender.send(paths)
    token.write_text("rotated\n")
    sender.send(paths)
    assert [r.headers["authorization"] for r in pacs.requests] == ["Bearer first", "Bearer rotated"]


def test_a_missing_secret_file_is_unreachable_not_a_crash(tmp_path: Path) -> None:
    sender = StowSender(dest(token_file=str(tmp_path / "absent")), 5, httpx.MockTransport(Pacs()))
    with pytest.raises(DestinationUnreachable, match="cannot read token_file"):
        sender.send(files(tmp_path, 1))


def test_unreadable_result_file_is_reported_and_others_sent(tmp_path: Path) -> None:
    paths = files(tmp_path, 1)
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"not dicom")
    report = StowSender(dest(), 5, httpx.MockTransport(Pacs())).send([bad, *paths])
    assert report.sent == paths and report.failed[bad].startswith("unreadable")


def settings(**dicomweb: Any) -> dict[str, Any]:
    return {"node": {"storage_dir": "/tmp/x"}, "destinations": [
        {"name": "pacs", "type": "dimse", "ae_title": "P", "host": "127.0.0.1", "port": 104},
        {"name": "web", "type": "dicomweb", "url": URL, **dicomweb}]}


def test_settings_pick_the_sender_by_destination_type() -> None:
    make = default_sender_factory(parse_settings(settings()))
    assert isinstance(make("web"), StowSender) and isinstance(make("pacs"), DimseSender)


@pytest.mark.parametrize(("extra", "message"), [
    ({"username": "u"}, "username and password_file go together"),
    ({"password_file": "/p"}, "username and password_file go together"),
    ({"username": "u", "password_file": "/p", "token_file": "/t"}, "not both"),
    ({"url": "ftp://pacs/dicom-web"}, "url"),
    ({"max_request_mb": 0}, "max_request_mb"),
])
def test_invalid_dicomweb_destinations_are_refused(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_settings(settings(**extra))


def test_priors_need_a_dimse_source() -> None:
    with pytest.raises(ConfigError, match="must be a dimse destination"):
        parse_settings({**settings(), "priors": {"source": "web"}})
    assert parse_settings({**settings(), "priors": {"source": "pacs"}}).priors is not None
