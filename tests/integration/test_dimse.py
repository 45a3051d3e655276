"""Real sockets on loopback: dcmtk echoscu/storescu against our SCP, our C-STORE SCU against Orthanc."""

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from models.errors import DestinationUnreachable
from node.catalog import Catalog
from node.config import DimseDestination, Settings
from node.receive.scp import Receiver
from node.send.dimse import DimseSender
from node.spool import Spool
from testkit.harness import ORTHANC_AE, Orthanc, free_port, peer_entries, storescu, tool_env
from tests.dsfactory import ct_slice

REAL_CT = Path(__file__).resolve().parents[1] / "data" / "ct-real-20"


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    settings = Settings.model_validate({
        "node": {"ae_title": "AI-NODE", "host": "127.0.0.1", "port": free_port(),
                 "storage_dir": str(tmp_path / "s"), "min_free_mb": 0, "peers": peer_entries()},
    })
    r = Receiver(settings, Catalog.for_storage(settings.node.storage_dir), Spool(settings.node.storage_dir),
                 clock=lambda: 0.0)
    r.start()
    yield r
    r.stop()


def test_echoscu(receiver: Receiver) -> None:
    import subprocess

    out = subprocess.run(["echoscu", "-aet", "SCANNER", "-aec", "AI-NODE", "127.0.0.1",
                          str(receiver.settings.node.port)],
                         capture_output=True, text=True, env=tool_env(), timeout=30, check=False)
    assert out.returncode == 0, out.stderr


def test_storescu_jpeg2000_real_ct_stored_as_sent(receiver: Receiver) -> None:
    out = storescu(receiver.settings.node.port, REAL_CT, "-xv")
    assert out.returncode == 0, out.stderr
    stored = sorted((receiver.spool.root / "instances").rglob("*.dcm"))
    assert len(stored) == 20
    ds = pydicom.dcmread(stored[0])
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"  # not transcoded
    assert receiver.catalog.counts()["instances"]["total"] == 20
    # pushing the same series again stores nothing new
    assert storescu(receiver.settings.node.port, REAL_CT, "-xv").returncode == 0
    assert receiver.catalog.counts()["instances"]["total"] == 20
    assert len(list((receiver.spool.root / "instances").rglob("*.dcm"))) == 20


def test_dimse_sender_to_orthanc(tmp_path: Path) -> None:
    orthanc = Orthanc(tmp_path / "o", node_port=free_port())
    (tmp_path / "o").mkdir()
    orthanc.start()
    try:
        files = []
        for i in range(3):
            p = tmp_path / f"{i}.dcm"
            ct_slice("1.2.826.0.1.99", "1.2.826.0.1.99.1", f"1.2.826.0.1.99.1.{i + 1}", z=float(i)).save_as(
                p, enforce_file_format=True)
            files.append(p)
        dest = DimseDestination(name="pacs", type="dimse", ae_title=ORTHANC_AE, host="127.0.0.1",
                                port=orthanc.dicom_port)
        report = DimseSender(dest, "AI-NODE", 10).send(files)
        assert sorted(report.sent) == sorted(files) and not report.failed
        assert orthanc.modalities_of_study("1.2.826.0.1.99") == {"CT": 3}
    finally:
        orthanc.stop()
    with pytest.raises(DestinationUnreachable):
        DimseSender(dest, "AI-NODE", 2).send(files)


def test_associations_run_without_nagle(receiver: Receiver) -> None:
    """The SCP's accepted socket has TCP_NODELAY (node.nodelay); so has our SCU's via the same handler."""
    import socket

    from pynetdicom import AE, evt

    from node.nodelay import NODELAY_HANDLERS

    ae = AE(ae_title="SCANNER")
    ae.add_requested_context("1.2.840.10008.1.1")
    plain = ae.associate("127.0.0.1", receiver.settings.node.port, ae_title="AI-NODE")
    ours = ae.associate("127.0.0.1", receiver.settings.node.port, ae_title="AI-NODE",
                        evt_handlers=[(evt.EVT_CONN_OPEN, handler) for _, handler in NODELAY_HANDLERS])
    try:
        assert plain.is_established and ours.is_established

        def nodelay(assoc: object) -> int:
            return int(assoc.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))  # type: ignore[attr-defined]

        assert nodelay(plain) == 0 and nodelay(ours) != 0  # pynetdicom's default, and with the handler
        server = receiver._server
        assert server is not None
        accepted = list(server.active_associations)
        assert len(accepted) == 2 and all(nodelay(a) != 0 for a in accepted)
    finally:
        plain.release()
        ours.release()
