"""``/metrics``: receive counters fed by the Receiver's hooks, and what the catalog collector reads
at scrape time (job stage histograms, turnaround, queue depth, deliveries, paused destinations)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pynetdicom import AE

from node.catalog import Catalog
from node.config import parse_settings
from node.metrics import NodeMetrics
from node.receive.scp import STATUS_SUCCESS, Answered, Receiver
from node.spool import Spool
from testkit.harness import free_port
from tests.dsfactory import ct_slice, encode
from tests.unit.api_helpers import CT, ApiNode, api_node

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def node(tmp_path: Path) -> Iterator[ApiNode]:
    with api_node(tmp_path) as n:
        yield n


def scrape(node: ApiNode) -> Samples:
    r = node.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def test_receive_counters_by_door_and_calling_ae(node: ApiNode) -> None:
    assert node.receiver.store(b"garbage", CT, "1.2.3", "SCANNER") != STATUS_SUCCESS
    stow = encode(ct_slice("1.2.826.0.1.99.3", "1.2.826.0.1.99.3.1", "1.2.826.0.1.99.3.1.1"))
    assert node.receiver.receive(stow, "STOW-RS").status == STATUS_SUCCESS
    tmp = node.spool.new_temp()
    tmp.write_bytes(encode(ct_slice("1.2.826.0.1.99.3", "1.2.826.0.1.99.3.1", "1.2.826.0.1.99.3.1.2")))
    assert node.receiver.receive_file(tmp, "STOW-RS").status == STATUS_SUCCESS
    m = scrape(node)
    assert m[("dicom_node_received_instances_total", (("calling_ae", "SCANNER"), ("door", "dimse")))] == 2
    assert m[("dicom_node_received_instances_total", (("calling_ae", "OTHER-AE"), ("door", "dimse")))] == 1
    assert m[("dicom_node_received_instances_total", (("calling_ae", "STOW-RS"), ("door", "stow")))] == 2
    assert m[("dicom_node_received_bytes_total", (("calling_ae", "STOW-RS"), ("door", "stow")))] == 2 * len(stow)
    assert m[("dicom_node_store_statuses_total", (("door", "dimse"), ("status", "0x0000")))] == 3
    assert m[("dicom_node_store_statuses_total", (("door", "dimse"), ("status", "0xC210")))] == 1
    assert m[("dicom_node_store_statuses_total", (("door", "stow"), ("status", "0x0000")))] == 2
    assert m[("dicom_node_disk_free_bytes", ())] > 0 and m[("dicom_node_catalog_up", ())] == 1


def test_job_stage_histograms_and_turnaround_from_the_catalog(node: ApiNode) -> None:
    m = scrape(node)
    seg = (("model", "ct-hu-segmentation"),)
    assert m[("dicom_node_job_stage_seconds_count", (*seg, ("stage", "load")))] == 1
    assert m[("dicom_node_job_stage_seconds_sum", (*seg, ("stage", "infer")))] == 3.0
    assert m[("dicom_node_job_stage_seconds_bucket", (("le", "1.0"), *seg, ("stage", "load")))] == 0
    assert m[("dicom_node_job_stage_seconds_bucket", (("le", "2.5"), *seg, ("stage", "load")))] == 1
    assert m[("dicom_node_job_stage_seconds_bucket", (("le", "+Inf"), *seg, ("stage", "encode")))] == 1
    assert m[("dicom_node_study_turnaround_seconds_count", ())] == 0  # deliveries still pending
    for d, _r, _s in node.catalog.due_deliveries(1e9):
        node.catalog.delivery_sent(d.id, 150.0 + d.id)  # the last at 154: 54 s after the last instance
    m = scrape(node)
    assert m[("dicom_node_study_turnaround_seconds_count", ())] == 1
    assert m[("dicom_node_study_turnaround_seconds_sum", ())] == 54.0
    assert m[("dicom_node_study_turnaround_seconds_bucket", (("le", "30.0"),))] == 0
    assert m[("dicom_node_study_turnaround_seconds_bucket", (("le", "60.0"),))] == 1
    assert m[("dicom_node_deliveries", (("destination", "web"), ("state", "sent")))] == 2


def test_queue_depth_jobs_deliveries_and_paused(node: ApiNode) -> None:
    node.post(f"/api/v1/studies/{node.study_id}/rerun", json={"model": "ct-emphysema"})  # its queue: slow
    node.post("/api/v1/destinations/web/pause")
    m = scrape(node)
    assert m[("dicom_node_queue_depth", (("queue", "slow"),))] == 1
    assert m[("dicom_node_queue_depth", (("queue", "cpu"),))] == 0
    assert m[("dicom_node_jobs", (("model", "ct-hu-segmentation"), ("state", "done")))] == 1
    assert m[("dicom_node_jobs", (("model", "ct-emphysema"), ("state", "queued")))] == 1
    assert m[("dicom_node_deliveries", (("destination", "pacs"), ("state", "pending")))] == 2
    assert m[("dicom_node_destination_paused", (("destination", "web"),))] == 1
    assert m[("dicom_node_destination_paused", (("destination", "pacs"),))] == 0


def test_registries_are_per_node(tmp_path: Path) -> None:
    settings = parse_settings({"node": {"storage_dir": str(tmp_path)}})
    catalog, spool = Catalog.for_storage(tmp_path), Spool(tmp_path)
    a, b = NodeMetrics(settings, catalog, spool), NodeMetrics(settings, catalog, spool)
    a.answered(Answered("dimse", "X", STATUS_SUCCESS, 10))
    a.accepted("X")
    assert a.registry.get_sample_value("dicom_node_received_instances_total", {"door": "dimse", "calling_ae": "X"}) == 1
    assert a.registry.get_sample_value("dicom_node_associations_accepted_total", {"calling_ae": "X"}) == 1
    assert b.registry.get_sample_value("dicom_node_received_instances_total", {"door": "dimse", "calling_ae": "X"}) \
        is None
    assert prometheus_client.REGISTRY.get_sample_value("dicom_node_received_instances_total",
                                                       {"door": "dimse", "calling_ae": "X"}) is None


def test_associations_accepted_reach_the_hook(tmp_path: Path) -> None:
    port = free_port()
    settings = parse_settings({"node": {"storage_dir": str(tmp_path), "port": port, "host": "127.0.0.1",
                                        "peers": [{"ae_title": "MODALITY-7", "allow": ["echo"]}]}})
    accepted: list[str] = []
    receiver = Receiver(settings, Catalog.for_storage(tmp_path), Spool(tmp_path), lambda: 0.0,
                        on_accepted=accepted.append)
    receiver.start()
    try:
        ae = AE(ae_title="MODALITY-7")
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", port, ae_title="AI-NODE")
        assert assoc.is_established
        assoc.send_c_echo()
        assoc.release()
    finally:
        receiver.stop()
    assert accepted == ["MODALITY-7"]
