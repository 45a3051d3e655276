"""Batches over the REST API, the dashboard's operations page and the CLI (real HTTP app on loopback, real
SQLite catalog; tests/unit/api_helpers.py): create, list, show, cancel, permissions, problems, no patient data."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from node.batch_store import BatchStore
from node.cli import main
from node.roles import Role
from node.schema import BatchStudyState
from tests.httpkit import bearer
from tests.unit.api_helpers import ApiNode, api_node

BODY = {"query": "Modality=CT StudyDate=20260101-20260131", "source": "pacs", "model": "ct-hu-segmentation",
        "rate_per_hour": 6}


@pytest.fixture
def node(tmp_path: Path) -> Iterator[ApiNode]:
    with api_node(tmp_path) as n:
        yield n


def _problem(r: httpx.Response, status: int, code: str, detail: str = "") -> None:
    assert r.status_code == status, r.text
    assert r.json()["code"] == code and detail in r.json().get("detail", "")


def test_create_follow_and_cancel_a_batch(node: ApiNode) -> None:
    r = node.post("/api/v1/batches", BODY)
    assert r.status_code == 201, r.text
    b = r.json()
    assert b["id"] == 1 and b["state"] == "pending" and b["query"] == "ModalitiesInStudy=CT StudyDate=20260101-20260131"
    assert b["destinations"] == ["pacs"] and b["rate_per_hour"] == 6 and not b["anytime"]
    assert b["total"] == 0 and b["counts"] == {} and b["estimated_finish_at"] is None
    # the node's loop would store the C-FIND's list: three studies, one retrieved already
    store = BatchStore(node.catalog)
    assert store.store_found(1, [f"1.2.3.{i}" for i in range(3)], 100.0) == 3
    row = store.next_study(1)
    assert row is not None
    assert store.start_retrieval(row, None, 150.0)
    assert not store.start_retrieval(row, None, 151.0)  # claimed once
    store.set_study(row.id, BatchStudyState.RETRIEVED, 160.0, instances=12)
    b = node.get("/api/v1/batches/1").json()
    assert b["state"] == "running" and b["total"] == 3 and b["counts"] == {"pending": 2, "retrieved": 1}
    assert b["finished"] == 0 and b["started_at"] == b["last_retrieval_at"] == 150.0
    assert b["estimated_finish_at"] is not None and b["estimated_finish_at"] >= 150.0 + 600  # 6 an hour, 2 left
    assert "1.2.3.0" not in json.dumps(b)  # counts, never UIDs
    page = node.get("/api/v1/batches").json()
    assert page["total"] == 1 and [x["id"] for x in page["items"]] == [1]
    r = node.post("/api/v1/batches/1/cancel")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    assert r.json()["counts"] == {"skipped": 2, "retrieved": 1} and r.json()["finished_at"] == node.now[0]
    _problem(node.post("/api/v1/batches/1/cancel"), 409, "not-cancellable")
    _problem(node.post("/api/v1/batches/9/cancel"), 404, "not-found")
    _problem(node.get("/api/v1/batches/9"), 404, "not-found")


@pytest.mark.parametrize(("change", "detail"), [
    ({"query": "Modalty=CT"}, "unknown DICOM keyword 'Modalty' (did you mean Modality?)"),
    ({"source": "web"}, "must be a dimse destination"),
    ({"model": "nope"}, "unknown model 'nope'"),
    ({"send_to": ["elsewhere"]}, "unknown destinations"),
])
def test_an_invalid_batch_is_refused(node: ApiNode, change: dict[str, object], detail: str) -> None:
    _problem(node.post("/api/v1/batches", {**BODY, **change}), 422, "invalid-batch", detail)
    assert node.get("/api/v1/batches").json()["total"] == 0


def test_reading_needs_a_token_and_creating_an_operator(node: ApiNode) -> None:
    url = f"{node.server.url}/api/v1/batches"
    assert httpx.get(url, timeout=10).status_code == 401
    viewer = bearer(node.tokens[Role.VIEWER])
    assert httpx.get(url, headers=viewer, timeout=10).status_code == 200
    assert httpx.post(url, json=BODY, headers=viewer, timeout=10).status_code == 403
    assert httpx.post(f"{url}/1/cancel", headers=viewer, timeout=10).status_code == 403


def test_the_operations_page_shows_batches_by_counts(node: ApiNode) -> None:
    empty = httpx.get(f"{node.server.url}/ops", headers=node.auth, timeout=10)
    assert empty.status_code == 200 and "No batch" in empty.text
    _problem(node.post("/api/v1/batches", {**BODY, "query": "Modality=CT PatientID=PID-SECRET-1"}), 422,
             "invalid-batch", "PatientID: patient and visit identifiers are not accepted")
    assert node.post("/api/v1/batches", {**BODY, "query": "Modality=CT StudyDescription=SECRET*"}).status_code == 201
    page = httpx.get(f"{node.server.url}/ops", headers=node.auth, timeout=10).text
    assert 'data-batch="1"' in page and "ct-hu-segmentation" in page and "0/0" in page
    assert "SECRET" not in page  # counts only: the query is not shown on the dashboard


def test_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump({
        "node": {"storage_dir": str(tmp_path / "s"), "min_free_mb": 0},
        "destinations": [{"name": "pacs", "type": "dimse", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}],
    }))
    c = str(config)
    assert main(["batch", "--query", "Modality=CT StudyDate=20260101-20260131", "--source", "pacs",
                 "--model", "ct-hu-segmentation", "-c", c]) == 0
    assert "batch #1 pending: ct-hu-segmentation" in capsys.readouterr().out
    assert main(["batch", "create", "-q", "Modality=MR", "--source", "pacs", "--model", "mr-brain-segmentation",
                 "--rate", "2", "--anytime", "--json", "-c", c]) == 0
    created = json.loads(capsys.readouterr().out)
    assert created["id"] == 2 and created["rate_per_hour"] == 2 and created["anytime"]
    assert main(["batch", "create", "-q", "Modalty=CT", "--source", "pacs", "--model", "ct-hu-segmentation",
                 "-c", c]) == 2
    assert "unknown DICOM keyword 'Modalty'" in capsys.readouterr().err
    assert main(["batch", "list", "-c", c]) == 0
    listed = capsys.readouterr().out
    assert "mr-brain-segmentation" in listed and "ct-hu-segmentation" in listed
    assert main(["batch", "cancel", "1", "-c", c]) == 0
    assert main(["batch", "show", "1", "--json", "-c", c]) == 0
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1])["state"] == "cancelled"
    assert main(["batch", "cancel", "1", "-c", c]) == 1
    assert main(["batch", "show", "7", "-c", c]) == 1
