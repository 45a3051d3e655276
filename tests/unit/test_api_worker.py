"""The remote workers' API (``/api/v1/worker``) on the real app and a real SQLite catalog: claims, inputs
scoped to the attempt that holds the job, refused results, and de-identification's burned-in rule."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest

from node.catalog import Catalog, JobSpec
from node.config import parse_settings
from node.dicomweb.payload import multipart, multipart_type, new_boundary
from node.http.app import create_app
from node.http.auth import issue_token
from node.http.context import NodeContext
from node.http.server import HttpServer
from node.receive.scp import STATUS_SUCCESS, Receiver
from node.roles import Role
from node.schema import JobState
from node.spool import Spool
from tests.dsfactory import ct_slice, encode

CT = "1.2.840.10008.5.1.4.1.1.2"
STUDY = "1.2.826.0.1.77.1"
WORKER = "remote-a:42"


@dataclass
class Node:
    catalog: Catalog
    job_id: int
    http: httpx.Client
    now: list[float]

    def claim(self, worker: str = WORKER) -> httpx.Response:
        return self.http.post(f"/api/v1/worker/jobs/{self.job_id}/claim", json={"worker": worker})


@contextmanager
def node(tmp_path: Path, *, deidentify: bool = False, burned_in: tuple[str, ...] = ("NO", "NO")) -> Iterator[Node]:
    settings = parse_settings({"node": {"storage_dir": str(tmp_path), "min_free_mb": 0}, "http": {"port": 0},
                               "remote_workers": {"deidentify": deidentify}})
    catalog, spool, now = Catalog.for_storage(tmp_path), Spool(tmp_path), [100.0]
    receiver = Receiver(settings, catalog, spool, lambda: now[0])
    for i, burned in enumerate(burned_in):
        ds = ct_slice(STUDY, f"{STUDY}.1", f"{STUDY}.1.{i + 1}", z=float(i))
        ds.BurnedInAnnotation = burned
        assert receiver.store(encode(ds), CT, f"{STUDY}.1.{i + 1}", "SCANNER") == STATUS_SUCCESS
    [study_id] = catalog.mark_quiet_studies_ready(120.0, now=130.0)
    [series] = catalog.series_of_study(study_id)
    [job_id] = catalog.create_jobs(study_id, 1, [JobSpec(series.id, "ct-hu-segmentation", "ct", ())], 131.0)
    ctx = NodeContext(settings, catalog, spool, receiver, lambda: now[0], broker_reachable=lambda: True)
    server = HttpServer(create_app(ctx), "127.0.0.1", 0)
    token = issue_token(catalog, Role.WORKER)
    server.start()
    try:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=10) as http:
            yield Node(catalog, job_id, http, now)
    finally:
        server.stop()
        catalog.engine.dispose()


def _fence(attempt: int, worker: str = WORKER) -> dict[str, Any]:
    return {"attempt": attempt, "worker": worker}


def test_claim_then_inputs_of_that_attempt_only(tmp_path: Path) -> None:
    with node(tmp_path) as n:
        r = n.claim()
        assert r.status_code == 200, r.text
        claim = r.json()
        assert (claim["attempt"], claim["worker"], claim["model"]) == (1, WORKER, "ct-hu-segmentation")
        assert len(claim["inputs"]) == 2 and claim["prior"] is None and claim["predecessors"] == {}
        assert n.claim("remote-b:7").status_code == 409  # running elsewhere
        url = f"/api/v1/worker/jobs/{n.job_id}/inputs/{claim['inputs'][0]}"
        got = n.http.get(url, params=_fence(1))
        assert got.status_code == 200 and got.headers["content-type"] == "application/dicom"
        assert pydicom.dcmread(io.BytesIO(got.content)).SOPInstanceUID == f"{STUDY}.1.1"
        assert n.http.get(url, params=_fence(2)).status_code == 409
        assert n.http.get(url, params=_fence(1, "remote-b:7")).status_code == 409
        assert n.http.get(f"/api/v1/worker/jobs/{n.job_id}/inputs/999", params=_fence(1)).status_code == 404
        failed = n.http.post(f"/api/v1/worker/jobs/{n.job_id}/failure",
                             json={**_fence(1), "outcome": "retry", "reason": "OSError: disk"})
        assert failed.status_code == 200 and failed.json()["state"] == "queued"
        assert n.http.post(f"/api/v1/worker/jobs/{n.job_id}/failure",
                           json={**_fence(1), "outcome": "fail", "reason": "again"}).status_code == 409


def test_results_of_another_study_are_refused(tmp_path: Path) -> None:
    with node(tmp_path) as n:
        assert n.claim().status_code == 200
        foreign = encode(ct_slice("1.2.826.0.1.77.999", "1.2.826.0.1.77.999.1", "1.2.826.0.1.77.999.1.1"))
        boundary = new_boundary()
        summary = b'{"attempt": 1, "worker": "%s", "state": "done", "variants": [""]}' % WORKER.encode()
        body = b"".join(multipart([("application/json", lambda: [summary]),
                                   ("application/dicom", lambda: [foreign])], boundary))
        r = n.http.post(f"/api/v1/worker/jobs/{n.job_id}/results", content=body,
                        headers={"Content-Type": multipart_type("application/dicom", boundary)})
        assert r.status_code == 400, r.text
        job = n.catalog.get_job(n.job_id)
        assert job is not None and job.state == JobState.RUNNING and n.catalog.counts()["results"] == {"total": 0}


def test_an_operator_may_not_claim(tmp_path: Path) -> None:
    with node(tmp_path) as n:
        operator = issue_token(n.catalog, Role.OPERATOR)
        r = n.http.post(f"/api/v1/worker/jobs/{n.job_id}/claim", json={"worker": WORKER},
                        headers={"Authorization": f"Bearer {operator}"})
        assert r.status_code == 403
        job = n.catalog.get_job(n.job_id)
        assert job is not None and job.state == JobState.QUEUED


@pytest.mark.parametrize(("burned_in", "inputs"), [(("NO", "YES"), 1), (("YES", "YES"), 0)])
def test_deidentification_leaves_burned_in_images_out(tmp_path: Path, burned_in: tuple[str, ...],
                                                     inputs: int) -> None:
    with node(tmp_path, deidentify=True, burned_in=burned_in) as n:
        r = n.claim()
        job = n.catalog.get_job(n.job_id)
        assert job is not None
        if inputs == 0:
            assert r.status_code == 409 and r.json()["code"] == "skipped"
            assert job.state == JobState.SKIPPED and job.error is not None and "burned-in" in job.error
            return
        claim = r.json()
        assert len(claim["inputs"]) == inputs
        got = n.http.get(f"/api/v1/worker/jobs/{n.job_id}/inputs/{claim['inputs'][0]}", params=_fence(1))
        ds = pydicom.dcmread(io.BytesIO(got.content))
        assert ds.PatientIdentityRemoved == "YES" and ds.StudyInstanceUID != STUDY
        assert STUDY.encode() not in got.content and b"Test^Patient" not in got.content


def test_a_deidentifying_node_asks_for_no_pdf_and_refuses_one(tmp_path: Path) -> None:
    with node(tmp_path, deidentify=True) as n:
        claim = n.claim().json()
        assert claim["leave_out"] == ["PDF"]
        got = n.http.get(f"/api/v1/worker/jobs/{n.job_id}/inputs/{claim['inputs'][0]}", params=_fence(1))
        seen = pydicom.dcmread(io.BytesIO(got.content))
        pdf = encode(ct_slice(str(seen.StudyInstanceUID), "2.25.1", "2.25.2"))
        ds = pydicom.dcmread(io.BytesIO(pdf))
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.EncapsulatedPDFStorage
        boundary = new_boundary()
        summary = b'{"attempt": 1, "worker": "%s", "state": "done", "variants": [""]}' % WORKER.encode()
        body = b"".join(multipart([("application/json", lambda: [summary]),
                                   ("application/dicom", lambda: [encode(ds)])], boundary))
        r = n.http.post(f"/api/v1/worker/jobs/{n.job_id}/results", content=body,
                        headers={"Content-Type": multipart_type("application/dicom", boundary)})
        assert r.status_code == 400 and r.json()["code"] == "bad-result", r.text
        assert n.catalog.counts()["results"] == {"total": 0}
    with node(tmp_path / "plain") as n:
        assert n.claim().json()["leave_out"] == []
