"""REST API actions (``POST /api/v1/...``): retry a job or a delivery, rerun a study, pause and resume
a destination; each with its 404/409/400 problem."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from node.policy import JobPolicy
from node.schema import DeliveryState, JobState
from tests.unit.api_helpers import ApiNode, api_node


@pytest.fixture
def node(tmp_path: Path) -> Iterator[ApiNode]:
    with api_node(tmp_path) as n:
        yield n


def _problem(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json" and r.json()["code"] == code


def test_retry_a_failed_job(node: ApiNode) -> None:
    _problem(node.post(f"/api/v1/jobs/{node.job_id}/retry"), 409, "not-retryable")  # done
    node.catalog.rerun_study(node.study_id, 150.0)
    node.catalog.claim_job(node.job_id, 151.0, worker="h:1", policy=JobPolicy())
    node.catalog.finish_job(node.job_id, JobState.FAILED, 152.0, error="ModelError: broken")
    r = node.post(f"/api/v1/jobs/{node.job_id}/retry")
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["state"] == "queued" and job["attempts"] == 0 and job["error"] is None
    assert job["times"]["started_at"] is None and job["times"]["finished_at"] is None
    _problem(node.post(f"/api/v1/jobs/{node.job_id}/retry"), 409, "not-retryable")  # queued now
    _problem(node.post("/api/v1/jobs/999/retry"), 404, "not-found")
    _problem(node.post("/api/v1/jobs/x/retry"), 400, "invalid-parameters")


def test_retry_a_pending_delivery(node: ApiNode) -> None:
    node.catalog.delivery_failed(1, "connection refused", next_attempt_at=900.0, now=140.0)
    node.now[0] = 300.0
    r = node.post("/api/v1/deliveries/1/retry")
    assert r.status_code == 200, r.text
    assert r.json()["next_attempt_at"] == 300.0 and r.json()["first_attempt_at"] == 140.0
    assert 1 in {d.id for d, _r, _s in node.catalog.due_deliveries(300.0)}
    node.catalog.delivery_sent(1, 301.0)
    _problem(node.post("/api/v1/deliveries/1/retry"), 409, "not-retryable")
    _problem(node.post("/api/v1/deliveries/999/retry"), 404, "not-found")


def test_rerun_queues_the_current_jobs_with_fresh_attempts(node: ApiNode) -> None:
    r = node.post(f"/api/v1/studies/{node.study_id}/rerun")
    assert r.status_code == 202, r.text
    assert r.json() == {"study_id": node.study_id, "generation": 1, "jobs": [node.job_id]}
    job = node.catalog.get_job(node.job_id)
    assert job is not None and (job.state, job.attempts, job.generation) == (JobState.QUEUED, 0, 1)
    assert job.first_enqueued_at is None and job.started_at is None
    assert job.model_version == "1.1.0"  # the version of the results still in place
    _problem(node.post(f"/api/v1/studies/{node.study_id}/rerun"), 409, "nothing-to-rerun")  # already queued


def test_rerun_one_model_creates_its_job(node: ApiNode) -> None:
    r = node.post(f"/api/v1/studies/{node.study_id}/rerun", json={"model": "ct-emphysema"})
    assert r.status_code == 202, r.text
    [new_id] = r.json()["jobs"]
    job = node.catalog.get_job(new_id)
    assert job is not None and job.model == "ct-emphysema" and job.rule == "api-rerun"
    assert job.state == JobState.QUEUED and job.generation == 1 and job.destinations == ["pacs", "web"]
    seg = node.catalog.get_job(node.job_id)
    assert seg is not None and seg.state == JobState.DONE  # the other model's job is left alone
    _problem(node.post(f"/api/v1/studies/{node.study_id}/rerun", json={"model": "ct-emphysema"}), 409,
             "nothing-to-rerun")


def test_rerun_problems(node: ApiNode) -> None:
    _problem(node.post("/api/v1/studies/999/rerun"), 404, "not-found")
    _problem(node.post(f"/api/v1/studies/{node.study_id}/rerun", json={"model": "no-such-model"}), 404,
             "unknown-model")
    receiving = node.get("/api/v1/studies", state="receiving").json()["items"][0]["id"]
    _problem(node.post(f"/api/v1/studies/{receiving}/rerun"), 409, "not-routed")
    _problem(node.post(f"/api/v1/studies/{node.study_id}/rerun", json={"modle": "x"}), 400, "invalid-parameters")


def test_pause_and_resume_a_destination(node: ApiNode) -> None:
    node.catalog.delivery_failed(1, "refused", next_attempt_at=5000.0, now=140.0)  # in backoff
    r = node.post("/api/v1/destinations/pacs/pause")
    assert r.status_code == 200 and r.json()["paused"] is True
    assert [d["paused"] for d in node.get("/api/v1/destinations").json()] == [True, False]
    assert node.get("/api/v1/deliveries/1").json()["destination_paused"] is True
    due = {d.destination for d, _r, _s in node.catalog.due_deliveries(1000.0, skip_paused=True)}
    assert due == {"web"}
    node.now[0] = 1000.0
    r = node.post("/api/v1/destinations/pacs/resume")
    assert r.status_code == 200 and r.json()["paused"] is False
    due_pacs = [d for d, _r, _s in node.catalog.due_deliveries(1000.0, skip_paused=True) if d.destination == "pacs"]
    assert len(due_pacs) == 2 and all(d.state == DeliveryState.PENDING for d in due_pacs)  # backoff cut short
    _problem(node.post("/api/v1/destinations/nowhere/pause"), 404, "not-found")
    _problem(node.post("/api/v1/destinations/nowhere/resume"), 404, "not-found")
