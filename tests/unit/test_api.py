"""REST API, read side (``GET /api/v1/...``) on the real app and a real catalog: pages, filters,
per-stage timestamps, 404/400 problems, and no patient data outside ``/studies/{id}/dicom``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import update

from node.schema import Study
from tests.unit.api_helpers import BIRTH_DATE, PATIENT_ID, PATIENT_NAME, PHI, SECRET, STUDY_UID, ApiNode, api_node


@pytest.fixture
def node(tmp_path: Path) -> Iterator[ApiNode]:
    with api_node(tmp_path) as n:
        yield n


def _problem(r: object, status: int, code: str) -> None:
    import httpx

    assert isinstance(r, httpx.Response)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json" and r.json()["code"] == code


def test_studies_page_with_stage_times_and_filters(node: ApiNode) -> None:
    r = node.get("/api/v1/studies")
    assert r.status_code == 200
    body = r.json()
    assert body["total"] == 2 and [s["state"] for s in body["items"]] == ["receiving", "routed"]  # newest first
    routed = body["items"][1]
    assert routed["id"] == node.study_id and routed["study_uid"] == STUDY_UID and routed["generation"] == 1
    assert routed["counts"] == {"series": 1, "instances": 2, "results": 2, "jobs": {"done": 1},
                                "deliveries": {"pending": 4}}
    times = routed["times"]
    assert (times["first_received_at"], times["last_received_at"], times["ready_at"], times["routed_at"]) == (
        100.0, 100.0, 130.0, 131.0)
    assert (times["first_enqueued_at"], times["jobs_started_at"], times["jobs_finished_at"]) == (132.0, 133.0, 140.0)
    assert times["delivered_at"] is None  # deliveries pending
    assert body["items"][0]["times"]["ready_at"] is None

    only = node.get("/api/v1/studies", state="routed", limit=1).json()
    assert only["total"] == 1 and [s["id"] for s in only["items"]] == [node.study_id] and only["limit"] == 1
    assert node.get("/api/v1/studies", limit=1, offset=1).json()["items"][0]["id"] == node.study_id
    assert node.get("/api/v1/studies", state="unrouted").json() == {"items": [], "total": 0, "limit": 50,
                                                                     "offset": 0}
    _problem(node.get("/api/v1/studies", state="nonsense"), 400, "invalid-parameters")
    _problem(node.get("/api/v1/studies", limit=0), 400, "invalid-parameters")
    _problem(node.get("/api/v1/studies", offset=-1), 400, "invalid-parameters")


def test_delivered_at_once_every_delivery_is_sent(node: ApiNode) -> None:
    for d, _r, _s in node.catalog.due_deliveries(1e9):
        node.catalog.delivery_sent(d.id, 150.0 + d.id)
    times = node.get(f"/api/v1/studies/{node.study_id}").json()["times"]
    assert times["delivered_at"] == 154.0


def test_study_detail(node: ApiNode) -> None:
    r = node.get(f"/api/v1/studies/{node.study_id}")
    assert r.status_code == 200
    body = r.json()
    [series] = body["series"]
    assert series["instance_count"] == 2 and series["attributes"]["Modality"] == "CT"
    assert series["attributes"]["CallingAETitle"] == "SCANNER" and series["attributes"]["BodyPartExamined"] == "CHEST"
    [job] = body["jobs"]
    assert job["model"] == "ct-hu-segmentation" and job["model_version"] == "1.1.0" and job["state"] == "done"
    assert [r["kind"] for r in body["results"]] == ["SEG", "SR"]
    assert sorted((d["kind"], d["destination"]) for d in body["deliveries"]) == [
        ("SEG", "pacs"), ("SEG", "web"), ("SR", "pacs"), ("SR", "web")]
    _problem(node.get("/api/v1/studies/999"), 404, "not-found")
    _problem(node.get("/api/v1/studies/abc"), 400, "invalid-parameters")


def test_only_the_dicom_route_returns_patient_attributes(node: ApiNode) -> None:
    r = node.get(f"/api/v1/studies/{node.study_id}/dicom")
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    body = r.json()
    attrs = body["attributes"]
    assert body["source"] == "catalog"
    assert attrs["00100010"]["Value"][0]["Alphabetic"] == PATIENT_NAME
    assert attrs["00100020"]["Value"] == [PATIENT_ID] and attrs["00100030"]["Value"] == [BIRTH_DATE]
    assert attrs["0020000D"]["Value"] == [STUDY_UID]
    _problem(node.get("/api/v1/studies/999/dicom"), 404, "not-found")

    every_other = ["/api/v1/studies", f"/api/v1/studies/{node.study_id}", "/api/v1/jobs",
                   f"/api/v1/jobs/{node.job_id}", "/api/v1/deliveries", "/api/v1/deliveries/1",
                   "/api/v1/destinations", "/api/v1/models", "/metrics", "/openapi.json"]
    for path in every_other:
        r = node.get(path)
        assert r.status_code == 200, path
        for value in PHI:
            assert value not in r.text, (path, value)


def test_dicom_route_reads_a_spooled_instance_for_an_older_study(node: ApiNode) -> None:
    """A study recorded before the catalog kept its attributes: they come from its first instance."""
    with node.catalog.session() as s:
        s.execute(update(Study).where(Study.id == node.study_id).values(dicom=None))
    body = node.get(f"/api/v1/studies/{node.study_id}/dicom").json()
    assert body["source"] == "instance"
    assert body["attributes"]["00100010"]["Value"][0]["Alphabetic"] == PATIENT_NAME
    assert body["attributes"]["0020000D"]["Value"] == [STUDY_UID]


def test_jobs(node: ApiNode) -> None:
    body = node.get("/api/v1/jobs").json()
    assert body["total"] == 1
    [job] = body["items"]
    assert job["id"] == node.job_id and job["attempts"] == 1 and job["worker"] == "host:1"
    assert job["times"]["load_seconds"] == 1.5 and job["times"]["infer_seconds"] == 3.0
    assert job["times"]["encode_seconds"] == 2.0 and job["times"]["started_at"] == 133.0
    assert node.get("/api/v1/jobs", state="done", model="ct-hu-segmentation").json()["total"] == 1
    assert node.get("/api/v1/jobs", state="failed").json()["total"] == 0
    assert node.get("/api/v1/jobs", model="ct-emphysema").json()["total"] == 0
    assert node.get("/api/v1/jobs", study=node.study_id).json()["total"] == 1
    assert node.get(f"/api/v1/jobs/{node.job_id}").json() == job
    _problem(node.get("/api/v1/jobs/999"), 404, "not-found")
    _problem(node.get("/api/v1/jobs", state="bogus"), 400, "invalid-parameters")


def test_deliveries(node: ApiNode) -> None:
    body = node.get("/api/v1/deliveries", limit=3).json()
    assert body["total"] == 4 and len(body["items"]) == 3
    web = node.get("/api/v1/deliveries", destination="web").json()
    assert web["total"] == 2 and {d["destination"] for d in web["items"]} == {"web"}
    assert node.get("/api/v1/deliveries", state="sent").json()["total"] == 0
    one = node.get("/api/v1/deliveries/1").json()
    assert one["id"] == 1 and one["state"] == "pending" and one["study_id"] == node.study_id
    assert one["job_id"] == node.job_id and one["destination_paused"] is False
    _problem(node.get("/api/v1/deliveries/999"), 404, "not-found")
    _problem(node.get("/api/v1/deliveries", state="lost"), 400, "invalid-parameters")


def test_destinations_without_secrets(node: ApiNode) -> None:
    r = node.get("/api/v1/destinations")
    assert r.status_code == 200
    pacs, web = r.json()
    assert (pacs["name"], pacs["type"], pacs["ae_title"], pacs["port"]) == ("pacs", "dimse", "PACS", 104)
    assert web["url"] == "https://pacs.example/dicom-web" and web["auth"] == "basic"
    assert pacs["paused"] is False and pacs["deliveries"] == {"pending": 2}
    for secret in (SECRET, "pw-in-url", "password"):
        assert secret not in r.text


def test_models_from_the_manifests(node: ApiNode) -> None:
    models = {m["name"]: m for m in node.get("/api/v1/models").json()}
    seg = models["ct-hu-segmentation"]
    assert seg["version"] == "1.2.0" and seg["family"] == "segmentation" and seg["modalities"] == ["CT"]
    assert seg["rules"] == ["ct"] and seg["queue"] == "cpu" and seg["runtime"] == "classical"
    assert models["ct-emphysema"]["queue"] == "slow" and models["ct-emphysema"]["rules"] == []
    assert models["dl-ct-segmentation"]["runtime"] == "torch"


def test_openapi_documents_the_api(node: ApiNode) -> None:
    spec = node.get("/openapi.json").json()
    paths = spec["paths"]
    for path in ("/api/v1/studies", "/api/v1/studies/{study_id}", "/api/v1/studies/{study_id}/dicom",
                 "/api/v1/jobs/{job_id}/retry", "/api/v1/destinations/{name}/pause", "/metrics"):
        assert path in paths, path
    schemas = spec["components"]["schemas"]
    assert {"StudySummary", "StudyDetail", "JobOut", "DeliveryOut", "DestinationOut", "ModelOut"} <= set(schemas)
    assert "patient" not in str(schemas["StudySummary"]).lower()
