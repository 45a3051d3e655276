"""The stages' typed audit hooks, without the audit module: the receiver's per-association
:class:`InstancesReceived` and :class:`AssociationEvent`, the STOW-RS route's per-request report, the
HTTP audit middleware (who, what, 401/403; QIDO keys by name only), the deliverer's per-batch report,
the retriever's C-FIND/C-MOVE reports. None carries a patient's name, ID or birth date."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.uid import generate_uid

from node.catalog import Catalog
from node.config import Settings, parse_settings
from node.http.app import create_app
from node.http.audit import HttpAudited
from node.http.auth import issue_token
from node.http.context import NodeContext
from node.http.server import HttpServer
from node.receive.scp import AssociationEvent, InstancesReceived, Receiver
from node.receive.stow import multipart_body
from node.retrieve import PriorExchange
from node.send.deliver import DeliveryBatch
from node.spool import Spool
from testkit.harness import FAULT_SCU_AE, c_store, free_port, peer_entries
from tests.dsfactory import ct_slice, encode
from tests.unit.test_deliver import FlakySender
from tests.unit.test_deliver import setup as deliver_setup
from tests.unit.test_retrieve import PATIENT, Candidate, Node, _series
from tests.unit.test_retrieve import _settings as prior_settings

CT = "1.2.840.10008.5.1.4.1.1.2"
NAME, PID, BIRTH = "Zyxwvut^Hooks", "HOOK-7731-XQ", "19411207"
PHI = (NAME, "Zyxwvut", PID, BIRTH)


def phi(study: str, series: str, z: float) -> bytes:
    ds = ct_slice(study, series, z=z)
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = NAME, PID, BIRTH
    return encode(ds)


def wait(predicate: Callable[[], Any], timeout: float = 10) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.02)
    raise AssertionError("timed out")


def settings_for(tmp_path: Path, **node: Any) -> Settings:
    return parse_settings({
        "node": {"ae_title": "AI-NODE", "host": "127.0.0.1", "port": free_port(), "storage_dir": str(tmp_path),
                 "min_free_mb": 0, "peers": peer_entries(), **node},
        "destinations": [{"name": "pacs", "type": "dimse", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}],
    })


def test_receiver_reports_each_association_once(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    associations: list[AssociationEvent] = []
    received: list[InstancesReceived] = []
    receiver = Receiver(settings, Catalog.for_storage(tmp_path), Spool(tmp_path), time.time,
                        on_association=associations.append, on_received=received.append)
    study, series = generate_uid(), generate_uid()
    files = []
    for i in range(3):
        path = tmp_path / f"{i}.dcm"
        path.write_bytes(phi(study, series, float(i)))
        files.append(path)
    bad = tmp_path / "bad.dcm"
    ds = ct_slice(study, series)
    del ds.StudyInstanceUID
    bad.write_bytes(encode(ds))
    receiver.start()
    try:
        statuses = c_store(settings.node.port, [*files, bad])
        assert sorted(statuses.values()) == [0, 0, 0, 0xC211]
        [event] = wait(lambda: received)
        from pynetdicom import AE

        ae = AE(ae_title="STRANGER")
        ae.add_requested_context(CT)
        assoc = ae.associate("127.0.0.1", settings.node.port, ae_title="AI-NODE")
        assert assoc.is_rejected
        wait(lambda: len(associations) >= 2)
    finally:
        receiver.stop()
    assert event == InstancesReceived("dimse", FAULT_SCU_AE, "127.0.0.1", {study: {CT: 3}}, 1)
    assert [(a.accepted, a.calling_ae, a.address) for a in associations] == [
        (True, FAULT_SCU_AE, "127.0.0.1"), (False, "STRANGER", "127.0.0.1")]
    assert len(received) == 1  # the rejected association stored nothing: no report


@pytest.fixture
def http_node(tmp_path: Path) -> Iterator[tuple[HttpServer, list[HttpAudited], list[InstancesReceived], Catalog]]:
    settings = settings_for(tmp_path)
    catalog, spool = Catalog.for_storage(tmp_path), Spool(tmp_path)
    received: list[InstancesReceived] = []
    events: list[HttpAudited] = []
    receiver = Receiver(settings, catalog, spool, time.time, on_received=received.append)
    ctx = NodeContext(settings, catalog, spool, receiver, time.time, broker_reachable=lambda: True,
                      on_audit=events.append)
    server = HttpServer(create_app(ctx), "127.0.0.1", 0)
    server.start()
    try:
        yield server, events, received, catalog
    finally:
        server.stop()


def test_http_requests_are_reported_with_who_and_what(
        http_node: tuple[HttpServer, list[HttpAudited], list[InstancesReceived], Catalog]) -> None:
    server, events, received, catalog = http_node
    tokens = {role: issue_token(catalog, role, f"{role}-user") for role in ("sender", "viewer", "operator")}

    def call(method: str, path: str, role: str | None, **kw: Any) -> httpx.Response:
        headers = {**kw.pop("headers", {}), **({"Authorization": f"Bearer {tokens[role]}"} if role else {})}
        return httpx.request(method, server.url + path, headers=headers, timeout=10, **kw)

    study, series = generate_uid(), generate_uid()
    body, content_type = multipart_body([phi(study, series, 0.0), phi(study, series, 1.0)])
    assert call("POST", "/dicom-web/studies", "sender", content=body,
                headers={"Content-Type": content_type}).status_code == 200
    [stow] = wait(lambda: received)
    assert stow == InstancesReceived("stow", "sender-user", "127.0.0.1", {study: {CT: 2}}, 0, "token")

    n = 0

    def next_event() -> HttpAudited:
        nonlocal n
        n += 1
        wait(lambda: len(events) >= n)
        return events[n - 1]

    r = call("GET", "/dicom-web/studies", "viewer", params={"PatientName": "Zyxwvut*", "limit": "5"})
    assert r.status_code == 200 and NAME in r.text  # QIDO-RS returns the name: the audit must not
    q = next_event()
    assert (q.kind, q.query_keys, q.level, q.requestor.name, q.requestor.role, q.requestor.kind) == (
        "query", ("PatientName",), "STUDY", "viewer-user", "viewer", "token")
    assert call("GET", f"/dicom-web/studies/{study}/series", "viewer").status_code == 200
    e = next_event()
    assert (e.kind, e.study_uids, e.level) == ("query", (study,), "SERIES")
    assert call("GET", f"/dicom-web/studies/{study}/metadata", "viewer").status_code == 200
    e = next_event()
    assert (e.kind, e.study_uids, e.route) == ("retrieve", (study,), "/dicom-web/studies/{study}/metadata")
    assert call("GET", "/api/v1/studies", "viewer").status_code == 200  # no patient data: not audited
    assert call("GET", "/api/v1/studies/1/dicom", "viewer").status_code == 200
    e = next_event()
    assert (e.kind, e.study_uids) == ("access", (study,))
    assert call("GET", "/metrics", None).status_code == 401
    e = next_event()
    assert (e.kind, e.status, e.requestor.name, e.requestor.address) == ("unauthenticated", 401, None, "127.0.0.1")
    assert call("POST", "/api/v1/destinations/pacs/pause", "viewer").status_code == 403
    e = next_event()
    assert (e.kind, e.requestor.name, e.requestor.role) == ("forbidden", "viewer-user", "viewer")
    assert call("POST", "/api/v1/destinations/pacs/pause", "operator").status_code == 200
    e = next_event()
    assert (e.kind, e.action, e.target, e.requestor.name) == ("action", "destination-pause", ("destination", "pacs"),
                                                              "operator-user")
    assert call("POST", "/api/v1/studies/1/rerun", "operator", json={}).status_code == 409  # nothing to rerun
    e = next_event()
    assert (e.kind, e.action, e.status, e.study_uids) == ("action", "study-rerun", 409, (study,))
    time.sleep(0.2)
    assert len(events) == n
    assert not any(v in repr(events) + repr(received) for v in PHI)


def test_deliverer_reports_each_batch(tmp_path: Path) -> None:
    batches: list[DeliveryBatch] = []
    d, _catalog, now = deliver_setup(tmp_path, FlakySender(fail_times=1))
    d.on_batch = batches.append
    d.tick()
    now[0] += 100
    d.tick()
    d.tick()  # nothing due: nothing reported
    assert batches == [DeliveryBatch("pacs", {}, 1, "connection refused"),
                       DeliveryBatch("pacs", {"1.2": {"1.2.840.10008.5.1.4.1.1.66.4": 1}}, 0)]


def test_retriever_reports_its_find_and_move(tmp_path: Path) -> None:
    node = Node(tmp_path, prior_settings(tmp_path, {"source": "pacs"}))
    exchanges: list[PriorExchange] = []
    node.retriever.on_exchange = exchanges.append
    prior_uid, current_uid = generate_uid(), generate_uid()
    node.pacs.studies[prior_uid] = (Candidate(prior_uid, PATIENT, "20230101"), _series(prior_uid, "20230101"))
    node.push(_series(current_uid, "20240101"))
    node.tick()
    assert [(e.operation, e.level, e.study_uid, e.count, e.error) for e in exchanges] == [
        ("find", "STUDY", None, 1, None), ("find", "SERIES", prior_uid, 1, None), ("move", "", prior_uid, 3, None)]
    assert "PatientID" in exchanges[0].keys and PATIENT not in repr(exchanges)


def test_retriever_reports_a_failed_find(tmp_path: Path) -> None:
    node = Node(tmp_path, prior_settings(tmp_path, {"source": "pacs", "method": "get"}))
    exchanges: list[PriorExchange] = []
    node.retriever.on_exchange = exchanges.append
    node.pacs.fail = "find"
    node.pacs.studies["1.2.3"] = (Candidate("1.2.3", PATIENT, "20230101"), [])
    node.push(_series(generate_uid(), "20240101"))
    node.tick()
    assert [(e.operation, e.error) for e in exchanges] == [("find", "no association with pacs (127.0.0.1:104)")]
