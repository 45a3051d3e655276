"""Only known peers get in, and DICOM TLS both ways, over real loopback sockets with dcmtk and pynetdicom.

Peers (``node.peers``): an unknown calling AE title, a known one from another address, or a wrong
called AE title gets A-ASSOCIATE-RJ and nothing is stored; a peer without ``store``/``echo`` gets
0x0124 (Refused: Not Authorized). TLS (``node.tls``, a destination's ``tls``): dcmtk's storescu into
the node's TLS port, the node's DimseSender into dcmtk's storescp, clients without a trusted
certificate refused, ``plain: false``. Certificates come from :mod:`testkit.certs`.
"""

from __future__ import annotations

import ssl
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom import AE

from models.errors import DestinationUnreachable
from node.catalog import Catalog
from node.config import DimseDestination, Settings, TlsClientSettings
from node.receive.scp import STATUS_NOT_AUTHORIZED, STATUS_SUCCESS, AssociationEvent, Receiver
from node.send.dimse import DimseSender
from node.spool import Spool
from node.tls import client_context
from testkit.certs import Pki, make_pki
from testkit.harness import NODE_AE, free_port, port_open, stop_process, storescu, tool_env, wait_for
from tests.dsfactory import ct_slice

CT = "1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = "1.2.840.10008.1.1"
PEERS: list[dict[str, Any]] = [
    {"ae_title": "SCANNER", "host": "127.0.0.1", "allow": ["echo", "store"]},
    {"ae_title": "ECHO-ONLY", "host": "127.0.0.0/8", "allow": ["echo"]},
    {"ae_title": "STORE-ONLY", "host": "localhost", "allow": ["store"]},
    {"ae_title": "ELSEWHERE", "host": "127.0.0.2", "allow": ["echo", "store"]},
]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    d = tmp_path_factory.mktemp("series")
    out = []
    for i in range(3):
        p = d / f"{i}.dcm"
        ct_slice("1.2.826.0.1.55", "1.2.826.0.1.55.1", f"1.2.826.0.1.55.1.{i + 1}", z=float(i), rows=32,
                 cols=32).save_as(p, enforce_file_format=True)
        out.append(p)
    return out


Make = Callable[..., Receiver]


@pytest.fixture
def make_receiver(tmp_path: Path, pki: Pki) -> Iterator[Make]:
    """A started Receiver with :data:`PEERS` (node overrides as keywords; ``tls=True``: a TLS port with
    the test PKI); its association events are in ``receiver.events``."""
    started: list[Receiver] = []

    def make(*, tls: bool | dict[str, Any] = False, **node: Any) -> Receiver:
        cfg: dict[str, Any] = {"ae_title": NODE_AE, "host": "127.0.0.1", "port": free_port(),
                               "storage_dir": str(tmp_path / "s"), "min_free_mb": 0, "peers": PEERS,
                               "acse_timeout_seconds": 5, "network_timeout_seconds": 5, "dimse_timeout_seconds": 5}
        if tls:
            cfg["tls"] = {"port": free_port(), "cert_file": str(pki.server_cert), "key_file": str(pki.server_key),
                          "ca_file": str(pki.ca_cert), **(tls if isinstance(tls, dict) else {})}
        settings = Settings.model_validate({"node": {**cfg, **node}})
        events: list[AssociationEvent] = []
        storage = settings.node.storage_dir
        r = Receiver(settings, Catalog.for_storage(storage), Spool(storage), clock=time.time,
                     on_association=events.append)
        r.events = events  # type: ignore[attr-defined]
        r.start()
        started.append(r)
        return r

    yield make
    for r in started:
        r.stop()


def events(r: Receiver) -> list[AssociationEvent]:
    return list(r.events)  # type: ignore[attr-defined]


def assert_nothing_stored(r: Receiver) -> None:
    assert r.catalog.counts()["instances"]["total"] == 0
    assert not (r.spool.root / "instances").exists() or not list((r.spool.root / "instances").rglob("*.dcm"))


def stored(r: Receiver) -> int:
    return int(r.catalog.counts()["instances"]["total"])


def associate(port: int, calling: str, *, called: str = NODE_AE, bind: str | None = None,
              contexts: tuple[str, ...] = (VERIFICATION, CT), tls: ssl.SSLContext | None = None) -> Any:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    for c in contexts:
        ae.add_requested_context(c)
    return ae.associate("127.0.0.1", port, ae_title=called, bind_address=(bind, 0) if bind else None,
                        tls_args=(tls, "127.0.0.1") if tls is not None else None)


def rejection(assoc: Any) -> tuple[int, int, int]:
    assert assoc.is_rejected, "expected an A-ASSOCIATE-RJ"
    rj = assoc.acceptor.primitive
    return int(rj.result), int(rj.result_source), int(rj.diagnostic)


# ---- peers ----------------------------------------------------------------------------------------

def test_unknown_calling_ae_is_rejected_by_dcmtk_storescu(make_receiver: Make, series: list[Path]) -> None:
    r = make_receiver()
    out = storescu(r.settings.node.port, series[0].parent, aet="INTRUDER")
    assert out.returncode != 0
    assert "Association Rejected" in out.stderr and "Calling AE Title Not Recognized" in out.stderr, out.stderr
    assert_nothing_stored(r)
    [ev] = events(r)
    assert (ev.accepted, ev.calling_ae, ev.called_ae, ev.address, ev.tls) == (False, "INTRUDER", NODE_AE,
                                                                              "127.0.0.1", False)
    assert ev.reason == "calling AE title not recognised"
    assert storescu(r.settings.node.port, series[0].parent).returncode == 0  # SCANNER is a peer
    assert stored(r) == 3


def test_unknown_calling_ae_is_rejected_by_pynetdicom(make_receiver: Make, caplog: pytest.LogCaptureFixture) -> None:
    r = make_receiver()
    with caplog.at_level("WARNING", logger="node.receive"):
        assoc = associate(r.settings.node.port, "INTRUDER")
    assert rejection(assoc) == (0x01, 0x01, 0x03)  # rejected-permanent, service-user, calling AE not recognised
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "node.receive"]
    assert lines == ["association from INTRUDER at 127.0.0.1 refused: calling AE title not recognised "
                     "(called AE AI-NODE)"]
    assert_nothing_stored(r)


def test_accept_unknown_peers_lets_unknown_titles_in(make_receiver: Make, series: list[Path]) -> None:
    r = make_receiver(accept_unknown_peers=True)
    assert storescu(r.settings.node.port, series[0].parent, aet="ANYONE").returncode == 0
    assert stored(r) == 3
    assoc = associate(r.settings.node.port, "ELSEWHERE")  # a known AE title from the wrong address: still out
    assert rejection(assoc) == (0x01, 0x01, 0x03)


def test_known_ae_from_another_address_is_rejected(make_receiver: Make, series: list[Path]) -> None:
    r = make_receiver()
    port = r.settings.node.port
    out = storescu(port, series[0].parent, aet="ELSEWHERE")  # from 127.0.0.1, allowed from 127.0.0.2 only
    assert out.returncode != 0 and "Calling AE Title Not Recognized" in out.stderr, out.stderr
    assert rejection(associate(port, "ELSEWHERE")) == (0x01, 0x01, 0x03)
    assert rejection(associate(port, "SCANNER", bind="127.0.0.2")) == (0x01, 0x01, 0x03)  # SCANNER: 127.0.0.1
    assert_nothing_stored(r)
    assert [e.reason for e in events(r)] == ["calling AE title not recognised from this address"] * 3
    assoc = associate(port, "ELSEWHERE", bind="127.0.0.2")
    try:
        assert assoc.is_established
        assert assoc.send_c_store(pydicom.dcmread(series[0])).Status == STATUS_SUCCESS
    finally:
        assoc.release()
    assert stored(r) == 1
    assert events(r)[-1].accepted and events(r)[-1].address == "127.0.0.2"


def test_peer_without_store_or_echo_is_refused_per_operation(make_receiver: Make, series: list[Path]) -> None:
    r = make_receiver()
    port = r.settings.node.port
    assoc = associate(port, "ECHO-ONLY")  # 127.0.0.0/8
    try:
        assert assoc.is_established
        assert assoc.send_c_echo().Status == STATUS_SUCCESS
        for path in series:
            assert assoc.send_c_store(pydicom.dcmread(path)).Status == STATUS_NOT_AUTHORIZED
    finally:
        assoc.release()
    assert_nothing_stored(r)
    out = storescu(port, series[0].parent, "-v", aet="ECHO-ONLY")  # a failure status: dcmtk stops there
    assert out.returncode != 0 and "Store Response (Unknown Status: 0x124)" in out.stderr, out.stderr
    assert_nothing_stored(r)
    assoc = associate(port, "STORE-ONLY")  # host: localhost (a name, resolved)
    try:
        assert assoc.is_established
        assert assoc.send_c_echo().Status == STATUS_NOT_AUTHORIZED
        assert assoc.send_c_store(pydicom.dcmread(series[0])).Status == STATUS_SUCCESS
    finally:
        assoc.release()
    assert stored(r) == 1
    echo = subprocess.run(["echoscu", "-v", "-aet", "STORE-ONLY", "-aec", NODE_AE, "127.0.0.1", str(port)],
                          capture_output=True, text=True, env=tool_env(), timeout=30, check=False)
    assert "0x124" in echo.stderr, echo.stderr


def test_wrong_called_ae_title_is_rejected(make_receiver: Make, series: list[Path]) -> None:
    r = make_receiver()
    out = storescu(r.settings.node.port, series[0].parent, aec="NOT-US")
    assert out.returncode != 0 and "Called AE Title Not Recognized" in out.stderr, out.stderr
    assert rejection(associate(r.settings.node.port, "SCANNER", called="NOT-US")) == (0x01, 0x01, 0x07)
    assert_nothing_stored(r)
    assert [e.reason for e in events(r)] == ["called AE title not recognised"] * 2
    lax = make_receiver(require_called_ae_title=False, storage_dir=str(r.settings.node.storage_dir) + "-lax")
    assert storescu(lax.settings.node.port, series[0].parent, aec="NOT-US").returncode == 0
    assert stored(lax) == 3


# ---- DICOM TLS ------------------------------------------------------------------------------------

def tls_storescu(port: int, files: Path, pki: Pki, *args: str,
                 aet: str = "SCANNER") -> subprocess.CompletedProcess[str]:
    return storescu(port, files, *args, "+cf", str(pki.ca_cert), aet=aet)


def test_dcmtk_storescu_over_tls_stores(make_receiver: Make, pki: Pki, series: list[Path]) -> None:
    r = make_receiver(tls=True)
    assert r.settings.node.tls is not None
    out = tls_storescu(r.settings.node.tls.port, series[0].parent, pki, "+tls", str(pki.client_key),
                       str(pki.client_cert))
    assert out.returncode == 0, out.stderr
    assert stored(r) == 3
    [ev] = events(r)
    assert ev.accepted and ev.tls and ev.calling_ae == "SCANNER" and ev.allow == {"echo", "store"}
    # the peer table applies on the TLS port too
    out = tls_storescu(r.settings.node.tls.port, series[0].parent, pki, "+tls", str(pki.client_key),
                       str(pki.client_cert), aet="INTRUDER")
    assert out.returncode != 0 and "Calling AE Title Not Recognized" in out.stderr, out.stderr
    assert events(r)[-1].tls and not events(r)[-1].accepted


@pytest.mark.parametrize("client", ["untrusted", "anonymous"])
def test_client_without_trusted_certificate_is_refused(make_receiver: Make, pki: Pki, series: list[Path],
                                                       client: str) -> None:
    r = make_receiver(tls=True)
    assert r.settings.node.tls is not None
    args = ("+tls", str(pki.rogue_key), str(pki.rogue_cert)) if client == "untrusted" else ("+tla",)
    out = tls_storescu(r.settings.node.tls.port, series[0].parent, pki, *args)
    assert out.returncode != 0
    assert_nothing_stored(r)
    [ev] = events(r)
    assert not ev.accepted and ev.tls and ev.reason.startswith("TLS handshake failed")
    # the server keeps serving trusted clients
    ok = tls_storescu(r.settings.node.tls.port, series[0].parent, pki, "+tls", str(pki.client_key),
                      str(pki.client_cert))
    assert ok.returncode == 0, ok.stderr


def test_optional_client_certificate_admits_anonymous_tls(make_receiver: Make, pki: Pki, series: list[Path]) -> None:
    r = make_receiver(tls={"require_client_cert": False})
    assert r.settings.node.tls is not None
    out = tls_storescu(r.settings.node.tls.port, series[0].parent, pki, "+tla")
    assert out.returncode == 0, out.stderr
    assert stored(r) == 3


def test_only_bcp195_tls_is_spoken(make_receiver: Make, pki: Pki) -> None:
    """TLS 1.1 and a TLS 1.2 suite outside BCP 195 (CBC, no forward secrecy) fail the handshake."""
    r = make_receiver(tls=True)
    assert r.settings.node.tls is not None
    port = r.settings.node.tls.port
    tls = TlsClientSettings(ca_file=pki.ca_cert, cert_file=pki.client_cert, key_file=pki.client_key)

    def handshake(ctx: ssl.SSLContext) -> str:
        import socket

        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            return f"{s.version()} {s.cipher()[0]}"  # type: ignore[index]

    assert handshake(client_context(tls)).startswith(("TLSv1.3", "TLSv1.2 ECDHE-"))
    twelve = client_context(tls)
    twelve.maximum_version = ssl.TLSVersion.TLSv1_2
    assert "GCM" in handshake(twelve)
    cbc = client_context(tls)
    cbc.maximum_version = ssl.TLSVersion.TLSv1_2
    cbc.set_ciphers("AES128-SHA256:ECDHE-ECDSA-AES128-SHA256")
    with pytest.raises(ssl.SSLError):
        handshake(cbc)
    old = client_context(tls)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSVersion.TLSv1_1 is deprecated: the point here
        old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises(ssl.SSLError):
        handshake(old)


def test_pynetdicom_client_over_tls_and_plain_off(make_receiver: Make, pki: Pki, series: list[Path]) -> None:
    r = make_receiver(tls=True, plain=False)
    assert r.settings.node.tls is not None
    assert not port_open(r.settings.node.port)  # plain: false closes the plain port
    assert port_open(r.settings.node.tls.port)
    ctx = client_context(TlsClientSettings(ca_file=pki.ca_cert, cert_file=pki.client_cert, key_file=pki.client_key))
    assoc = associate(r.settings.node.tls.port, "SCANNER", tls=ctx)
    try:
        assert assoc.is_established
        assert assoc.send_c_store(pydicom.dcmread(series[0])).Status == STATUS_SUCCESS
    finally:
        assoc.release()
    assert stored(r) == 1


@pytest.fixture
def storescp(tmp_path: Path, pki: Pki) -> Iterator[tuple[int, Path]]:
    """dcmtk's storescp with TLS (client certificate required, signed by the test CA) writing into a folder."""
    port, out = free_port(), tmp_path / "storescp"
    out.mkdir()
    with open(tmp_path / "storescp.log", "wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(["storescp", "+tls", str(pki.server_key), str(pki.server_cert), "+cf",
                                 str(pki.ca_cert), "--require-peer-cert", "-aet", "STORESCP", "-od", str(out),
                                 str(port)], stdout=log, stderr=subprocess.STDOUT, env=tool_env())
    try:
        wait_for(lambda: port_open(port), 20, what="storescp")
        yield port, out
    finally:
        stop_process(proc)


def test_dimse_sender_over_tls_into_dcmtk_storescp(storescp: tuple[int, Path], pki: Pki,
                                                   series: list[Path]) -> None:
    port, out = storescp
    dest = DimseDestination(name="pacs", type="dimse", ae_title="STORESCP", host="127.0.0.1", port=port,
                            tls=TlsClientSettings(ca_file=pki.ca_cert, cert_file=pki.client_cert,
                                                  key_file=pki.client_key))
    report = DimseSender(dest, NODE_AE, 10).send(series)
    assert sorted(report.sent) == sorted(series) and not report.failed
    arrived = sorted(out.iterdir())
    assert len(arrived) == 3
    assert {str(pydicom.dcmread(p).SOPInstanceUID) for p in arrived} == {
        str(pydicom.dcmread(p).SOPInstanceUID) for p in series}


def test_dimse_sender_refuses_an_untrusted_server(storescp: tuple[int, Path], pki: Pki, series: list[Path]) -> None:
    port, out = storescp
    untrusting = TlsClientSettings(ca_file=pki.rogue_cert, cert_file=pki.client_cert, key_file=pki.client_key)
    dest = DimseDestination(name="pacs", type="dimse", ae_title="STORESCP", host="127.0.0.1", port=port,
                            tls=untrusting)
    with pytest.raises(DestinationUnreachable, match="DICOM TLS"):
        DimseSender(dest, NODE_AE, 5).send(series)
    no_cert = TlsClientSettings(ca_file=pki.ca_cert)  # storescp requires a client certificate
    dest = dest.model_copy(update={"tls": no_cert})
    with pytest.raises(DestinationUnreachable):
        DimseSender(dest, NODE_AE, 5).send(series)
    assert list(out.iterdir()) == []


def test_prior_source_queries_over_tls(tmp_path: Path, pki: Pki) -> None:
    """DimsePriorSource associates over TLS with a destination's ``tls`` (a pynetdicom C-FIND SCP here)."""
    from pydicom.dataset import Dataset
    from pynetdicom import evt

    from node.config import TlsServerSettings
    from node.conformance import STUDY_ROOT_FIND
    from node.retrieve import DimsePriorSource, PriorQuery
    from node.tls import server_context

    seen: list[bool] = []

    def handle_find(event: Any) -> Iterator[tuple[int, Dataset | None]]:
        seen.append(isinstance(event.assoc.dul.socket.socket, ssl.SSLSocket))
        match = Dataset()
        match.StudyInstanceUID, match.PatientID, match.StudyDate = "1.2.3", "P1", "20240101"
        yield 0xFF00, match

    ae = AE(ae_title="PACS")
    ae.add_supported_context(STUDY_ROOT_FIND)
    port = free_port()
    ctx = server_context(TlsServerSettings(port=port, cert_file=pki.server_cert, key_file=pki.server_key,
                                           ca_file=pki.ca_cert))
    server = ae.start_server(("127.0.0.1", port), block=False, ssl_context=ctx,
                             evt_handlers=[(evt.EVT_C_FIND, handle_find)])
    try:
        dest = DimseDestination(name="pacs", type="dimse", ae_title="PACS", host="127.0.0.1", port=port,
                                tls=TlsClientSettings(ca_file=pki.ca_cert, cert_file=pki.client_cert,
                                                      key_file=pki.client_key))
        source = DimsePriorSource(dest, NODE_AE, "move", lambda *a: 0, move_destination=NODE_AE)
        found = source.find(PriorQuery("P1", "", "CT", "9.9", "20240301", ""), timeout=10)
        assert [c.study_uid for c in found] == ["1.2.3"] and seen == [True]
    finally:
        server.shutdown()
