"""Fault injection with real processes and signals on loopback: the node loses nothing it
acknowledged, every job ends exactly once, and bad luck never stops it. Each test is bounded in time.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless

from node.catalog import Catalog, Instance, Job
from testkit.dicom import write_ct_series
from testkit.harness import (
    VENV_BIN,
    Orthanc,
    Redis,
    c_store,
    free_port,
    kill_group,
    node_config,
    port_open,
    start_node_process,
    stop_process,
    storescu,
    tool_env,
    wait_for,
)
from testkit.phantom import make_ct_phantom

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]


@dataclass
class Node:
    """One node under test: its config, process(es), and a view of its catalog."""

    workdir: Path
    orthanc: Orthanc
    port: int
    config: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def storage(self) -> Path:
        return self.workdir / "node-storage"

    def start(self, *, worker: bool = False) -> Node:
        self.procs.append(start_node_process(self.config, "run", "node.log", port=self.port))
        if worker:
            self.start_worker()
        return self

    def start_worker(self) -> None:
        self.procs.append(start_node_process(self.config, "worker", "worker.log"))

    def kill(self) -> None:
        for p in self.procs:
            kill_group(p)
        self.procs.clear()

    def stop(self) -> None:
        for p in reversed(self.procs):
            stop_process(p)
            if p.poll() is None or p.returncode != 0:
                kill_group(p)  # and any embedded worker left in its group
        self.procs.clear()

    def reconfigure(self, overrides: dict[str, Any]) -> None:
        """Replace top-level sections of the node's YAML (before start)."""
        cfg = yaml.safe_load(self.config.read_text())
        self.config.write_text(yaml.safe_dump({**cfg, **overrides}))

    def catalog(self) -> Catalog:
        return Catalog.for_storage(self.storage)

    def jobs(self) -> list[Job]:
        return self.catalog().jobs_in_state("queued", "running", "done", "failed", "skipped", "superseded")

    def log(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.workdir.glob("*.log")))

    def results_in_pacs(self, study_uid: str) -> dict[str, int]:
        mods = self.orthanc.modalities_of_study(study_uid)
        return {k: v for k, v in mods.items() if k in ("SEG", "SR")}

    def wait_results(self, study_uid: str, n: int = 1, timeout: float = 240) -> None:
        try:
            wait_for(lambda: self.results_in_pacs(study_uid) == {"SEG": n, "SR": n}, timeout, interval=0.3,
                     what=f"{n} SEG + {n} SR")
        except TimeoutError:
            print(self.log()[-5000:])
            raise


def make_node(tmp_path: Path, overrides: dict[str, Any] | None = None, *, quiet: float = 2.0,
              broker_url: str = "", embedded_workers: bool = True) -> Node:
    port = free_port()
    (tmp_path / "pacs").mkdir(exist_ok=True)
    orthanc = Orthanc(tmp_path / "pacs", node_port=port).start()
    base = {"queue": {"job_retry_initial_seconds": 0.5, "job_retry_max_seconds": 1}}
    cfg = node_config(tmp_path, node_port=port, orthanc=orthanc, quiet_seconds=quiet, broker_url=broker_url,
                      embedded_workers=embedded_workers, overrides={**base, **(overrides or {})})
    return Node(tmp_path, orthanc, port, cfg)


@pytest.fixture
def cleanup() -> Iterator[list[Any]]:
    things: list[Any] = []
    yield things
    for t in reversed(things):
        t.stop()


def phantom_series(tmp_path: Path, name: str, *, n: int = 40, size: int = 96, seed: int = 1, **kw: Any) -> list[Path]:
    phantom = make_ct_phantom(n_slices=n, rows=size, cols=size, pixel_mm=384 / size, slice_mm=2.0, seed=seed)
    return write_ct_series(phantom, tmp_path / name, uid_seed=f"{name}-{seed}", **kw)


def study_of(files: list[Path]) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def test_node_sigkill_during_500_instance_push(tmp_path: Path, cleanup: list[Any]) -> None:
    node = make_node(tmp_path, quiet=8.0)
    cleanup += [node.orthanc, node]
    node.start()
    files = phantom_series(tmp_path, "big", n=500, size=64)
    acked: dict[str, int] = {}
    sender = threading.Thread(target=lambda: acked.update(c_store(node.port, files)))
    sender.start()
    # 160 stored: the acknowledgements lag the files by at most the one request in flight
    wait_for(lambda: len(list((node.storage / "instances").rglob("*.dcm"))) >= 160, 180, what="160 stored")
    node.kill()  # SIGKILL the node and its embedded worker mid-push
    sender.join(30)
    ok = {uid for uid, st in acked.items() if st == 0}
    assert 150 <= len(ok) < 500, len(ok)

    node.start()  # restart on the same storage: everything acknowledged is there, intact
    with node.catalog().session() as s:
        stored = {i.sop_instance_uid: i.path for i in s.query(Instance)}
    assert ok <= set(stored)
    for uid in ok:
        ds = pydicom.dcmread(node.storage / stored[uid])
        assert len(ds.PixelData) == ds.Rows * ds.Columns * 2
    assert list((node.storage / "tmp").iterdir()) == []  # half-written files cleaned up

    again = c_store(node.port, files)  # the scanner resends the whole study
    assert set(again.values()) == {0}
    assert node.catalog().counts()["instances"]["total"] == 500  # no duplicates
    node.wait_results(study_of(files))
    time.sleep(3)
    assert [j.state for j in node.jobs()] == ["done"]  # exactly one result set
    assert node.results_in_pacs(study_of(files)) == {"SEG": 1, "SR": 1}


def test_worker_sigkill_during_inference(tmp_path: Path, cleanup: list[Any]) -> None:
    node = make_node(tmp_path)
    cleanup += [node.orthanc, node]
    node.start()
    files = phantom_series(tmp_path, "slow", n=160, size=384)
    assert storescu(node.port, tmp_path / "slow").returncode == 0

    def running_worker() -> int | None:
        jobs = [j for j in node.jobs() if j.state == "running" and j.worker]
        return int(jobs[0].worker.rpartition(":")[2]) if jobs else None  # type: ignore[union-attr]

    pid = wait_for(running_worker, 60, interval=0.05, what="a running job")
    time.sleep(0.5)  # inside load/inference
    os.kill(pid, signal.SIGKILL)
    node.wait_results(study_of(files))
    [job] = node.jobs()
    assert job.state == "done" and job.attempts == 2
    time.sleep(2)
    assert node.results_in_pacs(study_of(files)) == {"SEG": 1, "SR": 1}


def test_redis_restart_with_queued_jobs(tmp_path: Path, cleanup: list[Any]) -> None:
    redis = Redis(tmp_path).start()
    cleanup.append(redis)
    node = make_node(tmp_path, {"queue": {"job_retry_initial_seconds": 0.5, "job_retry_max_seconds": 1,
                                          "in_flight": {"cpu": 2}}},  # both jobs sent before a worker runs
                     broker_url=redis.url, embedded_workers=False)
    cleanup += [node.orthanc, node]
    node.start()  # no worker yet: jobs wait in Redis
    series = [phantom_series(tmp_path, f"s{i}", seed=i) for i in range(2)]
    for i in range(2):
        assert storescu(node.port, tmp_path / f"s{i}").returncode == 0
    wait_for(lambda: len([j for j in node.jobs() if j.enqueued_at]) == 2, 60, what="2 jobs in Redis")
    assert redis.proc is not None
    redis.proc.kill()  # crash: only the append-only file keeps the queue
    redis.proc.wait()
    redis.start()
    node.start_worker()
    for files in series:
        node.wait_results(study_of(files))
    assert sorted(j.state for j in node.jobs()) == ["done", "done"]


@pytest.mark.parametrize("door", ["dimse", "dicomweb"])
def test_pacs_down_then_back(tmp_path: Path, cleanup: list[Any], door: str) -> None:
    """Results wait, retried with backoff, while the PACS is down, and all arrive when it is back:
    by C-STORE, and by STOW-RS to Orthanc's DICOMweb plugin."""
    node = make_node(tmp_path)
    if door == "dicomweb":
        node.reconfigure({"destinations": [{"name": "pacs", "type": "dicomweb",
                                            "url": node.orthanc.url("/dicom-web")}]})
    cleanup += [node.orthanc, node]
    node.orthanc.stop()
    node.start()
    files = phantom_series(tmp_path, "p")
    assert storescu(node.port, tmp_path / "p").returncode == 0

    def retrying() -> bool:  # SEG, SR, key images and PDF: every one pending and retried
        d = node.catalog().due_deliveries(float("inf"))
        return len(d) >= 4 and len(d) == node.catalog().counts()["results"]["total"] and all(
            x.attempts >= 2 for x, _, _ in d)

    wait_for(retrying, 120, what="deliveries failing and retried")
    n = node.catalog().counts()["results"]["total"]
    node.orthanc.start()
    node.wait_results(study_of(files))
    wait_for(lambda: node.catalog().counts()["deliveries"] == {"sent": n}, 30, what="deliveries marked sent")
    assert sum(node.orthanc.modalities_of_study(study_of(files)).values()) == n


def test_split_study_and_duplicate_push_give_one_job(tmp_path: Path, cleanup: list[Any]) -> None:
    node = make_node(tmp_path, quiet=3.0)
    cleanup += [node.orthanc, node]
    node.start()
    files = phantom_series(tmp_path, "split", n=30)
    for chunk in (files[:10], files[10:20], files[20:]):
        assert set(c_store(node.port, chunk).values()) == {0}
        time.sleep(1.0)  # pauses shorter than the quiet period
    node.wait_results(study_of(files))
    assert c_store(node.port, files[:5]) and True  # a duplicate push after processing
    time.sleep(5)
    assert [j.state for j in node.jobs()] == ["done"]
    assert node.catalog().counts()["instances"]["total"] == 30


def _poison(files: list[Path]) -> None:
    """Make a series whose JPEG 2000 pixel data cannot be decoded (valid DICOM, bad codestream)."""
    for f in files:
        ds = pydicom.dcmread(f)
        ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + os.urandom(200)])
        ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
        ds["PixelData"].VR = "OB"
        ds.save_as(f, enforce_file_format=True)


def test_poison_study_fails_bounded_and_node_stays_healthy(tmp_path: Path, cleanup: list[Any]) -> None:
    node = make_node(tmp_path, {"queue": {"job_max_attempts": 3}})
    cleanup += [node.orthanc, node]
    node.start()
    bad = phantom_series(tmp_path, "poison", n=12)
    _poison(bad)
    assert storescu(node.port, tmp_path / "poison", "-xv").returncode == 0
    wait_for(lambda: [j.state for j in node.jobs()] == ["failed"], 120, what="the job in failed state")
    [job] = node.jobs()
    assert job.attempts == 3 and job.error and "Error" in job.error
    status = subprocess.run([str(VENV_BIN / "dicom-node"), "status", "--failed", "--json", "-c", str(node.config)],
                            capture_output=True, text=True, env=tool_env(), check=True)
    assert [j["id"] for j in json.loads(status.stdout)["failed_jobs"]] == [job.id]
    good = phantom_series(tmp_path, "good", seed=7)  # the node keeps working
    assert storescu(node.port, tmp_path / "good").returncode == 0
    node.wait_results(study_of(good))
    assert port_open(node.port)


def test_late_instance_reruns_and_supersedes(tmp_path: Path, cleanup: list[Any]) -> None:
    node = make_node(tmp_path)
    cleanup += [node.orthanc, node]
    node.start()
    files = phantom_series(tmp_path, "late", n=31)
    study = study_of(files)
    assert set(c_store(node.port, files[:30]).values()) == {0}
    node.wait_results(study)
    first = {r.kind: r.sop_instance_uid for r in _results(node) if r.kind in ("SEG", "SR", "DOC")}
    assert set(c_store(node.port, files[30:]).values()) == {0}  # one slice arrives after processing
    node.wait_results(study, n=2)  # the rerun's objects join the same result series
    jobs = sorted(node.jobs(), key=lambda j: j.generation)
    assert [(j.generation, j.state) for j in jobs] == [(1, "done"), (2, "done")]
    latest = {r.kind: r.sop_instance_uid for r in _results(node)
              if r.job_id == jobs[1].id and r.kind in ("SEG", "SR", "DOC")}
    assert set(latest) == {"SEG", "SR", "DOC"} and not set(latest.values()) & set(first.values())
    def counts() -> tuple[int, ...]:
        series = {s["MainDicomTags"]["Modality"]: len(s["Instances"]) for s in node.orthanc.series_of_study(study)}
        return series.get("SEG", 0), series.get("SR", 0), series.get("DOC", 0)

    wait_for(lambda: counts() == (2, 2, 2), 60, what="each result series holding both runs")
    [new_sr] = [pydicom.dcmread(io.BytesIO(b)) for b in node.orthanc.instance_files(study, "SR")
                if pydicom.dcmread(io.BytesIO(b)).SOPInstanceUID == latest["SR"]]
    ref = new_sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == first["SR"]  # the rerun's SR supersedes the first


def _results(node: Node) -> list[Any]:
    from node.catalog import Result

    with node.catalog().session() as s:
        return list(s.query(Result))
