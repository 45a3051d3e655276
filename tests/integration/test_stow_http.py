"""STOW-RS on the node's HTTP service over real loopback HTTP into a real Receiver (spool + catalog),
from our client, a raw socket that gives up half way, and Orthanc's DICOMweb client."""

from __future__ import annotations

import json
import shutil
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from node.catalog import Catalog
from node.config import Settings
from node.receive.scp import Receiver
from node.receive.stow import FAILURE_STUDY_MISMATCH, multipart_body, stow_request
from node.spool import Spool
from testkit.harness import Orthanc, free_port, wait_for
from tests.httpkit import NodeServer, serve

REAL_CT = Path(__file__).resolve().parents[1] / "data" / "ct-real-20"
FILES = sorted(p for p in REAL_CT.iterdir() if p.is_file())


@pytest.fixture
def receiver(tmp_path: Path) -> Receiver:
    settings = Settings.model_validate({"node": {"storage_dir": str(tmp_path / "s"), "min_free_mb": 0}})
    storage = settings.node.storage_dir
    return Receiver(settings, Catalog.for_storage(storage), Spool(storage), clock=lambda: 0.0)


@pytest.fixture
def server(receiver: Receiver) -> Iterator[NodeServer]:
    with serve(receiver, role="sender", max_request_mb=256) as s:
        yield s


def dicomweb(server: NodeServer) -> str:
    return server.url + "/dicom-web"


def spooled(receiver: Receiver) -> set[str]:
    return {p.stem for p in (receiver.spool.root / "instances").rglob("*.dcm")}


def test_real_ct_series_is_stored(receiver: Receiver, server: NodeServer) -> None:
    files = [p.read_bytes() for p in FILES]
    study = str(pydicom.dcmread(FILES[0], stop_before_pixels=True).StudyInstanceUID)
    status, module = stow_request(dicomweb(server), files, study_uid=study, token=server.token)
    assert status == 200 and "00081198" not in module
    stored = [item["00081155"]["Value"][0] for item in module["00081199"]["Value"]]
    assert set(stored) == spooled(receiver) == {p.name[3:] for p in FILES}
    assert receiver.catalog.counts()["instances"]["total"] == len(FILES)
    # a resend is a success, not a duplicate
    assert stow_request(dicomweb(server), files[:3], token=server.token)[0] == 200
    assert receiver.catalog.counts()["instances"]["total"] == len(FILES)


def test_truncated_and_foreign_instances_fail(receiver: Receiver, server: NodeServer) -> None:
    whole, cut = FILES[0].read_bytes(), FILES[1].read_bytes()
    status, module = stow_request(dicomweb(server), [whole, cut[: len(cut) // 2]], token=server.token)
    assert status == 202
    (failed,) = module["00081198"]["Value"]
    assert failed["00081197"]["Value"][0] in (0xC210, 0xC211)
    assert spooled(receiver) == {FILES[0].name[3:]}
    status, module = stow_request(dicomweb(server), [FILES[2].read_bytes()], study_uid="1.2.3.4",
                                  token=server.token)
    assert status == 409 and module["00081198"]["Value"][0]["00081197"]["Value"] == [FAILURE_STUDY_MISMATCH]
    assert receiver.catalog.counts()["instances"]["total"] == 1


@pytest.mark.skipif(shutil.which("Orthanc") is None, reason="Orthanc not installed")
def test_orthanc_stow_client_is_accepted(tmp_path: Path, receiver: Receiver, server: NodeServer) -> None:
    orthanc = Orthanc(tmp_path, node_port=free_port()).start()
    try:
        for p in FILES:
            urllib.request.urlopen(urllib.request.Request(orthanc.url("/instances"), data=p.read_bytes()),
                                   timeout=30).close()
        study_id = orthanc.get("/studies")[0]
        entry = {"Url": dicomweb(server) + "/", "HttpHeaders": server.auth}  # Orthanc sends the token
        put = urllib.request.Request(orthanc.url("/dicom-web/servers/node"), method="PUT",
                                     data=json.dumps(entry).encode())
        urllib.request.urlopen(put, timeout=10).close()
        orthanc.post("/dicom-web/servers/node/stow", {"Resources": [study_id]})
        wait_for(lambda: len(spooled(receiver)) == len(FILES), 30, what="instances sent by Orthanc")
    finally:
        orthanc.stop()
    assert receiver.catalog.counts()["instances"]["total"] == len(FILES)


def test_client_gone_mid_request_keeps_finished_instances_only(receiver: Receiver, server: NodeServer) -> None:
    """A client that sends headers, two whole instances and half of a third, then closes: the two
    are stored, the third leaves neither a spooled file, a catalog row nor a temp file."""
    files = [p.read_bytes() for p in FILES[:3]]
    body, content_type = multipart_body(files)
    cut = body.index(files[2]) + len(files[2]) // 2
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(f"POST /dicom-web/studies HTTP/1.1\r\nHost: node\r\nContent-Type: {content_type}\r\n"
                     f"Content-Length: {len(body)}\r\n".encode() + server.auth_line + b"\r\n" + body[:cut])
        wait_for(lambda: receiver.catalog.counts()["instances"]["total"] == 2, 10, interval=0.02,
                 what="the two whole instances stored")
        wait_for(lambda: list(receiver.spool.tmp.iterdir()), 10, interval=0.02, what="the third part in a temp file")
    wait_for(lambda: not list(receiver.spool.tmp.iterdir()), 10, interval=0.02, what="no temp file")
    assert spooled(receiver) == {p.name[3:] for p in FILES[:2]}
    assert receiver.catalog.counts()["instances"]["total"] == 2
    status, _ = stow_request(dicomweb(server), files, token=server.token)  # the client tries again: all three stored
    assert status == 200 and receiver.catalog.counts()["instances"]["total"] == 3
