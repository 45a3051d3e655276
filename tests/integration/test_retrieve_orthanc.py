"""Prior retrieval against a real Orthanc: C-FIND, then C-MOVE (back through our SCP) or C-GET.

The node side is composed by hand (receiver on a real port, catalog, spool, assembler, retriever,
router) with a fake clock for the quiet period; retrieval runs synchronously in the test.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage, generate_uid
from pynetdicom import AE, evt

from node.assemble import Assembler
from node.catalog import Catalog
from node.config import Settings, parse_settings
from node.receive.scp import Receiver
from node.retrieve import STUDY_ROOT_FIND, PriorRetriever
from node.route import Router
from node.spool import Spool
from testkit.harness import NODE_AE, ORTHANC_AE, Orthanc, free_port
from tests.dsfactory import ct_slice, encode

PATIENT = "RETRIEVE-PAT-1"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _series(study_uid: str, date: str, n: int, modality: str = "CT") -> list[bytes]:
    series_uid = generate_uid()
    out = []
    for k in range(n):
        ds = ct_slice(study_uid, series_uid, z=float(k))
        ds.PatientID, ds.StudyDate, ds.StudyTime = PATIENT, date, "080000"
        if modality == "MR":
            ds.Modality = "MR"
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        out.append(encode(ds))
    return out


@dataclass
class Node:
    settings: Settings
    clock: Clock
    catalog: Catalog
    receiver: Receiver
    retriever: PriorRetriever
    assembler: Assembler
    router: Router

    def push(self, files: list[bytes]) -> None:
        for data in files:
            assert self.receiver.receive(data, "SCANNER").status == 0

    def tick(self) -> list[int]:
        self.clock.t += 10
        self.assembler.tick()
        jobs = self.router.route_ready()
        self.retriever.tick()  # acts on the jobs routing created awaiting their prior
        return jobs

    def study_states(self) -> dict[str, str]:
        return {s.study_uid: state for state in ("routed", "prior", "ready", "receiving")
                for s in self.catalog.studies_in_state(state)}


def _node(tmp_path: Path, node_port: int, pacs_port: int, method: str, timeout: float = 60) -> Node:
    settings = parse_settings({
        "node": {"ae_title": NODE_AE, "host": "127.0.0.1", "port": node_port, "storage_dir": str(tmp_path / "node"),
                 "min_free_mb": 0},
        "destinations": [{"name": "pacs", "type": "dimse", "ae_title": ORTHANC_AE, "host": "127.0.0.1",
                          "port": pacs_port}],
        "rules": [{"name": "ct", "match": {"Modality": "CT"}, "models": ["ct-registration"], "send_to": ["pacs"]}],
        "priors": {"source": "pacs", "method": method, "timeout_seconds": timeout},
    })
    clock = Clock()
    catalog = Catalog.for_storage(settings.node.storage_dir)
    spool = Spool(settings.node.storage_dir)
    receiver = Receiver(settings, catalog, spool, clock)
    retriever = PriorRetriever.from_settings(settings, catalog, spool, receiver.store, clock)
    assert retriever is not None
    retriever._submit = lambda task: task()  # synchronous: the test waits for the fetch
    return Node(settings, clock, catalog, receiver, retriever, Assembler(catalog, 5, clock),
                Router(catalog, settings.rules, clock, priors_from_pacs=True))


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    o = Orthanc(tmp_path / "orthanc", node_port=free_port())
    (tmp_path / "orthanc").mkdir()
    o.start()
    yield o
    o.stop()


def _upload(orthanc: Orthanc, files: list[bytes]) -> None:
    for data in files:
        req = urllib.request.Request(orthanc.url("/instances"), data=data, method="POST",
                                     headers={"Content-Type": "application/dicom"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200


@pytest.mark.parametrize("method", ["move", "get"])
def test_prior_retrieved_from_orthanc(tmp_path: Path, orthanc: Orthanc, method: str) -> None:
    prior_uid, older_uid, current_uid = generate_uid(), generate_uid(), generate_uid()
    prior_files = _series(prior_uid, "20230105", 6) + _series(prior_uid, "20230105", 2)  # two CT series
    _upload(orthanc, prior_files + _series(prior_uid, "20230105", 3, "MR") + _series(older_uid, "20190301", 2))
    node = _node(tmp_path, orthanc.node_port, orthanc.dicom_port, method)
    node.receiver.start()
    try:
        node.push(_series(current_uid, "20240210", 4))
        t0 = time.monotonic()
        jobs = node.tick()
        print(f"C-FIND + C-{method.upper()} of 8 instances: {time.monotonic() - t0:.2f} s")
    finally:
        node.receiver.stop()
    assert len(jobs) == 1
    job = node.catalog.get_job(jobs[0])
    assert job is not None and job.model == "ct-registration"
    prior = node.catalog.prior_series(job)
    assert prior is not None and prior.instance_count == 6
    fetch = node.catalog.prior_fetch(job.study_id, 1)
    assert fetch is not None and (fetch.state, fetch.prior_study_uid) == ("retrieved", prior_uid)
    for inst in node.catalog.instances_of_series(prior.id):  # spooled (fsynced) like any received instance
        assert node.retriever.spool.path(inst.path).is_file()
    assert node.catalog.counts()["instances"]["total"] == 4 + 8  # the current study + the prior's CT series only
    assert node.tick() == []  # the prior becomes "prior": no job, nothing sent for it
    assert node.study_states() == {current_uid: "routed", prior_uid: "prior"}
    assert node.catalog.counts()["jobs"] == {"queued": 1}


def test_pacs_down_routes_the_study_without_prior(tmp_path: Path) -> None:
    node = _node(tmp_path, free_port(), free_port(), "move")  # nothing listens on the PACS port
    node.push(_series(generate_uid(), "20240210", 3))
    t0 = time.monotonic()
    assert len(node.tick()) == 1
    assert time.monotonic() - t0 < 10
    [study] = node.catalog.studies_in_state("routed")
    fetch = node.catalog.prior_fetch(study.id, 1)
    assert fetch is not None and fetch.state == "failed" and "no association" in (fetch.note or "")


def test_silent_pacs_times_out(tmp_path: Path) -> None:
    """A PACS that accepts the association and never answers the C-FIND: aborted after the timeout."""
    ae = AE(ae_title="SILENT")
    ae.add_supported_context(STUDY_ROOT_FIND)
    release = time.monotonic() + 30

    def handle_find(event: Any) -> Iterator[tuple[int, Dataset | None]]:
        while time.monotonic() < release and event.assoc.is_established:
            time.sleep(0.05)
        yield 0x0000, None

    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_FIND, handle_find)])
    try:
        node = _node(tmp_path, free_port(), port, "move", timeout=1.5)
        node.push(_series(generate_uid(), "20240210", 3))
        t0 = time.monotonic()
        assert len(node.tick()) == 1
        took = time.monotonic() - t0
    finally:
        server.shutdown()
    assert 1.0 < took < 8
    [study] = node.catalog.studies_in_state("routed")
    fetch = node.catalog.prior_fetch(study.id, 1)
    assert fetch is not None and fetch.state == "failed" and "timed out" in (fetch.note or ""), fetch.note
