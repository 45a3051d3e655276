"""Retrospective batches against a real Orthanc and a real node (``dicom-node run``, embedded broker and workers).

Orthanc holds three small CT studies of January 2026, a CT study of December 2025 and an MR study of January
(neither may match ``Modality=CT StudyDate=20260101-20260131``). The site's rules would run ct-emphysema on
CT; the batch runs ct-hu-segmentation only, at priority offpeak, and its SEG and SR go back to Orthanc.
The second test SIGKILLs the node (with its workers) once the first study is retrieved and checks that
the restarted node finishes the batch without retrieving that study again and without duplicate jobs.
"""

from __future__ import annotations

import re
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pydicom.uid import MRImageStorage, generate_uid

from node.batch_store import BatchStore
from node.catalog import Catalog
from node.config import load_settings
from node.schema import JobState
from testkit.dicom import write_ct_series
from testkit.harness import (
    VENV_BIN,
    Orthanc,
    bearer,
    create_token,
    free_port,
    kill_group,
    node_config,
    start_node_process,
    stop_process,
    wait_for,
)
from testkit.phantom import make_ct_phantom
from tests.dsfactory import ct_slice, encode

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

QUERY = "Modality=CT StudyDate=20260101-20260131"
MODEL = "ct-hu-segmentation"


def _upload(orthanc: Orthanc, data: bytes) -> None:
    req = urllib.request.Request(orthanc.url("/instances"), data=data, method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200


def _archive(tmp_path: Path, orthanc: Orthanc) -> list[str]:
    """Orthanc's studies; returns the UIDs of the three that match :data:`QUERY`."""
    matching = []
    for k, date in enumerate(("20260105", "20260112", "20260130", "20251231")):
        phantom = make_ct_phantom(n_slices=12, rows=64, cols=64, pixel_mm=5.0, slice_mm=5.0, seed=k, nodules=0)
        files = write_ct_series(phantom, tmp_path / f"ct{k}", uid_seed=f"batch-{k}", patient_id=f"BATCH-{k}",
                                patient_name="Batch^Archive")
        for f in files:
            ct = pydicom.dcmread(f)
            ct.StudyDate = date
            _upload(orthanc, encode(ct))
        if date.startswith("2026"):
            matching.append(str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID))
    study, series = generate_uid(), generate_uid()
    for z in range(3):  # an MR study of January: not matched
        ds = ct_slice(study, series, z=float(z))
        ds.Modality, ds.StudyDate = "MR", "20260115"
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        _upload(orthanc, encode(ds))
    return matching


def _node(tmp_path: Path, orthanc: Orthanc, node_port: int) -> Path:
    return node_config(tmp_path, node_port=node_port, orthanc=orthanc, quiet_seconds=2.0, models=("ct-emphysema",),
                       overrides={"batch": {"poll_seconds": 0.2, "timeout_seconds": 60}})


def _api(config: Path) -> str:
    return f"http://127.0.0.1:{load_settings(config).http.port}/api/v1"


def _batch(config: Path, token: str, batch_id: int = 1) -> dict[str, Any]:
    r = httpx.get(f"{_api(config)}/batches/{batch_id}", headers=bearer(token), timeout=10)
    r.raise_for_status()
    return dict(r.json())


def _jobs(config: Path) -> list[tuple[str, str, str, int]]:
    """(model, priority, state, study id) of every job in the node's catalog."""
    catalog = Catalog.for_settings(load_settings(config))
    try:
        return sorted((j.model, j.priority, str(j.state), j.study_id) for j in catalog.jobs_in_state(*JobState))
    finally:
        catalog.close()


def _results_in_orthanc(orthanc: Orthanc, uids: list[str]) -> bool:
    return all({"SEG", "SR"} <= set(orthanc.modalities_of_study(u)) for u in uids)


def _wait_done(config: Path, token: str, orthanc: Orthanc, uids: list[str], log: Path) -> dict[str, Any]:
    try:
        wait_for(lambda: _batch(config, token)["state"] == "done", 150, what="the batch done")
        wait_for(lambda: _results_in_orthanc(orthanc, uids), 60, what="SEG + SR of every study in Orthanc")
    except TimeoutError:
        print(log.read_text()[-6000:])
        raise
    return _batch(config, token)


def test_a_batch_retrieves_the_matching_studies_runs_its_model_and_sends_the_results(tmp_path: Path) -> None:
    node_port = free_port()
    orthanc = Orthanc(tmp_path, node_port=node_port).start()
    proc = None
    try:
        matching = _archive(tmp_path, orthanc)
        config = _node(tmp_path, orthanc, node_port)
        proc = start_node_process(config, "run", "node.log", port=node_port)
        token = create_token(config, "viewer")
        out = subprocess.run([str(VENV_BIN / "dicom-node"), "batch", "--query", QUERY, "--source", "pacs",
                              "--model", MODEL, "--rate", "3600", "--anytime", "--config", str(config)],
                             capture_output=True, text=True, timeout=60, check=False)
        assert out.returncode == 0, out.stderr
        assert re.match(r"batch #1 (pending|running): ct-hu-segmentation", out.stdout)
        body = _wait_done(config, token, orthanc, matching, tmp_path / "node.log")
        assert body["counts"] == {"done": 3} and body["total"] == body["finished"] == 3
        assert body["started_at"] is not None and body["estimated_finish_at"] is None
        listed = httpx.get(f"{_api(config)}/batches", headers=bearer(token), timeout=10).json()
        assert [b["id"] for b in listed["items"]] == [1]
        refused = httpx.post(f"{_api(config)}/batches", headers=bearer(token), timeout=10,
                             json={"query": QUERY, "source": "pacs", "model": MODEL})
        assert refused.status_code == 403  # a viewer may not create a batch
        page = httpx.get(f"http://127.0.0.1:{load_settings(config).http.port}/ops", headers=bearer(token), timeout=10)
        assert page.status_code == 200 and 'data-batch="1"' in page.text and "3/3" in page.text
    finally:
        if proc is not None:
            stop_process(proc)
        orthanc.stop()
    jobs = _jobs(config)
    assert [(m, p, s) for m, p, s, _ in jobs] == [(MODEL, "offpeak", "done")] * 3  # no ct-emphysema (the rules)
    assert len({study for *_, study in jobs}) == 3
    logs = (tmp_path / "node.log").read_text()
    assert "BATCH-0" not in logs and "Batch^Archive" not in logs and "20260105" not in logs


def test_a_batch_resumes_after_the_node_is_killed(tmp_path: Path) -> None:
    node_port = free_port()
    orthanc = Orthanc(tmp_path, node_port=node_port).start()
    proc = None
    try:
        matching = _archive(tmp_path, orthanc)
        config = _node(tmp_path, orthanc, node_port)
        proc = start_node_process(config, "run", "node.log", port=node_port)
        token = create_token(config, "operator")
        created = httpx.post(f"{_api(config)}/batches", headers=bearer(token), timeout=10,
                             json={"query": QUERY, "source": "pacs", "model": MODEL, "rate_per_hour": 400,
                                   "anytime": True})  # one retrieval every 9 s
        assert created.status_code == 201, created.text
        assert created.json()["state"] == "pending" and created.json()["destinations"] == ["pacs"]
        wait_for(lambda: _batch(config, token)["counts"].get("retrieved"), 60, interval=0.1,
                 what="the first study retrieved")
        kill_group(proc)  # the node and its workers, at once
        proc = None
        assert _batch_offline(config).get("pending") == 2  # one retrieved (maybe routed already), two to go
        proc = start_node_process(config, "run", "node.log", port=node_port)
        body = _wait_done(config, token, orthanc, matching, tmp_path / "node.log")
        assert body["counts"] == {"done": 3}
    finally:
        if proc is not None:
            stop_process(proc)
        orthanc.stop()
    logs = (tmp_path / "node.log").read_text()
    retrieved = re.findall(r"batch #1: entry (\d+) retrieved", logs)
    assert sorted(retrieved) == ["1", "2", "3"]  # each study retrieved once, across the restart
    jobs = _jobs(config)
    assert [(m, p, s) for m, p, s, _ in jobs] == [(MODEL, "offpeak", "done")] * 3  # none superseded, none twice


def _batch_offline(config: Path) -> dict[str, int]:
    """Studies of batch 1 by state, read from the catalog while the node is down."""
    catalog = Catalog.for_settings(load_settings(config))
    try:
        return BatchStore(catalog).counts([1])[1]
    finally:
        catalog.close()
