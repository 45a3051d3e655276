"""Sending results to the PACS: our C-STORE and STOW-RS senders against dcmtk's storescu.

Run by hand from the repository root:  TCP_NODELAY=1 .venv/bin/python -m bench.send_results [--slices 300]

Writes a phantom CT series (the size of a registered prior, the largest result we send) and
sends it to a fresh private Orthanc each time: by ``storescu`` (the reference, same run), by
``DimseSender`` and by ``StowSender`` (one or several requests, ``max_request_mb``). Prints the
time of each, MB/s and the ratio to storescu, and checks Orthanc holds every instance.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        phantom = make_ct_phantom(n_slices=args.slices, rows=args.size, cols=args.size, seed=7)
        files = write_ct_series(phantom, work / "series", uid_seed="send-bench")
        mb = sum(f.stat().st_size for f in files) / 1e6
        print(f"{len(files)} instances, {mb:.1f} MB, each sent to a fresh Orthanc on loopback")

        def storescu(o: Orthanc) -> None:
            subprocess.run(["storescu", "-aec", ORTHANC_AE, "+sd", "+r", "127.0.0.1", str(o.dicom_port),
                            str(work / "series")], check=True, capture_output=True, env=tool_env())

        def dimse(o: Orthanc) -> None:
            d = DimseDestination(name="pacs", type="dimse", ae_title=ORTHANC_AE, host="127.0.0.1", port=o.dicom_port)
            report = DimseSender(d, "AI-NODE", 30).send(files)
            assert not report.failed, report.failed

        def stow(limit_mb: float) -> Callable[[Orthanc], None]:
            def send(o: Orthanc) -> None:
                d = DicomwebDestination(name="web", type="dicomweb", url=o.url("/dicom-web"),
                                        max_request_mb=limit_mb)
                report = StowSender(d, 120).send(files)
                assert not report.failed, report.failed
            return send

        rows = [
            run("storescu (reference)", work, files, storescu),
            run("DimseSender (C-STORE)", work, files, dimse),
            run("StowSender, 64 MB requests", work, files, stow(64)),
            run("StowSender, 8 MB requests", work, files, stow(8)),
        ]
        ref = rows[0][1]
        print(f"{'sender':<30} {'seconds':>8} {'MB/s':>8} {'x storescu':>11}")
        for name, took in rows:
            print(f"{name:<30} {took:8.2f} {mb / took:8.1f} {took / ref:11.2f}")


if __name__ == "__main__":
    main()
