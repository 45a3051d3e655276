"""Turnaround (issue 15): last instance -> every result of segmentation + nodule detection + emphysema
stored in Orthanc, quiet period subtracted, with each stage's share taken from the node's own records.

Run by hand from the repository root:  TCP_NODELAY=1 .venv/bin/python -m bench.turnaround [--slices 300]

Starts a private Orthanc (the destination), a reference Orthanc and ``dicom-node run`` (embedded
broker, default ``queue.worker_concurrency`` 1) with a rule that runs ct-hu-segmentation,
ct-lung-nodules and ct-emphysema on CT. A small warm-up study goes through first (the worker builds
the three models, as a running node has them warm); then a generated chest phantom of ``slices`` x
512 x 512 (1 mm slices, 360 mm field of view, vessels, nodules, some emphysema; testkit's chest
phantom: the real CT of ``tests/data/ct-real-20`` holds 40 mm of the lung bases, which resampled to
300 slices would be either 0.13 mm slices or a stretched abdomen, neither a chest CT for these models)
is pushed with storescu, after the same files were pushed to the reference Orthanc (the reference
figure of the row, measured in the same run).

The figures come from the study in the node's REST API (``GET /api/v1/studies/{id}``): the turnaround
is its ``delivered_at`` (the last result's C-STORE acknowledged by Orthanc) minus ``last_received_at``
minus the quiet period; the stages are, in order: ready (the assembler's wait beyond the quiet
period), route, queue (routed -> first job claimed), load, infer, encode (sums of the jobs' own
timings), jobs' rest (claims, writing results, gaps between the jobs run one after the other) and
send (last job finished -> last result stored; the results of the earlier jobs are sent while the
later ones run). Every result delivered is then looked up in Orthanc.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pydicom

from bench.e2e_latency import QUIET, Stack, push_to_orthanc, running_stack
from bench.report import Row, format_table
from testkit.dicom import write_ct_series
from testkit.harness import bearer, create_token, storescu, wait_for
from testkit.phantom import make_ct_phantom

MODELS = ("ct-hu-segmentation", "ct-lung-nodules", "ct-emphysema")
TARGET_S = 10.0
"""The issue's bound on the turnaround of the 300-slice chest CT on 2 CPU cores."""
STAGES = ("ready", "route", "queue", "load", "infer", "encode", "jobs' rest", "send")


@dataclass(frozen=True)
class Turnaround:
    """One study's turnaround and its stages (s), from the node's records."""

    instances: int
    push_s: float
    """storescu to the node."""
    ref_push_s: float
    """storescu of the same files to the reference Orthanc."""
    total_s: float
    stages: dict[str, float]
    jobs: list[dict[str, Any]]

    def shares(self) -> str:
        return ", ".join(f"{name} {s:.2f} s ({100 * s / self.total_s:.0f}%)" for name, s in self.stages.items())


def chest_phantom(out_dir: Path, slices: int, seed: int, size: int = 512) -> Path:
    """A chest CT phantom (1 mm slices, 360 mm field of view) written as one file per slice."""
    phantom = make_ct_phantom(n_slices=slices, rows=size, cols=size, pixel_mm=360.0 / size, slice_mm=1.0, seed=seed,
                              nodules=4, vessels=2, emphysema=0.05)
    write_ct_series(phantom, out_dir, patient_id=f"TURNAROUND-{seed}")
    return out_dir


def _study(api: httpx.Client, study_uid: str) -> dict[str, Any] | None:
    for item in api.get("/api/v1/studies", params={"limit": 200}).raise_for_status().json()["items"]:
        if item["study_uid"] == study_uid:
            detail: dict[str, Any] = api.get(f"/api/v1/studies/{item['id']}").raise_for_status().json()
            return detail
    return None


def _finished(api: httpx.Client, study_uid: str) -> dict[str, Any] | None:
    """The study once its jobs ended and every delivery was made; None before."""
    study = _study(api, study_uid)
    if study is None or study["times"]["delivered_at"] is None or study["times"]["jobs_finished_at"] is None:
        return None
    failed = [j for j in study["jobs"] if j["state"] not in ("done", "skipped")]
    if failed:
        raise RuntimeError(f"jobs did not finish: {[(j['model'], j['state'], j['error']) for j in failed]}")
    return study


def run_study(stack: Stack, api: httpx.Client, series: Path) -> Turnaround:
    """Push ``series`` to the reference Orthanc, then to the node; wait for every result in the PACS."""
    study_uid = str(pydicom.dcmread(next(iter(sorted(series.iterdir()))), stop_before_pixels=True).StudyInstanceUID)
    n = len(list(series.iterdir()))
    ref_push = push_to_orthanc(stack.ref, series)
    t0 = time.monotonic()
    out = storescu(stack.node_port, series)
    assert out.returncode == 0, out.stderr
    push = time.monotonic() - t0
    study = wait_for(lambda: _finished(api, study_uid), 1800, interval=0.5, what="results delivered")
    t, jobs = study["times"], study["jobs"]
    sums = {k: sum(j["times"][f"{k}_seconds"] or 0.0 for j in jobs) for k in ("load", "infer", "encode")}
    started = min(j["times"]["started_at"] for j in jobs)
    span = t["jobs_finished_at"] - started
    stages = {
        "ready": t["ready_at"] - t["last_received_at"] - QUIET,
        "route": t["routed_at"] - t["ready_at"],
        "queue": started - t["routed_at"],
        **sums,
        "jobs' rest": span - sum(sums.values()),
        "send": t["delivered_at"] - t["jobs_finished_at"],
    }
    missing = [d["sop_instance_uid"] for d in study["deliveries"]
               if d["state"] == "sent" and not stack.pacs.post(
                   "/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": d["sop_instance_uid"]}})]
    if missing:
        raise RuntimeError(f"{len(missing)} result(s) delivered but not in Orthanc")
    return Turnaround(n, push, ref_push, t["delivered_at"] - t["last_received_at"] - QUIET, stages, jobs)


def measure(slices: int, workdir: Path) -> tuple[Turnaround, Turnaround]:
    """(the warm-up study, the chest CT of ``slices`` slices) through a fresh node."""
    warm = chest_phantom(workdir / "warm-up", 40, seed=21, size=128)
    chest = chest_phantom(workdir / "chest", slices, seed=11)
    (workdir / "stack").mkdir()
    with running_stack(workdir / "stack", models=MODELS) as stack, \
            httpx.Client(base_url=f"http://127.0.0.1:{stack.http_port}", timeout=30,
                         headers=bearer(create_token(stack.config, "viewer"))) as api:
        return run_study(stack, api, warm), run_study(stack, api, chest)


def rows(slices: int = 300) -> list[Row]:
    with tempfile.TemporaryDirectory() as tmp:
        _, chest = measure(slices, Path(tmp))
    return [_row(slices, chest)]


def _row(slices: int, t: Turnaround) -> Row:
    return Row(f"Turnaround, {slices}x512x512 chest CT, seg+nodules+emphysema", t.total_s, "s",
               reference="Orthanc push (same files)", ref_value=t.ref_push_s, target=TARGET_S,
               higher_is_better=False, target_on_value=True,
               note=f"turnaround: {t.shares()}; the reference is the push of the {t.instances} files to Orthanc "
                    f"(no analysis there: the ratio only says how the turnaround compares with the transfer)")


def _print(name: str, t: Turnaround) -> None:
    print(f"{name}: {t.instances} instances, push {t.push_s:.2f} s (Orthanc {t.ref_push_s:.2f} s); "
          f"last instance -> all results in Orthanc {t.total_s:.2f} s (quiet period {QUIET:.0f} s subtracted)")
    print(f"  stages: {t.shares()}")
    for j in t.jobs:
        jt = j["times"]
        print(f"  job #{j['id']} {j['model']}: {j['state']}, load {jt['load_seconds'] or 0:.2f} s, "
              f"infer {jt['infer_seconds'] or 0:.2f} s, encode {jt['encode_seconds'] or 0:.2f} s, "
              f"claimed -> finished {jt['finished_at'] - jt['started_at']:.2f} s")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slices", type=int, default=300)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        warm, chest = measure(args.slices, Path(tmp))
    _print("warm-up (40x128x128, the models built on the way)", warm)
    _print(f"chest CT {args.slices}x512x512", chest)
    print(format_table([_row(args.slices, chest)]))


if __name__ == "__main__":
    main()
