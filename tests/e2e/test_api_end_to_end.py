"""End to end through the REST API and /metrics: storescu -> dicom-node (embedded worker) -> Orthanc,
then the operator's view and actions over HTTP: per-stage timestamps without patient data, a rerun
that replaces the results in the PACS, a paused destination holding a rerun's deliveries until
resumed, a retried job, and the Prometheus metrics of it all."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families

from models import registry
from testkit.dicom import write_ct_series
from testkit.harness import (
    Orthanc,
    bearer,
    create_token,
    free_port,
    node_config,
    start_node_process,
    stop_process,
    storescu,
    wait_for,
)
from testkit.phantom import make_ct_phantom

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

PATIENT_NAME, PATIENT_ID = "Apiwatch^Rosalind", "API-PID-0042"
N_SLICES = 30


@dataclass
class ApiStack:
    workdir: Path
    node_port: int
    api: str
    orthanc: Orthanc
    auth: dict[str, str]
    """An operator's token (``dicom-node token create``): API reads and actions, metrics."""

    def get(self, path: str, **params: Any) -> Any:
        r = httpx.get(f"{self.api}{path}", params=params, headers=self.auth, timeout=30)
        assert r.status_code == 200, (path, r.text)
        return r.json()

    def post(self, path: str, json: Any = None) -> httpx.Response:
        return httpx.post(f"{self.api}{path}", json=json, headers=self.auth, timeout=30)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = httpx.get(f"{self.api}/metrics", headers=self.auth, timeout=30).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.workdir.glob("*.log")))


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[ApiStack]:
    node_port, http_port = free_port(), free_port()
    orthanc = Orthanc(tmp_path, node_port=node_port).start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        rules = [{"name": "ct", "match": {"Modality": "CT"}, "models": ["ct-hu-segmentation"], "send_to": ["pacs"]},
                 # no prior in the catalog and no priors: section: this job is skipped, to be retried
                 {"name": "reg", "match": {"Modality": "CT"}, "models": ["ct-registration"], "send_to": ["pacs"]}]
        cfg = node_config(tmp_path, node_port=node_port, orthanc=orthanc, quiet_seconds=2.0, http_port=http_port,
                          overrides={"rules": rules})
        procs.append(start_node_process(cfg, "run", "node.log", port=node_port))
        stack = ApiStack(tmp_path, node_port, f"http://127.0.0.1:{http_port}", orthanc,
                         bearer(create_token(cfg, "operator")))
        wait_for(lambda: httpx.get(f"{stack.api}/healthz", timeout=2).status_code == 200, 60, what="HTTP service")
        yield stack
    finally:
        for p in reversed(procs):
            stop_process(p)
        orthanc.stop()


def _wait(stack: ApiStack, predicate: Any, timeout: float, what: str) -> Any:
    try:
        return wait_for(predicate, timeout, interval=0.25, what=what)
    except (TimeoutError, AssertionError):
        print(stack.logs()[-6000:])
        raise


def _job(stack: ApiStack, model: str) -> dict[str, Any]:
    [job] = stack.get("/api/v1/jobs", model=model)["items"]
    return dict(job)


def _seg_deliveries(stack: ApiStack, job_id: int) -> list[dict[str, Any]]:
    return [d for d in stack.get("/api/v1/deliveries", destination="pacs", limit=500)["items"] if d["job_id"] == job_id]


def _sent_times(stack: ApiStack, job_id: int, attempts: int) -> bool:
    """None pending, and every delivery sent has been sent ``attempts`` times (a LABELMAP set that
    Orthanc does not take is not-needed, without an attempt of its own)."""
    deliveries = _seg_deliveries(stack, job_id)
    return bool(deliveries) and all(d["state"] != "pending" for d in deliveries) and all(
        d["attempts"] == attempts for d in deliveries if d["state"] == "sent")


def test_api_rerun_pause_retry_and_metrics(stack: ApiStack, tmp_path: Path) -> None:
    phantom = make_ct_phantom(n_slices=N_SLICES, rows=128, cols=128, pixel_mm=3.0, seed=8)
    files = write_ct_series(phantom, tmp_path / "ct", patient_id=PATIENT_ID, patient_name=PATIENT_NAME,
                            uid_seed="api-e2e")
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    assert storescu(stack.node_port, tmp_path / "ct").returncode == 0
    _wait(stack, lambda: all(stack.orthanc.modalities_of_study(study_uid).get(m, 0) >= 1
                             for m in ("SEG", "SR", "OT", "DOC")), 240, "results in Orthanc")

    # the study with every per-stage time set, and no patient data in the listing
    def finished() -> dict[str, Any] | None:
        items = stack.get("/api/v1/studies")["items"]
        return items[0] if items and all(v is not None for v in items[0]["times"].values()) else None

    study = _wait(stack, finished, 120, "every stage time of the study")
    assert study["study_uid"] == study_uid and study["state"] == "routed"
    assert study["counts"]["instances"] == N_SLICES and study["counts"]["jobs"] == {"done": 1, "skipped": 1}
    t = study["times"]
    assert (t["first_received_at"] <= t["last_received_at"] < t["ready_at"] <= t["routed_at"] <= t["first_enqueued_at"]
            <= t["jobs_started_at"] <= t["jobs_finished_at"])
    assert t["jobs_started_at"] < t["delivered_at"]
    listing = httpx.get(f"{stack.api}/api/v1/studies", headers=stack.auth, timeout=30).text
    detail = httpx.get(f"{stack.api}/api/v1/studies/{study['id']}", headers=stack.auth, timeout=30).text
    for text in (listing, detail):
        assert PATIENT_NAME not in text and "Apiwatch" not in text and PATIENT_ID not in text
    phi = stack.get(f"/api/v1/studies/{study['id']}/dicom")["attributes"]
    assert phi["00100010"]["Value"][0]["Alphabetic"] == PATIENT_NAME  # only when asked for

    seg = _job(stack, "ct-hu-segmentation")
    assert seg["model_version"] == registry.manifest("ct-hu-segmentation").version
    assert seg["times"]["infer_seconds"] > 0
    assert _sent_times(stack, seg["id"], 1)
    n_seg = stack.orthanc.modalities_of_study(study_uid)["SEG"]

    m = stack.metrics()
    assert m[("dicom_node_received_instances_total", (("calling_ae", "SCANNER"), ("door", "dimse")))] == N_SLICES
    assert m[("dicom_node_received_bytes_total", (("calling_ae", "SCANNER"), ("door", "dimse")))] > 0
    assert m[("dicom_node_store_statuses_total", (("door", "dimse"), ("status", "0x0000")))] == N_SLICES
    assert m[("dicom_node_associations_accepted_total", (("calling_ae", "SCANNER"),))] >= 1
    for stage in ("load", "infer", "encode"):
        assert m[("dicom_node_job_stage_seconds_count", (("model", "ct-hu-segmentation"), ("stage", stage)))] >= 1
    assert m[("dicom_node_deliveries", (("destination", "pacs"), ("state", "sent")))] >= 1
    assert m[("dicom_node_study_turnaround_seconds_count", ())] == 1

    # rerun: the results are sent again and replace the earlier ones (same UIDs)
    r = stack.post(f"/api/v1/studies/{study['id']}/rerun", json={"model": "ct-hu-segmentation"})
    assert r.status_code == 202 and r.json()["jobs"] == [seg["id"]], r.text
    _wait(stack, lambda: _sent_times(stack, seg["id"], 2), 180, "the rerun's deliveries")
    assert stack.orthanc.modalities_of_study(study_uid)["SEG"] == n_seg

    # paused: a rerun's deliveries stay pending until the destination is resumed
    assert stack.post("/api/v1/destinations/pacs/pause").json()["paused"] is True
    assert stack.post(f"/api/v1/studies/{study['id']}/rerun", json={"model": "ct-hu-segmentation"}).status_code == 202
    _wait(stack, lambda: _job(stack, "ct-hu-segmentation")["state"] == "done"
          and all(d["state"] == "pending" for d in _seg_deliveries(stack, seg["id"])), 180, "the held rerun")
    time.sleep(1.5)  # several passes of the delivery loop
    held = _seg_deliveries(stack, seg["id"])
    assert all(d["state"] == "pending" and d["destination_paused"] for d in held)
    assert {d["attempts"] for d in held} <= {0, 2}
    assert stack.post("/api/v1/destinations/pacs/resume").json()["paused"] is False
    _wait(stack, lambda: _sent_times(stack, seg["id"], 3), 120, "deliveries after resume")

    # a skipped job is retried on request
    reg = _job(stack, "ct-registration")
    assert reg["state"] == "skipped" and "earlier study" in (reg["error"] or "")
    r = stack.post(f"/api/v1/jobs/{reg['id']}/retry")
    assert r.status_code == 202 and r.json()["state"] == "queued" and r.json()["attempts"] == 0, r.text
    _wait(stack, lambda: _job(stack, "ct-registration")["state"] == "skipped", 120, "the retried job to end")
    assert stack.post(f"/api/v1/jobs/{seg['id']}/retry").json()["code"] == "not-retryable"

    m = stack.metrics()
    assert m[("dicom_node_jobs", (("model", "ct-registration"), ("state", "skipped")))] == 1
    assert m[("dicom_node_destination_paused", (("destination", "pacs"),))] == 0
    assert m[("dicom_node_queue_depth", (("queue", "cpu"),))] == 0
    logs = stack.logs()
    assert PATIENT_NAME not in logs and PATIENT_ID not in logs
