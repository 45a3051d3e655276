"""A remote worker's way to the node: the worker API (``/api/v1/worker``, :mod:`node.http.api_worker`)
over httpx, with a token of role ``worker`` (``remote.token_file``). Such a worker host has the broker
URL, the node's URL and the token; it never opens the catalog nor reads the node's spool.

:class:`NodeClient` is the HTTP client (and a heartbeat sink: :mod:`workers.heartbeat`);
:class:`RemoteSource` is the pipeline's :class:`workers.source.JobSource` over it. A job's inputs are
downloaded into ``<node.storage_dir>/remote-jobs/<pid>-<job>-<attempt>/`` and removed when the attempt
ends. HTTP 409 from the node means this attempt no longer holds the job (fencing): its results or
outcome are dropped.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Hashable, Sequence
from dataclasses import asdict
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import pydicom
from pydicom.dataset import Dataset

from node.catalog_ops import JobTimings
from node.config import Settings
from node.config_ops import RemoteSettings
from node.dicomweb.payload import multipart, multipart_type, new_boundary
from node.job_results import Outcome, ResultObject
from node.policy import pid_alive, worker_identity
from node.schema import JobState
from node.worker_beats import Beat
from workers.source import ClaimedJob

log = logging.getLogger("workers.remote")

API = "/api/v1/worker"
JOBS_DIR = "remote-jobs"
"""Under ``node.storage_dir``: the inputs of the jobs running on this host, one directory per attempt."""


class NodeClient:
    """HTTP client of the node's worker API (one per worker process)."""

    def __init__(self, remote: RemoteSettings, *, transport: httpx.BaseTransport | None = None) -> None:
        token = remote.token_file.read_text(encoding="utf-8").strip()
        self.name = remote.name
        self.http = httpx.Client(base_url=remote.node_url.rstrip("/") + API, transport=transport,
                                 headers={"Authorization": f"Bearer {token}"}, timeout=remote.timeout_seconds,
                                 verify=str(remote.ca_file) if remote.ca_file is not None else True)

    def close(self) -> None:
        self.http.close()

    # ---- heartbeats (workers.heartbeat.BeatSink) ---------------------------------------------------
    def write_beat(self, beat: Beat, now: float) -> None:
        """The node writes the row with its own clock (``now`` is this host's, not used)."""
        self.http.post("/heartbeat", json=asdict(beat)).raise_for_status()

    def remove_beat(self, host: str, pid: int) -> None:
        self.http.post("/heartbeat/stopped", json={"host": host, "pid": pid}).raise_for_status()

    # ---- jobs --------------------------------------------------------------------------------------
    def claim(self, job_id: int, worker: str) -> dict[str, Any] | None:
        """The claimed job (attempt, model, input ids...); None when the node does not give it."""
        r = self.http.post(f"/jobs/{job_id}/claim", json={"worker": worker})
        if r.status_code == 409:
            return None
        r.raise_for_status()
        found = r.json()
        assert isinstance(found, dict)
        return found

    def download(self, job: ClaimedJob, kind: str, object_id: str, dest: Path) -> None:
        """Stream input ``object_id`` (``inputs`` or ``predecessors``) of the job into ``dest``."""
        with self.http.stream("GET", f"/jobs/{job.id}/{kind}/{object_id}", params=_fence(job)) as r:
            r.raise_for_status()
            with dest.open("wb") as f:
                for chunk in r.iter_bytes():
                    f.write(chunk)

    def fetch(self, job: ClaimedJob, kind: str, object_id: str) -> bytes:
        r = self.http.get(f"/jobs/{job.id}/{kind}/{object_id}", params=_fence(job))
        r.raise_for_status()
        return r.content

    def submit(self, job: ClaimedJob, objects: Sequence[ResultObject], summary: dict[str, Any]) -> bool:
        """POST the results (multipart/related: the JSON summary, then each object, its variant listed in
        the summary's ``variants``); False on 409."""
        boundary = new_boundary()
        parts = [("application/json", lambda: [json.dumps(summary).encode()])]
        parts += [("application/dicom", _body(o.data)) for o in objects]
        body = b"".join(multipart(parts, boundary))
        r = self.http.post(f"/jobs/{job.id}/results", content=body,
                           headers={"Content-Type": multipart_type("application/dicom", boundary)})
        if r.status_code == 409:
            return False
        r.raise_for_status()
        return True

    def fail(self, job: ClaimedJob, outcome: Outcome, reason: str) -> JobState | None:
        r = self.http.post(f"/jobs/{job.id}/failure", json={**_fence(job), "outcome": outcome, "reason": reason})
        if r.status_code == 409:
            return None
        r.raise_for_status()
        return JobState(r.json()["state"])


def _body(data: bytes) -> Any:
    return lambda: [data]


def _fence(job: ClaimedJob) -> dict[str, Any]:
    return {"attempt": job.attempt, "worker": job.worker}


def _pid_of(name: str) -> int | None:
    head = name.partition("-")[0]
    return int(head) if head.isdigit() else None


class RemoteSource:
    """The pipeline's job source on a worker host without the catalog and the spool."""

    def __init__(self, settings: Settings, client: NodeClient) -> None:
        self.client = client
        self.worker = worker_identity(client.name)
        self.root = settings.node.storage_dir / JOBS_DIR
        self.root.mkdir(parents=True, exist_ok=True)
        self._claims: dict[int, dict[str, Any]] = {}
        for d in self.root.iterdir():  # left by a worker process killed mid-job
            pid = _pid_of(d.name)
            if pid is not None and not pid_alive(pid):
                shutil.rmtree(d, ignore_errors=True)

    def _dir(self, job: ClaimedJob) -> Path:
        return self.root / f"{os.getpid()}-{job.id}-{job.attempt}"

    def claim(self, job_id: int) -> ClaimedJob | None:
        found = self.client.claim(job_id, self.worker)
        if found is None:
            return None
        job = ClaimedJob(job_id, int(found["study_id"]), str(found["model"]), int(found["attempt"]), self.worker,
                         leave_out=frozenset(found.get("leave_out", ())))
        self._claims[job_id] = found
        self._dir(job).mkdir(parents=True, exist_ok=True)
        return job

    def _download(self, job: ClaimedJob, ids: list[str], sub: str) -> list[Path]:
        folder = self._dir(job) / sub
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for n, object_id in enumerate(ids):
            path = folder / f"{n:06d}.dcm"
            self.client.download(job, "inputs", object_id, path)
            paths.append(path)
        return paths

    def series_key(self, job: ClaimedJob) -> Hashable | None:
        """The node and the ids of the series' instances it gives (a stored instance's file never changes)."""
        return ("remote", str(self.client.http.base_url), tuple(str(i) for i in self._claims[job.id]["inputs"]))

    def inputs(self, job: ClaimedJob) -> list[Path]:
        return self._download(job, [str(i) for i in self._claims[job.id]["inputs"]], "series")

    def prior_inputs(self, job: ClaimedJob) -> list[Path] | None:
        prior = self._claims[job.id].get("prior")
        return None if prior is None else self._download(job, [str(i) for i in prior], "prior")

    def predecessor(self, job: ClaimedJob, variant: str) -> Dataset | None:
        object_id = (self._claims[job.id].get("predecessors") or {}).get(variant)
        if object_id is None:
            return None
        return pydicom.dcmread(BytesIO(self.client.fetch(job, "predecessors", str(object_id))))

    def submit(self, job: ClaimedJob, objects: Sequence[ResultObject], *, state: JobState = JobState.DONE,
               reason: str | None = None, timings: JobTimings | None = None) -> bool:
        summary = {**_fence(job), "state": state.value, "reason": reason, "variants": [o.variant for o in objects],
                   "timings": None if timings is None else timings._asdict()}
        return self.client.submit(job, objects, summary)

    def end_attempt(self, job: ClaimedJob, outcome: Outcome, reason: str) -> JobState | None:
        return self.client.fail(job, outcome, reason)

    def release(self, job: ClaimedJob) -> None:
        self._claims.pop(job.id, None)
        shutil.rmtree(self._dir(job), ignore_errors=True)

