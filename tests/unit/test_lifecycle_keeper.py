"""The storage keeper in a receiving node: above the high watermark with nothing eligible the real
Storage SCP answers C-STORE 0xA700, STOW-RS 503 with Retry-After and /readyz 503, until a study
settles and the keeper purges it; and the storage API (reads for api-read, the purge for admin)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import update

from node.http.app import create_app
from node.http.auth import issue_token
from node.http.context import NodeContext
from node.http.server import HttpServer
from node.lifecycle.eligibility import DAY
from node.lifecycle.guard import StudyGuard, node_running
from node.lifecycle.loop import StorageKeeper
from node.lifecycle.purge import execute_purge, plan_purge
from node.lifecycle.usage import DiskUsage
from node.receive.scp import STATUS_OUT_OF_RESOURCES, STATUS_SUCCESS, Receiver
from node.receive.stow import multipart_body
from node.roles import Role
from node.schema import Delivery, DeliveryState
from node.service import NodeService
from testkit.harness import c_store, free_port, peer_entries
from tests.dsfactory import ct_slice, encode
from tests.httpkit import bearer
from tests.unit.lifecycle_helpers import add_study, inconsistencies, lifecycle_settings, node_parts, study_uid

FULL = DiskUsage(total=100, used=95, free=5, used_percent=95.0)
PATIENT_ID = "PID-4711-XQ"
ROOMY = DiskUsage(total=100, used=50, free=50, used_percent=50.0)


@dataclass
class Node:
    receiver: Receiver
    keeper: StorageKeeper
    server: HttpServer
    tokens: dict[Role, str]
    clock: list[float]

    def get(self, path: str, role: Role = Role.OPERATOR, **params: str) -> httpx.Response:
        return httpx.get(self.server.url + path, params=params, headers=bearer(self.tokens[role]), timeout=10)

    def post(self, path: str, role: Role, **params: str) -> httpx.Response:
        return httpx.post(self.server.url + path, params=params, headers=bearer(self.tokens[role]), timeout=60)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    settings, catalog, spool, _r, clock = node_parts(tmp_path, {"host": "127.0.0.1", "port": free_port(),
                                                                 "peers": peer_entries()})
    receiver = Receiver(settings, catalog, spool, lambda: clock[0])
    guard = StudyGuard()
    # "full" while the first study's files are on disk: purging it brings the disk back to 50%
    keeper = StorageKeeper(settings, catalog, spool, lambda: clock[0], guard,
                           usage=lambda: FULL if (tmp_path / "instances" / study_uid(1)).exists() else ROOMY)
    receiver.room_gate, receiver.study_guard = keeper.has_room, guard.receiving
    ctx = NodeContext(settings, catalog, spool, receiver, lambda: clock[0], broker_reachable=lambda: True,
                      storage=keeper)
    server = HttpServer(create_app(ctx), "127.0.0.1", 0)
    tokens = {role: issue_token(catalog, role) for role in Role}
    receiver.start()
    server.start()
    try:
        yield Node(receiver, keeper, server, tokens, clock)
    finally:
        server.stop()
        receiver.stop()
        catalog.engine.dispose()


def _slice(tmp_path: Path, n: int) -> Path:
    uid = study_uid(n)
    ds = ct_slice(uid, f"{uid}.1", f"{uid}.1.1")
    ds.PatientID, ds.PatientName = PATIENT_ID, "Quimby^Wilhelmina"
    path = tmp_path / f"new-{n}.dcm"
    path.write_bytes(encode(ds))
    return path


def test_full_disk_refuses_until_a_study_settles(node: Node, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    add_study(node.receiver, 1, outcome="pending", now=0.0, clock=node.clock)  # delivery pending: not eligible
    caplog.set_level(logging.INFO)
    node.keeper.tick()
    assert node.keeper.refusing
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "node.lifecycle"]
    assert "refusing new instances" in warning.getMessage() and "95.0%" in warning.getMessage()
    new = _slice(tmp_path, 2)
    assert c_store(node.receiver.settings.node.port, [new]) == {f"{study_uid(2)}.1.1": STATUS_OUT_OF_RESOURCES}
    body, ctype = multipart_body([new.read_bytes()])
    stow = httpx.post(node.server.url + "/dicom-web/studies", content=body, timeout=10,
                      headers={"Content-Type": ctype, **bearer(node.tokens[Role.SENDER])})
    assert stow.status_code == 503 and stow.headers["Retry-After"]
    ready = httpx.get(node.server.url + "/readyz", timeout=10)
    assert ready.status_code == 503 and ready.json()["checks"]["storage"] is False
    assert node.get("/api/v1/storage").json()["refusing"] is True
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert PATIENT_ID not in logged and "Quimby" not in logged  # no patient data in the logs
    # the PACS took the results: the study is settled, the watermark takes it, instances are welcome again
    with node.receiver.catalog.session() as s:
        s.execute(update(Delivery).values(state=DeliveryState.SENT, sent_at=1.0))
    outcome = node.keeper.tick()
    assert outcome is not None and len(outcome.purged) == 1 and not node.keeper.refusing
    assert c_store(node.receiver.settings.node.port, [new]) == {f"{study_uid(2)}.1.1": STATUS_SUCCESS}
    assert httpx.get(node.server.url + "/readyz", timeout=10).json()["checks"]["storage"] is True


def test_storage_api(node: Node) -> None:
    add_study(node.receiver, 1, now=0.0, clock=node.clock)
    add_study(node.receiver, 3, outcome="queued", now=0.0, clock=node.clock)
    got = node.get("/api/v1/storage")
    assert got.status_code == 200
    body = got.json()
    assert body["usage"]["used_percent"] == 95.0 and body["target_bytes"] > 0
    assert [(i["study_uid"], i["scope"], i["reason"]) for i in body["items"]] == [
        (study_uid(1), "study", "watermark")]
    assert body["kept"] == {"jobs under way": 1} and body["files"] == 5
    assert node.get("/api/v1/storage", Role.VIEWER).status_code == 200
    assert node.post("/api/v1/storage/purge", Role.OPERATOR, dry_run="false").status_code == 403
    dry = node.post("/api/v1/storage/purge", Role.ADMIN)
    assert dry.status_code == 200 and dry.json()["dry_run"] is True and dry.json()["purged"] is None
    assert (node.receiver.spool.root / "instances" / study_uid(1)).is_dir()
    real = node.post("/api/v1/storage/purge", Role.ADMIN, dry_run="false").json()
    assert (real["dry_run"], real["purged"], real["purged_files"], real["skipped"]) == (False, 1, 5, {})
    assert not (node.receiver.spool.root / "instances" / study_uid(1)).exists()
    assert node.get("/api/v1/storage").json()["items"] == []  # 50% now: nothing to do


def test_the_node_runs_the_lifecycle(tmp_path: Path) -> None:
    settings = lifecycle_settings(tmp_path, {"host": "127.0.0.1", "port": free_port(), "peers": peer_entries()},
                                  retention={"results_days": 1}, check_seconds=0.1)
    service = NodeService(settings, clock=lambda: 10 * DAY)
    add_study(service.receiver, 1, now=0.0)  # delivered 10 days ago
    assert service.receiver.room_gate() and not node_running(tmp_path)
    service.start()
    try:
        assert node_running(tmp_path)  # the CLI refuses a real purge now
        deadline = time.monotonic() + 20
        while (tmp_path / "instances" / study_uid(1)).exists() and time.monotonic() < deadline:
            time.sleep(0.05)  # polling for the lifecycle loop's first pass
        assert not (tmp_path / "instances" / study_uid(1)).exists()
        assert inconsistencies(service.catalog, tmp_path) == (set(), set())
    finally:
        service.stop()
    assert not node_running(tmp_path)


def test_a_purged_study_answers_409_and_404(tmp_path: Path) -> None:
    settings, catalog, spool, receiver, clock = node_parts(tmp_path, retention={"instances_days": 1})
    sid = add_study(receiver, 1, now=0.0, clock=clock)
    execute_purge(settings, catalog, spool, plan_purge(settings, catalog, 2 * DAY, watermarks=False), 2 * DAY)
    ctx = NodeContext(settings, catalog, spool, receiver, lambda: 2 * DAY, broker_reachable=lambda: True)
    server = HttpServer(create_app(ctx), "127.0.0.1", 0)
    auth = bearer(issue_token(catalog, Role.ADMIN))
    server.start()
    try:
        rerun = httpx.post(f"{server.url}/api/v1/studies/{sid}/rerun", headers=auth, timeout=10)
        assert rerun.status_code == 409 and rerun.json()["code"] == "purged"
        job_id = httpx.get(f"{server.url}/api/v1/jobs", headers=auth, timeout=10).json()["items"][0]["id"]
        retry = httpx.post(f"{server.url}/api/v1/jobs/{job_id}/retry", headers=auth, timeout=10)
        assert retry.status_code == 409 and retry.json()["code"] == "purged"
        uid = study_uid(1)
        wado = httpx.get(f"{server.url}/dicom-web/studies/{uid}/series/{uid}.1", headers=auth, timeout=10)
        assert wado.status_code == 404
        study = httpx.get(f"{server.url}/api/v1/studies/{sid}", headers=auth, timeout=10)
        assert study.status_code == 200  # the history stays
        # an app without the node's keeper: a real purge is refused, a dry run answers
        assert httpx.post(f"{server.url}/api/v1/storage/purge", params={"dry_run": "false"}, headers=auth,
                          timeout=10).status_code == 503
        assert httpx.post(f"{server.url}/api/v1/storage/purge", headers=auth, timeout=10).status_code == 200
    finally:
        server.stop()
        catalog.engine.dispose()
