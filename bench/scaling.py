"""Scaling: studies per hour of one node with 1, 2 and 4 separate worker processes on the same load.

Run by hand from the repository root:

    TCP_NODELAY=1 .venv/bin/python -m bench.scaling [--studies 12] [--slices 96] [--workers 1,2,4]
        [--model NAME ...] [--quiet 1.5] [--threads N] [--repeat 1] [--cold | --preload] [--keep]

(with ``.venv/bin/python``, not from an activated venv, whose ``storescu`` is pynetdicom's, not dcmtk's).

Writes the load once: ``--studies`` synthetic CT studies (one chest phantom of ``--slices`` slices of
256x256, each study its own patient and UIDs). Each worker count N then gets a fresh round: a private
Orthanc (the destination), a ``redis-server`` (the queue), ``dicom-node run`` with
``queue.embedded_workers: false`` and ``queue.in_flight`` = N, and N processes ``dicom-node worker
--concurrency 1``, each with ``queue.torch_threads`` = CPUs // N (at least 1; ``--threads`` sets it),
as a site sizing its workers to its cores would. Once every worker's heartbeat is in, all studies
are pushed at once by one ``storescu`` (one association, study after study, as a PACS forwards them;
twelve parallel ``storescu`` processes would take the CPUs of the node on a small machine, where real
senders are elsewhere); each study is routed and run as soon as it is complete, while the next ones
arrive. The round ends when every job is done and every delivery sent, which the node's REST API
says. Before that, unmeasured, one warm-up study per worker is pushed and finished, so that each
worker has imported and loaded its model (steady state, what sizing needs); ``--cold`` skips it.
``--preload`` measures the workers alone: every study is pushed and routed first, then the workers
start (cold, no warm-up) and the clock with them; the push no longer shares the CPUs with the jobs.

Per round: the wall time from the start of the push to the last delivery's ``sent_at`` (the node's
clock is this machine's), studies/h, the ratio against the 1-worker round of the same run (else the
first round), the efficiency (ratio / workers), the push time, the mean job run time (started ->
finished), the CPU time of the node, its workers and redis-server per study (from /proc), and the
workers that ran a job. The instances in Orthanc are checked against the deliveries sent. Last, the
machine (CPUs, model, load average) and the sizing lines: the best round's studies/h per CPU core,
the bound the CPU time per study sets, and both extrapolated to 8 cores (marked as such).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from node.queue import DEFAULT_QUEUE
from node.schema import DeliveryState, JobState, StudyState
from testkit.dicom import write_ct_series
from testkit.harness import (
    Orthanc,
    Redis,
    bearer,
    create_token,
    free_port,
    node_config,
    port_open,
    start_node_process,
    stop_process,
    storescu,
    wait_for,
)
from testkit.phantom import make_ct_phantom
from workers.celery_app import available_cpus

REFERENCE_WORKERS = 1
PAGE = 500
"""The REST API's largest page."""
MAX_WORKERS = 64


@dataclass(frozen=True)
class Load:
    """The synthetic load of every round: one directory per study, all in one parent directory; the
    warm-up studies (one per worker) go first, and are not measured."""

    studies: list[Path]
    warmup: list[Path]
    slices: int
    size: int
    models: tuple[str, ...]

    @property
    def studies_dir(self) -> Path:
        return self.studies[0].parent

    def describe(self) -> str:
        return (f"{len(self.studies)} CT studies of {self.slices}x{self.size}x{self.size}, "
                f"models {', '.join(self.models)}")


@dataclass(frozen=True)
class Round:
    workers: int
    threads: int
    studies: int
    wall_s: float
    mean_job_s: float
    mean_infer_s: float
    busy_workers: int
    push_s: float
    """The push of all studies (one association), from its start."""
    load_before: float
    """The 1-minute load average when the round started (the machine may be shared)."""
    cpu_s: float
    """CPU seconds (user + system) of the node, its workers and redis-server while measured."""

    @property
    def per_hour(self) -> float:
        return self.studies / self.wall_s * 3600

    @property
    def cpu_per_study(self) -> float:
        return self.cpu_s / self.studies


def write_load(root: Path, studies: int, warmup: int, slices: int, size: int, models: tuple[str, ...]) -> Load:
    """``studies`` and ``warmup`` copies of one phantom, each with its own patient, study and series UIDs."""
    phantom = make_ct_phantom(n_slices=slices, rows=size, cols=size, pixel_mm=360.0 / size, seed=3)

    def write(name: str, n: int) -> list[Path]:
        dirs = [root / name / f"{name}-{i:03d}" for i in range(n)]
        for i, out in enumerate(dirs):
            write_ct_series(phantom, out, patient_id=f"{name.upper()}-{i:03d}", patient_name=f"{name}^{i:03d}",
                            uid_seed=f"bench-scaling-{name}-{i}")
        return dirs

    return Load(write("study", studies), write("warmup", warmup), slices, size, models)


def cpu_seconds(roots: list[int]) -> float:
    """CPU seconds (user + system) of the processes ``roots`` and all their descendants, with their
    reaped children's, from /proc (Linux)."""
    tick = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            pid = int(entry.name)
            parent[pid] = int(fields[1])
            cpu[pid] = sum(int(f) for f in fields[11:15]) / tick  # utime stime cutime cstime
    tree = set(roots) & cpu.keys()
    while grown := {pid for pid, ppid in parent.items() if ppid in tree} - tree:
        tree |= grown
    return sum(cpu[pid] for pid in tree)


def _total(api: httpx.Client, path: str, **params: str) -> int:
    """The ``total`` of a filtered list of the REST API (one row fetched)."""
    r = api.get(path, params={"limit": 1, **params})
    r.raise_for_status()
    return int(r.json()["total"])


def _all(api: httpx.Client, path: str) -> list[dict[str, Any]]:
    """Every row of a paged list of the REST API."""
    items: list[dict[str, Any]] = []
    while True:
        r = api.get(path, params={"limit": PAGE, "offset": len(items)})
        r.raise_for_status()
        page = r.json()
        items += page["items"]
        if not page["items"] or len(items) >= page["total"]:
            return items


def _finished(api: httpx.Client, expected_jobs: int) -> bool:
    """After a push: every study routed, every job ended (at least ``expected_jobs`` done or skipped),
    no delivery pending; a failed job ends the run. A study re-opened by late instances (a pause in a
    push longer than the quiet period) is receiving or ready again, and its new jobs queued."""
    if failed := _total(api, "/jobs", state=JobState.FAILED):
        raise RuntimeError(f"{failed} job(s) failed; see the worker logs")
    if any(_total(api, "/studies", state=s) for s in (StudyState.RECEIVING, StudyState.READY)):
        return False
    if any(_total(api, "/jobs", state=s) for s in (JobState.QUEUED, JobState.RUNNING, JobState.AWAITING_PRIOR)):
        return False
    ended = _total(api, "/jobs", state=JobState.DONE) + _total(api, "/jobs", state=JobState.SKIPPED)
    # deliveries are recorded with their job's end, so none pending after all ended means all sent
    return ended >= expected_jobs and _total(api, "/deliveries", state=DeliveryState.PENDING) == 0


def _alive_workers(api: httpx.Client) -> int:
    r = api.get("/workers")
    r.raise_for_status()
    return sum(bool(w["alive"]) for w in r.json())


def push_all(node_port: int, studies: list[Path]) -> None:
    """Push ``studies`` at once: one storescu (one association) per study, in parallel (the warm-up)."""
    with ThreadPoolExecutor(max_workers=len(studies)) as pool:
        for out in pool.map(lambda d: storescu(node_port, d), studies):
            if out.returncode != 0:
                raise RuntimeError(f"storescu failed: {out.stderr[-2000:]}")


def _queued(api: httpx.Client, expected_jobs: int) -> bool:
    """Every study routed and ``expected_jobs`` jobs waiting for a worker (``--preload``)."""
    if any(_total(api, "/studies", state=s) for s in (StudyState.RECEIVING, StudyState.READY)):
        return False
    return _total(api, "/jobs", state=JobState.QUEUED) >= expected_jobs


def run_round(work: Path, load: Load, workers: int, threads: int, quiet: float, timeout: float,
              preload: bool = False) -> Round:
    """One round on fresh processes: Orthanc, redis-server, the node and ``workers`` worker processes.
    ``preload``: push and route every study first, then start the workers (cold) and the clock."""
    work.mkdir(parents=True)
    load_before = os.getloadavg()[0]
    node_port, http_port = free_port(), free_port()
    pacs = Orthanc(work / "pacs", node_port=node_port).start()
    redis = Redis(work).start()
    procs = []
    try:
        config = node_config(work, node_port=node_port, orthanc=pacs, quiet_seconds=quiet, broker_url=redis.url,
                             embedded_workers=False, models=load.models, http_port=http_port,
                             overrides={"queue": {"in_flight": {DEFAULT_QUEUE: workers}, "torch_threads": threads},
                                        "node": {"max_associations": max(10, 2 * workers)}})
        token = create_token(config, "viewer")
        procs.append(start_node_process(config, "run", "node.log", port=node_port))
        wait_for(lambda: port_open(http_port), 60, what="the node's HTTP service")

        def start_workers() -> None:
            procs.extend(start_node_process(config, "worker", f"worker-{i}.log", extra=("--concurrency", "1"))
                         for i in range(workers))

        def push() -> float:
            t = time.time()
            out = storescu(node_port, load.studies_dir)  # every study, one after the other, one association
            if out.returncode != 0:
                raise RuntimeError(f"storescu failed: {out.stderr[-2000:]}")
            return time.time() - t

        def roots() -> list[int]:
            return [p.pid for p in procs] + ([redis.proc.pid] if redis.proc else [])

        expected = len(load.studies) * len(load.models)
        warm: list[Path] = []
        with httpx.Client(base_url=f"http://127.0.0.1:{http_port}/api/v1", headers=bearer(token), timeout=30) as api:
            if preload:
                push_s = push()
                wait_for(lambda: _queued(api, expected), timeout, interval=1.0, what="every study routed")
                cpu0 = cpu_seconds(roots())
                t0 = time.time()
                start_workers()
            else:
                start_workers()
                wait_for(lambda: _alive_workers(api) >= workers, 120, what=f"{workers} worker heartbeat(s)")
                warm = load.warmup[:workers]
                if warm:
                    push_all(node_port, warm)
                    wait_for(lambda: _finished(api, len(warm) * len(load.models)), timeout, interval=1.0,
                             what="the warm-up studies")
                cpu0 = cpu_seconds(roots())
                t0 = time.time()
                push_s = push()
            wait_for(lambda: _finished(api, expected + len(warm) * len(load.models)), timeout, interval=1.0,
                     what="all jobs done and results sent")
            cpu_s = cpu_seconds(roots()) - cpu0
            done = [j for j in _all(api, "/jobs") if j["state"] == JobState.DONE]
            sent = [d for d in _all(api, "/deliveries") if d["state"] == DeliveryState.SENT]
        in_orthanc = int(pacs.get("/statistics")["CountInstances"])
        if in_orthanc != len(sent):
            raise RuntimeError(f"{in_orthanc} instances in Orthanc, {len(sent)} deliveries sent")
        since = 0.0 if preload else t0
        if warm and len({j["worker"] for j in done if j["times"]["created_at"] < since}) < workers:
            print(f"  note: the warm-up reached fewer than {workers} workers; some ran their first job cold")
        jobs = [j for j in done if j["times"]["created_at"] >= since]
        if len(jobs) != expected:
            print(f"  note: {len(jobs)} jobs done for {len(load.studies)} studies x {len(load.models)} model(s): "
                  "studies re-opened by late instances (a push paused longer than --quiet)")
        measured = {j["id"] for j in jobs}
        times = [j["times"] for j in jobs]
        return Round(
            workers=workers, threads=threads, studies=len(load.studies),
            wall_s=max(d["sent_at"] for d in sent if d["job_id"] in measured) - t0,
            mean_job_s=statistics.fmean(t["finished_at"] - t["started_at"] for t in times),
            mean_infer_s=statistics.fmean(t["infer_seconds"] or 0.0 for t in times),
            busy_workers=len({j["worker"] for j in jobs}), load_before=load_before, cpu_s=cpu_s, push_s=push_s,
        )
    finally:
        for p in reversed(procs):  # the workers first (warm shutdown), then the node
            stop_process(p)
        redis.stop()
        pacs.stop()


def medians(rounds: list[Round]) -> list[Round]:
    """Per worker count (in the order first run), the round of median wall time (the lower middle one)."""
    by_count: dict[int, list[Round]] = {}
    for r in rounds:
        by_count.setdefault(r.workers, []).append(r)
    return [sorted(rs, key=lambda r: r.wall_s)[(len(rs) - 1) // 2] for rs in by_count.values()]


def table(rounds: list[Round]) -> str:
    ref = next((r for r in rounds if r.workers == REFERENCE_WORKERS), rounds[0])
    head = (f"{'workers':>7} {'threads':>7} {'wall s':>7} {'studies/h':>9} {f'x {ref.workers} wkr':>8} "
            f"{'effic.':>6} {'push s':>6} {'mean job s':>10} {'infer s':>7} {'CPU s/study':>11} {'busy':>4} "
            f"{'load':>5}")
    lines = [head, "-" * len(head)]
    for r in rounds:
        ratio = r.per_hour / ref.per_hour
        lines.append(f"{r.workers:7d} {r.threads:7d} {r.wall_s:7.1f} {r.per_hour:9.0f} {ratio:8.2f} "
                     f"{ratio * ref.workers / r.workers:6.0%} {r.push_s:6.1f} {r.mean_job_s:10.2f} "
                     f"{r.mean_infer_s:7.2f} {r.cpu_per_study:11.2f} {r.busy_workers:4d} {r.load_before:5.2f}")
    return "\n".join(lines)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def sizing(rounds: list[Round], cpus: int, load: Load, cores: int = 8) -> str:
    """The sizing lines: measured per core (the best round's wall time), the bound from CPU time, and
    their extrapolation to ``cores`` (not measured)."""
    best = max(rounds, key=lambda r: r.per_hour)
    per_core = best.per_hour / cpus
    cpu_core = 3600 / best.cpu_per_study
    return "\n".join([
        f"sizing, measured: best {best.per_hour:.0f} studies/h with {best.workers} worker(s) on {cpus} CPU(s) -> "
        f"per CPU core: {per_core:.0f} studies/h of this load ({load.describe()})",
        f"sizing, from CPU time: {best.cpu_per_study:.2f} CPU s per study (node, workers, redis) -> at most "
        f"{cpu_core:.0f} studies/h per fully used core",
        f"extrapolated, not measured: {cores} cores with {cores} workers ~{per_core * cores:.0f} (wall) to "
        f"{cpu_core * cores:.0f} (CPU time) studies/h, if the work stays CPU-bound and nothing else limits it",
    ])


def parse_counts(text: str) -> list[int]:
    counts = [int(c) for c in text.split(",") if c.strip()]
    if not counts or min(counts) < 1 or max(counts) > MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"{text!r}: give worker counts 1 to {MAX_WORKERS}, comma-separated "
                                         "(e.g. 1,2,4)")
    return counts


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--studies", type=int, default=12, help="studies pushed at once each round (default: 12)")
    ap.add_argument("--slices", type=int, default=96, help="slices per study (default: 96)")
    ap.add_argument("--size", type=int, default=256, help="rows and columns (default: 256)")
    ap.add_argument("--workers", type=parse_counts, default=[1, 2, 4],
                    help="worker process counts, one round each (default: 1,2,4)")
    ap.add_argument("--model", action="append", help="models of the rule (default: ct-hu-segmentation)")
    ap.add_argument("--quiet", type=float, default=1.5, help="assembly.study_quiet_seconds (default: 1.5)")
    ap.add_argument("--threads", type=int, default=0,
                    help="queue.torch_threads per worker process (default: CPUs // workers, at least 1)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds a round may take (default: 1800)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run the worker counts in turn this many times; report each count's median round")
    ap.add_argument("--preload", action="store_true",
                    help="push and route every study before the workers start; measure from their start (cold)")
    ap.add_argument("--cold", action="store_true",
                    help="no warm-up: each worker loads its model on its first measured job")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, configurations)")
    args = ap.parse_args(argv)
    if args.studies < 1:
        ap.error("--studies: at least 1")
    models = tuple(args.model or ["ct-hu-segmentation"])
    cpus = available_cpus()
    rounds: list[Round] = []
    workdir = contextlib.nullcontext(tempfile.mkdtemp(prefix="bench-scaling-")) if args.keep else \
        tempfile.TemporaryDirectory(prefix="bench-scaling-")
    with workdir as tmp_s:
        tmp = Path(tmp_s)
        if args.keep:
            print(f"work directory (kept: configurations and logs of every round): {tmp}")
        t = time.perf_counter()
        warmup = 0 if args.cold or args.preload else max(args.workers)
        load = write_load(tmp / "load", args.studies, warmup, args.slices, args.size, models)
        print(f"load: {load.describe()}; written in {time.perf_counter() - t:.1f} s")
        for _ in range(args.repeat):
            for n in args.workers:
                threads = args.threads or max(1, cpus // n)
                r = run_round(tmp / f"round-{len(rounds)}-{n}", load, n, threads, args.quiet, args.timeout,
                              args.preload)
                rounds.append(r)
                print(f"  {n} worker(s): {r.wall_s:.1f} s, {r.per_hour:.0f} studies/h, load {r.load_before:.2f}",
                      flush=True)
    rounds = medians(rounds)
    print()
    print(table(rounds))
    if args.repeat > 1:
        print(f"each row: the round of median wall time of {args.repeat} (the lower middle one; the worker "
              f"counts in turn, {args.repeat} times)")
    push = "before the clock started" if args.preload else "jobs run meanwhile"
    print("x N wkr: studies/h / the N-worker round of this run; effic.: that ratio per added worker; push s: "
          f"the push of all studies ({push}); busy: "
          "workers that ran a job; CPU s/study: CPU time of node, workers and redis-server per study; load: 1-min "
          "load average at the round's start")
    print(f"machine: {cpus} CPU(s) usable of {os.cpu_count()}, {cpu_model()}; load average at the end "
          f"{os.getloadavg()[0]:.2f}")
    print(sizing(rounds, cpus, load))


if __name__ == "__main__":
    main()
