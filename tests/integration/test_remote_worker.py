"""Remote workers: ``dicom-node worker`` on a host with neither the catalog nor the spool (a ``remote:``
section, its own storage dir, a ``catalog.url`` that cannot be opened), a node on Redis with Orthanc as
its destination; real processes, storescu, sockets. Also: a remote worker SIGKILLed mid-job (its
heartbeat goes quiet, the node queues the job again, a second worker finishes it, the first one's late
results are refused), and de-identification checked on the bytes that reach the worker.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from sqlalchemy import select

from node.catalog import Catalog
from node.config_ops import RemoteSettings
from node.job_results import ResultObject
from node.schema import Job, JobState, Result, WorkerHeartbeat
from testkit.dicom import write_ct_series
from testkit.harness import (
    Orthanc,
    Redis,
    create_token,
    free_port,
    kill_group,
    node_config,
    start_node_process,
    stop_process,
    storescu,
    wait_for,
)
from testkit.phantom import make_ct_phantom
from testkit.proxy import RecordingProxy
from workers.remote import NodeClient
from workers.source import ClaimedJob

pytestmark = pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in ("redis-server", "Orthanc", "storescu")),
    reason="needs redis-server, Orthanc and dcmtk's storescu")

RESULT_MODALITIES = ("SEG", "SR")
_REDIS_DBS = itertools.count(1)
"""Each test's Redis database (the server is the module's)."""


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Redis]:
    server = Redis(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@dataclass
class Stack:
    """A node (``dicom-node run``, no embedded workers) on Redis with Orthanc, and remote workers."""

    workdir: Path
    broker_url: str
    node_overrides: dict[str, Any] = field(default_factory=dict)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self) -> Stack:
        self.node_port, self.http_port = free_port(), free_port()
        self.orthanc = Orthanc(self.workdir, node_port=self.node_port).start()
        self.config = node_config(self.workdir, node_port=self.node_port, orthanc=self.orthanc,
                                  broker_url=self.broker_url, embedded_workers=False, http_port=self.http_port,
                                  overrides={"queue": {"job_retry_initial_seconds": 0}, **self.node_overrides})
        self.token_file = self.workdir / "worker.token"
        self.token_file.write_text(create_token(self.config, "worker", "remote-workers"))
        self.token_file.chmod(0o600)
        self.procs.append(start_node_process(self.config, "run", "node.log", port=self.node_port))
        wait_for(lambda: self.catalog_path().exists(), 30, what="the node's catalog")
        self.catalog = Catalog.for_storage(self.workdir / "node-storage")
        return self

    def catalog_path(self) -> Path:
        return self.workdir / "node-storage" / "catalog.sqlite3"

    def stop(self) -> None:
        for p in reversed(self.procs):
            stop_process(p)
        self.orthanc.stop()

    def remote_settings(self, port: int | None = None, name: str = "remote-a") -> dict[str, Any]:
        return {"node_url": f"http://127.0.0.1:{port or self.http_port}", "token_file": str(self.token_file),
                "name": name}

    def worker(self, name: str, port: int | None = None) -> tuple[subprocess.Popen[bytes], Path]:
        """Start ``dicom-node worker --config worker-<name>.yaml`` reaching the node at ``port`` (default its
        HTTP port); returns the process and the worker's own storage dir."""
        storage = self.workdir / f"worker-{name}"
        cfg = {
            "node": {"storage_dir": str(storage)},
            "queue": {"broker_url": self.broker_url},
            "catalog": {"url": f"sqlite:///{self.workdir}/no-such-dir/catalog.sqlite3"},
            "remote": self.remote_settings(port, name),
        }
        path = self.workdir / f"worker-{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        proc = start_node_process(path, "worker", f"worker-{name}.log")
        self.procs.append(proc)
        return proc, storage

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in self.workdir.glob("*.log"))

    def jobs(self) -> list[Job]:
        return sorted(self.catalog.jobs_in_state(*JobState), key=lambda j: j.id)

    def results_of(self, study_uid: str) -> dict[str, int]:
        mods = self.orthanc.modalities_of_study(study_uid)
        return {m: mods.get(m, 0) for m in RESULT_MODALITIES}

    def wait_results(self, study_uid: str, timeout: float = 120) -> None:
        try:
            wait_for(lambda: all(self.results_of(study_uid).values()), timeout, interval=0.25,
                     what="SEG and SR in Orthanc")
        except TimeoutError:
            print(self.logs())
            raise


@pytest.fixture
def stack(request: pytest.FixtureRequest, tmp_path: Path, redis: Redis) -> Iterator[Stack]:
    db = next(_REDIS_DBS)
    s = Stack(tmp_path, redis.url.replace("/0", f"/{db}"), getattr(request, "param", {})).start()
    yield s
    s.stop()


def _series(tmp_path: Path, name: str, **attributes: str) -> tuple[Path, list[pydicom.Dataset]]:
    """A small CT phantom series (12 slices of 64 x 64), ``attributes`` set on every slice."""
    out = tmp_path / "in" / name
    paths = write_ct_series(make_ct_phantom(n_slices=12, rows=64, cols=64, pixel_mm=5.0, nodules=0), out,
                            patient_id=attributes.get("PatientID", name), uid_seed=name)
    datasets: list[pydicom.Dataset] = []
    for p in paths:
        ds = pydicom.dcmread(p)
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
        ds.save_as(p, enforce_file_format=True)
        datasets.append(ds)
    return out, datasets


def _push(stack: Stack, series: Path) -> None:
    out = storescu(stack.node_port, series)
    assert out.returncode == 0, out.stderr


def test_remote_worker_runs_a_job_without_catalog_or_spool(stack: Stack, tmp_path: Path) -> None:
    worker, storage = stack.worker("remote-a")
    series, datasets = _series(tmp_path, "REMOTE1")
    _push(stack, series)
    pushed = time.monotonic()
    study_uid = str(datasets[0].StudyInstanceUID)
    stack.wait_results(study_uid)
    print(f"pushed -> SEG+SR in Orthanc through a remote worker: {time.monotonic() - pushed:.1f} s (2 s quiet)")
    assert worker.poll() is None, stack.logs()  # never opened the unreachable catalog
    [job] = stack.jobs()
    assert job.state == JobState.DONE and job.attempts == 1
    assert job.worker is not None and job.worker.startswith("remote-a:")
    assert job.model_version and job.load_seconds is not None  # the worker's timings, recorded by the node
    with stack.catalog.reading() as s:
        hosts = set(s.scalars(select(WorkerHeartbeat.host)))
    assert "remote-a" in hosts  # its heartbeat came through the API
    with stack.catalog.reading() as s:
        kinds = set(s.scalars(select(Result.kind).where(Result.job_id == job.id)))
    assert {"SEG", "SR", "DOC"} <= kinds  # identified inputs: the PDF report is made too
    assert not (tmp_path / "no-such-dir").exists()
    wait_for(lambda: not [p for p in storage.rglob("*") if p.is_file()], 10, what="the worker's files removed")
    assert (storage / "remote-jobs").is_dir()


@pytest.mark.parametrize("stack", [{"queue": {"worker_lost_seconds": 10}}], indirect=True)
def test_a_vanished_worker_job_runs_elsewhere_exactly_once(stack: Stack, tmp_path: Path) -> None:
    proxy = RecordingProxy(stack.http_port, hold_after=b"/claim HTTP").start()  # the claim's answer never comes
    try:
        worker_a, _ = stack.worker("remote-a", port=proxy.port)
        series, datasets = _series(tmp_path, "LEASE1")
        _push(stack, series)
        [claimed] = wait_for(lambda: [j for j in stack.jobs() if j.state == JobState.RUNNING], 60,
                             what="remote-a to claim the job")
        assert claimed.worker is not None and claimed.worker.startswith("remote-a:") and claimed.attempts == 1
        assert proxy.held.is_set()
        kill_group(worker_a)  # SIGKILL: the worker host vanishes
    finally:
        proxy.stop()
    _, _ = stack.worker("remote-b")
    study_uid = str(datasets[0].StudyInstanceUID)
    stack.wait_results(study_uid, timeout=90)
    [job] = stack.jobs()
    assert job.state == JobState.DONE and job.attempts == 2, job.error
    assert job.worker is not None and job.worker.startswith("remote-b:")
    assert claimed.started_at is not None and job.started_at is not None
    assert job.started_at - claimed.started_at >= 10  # not before remote-a's heartbeat was 10 s quiet
    print(f"remote-a claimed, then SIGKILLed; remote-b claimed {job.started_at - claimed.started_at:.1f} s later")
    with stack.catalog.reading() as s:
        kinds = list(s.scalars(select(Result.kind).where(Result.job_id == job.id)))
    in_orthanc = stack.results_of(study_uid)
    assert in_orthanc == {m: kinds.count(m) for m in RESULT_MODALITIES}  # one result set

    # remote-a's attempt comes back late: refused, nothing changes
    client = NodeClient(RemoteSettings.model_validate(stack.remote_settings()))
    stale = ClaimedJob(job.id, job.study_id, job.model, claimed.attempts, claimed.worker)
    seg = stack.orthanc.instance_files(study_uid, "SEG")[0]
    try:
        assert client.submit(stale, [ResultObject(seg)], {"attempt": stale.attempt, "worker": stale.worker,
                                                          "state": "done", "variants": [""]}) is False
        assert client.fail(stale, "retry", "came back") is None
    finally:
        client.close()
    after = stack.catalog.get_job(job.id)
    assert after is not None and (after.state, after.attempts, after.worker, after.error) == (
        JobState.DONE, 2, job.worker, job.error)
    assert stack.catalog.counts()["results"] == {"total": len(kinds)}
    assert stack.results_of(study_uid) == in_orthanc


IDENTITY = {
    "PatientName": "Zyxwvutsrq^Kjihgfedcb",
    "PatientID": "PID-88231-QZ",
    "PatientBirthDate": "19520823",
    "StudyDate": "20190314",
    "SeriesDate": "20190314",
    "AcquisitionDate": "20190314",
    "ContentDate": "20190314",
    "InstanceCreationDate": "20190314",
    "AccessionNumber": "ACC77104291",
    "InstitutionName": "Glenwood Memorial Hospital",
}


@pytest.mark.parametrize("stack", [{"remote_workers": {"deidentify": True}}], indirect=True)
def test_a_deidentifying_node_sends_no_identity_to_the_worker(stack: Stack, tmp_path: Path) -> None:
    proxy = RecordingProxy(stack.http_port).start()
    try:
        stack.worker("remote-a", port=proxy.port)
        series, datasets = _series(tmp_path, "DEID1", **IDENTITY)
        _push(stack, series)
        study_uid = str(datasets[0].StudyInstanceUID)
        stack.wait_results(study_uid)
    finally:
        proxy.stop()
    first = datasets[0]
    secrets = [IDENTITY[k] for k in ("PatientName", "PatientID", "PatientBirthDate", "StudyDate", "AccessionNumber",
                                     "InstitutionName")]
    secrets += IDENTITY["PatientName"].split("^")
    secrets += [str(first.StudyInstanceUID), str(first.SeriesInstanceUID), str(first.FrameOfReferenceUID)]
    secrets += [str(ds.SOPInstanceUID) for ds in datasets]
    received, sent = bytes(proxy.to_client), bytes(proxy.to_server)
    assert len(received) > 12 * 64 * 64 * 2  # every slice came through...
    for ds in datasets[:3]:
        assert bytes(ds.PixelData)[2048:4096] in received  # ...pixel data included
    leaked = [v for v in secrets if v.encode("latin-1") in received or v.encode("latin-1") in sent]
    print(f"recorded {len(received)} bytes node -> worker, {len(sent)} worker -> node; {len(secrets)} values sought")
    assert leaked == []

    [job] = stack.jobs()
    assert job.state == JobState.DONE and job.worker is not None and job.worker.startswith("remote-a:")
    with stack.catalog.reading() as s:
        own = set(s.scalars(select(Result.sop_instance_uid).where(Result.job_id == job.id)))
        kinds = set(s.scalars(select(Result.kind).where(Result.job_id == job.id)))
    assert {"SEG", "SR"} <= kinds and "DOC" not in kinds  # no PDF page: its text would show the shifted date
    originals = {str(ds.SOPInstanceUID) for ds in datasets}
    for modality in RESULT_MODALITIES:
        for data in stack.orthanc.instance_files(study_uid, modality):
            result = pydicom.dcmread(BytesIO(data))
            assert (result.PatientID, result.StudyInstanceUID) == (IDENTITY["PatientID"], str(first.StudyInstanceUID))
            assert str(result.PatientName) == IDENTITY["PatientName"]
            refs = _referenced_sop_uids(result)
            assert refs & originals and refs <= originals | own, (modality, refs - originals - own)


def _referenced_sop_uids(ds: pydicom.Dataset) -> set[str]:
    """Every Referenced SOP Instance UID anywhere in ``ds``."""
    out: set[str] = set()
    for elem in ds.iterall():
        if elem.keyword == "ReferencedSOPInstanceUID":
            out.add(str(elem.value))
    return out
