"""The operations API (``GET /api/v1/queues|workers|peers|stats``) and what feeds it: worker heartbeats
(workers/heartbeat.py, real catalog, a real thread), peers from the receiver's hooks, hourly turnaround
and throughput from the catalog's timings; and the operations page that draws them."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from node.overview_ops import percentile
from node.schema import WorkerHeartbeat
from testkit.harness import wait_for
from tests.unit.api_helpers import ApiNode, api_node
from workers.heartbeat import Heartbeat, gpu_name


@pytest.fixture
def node(tmp_path: Path) -> Iterator[ApiNode]:
    with api_node(tmp_path) as n:
        yield n


def test_queue_depth_per_worker_queue(node: ApiNode) -> None:
    assert node.post(f"/api/v1/studies/{node.study_id}/rerun", json={"model": "ct-emphysema"}).status_code == 202
    queues = {q["queue"]: q for q in node.get("/api/v1/queues").json()}
    assert queues["slow"] == {"queue": "slow", "queued": 1, "running": 0, "awaiting_prior": 0,
                              "models": ["ct-emphysema"]}
    assert queues["cpu"]["queued"] == 0 and queues["cpu"]["running"] == 0


def test_workers_from_heartbeats(node: ApiNode) -> None:
    beat = Heartbeat(node.catalog, ["cpu", "slow"], clock=lambda: node.now[0], host="gpu-host", pid=4242)
    beat.job_id = node.job_id
    beat.beat()
    [w] = node.get("/api/v1/workers").json()
    assert (w["host"], w["pid"], w["queues"], w["alive"]) == ("gpu-host", 4242, ["cpu", "slow"], True)
    assert (w["job_id"], w["job_model"], w["job_study_id"], w["gpu"]) == (node.job_id, "ct-hu-segmentation",
                                                                          node.study_id, None)
    node.now[0] += 60  # no beat for a minute: lost, and no current job claimed for it
    [w] = node.get("/api/v1/workers").json()
    assert w["alive"] is False and w["job_id"] is None
    node.now[0] += 2 * 86400  # not shown after a day
    assert node.get("/api/v1/workers").json() == []


def test_heartbeat_thread_writes_its_job_and_removes_its_row(node: ApiNode) -> None:
    beat = Heartbeat(node.catalog, ["cpu"], interval=30.0)  # the thread would beat again only in 30 s

    def row() -> WorkerHeartbeat | None:
        with node.catalog.reading() as s:
            found = s.scalar(select(WorkerHeartbeat).where(WorkerHeartbeat.pid == beat.pid))
            if found is not None:
                s.expunge(found)
            return found

    beat.start()
    try:
        wait_for(lambda: row() is not None, 10, interval=0.05, what="the first beat")
        beat.set_job(7)  # written at once, not at the next interval
        wait_for(lambda: (r := row()) is not None and r.job_id == 7, 10, interval=0.05, what="the current job")
        beat.set_job(None)
        wait_for(lambda: (r := row()) is not None and r.job_id is None, 10, interval=0.05, what="idle")
    finally:
        beat.stop()
    assert row() is None


def test_gpu_name_only_once_cuda_is_initialised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert gpu_name() is None  # torch not imported: never imported here
    state = {"initialised": False}
    cuda = types.SimpleNamespace(is_initialized=lambda: state["initialised"], current_device=lambda: 0,
                                 get_device_name=lambda i: f"NVIDIA H200 #{i}")
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    assert gpu_name() is None
    state["initialised"] = True
    assert gpu_name() == "NVIDIA H200 #0"


def test_peers_since_start(node: ApiNode) -> None:
    node.now[0] = 250.0
    node.metrics.accepted("SCANNER")
    peers = {p["source"]: p for p in node.get("/api/v1/peers").json()}
    assert peers["SCANNER"]["instances"] == 2 and peers["SCANNER"]["bytes"] > 0
    assert peers["SCANNER"]["associations"] == 1 and peers["SCANNER"]["last_association_at"] is not None
    assert peers["OTHER-AE"]["instances"] == 1 and peers["OTHER-AE"]["associations"] == 0
    assert next(iter(peers)) == "SCANNER"  # most recently active first


def test_hourly_stats(node: ApiNode) -> None:
    for delivery_id in range(1, 5):
        node.catalog.delivery_sent(delivery_id, 140.0 + delivery_id)
    node.now[0] = 3 * 3600 + 10.0
    body = node.get("/api/v1/stats", hours=4).json()
    assert [h["start"] for h in body["hours"]] == [0.0, 3600.0, 7200.0, 10800.0]
    first = body["hours"][0]
    # study 1: last instance at 100, last delivery sent at 144; study 2 still receiving (1 instance at 200)
    assert (first["studies"], first["turnaround_p50"], first["turnaround_p95"]) == (1, 44.0, 44.0)
    assert first["instances"] == 3 and first["instances_per_second"] == round(3 / 3600, 4)
    assert all(h["studies"] == 0 and h["turnaround_p50"] is None for h in body["hours"][1:])
    assert node.get("/api/v1/stats", hours=0).status_code == 400


def test_percentile_nearest_rank() -> None:
    assert percentile([], 50) is None
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 95), percentile(values, 100)) == (50.0, 95.0, 100.0)
    assert percentile([3.0], 95) == 3.0


def test_operations_page(node: ApiNode) -> None:
    Heartbeat(node.catalog, ["cpu"], clock=lambda: node.now[0], host="worker-host", pid=99).beat()
    node.catalog.delivery_sent(1, 150.0)
    r = node.get("/ops")
    assert r.status_code == 200
    text = r.text
    assert 'data-queue="cpu"' in text and 'data-queue="slow"' in text
    assert "worker-host" in text and "alive" in text
    assert text.count("<svg") == 3 and "Turnaround" in text
    for area in ("instances", "results", "queue", "catalog", "audit", "tmp"):
        assert f'data-area="{area}"' in text
    assert "SCANNER" in text and "OTHER-AE" in text
