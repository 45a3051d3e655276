"""A node with a seeded catalog behind the real HTTP app on a loopback port, for the REST API and
metrics tests: one routed study (two CT slices with patient attributes, one done job with a SEG and
an SR, a delivery of each to two destinations) and one study still receiving."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from node.catalog import Catalog, JobSpec, ResultFile
from node.catalog_ops import JobTimings
from node.config import Settings, parse_settings
from node.http.app import create_app
from node.http.auth import issue_token
from node.http.context import NodeContext
from node.http.server import HttpServer
from node.metrics import NodeMetrics
from node.policy import JobPolicy
from node.receive.scp import STATUS_SUCCESS, Receiver
from node.roles import Role
from node.spool import Spool
from tests.dsfactory import ct_slice, encode
from tests.httpkit import bearer

CT = "1.2.840.10008.5.1.4.1.1.2"
PATIENT_NAME = "Quimby^Wilhelmina"
PATIENT_ID = "PID-4711-XQ"
BIRTH_DATE = "19610203"
PHI = (PATIENT_NAME, "Quimby", PATIENT_ID, BIRTH_DATE)
SECRET = "hunter2-not-for-you"
STUDY_UID = "1.2.826.0.1.99.1"


@dataclass
class ApiNode:
    settings: Settings
    catalog: Catalog
    spool: Spool
    receiver: Receiver
    metrics: NodeMetrics
    server: HttpServer
    now: list[float]
    study_id: int
    job_id: int
    tokens: dict[Role, str]
    """A token of each role, in the catalog."""
    auth: dict[str, str]
    """The Authorization header :meth:`get` and :meth:`post` send: an operator's (reads, actions, metrics)."""

    def get(self, path: str, **params: Any) -> httpx.Response:
        return httpx.get(f"{self.server.url}{path}", params=params, headers=self.auth, timeout=10)

    def post(self, path: str, json: Any = None) -> httpx.Response:
        return httpx.post(f"{self.server.url}{path}", json=json, headers=self.auth, timeout=10)


def settings_for(tmp_path: Path) -> Settings:
    secret = tmp_path / "password.txt"
    secret.write_text(SECRET)
    return parse_settings({
        "node": {"storage_dir": str(tmp_path), "min_free_mb": 0},
        "http": {"port": 0},
        "destinations": [
            {"name": "pacs", "type": "dimse", "ae_title": "PACS", "host": "127.0.0.1", "port": 104},
            {"name": "web", "type": "dicomweb", "url": "https://ai:pw-in-url@pacs.example/dicom-web",
             "username": "ai", "password_file": str(secret)},
        ],
        "rules": [{"name": "ct", "match": {"Modality": "CT"}, "models": ["ct-hu-segmentation"],
                   "send_to": ["pacs", "web"]}],
        "models": {"ct-emphysema": {"queue": "slow"}},
    })


def phi_slice(series_uid: str, sop_uid: str, z: float = 0.0) -> bytes:
    ds = ct_slice(STUDY_UID, series_uid, sop_uid, z=z)
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = PATIENT_NAME, PATIENT_ID, BIRTH_DATE
    ds.StudyDescription = "CHEST CT"
    return encode(ds)


@contextmanager
def api_node(tmp_path: Path) -> Iterator[ApiNode]:
    settings = settings_for(tmp_path)
    catalog, spool = Catalog.for_storage(tmp_path), Spool(tmp_path)
    now = [100.0]
    metrics = NodeMetrics(settings, catalog, spool)
    receiver = Receiver(settings, catalog, spool, lambda: now[0], on_answered=metrics.answered,
                        on_accepted=metrics.accepted)
    for i in range(2):
        uid = f"{STUDY_UID}.1.{i + 1}"
        assert receiver.store(phi_slice(f"{STUDY_UID}.1", uid, z=float(i)), CT, uid, "SCANNER") == STATUS_SUCCESS
    [study_id] = catalog.mark_quiet_studies_ready(120.0, now=130.0)
    now[0] = 200.0  # a second study, still receiving
    other = ct_slice("1.2.826.0.1.99.2", "1.2.826.0.1.99.2.1", "1.2.826.0.1.99.2.1.1")
    assert receiver.store(encode(other), CT, "1.2.826.0.1.99.2.1.1", "OTHER-AE") == STATUS_SUCCESS
    [series] = catalog.series_of_study(study_id)
    [job_id] = catalog.create_jobs(study_id, 1, [JobSpec(series.id, "ct-hu-segmentation", "ct", ("pacs", "web"))],
                                   131.0)
    catalog.mark_enqueued(job_id, 132.0)
    assert catalog.claim_job(job_id, 133.0, worker="host:1", policy=JobPolicy()) is not None
    results = [ResultFile("SEG", "2.25.901", "1.2.840.10008.5.1.4.1.1.66.4", "results/a/seg.dcm"),
               ResultFile("SR", "2.25.902", "1.2.840.10008.5.1.4.1.1.88.34", "results/a/sr.dcm")]
    catalog.record_results(job_id, results, ["pacs", "web"], 140.0)
    catalog.record_job_timings(job_id, JobTimings(1.5, 3.0, 2.0, "1.1.0"), 140.0)
    ctx = NodeContext(settings, catalog, spool, receiver, lambda: now[0], broker_reachable=lambda: True,
                      metrics=metrics)
    server = HttpServer(create_app(ctx), "127.0.0.1", 0)
    tokens = {role: issue_token(catalog, role) for role in Role}
    server.start()
    try:
        yield ApiNode(settings, catalog, spool, receiver, metrics, server, now, study_id, job_id, tokens,
                      bearer(tokens[Role.OPERATOR]))
    finally:
        server.stop()
        catalog.engine.dispose()
