"""End-to-end latency: last instance pushed -> SEG + SR stored in Orthanc (quiet period subtracted).

Run by hand from the repository root:  TCP_NODELAY=1 .venv/bin/python -m bench.e2e_latency [--slices 300]

Starts a private Orthanc and ``dicom-node run`` (embedded broker) on loopback, pushes the real CT
series (JPEG 2000) and a generated phantom with storescu, and prints per series: the push time to
the node, the push time of the same files to Orthanc (the reference, same run), their ratio, and
the latency from the end of the push to SEG + SR in Orthanc.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

import pydicom

from testkit.dicom import write_ct_series
from testkit.harness import (
    ORTHANC_AE,
    Orthanc,
    free_port,
    node_config,
    start_node_process,
    stop_process,
    storescu,
    tool_env,
    wait_for,
)
from testkit.phantom import make_ct_phantom

REAL_CT = Path(__file__).resolve().parent.parent / "tests" / "data" / "ct-real-20"
QUIET = 2.0


def push_to_orthanc(orthanc: Orthanc, series: Path, *args: str) -> float:
    t0 = time.monotonic()
    subprocess.run(["storescu", "-aec", ORTHANC_AE, *args, "+sd", "+r", "127.0.0.1", str(orthanc.dicom_port),
                    str(series)], check=True, capture_output=True, env=tool_env())
    return time.monotonic() - t0


def run_case(name: str, series: Path, node_port: int, ref: Orthanc, pacs: Orthanc, *args: str) -> None:
    study = str(pydicom.dcmread(next(iter(sorted(series.iterdir()))), stop_before_pixels=True).StudyInstanceUID)
    n = len(list(series.iterdir()))
    ref_push = push_to_orthanc(ref, series, *args)
    t0 = time.monotonic()
    out = storescu(node_port, series, *args)
    assert out.returncode == 0, out.stderr
    pushed = time.monotonic()
    wait_for(lambda: {"SEG", "SR"} <= set(pacs.modalities_of_study(study)), 900, interval=0.1, what="results")
    latency = time.monotonic() - pushed - QUIET
    push = pushed - t0
    print(f"{name}: {n} instances | push to node {push:.2f} s ({n / push:.0f}/s) vs Orthanc {ref_push:.2f} s "
          f"({n / ref_push:.0f}/s), ratio {push / ref_push:.2f} | last instance -> SEG+SR in Orthanc "
          f"{latency:.2f} s (quiet period {QUIET:.0f} s subtracted)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slices", type=int, default=300)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        node_port = free_port()
        (tmp / "pacs").mkdir()
        (tmp / "ref").mkdir()
        pacs = Orthanc(tmp / "pacs", node_port=node_port).start()
        ref = Orthanc(tmp / "ref", node_port=node_port).start()
        cfg = node_config(tmp, node_port=node_port, orthanc=pacs, quiet_seconds=QUIET)
        node = start_node_process(cfg, "run", "node.log", port=node_port)
        try:
            run_case("real CT (JPEG 2000)", REAL_CT, node_port, ref, pacs, "-xv")
            phantom = make_ct_phantom(n_slices=args.slices, rows=512, cols=512, pixel_mm=0.8, slice_mm=1.0, seed=1)
            series = tmp / "phantom"
            write_ct_series(phantom, series)
            run_case(f"phantom {args.slices}x512x512", series, node_port, ref, pacs)
            print("node log, job lines:")
            for line in (tmp / "node.log").read_text().splitlines():
                if "job #" in line and "done" in line:
                    print("  ", line.split(": ", 1)[-1])
        finally:
            stop_process(node)
            pacs.stop()
            ref.stop()


if __name__ == "__main__":
    main()
