"""Multi-host tests on a private network of namespaces (issue 14): the receiver (node + API), Redis,
PostgreSQL and the PACS on hosts of their own, studies pushed from a scanner host, two remote worker
hosts with separate storage directories; one worker host vanishes mid-run (SIGKILL of all its
processes) and every study still ends with exactly one result set in Orthanc.

Figures are printed (``pytest -s``): push to last result, jobs per host, kill to re-run."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
import redis

from testkit.dicom import write_ct_series
from testkit.harness import wait_for
from testkit.netns import Network
from testkit.phantom import make_ct_phantom
from tests.multihost.cluster import MODEL, WORKER_LOST_SECONDS, Cluster, cluster

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

STUDIES = 6
SLICES = 12
WORKER_HOSTS = ("w1", "w2")
RESULT_MODALITIES = ("SEG", "SR", "DOC")
"""One result set of the model holds one SEG, one SR and one PDF (and its key images)."""


def _write_studies(root: Path, n: int) -> dict[str, Path]:
    """``n`` synthetic CT studies (different patients and UIDs): study UID -> series directory."""
    out = {}
    for i in range(n):
        d = root / f"study{i}"
        files = write_ct_series(make_ct_phantom(n_slices=SLICES, rows=128, cols=128, seed=100 + i, nodules=1), d,
                                patient_id=f"MH-{i:03d}")
        out[str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)] = d
    return out


def _host_of(job: dict[str, Any]) -> str:
    return str(job["worker"] or "").rpartition(":")[0]


@dataclass
class Run:
    """What :func:`_watch` saw of a run (monotonic times)."""

    jobs: list[dict[str, Any]] = field(default_factory=list)
    running_seen: dict[str, set[int]] = field(default_factory=lambda: {h: set() for h in WORKER_HOSTS})
    """Host -> jobs seen running there."""
    victim: str = ""
    victim_job: int = 0
    victim_pids_left: list[int] = field(default_factory=list)
    killed_at: float = 0.0
    reclaimed_by: str = ""
    reclaimed_at: float = 0.0
    victim_done_at: float = 0.0
    finished_at: float = 0.0


def _watch(c: Cluster, deadline: float) -> Run:
    """Poll the node's API until every job is done and every delivery sent; SIGKILL all processes of
    the first worker host that has finished a job and runs another, and time the re-run elsewhere."""
    run = Run()
    while time.monotonic() < deadline:
        jobs = c.jobs()
        now = time.monotonic()
        for j in jobs:
            if j["state"] == "running" and _host_of(j) in run.running_seen:
                run.running_seen[_host_of(j)].add(j["id"])
        if not run.victim:
            for host in WORKER_HOSTS:
                done = [j for j in jobs if j["state"] == "done" and _host_of(j) == host]
                running = [j for j in jobs if j["state"] == "running" and _host_of(j) == host]
                if done and running:
                    c.host(host).kill_all()
                    run.killed_at, run.victim, run.victim_job = time.monotonic(), host, running[0]["id"]
                    run.victim_pids_left = c.host(host).pids()
                    break
        else:
            [vj] = [j for j in jobs if j["id"] == run.victim_job]
            if not run.reclaimed_at and vj["state"] == "running" and _host_of(vj) not in ("", run.victim):
                run.reclaimed_at, run.reclaimed_by = now, _host_of(vj)
            if not run.victim_done_at and vj["state"] == "done":
                run.victim_done_at = now
                run.reclaimed_at = run.reclaimed_at or now
                run.reclaimed_by = run.reclaimed_by or _host_of(vj)
        if len(jobs) == STUDIES and all(j["state"] == "done" for j in jobs) and run.victim:
            deliveries = c.api("/deliveries", limit=500)["items"]
            if deliveries and all(d["state"] == "sent" for d in deliveries):
                run.jobs, run.finished_at = jobs, time.monotonic()
                return run
        time.sleep(0.1)
    states = {j["id"]: (j["state"], j["worker"], j["attempts"]) for j in c.jobs()}
    raise TimeoutError(f"run not finished in time (victim {run.victim or 'none yet'}; jobs {states}):\n"
                       + c.log("recv/node.log") + "".join(c.log(f"{h}/worker.log") for h in WORKER_HOSTS))


@pytest.mark.timeout(120)
def test_node_uses_postgres_and_redis_on_other_hosts(net: Network, tmp_path: Path) -> None:
    """The node on ``recv`` keeps its catalog on the PostgreSQL host, sends jobs to the Redis host and
    takes a storescu push from the scanner host; no worker runs, so the job stays queued."""
    studies = _write_studies(tmp_path / "in", 1)
    with cluster(net, tmp_path / "run") as c:
        [(study_uid, series_dir)] = studies.items()
        c.push(series_dir)
        [job] = wait_for(lambda: [j for j in c.jobs() if j["times"]["enqueued_at"] is not None], 30,
                         what="job sent to Redis")
        assert job["model"] == MODEL and job["state"] == "queued" and job["worker"] is None
        [study] = c.api("/studies")["items"]
        assert study["study_uid"] == study_uid
        assert study["counts"]["instances"] == SLICES
        assert set(net.hosts["recv"].pids()) >= {c.procs["recv"].pid}
        assert not list((tmp_path / "run" / "recv").rglob("*.sqlite3"))  # the catalog is on the pg host
        assert c.redis.proc is not None and net.hosts["redis"].pids() == [c.redis.proc.pid]
        with net.hosts["scanner"].entered(), redis.Redis.from_url(c.redis.url, socket_timeout=5) as client:
            assert client.llen("cpu") == 1  # the job's message waits in Redis, on its own host
        assert net.hosts["pg"].pids() and not net.hosts["w1"].pids()


@pytest.mark.timeout(240)
def test_two_worker_hosts_one_vanishes_every_study_one_result_set(net: Network, tmp_path: Path) -> None:
    """Six studies, two remote worker hosts: both take jobs; all processes of the first host that
    finished a job and runs another are SIGKILLed; its job is re-run on the other host after
    ``queue.worker_lost_seconds``; every study ends with exactly one result set in Orthanc: the
    instances of the results the catalog recorded, nothing from the killed attempt, no duplicate."""
    studies = _write_studies(tmp_path / "in", STUDIES)
    t_start = time.monotonic()
    with cluster(net, tmp_path / "run") as c:
        t_node = time.monotonic()
        for name in WORKER_HOSTS:
            c.start_worker(name)
        try:
            wait_for(lambda: {w["host"] for w in c.api("/workers") if w["alive"]} >= set(WORKER_HOSTS), 90,
                     what="both worker hosts' heartbeats")
        except TimeoutError:
            pytest.fail("worker hosts not seen by the node:\n"
                        + "\n".join(c.log(f"{h}/worker.log") for h in WORKER_HOSTS))
        t_push = time.monotonic()
        print(f"\nmultihost: services and node up in {t_node - t_start:.1f} s, both worker hosts' heartbeats "
              f"{t_push - t_node:.1f} s later")
        for series_dir in studies.values():
            c.push(series_dir)
        run = _watch(c, deadline=t_push + 120)
        study_ids = {s["study_uid"]: s["id"] for s in c.api("/studies", limit=100)["items"]}
        expected = {uid: {r["sop_instance_uid"] for r in c.api(f"/studies/{study_ids[uid]}")["results"]}
                    for uid in studies}
        in_pacs = {uid: c.orthanc_instances(uid) for uid in studies}
    jobs = run.jobs
    per_host = {h: sum(1 for j in jobs if _host_of(j) == h) for h in WORKER_HOSTS}
    print(f"multihost: {STUDIES} studies x {SLICES} slices, push to last result {run.finished_at - t_push:.1f} s; "
          f"jobs done per host {per_host}, seen running per host "
          f"{ {h: sorted(v) for h, v in run.running_seen.items()} }; "
          f"{run.victim} killed at {run.killed_at - t_push:.1f} s while running job #{run.victim_job}: "
          f"claimed by {run.reclaimed_by} {run.reclaimed_at - run.killed_at:.1f} s and done "
          f"{run.victim_done_at - run.killed_at:.1f} s after the kill "
          f"(queue.worker_lost_seconds {WORKER_LOST_SECONDS:.0f})")
    assert len(jobs) == STUDIES and {j["state"] for j in jobs} == {"done"}
    assert all(run.running_seen[h] for h in WORKER_HOSTS), run.running_seen  # both hosts took jobs
    assert all(per_host[h] >= 1 for h in WORKER_HOSTS), per_host  # and both finished some
    assert run.victim_pids_left == []  # the host vanished whole
    [victim_job] = [j for j in jobs if j["id"] == run.victim_job]
    assert _host_of(victim_job) == run.reclaimed_by != run.victim  # re-run on the other host
    assert victim_job["attempts"] >= 2
    for h in WORKER_HOSTS:  # each host downloaded its inputs into its own storage directory, no catalog there
        storage = tmp_path / "run" / h / "storage"
        assert (storage / "remote-jobs").is_dir() and not list(storage.rglob("*.sqlite3"))
    for uid in studies:
        modalities = in_pacs[uid]
        assert {m: len(modalities.get(m, [])) for m in RESULT_MODALITIES} == dict.fromkeys(RESULT_MODALITIES, 1), uid
        assert len(expected[uid]) >= len(RESULT_MODALITIES) + 1  # SEG, SR, PDF and key images
        assert sorted(x for uids in modalities.values() for x in uids) == sorted(expected[uid]), uid
