"""Sending results to the PACS: our C-STORE and STOW-RS senders against dcmtk's storescu.

Run by hand from the repository root:  TCP_NODELAY=1 .venv/bin/python -m bench.send_results [--slices 300]

Writes a phantom CT series (the size of a registered prior, the largest result we send) and
sends it to a fresh private Orthanc each time: by ``storescu`` (the reference, same run), by
``DimseSender`` and by ``StowSender`` (one or several requests, ``max_request_mb``). Prints the
time of each, MB/s and the ratio to storescu, and checks Orthanc holds every instance. :func:`rows`
gives the C-STORE and STOW-RS (64 MB requests) figures to ``bench.all``'s table.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.ingest import dcmtk
from bench.report import Row
from node.config import DicomwebDestination, DimseDestination
from node.send.dimse import DimseSender
from node.send.stow import StowSender
from testkit.dicom import write_ct_series
from testkit.harness import ORTHANC_AE, Orthanc, free_port, tool_env
from testkit.phantom import make_ct_phantom


def instances_in(orthanc: Orthanc) -> int:
    return int(orthanc.get("/statistics")["CountInstances"])


def run(name: str, work: Path, files: list[Path], send: Callable[[Orthanc], None]) -> tuple[str, float]:
    orthanc = Orthanc(work / name, node_port=free_port()).start()
    try:
        t0 = time.monotonic()
        send(orthanc)
        took = time.monotonic() - t0
        assert instances_in(orthanc) == len(files), f"{name}: {instances_in(orthanc)} of {len(files)} stored"
        return name, took
    finally:
        orthanc.stop()


STORESCU = "storescu (reference)"
DIMSE = "DimseSender (C-STORE)"


def stow_run(limit_mb: float) -> str:
    return f"StowSender, {limit_mb:g} MB requests"


def measure(work: Path, files: list[Path], stow_limits: tuple[float, ...] = (64, 8)) -> dict[str, float]:
    """Seconds of each sender (:data:`STORESCU`, :data:`DIMSE`, :func:`stow_run` per limit), each into a fresh
    Orthanc; storescu gets the same files by name, in the same order (``files`` share one directory)."""

    def storescu(o: Orthanc) -> None:
        subprocess.run([dcmtk("storescu"), "-aec", ORTHANC_AE, "127.0.0.1", str(o.dicom_port), *map(str, files)],
                       check=True, capture_output=True, env=tool_env())

    def dimse(o: Orthanc) -> None:
        d = DimseDestination(name="pacs", type="dimse", ae_title=ORTHANC_AE, host="127.0.0.1", port=o.dicom_port)
        report = DimseSender(d, "AI-NODE", 30).send(files)
        assert not report.failed, report.failed

    def stow(limit_mb: float) -> Callable[[Orthanc], None]:
        def send(o: Orthanc) -> None:
            d = DicomwebDestination(name="web", type="dicomweb", url=o.url("/dicom-web"), max_request_mb=limit_mb)
            report = StowSender(d, 120).send(files)
            assert not report.failed, report.failed
        return send

    runs: list[tuple[str, Callable[[Orthanc], None]]] = [(STORESCU, storescu), (DIMSE, dimse)]
    runs += [(stow_run(limit), stow(limit)) for limit in stow_limits]
    return dict(run(name, work, files, send) for name, send in runs)


def series(work: Path, slices: int, size: int) -> list[Path]:
    phantom = make_ct_phantom(n_slices=slices, rows=size, cols=size, seed=7)
    return write_ct_series(phantom, work / "series", uid_seed="send-bench")


def rows(slices: int = 300, size: int = 512) -> list[Row]:
    """Sending a CT series of ``slices`` to Orthanc: DimseSender against storescu (time, <= 1.2x), and
    StowSender (64 MB requests) against storescu (no target: another protocol)."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = series(work, slices, size)
        took = measure(work, files, (64,))
    ref = took[STORESCU]
    return [
        Row(f"Send results, C-STORE, {len(files)} inst", took[DIMSE], "s", "storescu", ref, 1.2,
            higher_is_better=False, note="Send: to a fresh Orthanc on loopback, one association; storescu gets "
                                         "the same files on its command line"),
        Row(f"Send results, STOW-RS 64 MB req, {len(files)} inst", took[stow_run(64)], "s", "storescu", ref,
            higher_is_better=False),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = series(work, args.slices, args.size)
        mb = sum(f.stat().st_size for f in files) / 1e6
        print(f"{len(files)} instances, {mb:.1f} MB, each sent to a fresh Orthanc on loopback")
        took = measure(work, files)
        ref = took[STORESCU]
        print(f"{'sender':<30} {'seconds':>8} {'MB/s':>8} {'x storescu':>11}")
        for name, s in took.items():
            print(f"{name:<30} {s:8.2f} {mb / s:8.1f} {s / ref:11.2f}")


if __name__ == "__main__":
    main()
