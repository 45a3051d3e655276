"""End to end: the prior lives only in the PACS; the node fetches it (C-MOVE / C-GET) and registers it.

Orthanc holds the patient's earlier CT; the node (ct-registration, ``priors.source: pacs``) receives
only the current study by storescu. The registered prior series and the SR must arrive in Orthanc
under the current study, and nothing may be produced for the prior study itself.
"""

from __future__ import annotations

import io
import json
import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
import pytest

from testkit.dicom import write_ct_series
from testkit.harness import (
    VENV_BIN,
    Orthanc,
    free_port,
    node_config,
    start_node_process,
    stop_process,
    storescu,
    wait_for,
)
from testkit.phantom import make_ct_phantom

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

PATIENT_ID = "PRIOR-E2E-77"
PATIENT_NAME = "Prior^Fetched"


def _status(config: Path) -> dict[str, dict[str, int]]:
    out = subprocess.run([str(VENV_BIN / "dicom-node"), "status", "--json", "--config", str(config)],
                         capture_output=True, text=True, check=True, timeout=60)
    return dict(json.loads(out.stdout))


@pytest.mark.parametrize("method", ["move", "get"])
def test_prior_fetched_from_the_pacs_is_registered(tmp_path: Path, method: str) -> None:
    kw = {"n_slices": 40, "rows": 128, "cols": 128, "pixel_mm": 3.0, "slice_mm": 2.5}
    prior = make_ct_phantom(seed=41, **kw)  # type: ignore[arg-type]
    current = make_ct_phantom(seed=42, shift_mm=(5.0, -3.0, 4.0), rotation_deg=3.0, **kw)  # type: ignore[arg-type]
    prior_files = write_ct_series(prior, tmp_path / "prior", uid_seed="fetch-prior", patient_id=PATIENT_ID,
                                  patient_name=PATIENT_NAME)
    current_files = write_ct_series(current, tmp_path / "current", uid_seed="fetch-current", patient_id=PATIENT_ID,
                                    patient_name=PATIENT_NAME)
    for path, date in ((prior_files, "20220301"), (current_files, "20240301")):  # the prior is the earlier study
        for f in path:
            ds = pydicom.dcmread(f)
            ds.StudyDate = date
            ds.save_as(f)
    prior_uid = str(pydicom.dcmread(prior_files[0], stop_before_pixels=True).StudyInstanceUID)
    current_uid = str(pydicom.dcmread(current_files[0], stop_before_pixels=True).StudyInstanceUID)
    assert prior_uid != current_uid

    node_port = free_port()
    orthanc = Orthanc(tmp_path, node_port=node_port).start()
    proc = None
    try:
        for f in prior_files:  # the PACS has the prior; the node has never seen it
            req = urllib.request.Request(orthanc.url("/instances"), data=f.read_bytes(), method="POST")
            with urllib.request.urlopen(req, timeout=30) as r:
                assert r.status == 200
        cfg = node_config(tmp_path, node_port=node_port, orthanc=orthanc, quiet_seconds=4.0,
                          models=("ct-registration",),
                          overrides={"priors": {"source": "pacs", "method": method, "timeout_seconds": 120}})
        proc = start_node_process(cfg, "run", "node.log", port=node_port)
        assert storescu(node_port, tmp_path / "current").returncode == 0
        try:
            def arrived() -> bool:  # the registered prior (40 CT) + the SR (other objects may come with them)
                mods = orthanc.modalities_of_study(current_uid)
                return mods.get("CT") == 40 and mods.get("SR", 0) >= 1

            wait_for(arrived, 300, what="registered prior series + SR")
            wait_for(lambda: _status(cfg)["studies"] == {"routed": 1, "prior": 1}, 60, what="the prior stored")
        except TimeoutError:
            print((tmp_path / "node.log").read_text()[-6000:])
            raise
        registered = sorted((pydicom.dcmread(io.BytesIO(b)) for b in orthanc.instance_files(current_uid, "CT")),
                            key=lambda d: float(d.ImagePositionPatient[2]))
        cur = sorted((pydicom.dcmread(f) for f in current_files), key=lambda d: float(d.ImagePositionPatient[2]))
        assert {d.FrameOfReferenceUID for d in registered} == {cur[0].FrameOfReferenceUID}
        reg = np.stack([d.pixel_array.astype(np.float32) for d in registered])
        now = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in cur])
        before = np.stack([pydicom.dcmread(f).pixel_array * 1.0 - 1024 for f in sorted(
            prior_files, key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]))])
        inner = (slice(8, -8), slice(16, -16), slice(16, -16))
        err_registered = float(np.abs(reg[inner] - now[inner]).mean())
        err_unregistered = float(np.abs(before[inner] - now[inner]).mean())
        print(f"C-{method.upper()}: mean |HU difference| {err_unregistered:.1f} before, {err_registered:.1f} after")
        assert err_registered < 0.5 * err_unregistered
        status = _status(cfg)
        assert status["jobs"] == {"done": 1}  # one job, for the current study only
        assert orthanc.modalities_of_study(prior_uid) == {"CT": 40}  # nothing was sent for the prior
        logs = (tmp_path / "node.log").read_text()
        assert "instance(s) in 1 series from pacs" in logs
        assert PATIENT_ID not in logs and "Prior^Fetched" not in logs and "20220301" not in logs
    finally:
        if proc is not None:
            stop_process(proc)
        orthanc.stop()
