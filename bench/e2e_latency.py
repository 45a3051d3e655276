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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Stack:
    """A running ``dicom-node run`` (embedded broker and worker), its PACS and a reference Orthanc."""

    workdir: Path
    node_port: int
    http_port: int
    config: Path
    pacs: Orthanc
    """The node's destination ``pacs`` (the rule ``ct`` sends every result there)."""
    ref: Orthanc
    """A second Orthanc: the same files pushed there are the reference of the push times."""


@contextmanager
def running_stack(workdir: Path, *, models: tuple[str, ...] = ("ct-hu-segmentation",),
                  quiet: float = QUIET) -> Iterator[Stack]:
    """Start the PACS, the reference Orthanc and the node (rule ``ct``: CT -> ``models`` -> pacs) on
    loopback; stop them on exit. The node logs to ``workdir/node.log``."""
    node_port, http_port = free_port(), free_port()
    (workdir / "pacs").mkdir()
    (workdir / "ref").mkdir()
    pacs = Orthanc(workdir / "pacs", node_port=node_port).start()
    ref = Orthanc(workdir / "ref", node_port=node_port).start()
    node = None
    try:
        cfg = node_config(workdir, node_port=node_port, orthanc=pacs, quiet_seconds=quiet, models=models,
                          http_port=http_port)
        node = start_node_process(cfg, "run", "node.log", port=node_port)
        yield Stack(workdir, node_port, http_port, cfg, pacs, ref)
    finally:
        if node is not None:
            stop_process(node)
        pacs.stop()
        ref.stop()


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
    with tempfile.TemporaryDirectory() as tmp_s, running_stack(Path(tmp_s)) as stack:
        tmp = stack.workdir
        run_case("real CT (JPEG 2000)", REAL_CT, stack.node_port, stack.ref, stack.pacs, "-xv")
        phantom = make_ct_phantom(n_slices=args.slices, rows=512, cols=512, pixel_mm=0.8, slice_mm=1.0, seed=1)
        series = tmp / "phantom"
        write_ct_series(phantom, series)
        run_case(f"phantom {args.slices}x512x512", series, stack.node_port, stack.ref, stack.pacs)
        print("node log, job lines:")
        for line in (tmp / "node.log").read_text().splitlines():
            if "job #" in line and "done" in line:
                print("  ", line.split(": ", 1)[-1])


if __name__ == "__main__":
    main()
