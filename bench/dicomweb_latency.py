"""QIDO-RS and WADO-RS latency of the node's DICOMweb origin, against Orthanc's DICOMweb plugin.

Run by hand from the repository root:  TCP_NODELAY=1 .venv/bin/python -m bench.dicomweb_latency [--slices 300]

Writes a CT phantom of ``--slices`` 512x512 slices, stores it in a private Orthanc (the reference,
same run) and in the node (``dicom-node run`` on loopback, C-STORE), then times the same DICOMweb
requests against both with one keep-alive HTTP client: QIDO studies by PatientID, QIDO instances of
the series, WADO metadata of the series, WADO one instance, WADO the whole series (multipart), one
frame, one rendered JPEG. Prints the median of ``--repeat`` runs per request and the ratio
node / Orthanc.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pydicom

from testkit.dicom import write_ct_series
from testkit.harness import (
    ORTHANC_AE,
    Orthanc,
    bearer,
    create_token,
    free_port,
    node_config,
    start_node_process,
    stop_process,
    storescu,
    tool_env,
    wait_for,
)
from testkit.phantom import make_ct_phantom

MULTIPART_DICOM = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def median_seconds(client: httpx.Client, url: str, accept: str, repeat: int,
                   headers: dict[str, str] | None = None) -> float:
    """Median wall time of ``repeat`` GETs of ``url``, the body read whole; ``headers``: added (a token)."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        r = client.get(url, headers={"Accept": accept, **(headers or {})})
        r.raise_for_status()
        _ = r.content
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def requests(base: str, study: str, series: str, instance: str, patient: str) -> dict[str, tuple[str, str]]:
    """name -> (path, Accept header) for the DICOMweb requests compared."""
    s = f"{base}/studies/{study}/series/{series}"
    return {
        "QIDO studies by PatientID": (f"{base}/studies?PatientID={patient}", "application/dicom+json"),
        "QIDO instances of the series": (f"{s}/instances", "application/dicom+json"),
        "WADO series metadata": (f"{s}/metadata", "application/dicom+json"),
        "WADO one instance": (f"{s}/instances/{instance}", MULTIPART_DICOM),
        "WADO one frame": (f"{s}/instances/{instance}/frames/1",
                           'multipart/related; type="application/octet-stream"; transfer-syntax=*'),
        "WADO rendered (JPEG)": (f"{s}/instances/{instance}/rendered", "image/jpeg"),
        "WADO whole series": (s, MULTIPART_DICOM),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        series_dir = tmp / "ct"
        files = write_ct_series(make_ct_phantom(n_slices=args.slices, rows=512, cols=512, pixel_mm=0.8,
                                                slice_mm=1.0, seed=3), series_dir, uid_seed="bench-dicomweb")
        first = pydicom.dcmread(files[len(files) // 2], stop_before_pixels=True)
        study, series, instance = str(first.StudyInstanceUID), str(first.SeriesInstanceUID), str(first.SOPInstanceUID)
        patient = str(first.PatientID)
        node_port, http_port = free_port(), free_port()
        (tmp / "orthanc").mkdir()
        orthanc = Orthanc(tmp / "orthanc", node_port=node_port).start()
        cfg = node_config(tmp, node_port=node_port, orthanc=orthanc, http_port=http_port,
                          overrides={"rules": [], "queue": {"embedded_workers": False}})
        node_auth = bearer(create_token(cfg, "viewer"))  # QIDO-RS and WADO-RS need a viewer's token
        node = start_node_process(cfg, "run", "node.log", port=node_port)
        try:
            subprocess.run(["storescu", "-aec", ORTHANC_AE, "+sd", "+r", "127.0.0.1", str(orthanc.dicom_port),
                            str(series_dir)], check=True, capture_output=True, env=tool_env())
            out = storescu(node_port, series_dir)
            assert out.returncode == 0, out.stderr
            node_base = f"http://127.0.0.1:{http_port}/dicom-web"
            orthanc_base = orthanc.url("/dicom-web")
            with httpx.Client(timeout=120) as client:
                def count(base: str) -> int:
                    r = client.get(f"{base}/studies/{study}/series/{series}/instances",
                                   headers={"Accept": "application/dicom+json", **node_auth})
                    return len(r.json()) if r.status_code == 200 else 0

                wait_for(lambda: count(node_base) == len(files), 120, what="the series in the node's catalog")
                print(f"{len(files)} instances of 512x512 CT; median of {args.repeat} runs per request")
                print(f"{'request':32} {'node':>10} {'Orthanc':>10} {'ratio':>7}")
                for name, (node_url, accept) in requests(node_base, study, series, instance, patient).items():
                    orthanc_url = node_url.replace(node_base, orthanc_base)

                    t_node = median_seconds(client, node_url, accept, args.repeat, node_auth)
                    t_ref = median_seconds(client, orthanc_url, accept, args.repeat)
                    print(f"{name:32} {t_node * 1000:8.1f}ms {t_ref * 1000:8.1f}ms {t_node / t_ref:7.2f}")
        finally:
            stop_process(node)
            orthanc.stop()


if __name__ == "__main__":
    main()
