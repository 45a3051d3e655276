"""End to end with the deep-learning models on CPU: storescu -> dicom-node -> embedded worker -> Orthanc.

One chest phantom of the kind the demo networks were trained on (``tools/train_demo_models.py``
draws 1.2-2.4 mm pixels, 2-5 mm slices, 300-450 mm fields of view; nodules, vessels, emphysema),
scanned twice: a prior stored first, then the current study, on which all four DL models run in
two worker processes. The prior is the same anatomy with other noise, moved by a known rigid
transform put into its geometry (Image Position/Orientation), as ``testkit.dl_synth.rigid_pair``
makes them. Results are checked against the phantom's truth and validated with dciodvfy; a second
test breaks the configured bundles and expects the jobs to fail with the paths in the reason.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from scipy import ndimage as ndi

pytest.importorskip("torch")
pytest.importorskip("monai")

from models.ct_emphysema import GRADES
from models.dl.core import bundle_dir
from testkit import dl_synth
from testkit.dicom import write_ct_series
from testkit.dl_evaluate import DICE_TARGET
from testkit.harness import (
    VENV_BIN,
    Orthanc,
    dciodvfy,
    free_port,
    node_config,
    start_node_process,
    stop_process,
    storescu,
    wait_for,
)
from testkit.phantom import Phantom, make_ct_phantom
from workers.celery_app import available_cpus, torch_threads
from workers.encode.series import series_description

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

DL_MODELS = ("dl-ct-segmentation", "dl-lung-nodule-detection", "dl-emphysema-classification", "dl-ct-registration")
SEGMENTS = ("Body", "Right Lung", "Left Lung", "Bone")
QUIET_SECONDS = 2.0
PATIENT_ID, PATIENT_NAME = "DL-E2E-1", "Phantom^Deep"
CONCURRENCY = 2
# 48 x 160 x 160 at 2.2 x 2.2 x 4 mm (a 352 mm field of view, 192 mm long), moderate emphysema,
# five nodules (four of at least 6 mm) and vessel trees: inside the training distribution.
PHANTOM_ARGS: dict[str, Any] = {
    "n_slices": 48, "rows": 160, "cols": 160, "pixel_mm": 2.2, "slice_mm": 4.0, "seed": 101,
    "nodules": 5, "vessels": 2, "emphysema": 0.2,
}
# current LPS -> prior LPS: the prior lies rotated (2, -2, 6 degrees about x, y, z) and shifted
MOTION = dl_synth.rigid_matrix((2.0, -2.0, 6.0), (10.0, -8.0, 6.0), (0.0, 0.0, 0.0))


@dataclass
class Stack:
    workdir: Path
    node_port: int
    orthanc: Orthanc

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.workdir.glob("*.log")))

    def status(self, *extra: str) -> str:
        out = subprocess.run(
            [str(VENV_BIN / "dicom-node"), "status", "--config", str(self.workdir / "node.yaml"), *extra],
            capture_output=True, text=True, check=True, timeout=60,
        )
        return out.stdout

    def jobs(self) -> dict[str, int]:
        text = self.status("--json")
        return dict(json.loads(text)["jobs"])


@contextmanager
def node_stack(tmp_path: Path, overrides: dict[str, Any]) -> Iterator[Stack]:
    """Orthanc + ``dicom-node run`` (embedded broker and worker) configured with ``overrides``."""
    node_port = free_port()
    orthanc = Orthanc(tmp_path, node_port=node_port).start()
    procs = []
    try:
        cfg = node_config(tmp_path, node_port=node_port, orthanc=orthanc, quiet_seconds=QUIET_SECONDS,
                          overrides=overrides)
        procs.append(start_node_process(cfg, "run", "node.log", port=node_port))
        yield Stack(tmp_path, node_port, orthanc)
    finally:
        for p in procs:
            stop_process(p)
        orthanc.stop()


def site_bundle(dest: Path, package: str = "dl_ct_segmentation") -> Path:
    """A copy of a shipped bundle (configs/ and models/ only), as a site would install its own."""
    for part in ("configs", "models"):
        shutil.copytree(bundle_dir(package) / part, dest / part)
    return dest


def rule(description: str, models: tuple[str, ...]) -> dict[str, Any]:
    return {"name": "dl", "match": {"Modality": "CT", "SeriesDescription": description},
            "models": list(models), "send_to": ["pacs"]}


def result_series(orthanc: Orthanc, study_uid: str) -> dict[str, list[str]]:
    """Series Description -> Orthanc instance ids, for each series of the study in Orthanc."""
    return {str(s["MainDicomTags"].get("SeriesDescription", "")): list(s["Instances"])
            for s in orthanc.series_of_study(study_uid)}


def move_geometry(files: list[Path], motion: npt.NDArray[np.float64]) -> None:
    """Rewrite each file's Image Position/Orientation (Patient) as if the patient lay moved by ``motion``."""
    for f in files:
        ds = pydicom.dcmread(f)
        iop = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
        ipp = np.asarray(ds.ImagePositionPatient, dtype=np.float64)
        rows = motion[:3, :3] @ iop[:3], motion[:3, :3] @ iop[3:]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*rows[0], *rows[1])]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in motion[:3, :3] @ ipp + motion[:3, 3]]
        del ds.SliceLocation
        ds.save_as(f, enforce_file_format=True)


def sorted_by_z(datasets: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    return sorted(datasets, key=lambda d: float(d.ImagePositionPatient[2]))


def hu(ds: pydicom.Dataset) -> npt.NDArray[np.float32]:
    slope, intercept = float(ds.get("RescaleSlope", 1.0)), float(ds.get("RescaleIntercept", 0.0))
    return (ds.pixel_array.astype(np.float32) * slope + intercept).astype(np.float32)


def unregistered(prior: Phantom, current: Phantom) -> npt.NDArray[np.float32]:
    """The prior on the current grid without registration: the HU at the same LPS point."""
    to_prior = np.linalg.inv(MOTION @ prior.affine) @ current.affine  # current (i, j, k) -> prior (i, j, k)
    swap = np.eye(4)[[2, 1, 0, 3]]  # (i, j, k) <-> (k, j, i)
    m = swap @ to_prior @ swap
    out = ndi.affine_transform(prior.hu.astype(np.float32), m[:3, :3], m[:3, 3], order=1, cval=-1024.0)
    return np.asarray(out, dtype=np.float32)


def dice(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_]) -> float:
    return float(2 * np.logical_and(a, b).sum() / max(1, int(a.sum() + b.sum())))


def validate(tmp: Path, name: str, data: bytes) -> None:
    path = tmp / name
    path.write_bytes(data)
    errors, warnings = dciodvfy(path)
    print(f"dciodvfy {name}: {len(errors)} error(s), {len(warnings)} warning(s)")
    assert errors == [], errors


def scoord_centre_lps(group: hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations,
                      sources: dict[str, pydicom.Dataset]) -> npt.NDArray[np.float64]:
    """LPS centre of a nodule outline (CIRCLE: centre first) on its source image."""
    region = group.roi
    assert isinstance(region, hd.sr.ImageRegion)
    (ref,) = region.ContentSequence[0].ReferencedSOPSequence
    image = sources[str(ref.ReferencedSOPInstanceUID)]
    data = np.asarray(region.value, dtype=np.float64).reshape(-1, 2)
    if region.graphic_type == hd.sr.GraphicTypeValues.CIRCLE:
        col, row = data[0]
    else:  # ELLIPSE: the centre of the major axis
        col, row = data[:2].mean(axis=0)
    iop = np.asarray(image.ImageOrientationPatient, dtype=np.float64)
    row_mm, col_mm = (float(v) for v in image.PixelSpacing)
    # SCOORD (0, 0) is the top left corner of the top left pixel, whose centre is IPP
    return (np.asarray(image.ImagePositionPatient, dtype=np.float64)
            + (col - 0.5) * col_mm * iop[:3] + (row - 0.5) * row_mm * iop[3:])


def check_segmentation(seg_bytes: bytes, sr: pydicom.Dataset, sources: list[pydicom.Dataset],
                       phantom: Phantom) -> dict[str, float]:
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(io.BytesIO(seg_bytes)))
    numbers = seg.get_segment_numbers()
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[str(d.SOPInstanceUID) for d in sources], segment_numbers=numbers,
        combine_segments=False, assert_missing_frames_are_empty=True,
    )
    masks = {seg.get_segment_description(n).segment_label: pixels[..., i] > 0 for i, n in enumerate(numbers)}
    assert tuple(masks) == SEGMENTS
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    scores = {name: dice(masks[name], phantom.truth(name)) for name in SEGMENTS}
    # the segmentation SR: one volumetric group per segment, measuring exactly what the SEG shows
    report = hd.sr.Comprehensive3DSR.from_dataset(sr).content
    assert isinstance(report, hd.sr.MeasurementReport)
    voxel_ml = abs(np.linalg.det(phantom.affine[:3, :3])) / 1000
    volumes = {}
    for group in report.get_volumetric_roi_measurement_groups():
        (volume,) = group.get_measurements(name=codes.SCT.Volume)
        volumes[str(group.tracking_identifier)] = float(volume.value)
    assert set(volumes) == set(SEGMENTS)
    for name, ml in volumes.items():
        assert ml == pytest.approx(masks[name].sum() * voxel_ml, rel=1e-6), name
    return scores


def check_nodules(sr: pydicom.Dataset, sources: list[pydicom.Dataset], phantom: Phantom) -> tuple[int, int, int]:
    """(true positives, misses among nodules >= 6 mm, false positives) of the SR's findings."""
    report = hd.sr.Comprehensive3DSR.from_dataset(sr).content
    assert isinstance(report, hd.sr.MeasurementReport)
    groups = report.get_planar_roi_measurement_groups()
    by_uid = {str(d.SOPInstanceUID): d for d in sources}
    found = []
    for group in groups:
        (diameter,) = group.get_measurements(name=codes.SCT.Diameter)
        assert 3.0 <= float(diameter.value) <= 32.0
        found.append(scoord_centre_lps(group, by_uid))
    # greedy matching as testkit.evaluate.match_detections, plus half a slice: the outline sits on
    # the source slice nearest the centre
    tolerance = phantom.slice_mm / 2
    pairs = sorted(
        (float(np.linalg.norm(c - np.asarray(n.center_lps))), fi, ni)
        for fi, c in enumerate(found) for ni, n in enumerate(phantom.nodules)
        if np.linalg.norm(c - np.asarray(n.center_lps)) <= max(n.diameter_mm / 2, 3.0) + tolerance
    )
    used: set[int] = set()
    matched: set[int] = set()
    for _, fi, ni in pairs:
        if fi not in used and ni not in matched:
            used.add(fi)
            matched.add(ni)
    big = [i for i, n in enumerate(phantom.nodules) if n.diameter_mm >= 6.0]
    tp = sum(1 for i in big if i in matched)
    return tp, len(big) - tp, len(found) - len(used)


def test_dl_models_reach_the_pacs(tmp_path: Path) -> None:
    """All four DL models on one current study (and its prior), in two worker processes."""
    seg_bundle = site_bundle(tmp_path / "site-bundles" / "seg")
    overrides = {
        "queue": {"worker_concurrency": CONCURRENCY},
        "rules": [rule("DL current", DL_MODELS)],  # the prior matches no rule: stored, not analysed
        "models": {"dl-ct-segmentation": {"path": str(seg_bundle), "device": "cpu", "precision": "fp32",
                                          "batch_size": 2}},
    }
    current = make_ct_phantom(**PHANTOM_ARGS, noise_seed=1)
    prior = make_ct_phantom(**{**PHANTOM_ARGS, "nodules": current.nodules}, noise_seed=2)
    cur_files = write_ct_series(current, tmp_path / "current", patient_id=PATIENT_ID, patient_name=PATIENT_NAME,
                                uid_seed="dl-current", series_description="DL current")
    prior_files = write_ct_series(prior, tmp_path / "prior", patient_id=PATIENT_ID, patient_name=PATIENT_NAME,
                                  uid_seed="dl-prior", series_description="DL prior")
    move_geometry(prior_files, MOTION)
    study_uid = str(pydicom.dcmread(cur_files[0], stop_before_pixels=True).StudyInstanceUID)
    n = current.shape[0]

    expected = {series_description("SEG", "dl-ct-segmentation"): 1,
                series_description("REGISTERED-PRIOR", "dl-ct-registration"): n,
                **{series_description("SR", m): 1 for m in DL_MODELS}}

    with node_stack(tmp_path, overrides) as stack:
        assert storescu(stack.node_port, tmp_path / "prior").returncode == 0
        assert storescu(stack.node_port, tmp_path / "current").returncode == 0

        def done() -> bool:
            found = result_series(stack.orthanc, study_uid)
            return all(len(found.get(d, ())) >= count for d, count in expected.items())

        try:
            wait_for(done, 240, interval=0.5, what="SEG, 4 SR and the registered prior in Orthanc")
        except TimeoutError:
            print(stack.logs()[-8000:])
            raise
        assert stack.jobs() == {"done": 4}
        logs = stack.logs()
        files = {d: [stack.orthanc.get_bytes(f"/instances/{i}/file") for i in ids]
                 for d, ids in result_series(stack.orthanc, study_uid).items()}

    # the worker built dl-ct-segmentation from the configured copy, with the configured options
    assert re.search(rf"model dl-ct-segmentation \S+ loaded in [\d.]+ s from {re.escape(str(seg_bundle))} "
                     r"\(weights: .* on cpu, fp32, batch size 2\)", logs), logs[-4000:]
    assert "model dl-lung-nodule-detection" in logs and "from the shipped demo bundle" in logs
    # two pool children, each capping its threads (torch, SimpleITK, BLAS) to its share of the CPUs
    threads = torch_threads(available_cpus(), CONCURRENCY, None, os.environ)
    capped = rf"worker process (\d+): torch, SimpleITK and BLAS use {threads} thread\(s\)"
    assert len(set(re.findall(capped, logs))) == CONCURRENCY
    assert PATIENT_NAME not in logs and PATIENT_ID not in logs

    # every result object is valid (one instance per series; other kinds the models promise too)
    assert {d: len(files[d]) for d in expected} == expected
    for i, (description, data) in enumerate(sorted(files.items())):
        validate(tmp_path, f"{i}-{description.replace(' ', '_')}.dcm", data[0])
    srs = {m: pydicom.dcmread(io.BytesIO(files[series_description("SR", m)][0])) for m in DL_MODELS}
    seg_bytes = files[series_description("SEG", "dl-ct-segmentation")][0]
    registered_files = files[series_description("REGISTERED-PRIOR", "dl-ct-registration")]
    sources = sorted_by_z([pydicom.dcmread(f) for f in cur_files])

    # segmentation: SEG + SR, Dice against the phantom's truth
    scores = check_segmentation(seg_bytes, srs["dl-ct-segmentation"], sources, current)
    print("dl-ct-segmentation Dice: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    for name, target in DICE_TARGET.items():
        assert scores[name] >= target, (name, scores[name])

    # detection: nodule findings on source images, sensitivity for nodules >= 6 mm
    tp, fn, fp = check_nodules(srs["dl-lung-nodule-detection"], sources, current)
    print(f"dl-lung-nodule-detection: {tp}/{tp + fn} nodules >= 6 mm found, {fp} false positive(s)")
    assert tp + fn >= 3 and tp / (tp + fn) >= 0.75 and fp <= 2

    # classification: the grade of the phantom's emphysema (LAA of the lungs)
    report = hd.sr.Comprehensive3DSR.from_dataset(srs["dl-emphysema-classification"]).content
    assert isinstance(report, hd.sr.MeasurementReport)
    [grading] = report.get_image_measurement_groups()
    [grade] = grading.get_qualitative_evaluations(name=Code("87433001", "SCT", "Pulmonary emphysema"))
    [score] = grading.get_measurements(name=Code("246262008", "SCT", "Score"))
    laa = dl_synth.laa_fraction(current)
    expected = GRADES[dl_synth.emphysema_grade(laa)]
    print(f"dl-emphysema-classification: {grade.value.meaning} (p = {float(score.value):.2f}); "  # type: ignore[union-attr]
          f"truth LAA {100 * laa:.1f} % = {expected.meaning}")
    assert grade.value.value == expected.value  # type: ignore[union-attr]
    assert 0.25 < float(score.value) <= 1.0

    # registration: the prior resampled on the current geometry, and the SR's residual
    registered = sorted_by_z([pydicom.dcmread(io.BytesIO(b)) for b in registered_files])
    assert {d.FrameOfReferenceUID for d in registered} == {sources[0].FrameOfReferenceUID}
    assert [d.ImagePositionPatient for d in registered] == [d.ImagePositionPatient for d in sources]
    after = np.stack([hu(d) for d in registered])
    before = unregistered(prior, current)
    body = current.truth("Body")
    lungs = current.truth("Right Lung") | current.truth("Left Lung")
    inner = (slice(6, -6), slice(12, -12), slice(12, -12))  # away from the fields of view's edges
    err_after = float(np.abs(after - current.hu)[inner][body[inner]].mean())
    err_before = float(np.abs(before - current.hu)[inner][body[inner]].mean())
    lung_after = dice((after < -500) & body, lungs)
    lung_before = dice((before < -500) & body, lungs)
    reg_report = hd.sr.Comprehensive3DSR.from_dataset(srs["dl-ct-registration"]).content
    assert isinstance(reg_report, hd.sr.MeasurementReport)
    [group] = reg_report.get_image_measurement_groups()
    [residual] = group.get_measurements(name=Code("121206", "DCM", "Distance"))
    print(f"dl-ct-registration: mean |HU difference| in the body {err_before:.0f} -> {err_after:.0f}; "
          f"lung Dice {lung_before:.3f} -> {lung_after:.3f}; SR residual {float(residual.value):.2f} mm")
    assert err_after < 0.5 * err_before
    assert lung_after >= 0.9 and lung_after > lung_before + 0.1
    assert 0.0 <= float(residual.value) < 4.0


def test_configured_bundle_paths_are_the_ones_loaded(tmp_path: Path) -> None:
    """A broken copy of a bundle and a path that does not exist: the jobs fail at the first attempt
    (the same files would fail every retry), naming the paths."""
    broken = site_bundle(tmp_path / "site-bundles" / "seg")
    weights = broken / "models" / "model.pt"
    weights.write_bytes(weights.read_bytes()[:1000])  # a truncated copy
    missing = tmp_path / "site-bundles" / "no-such-bundle"
    overrides = {
        "queue": {"job_max_attempts": 3, "job_retry_initial_seconds": 1},
        "rules": [rule("DL small", ("dl-ct-segmentation", "dl-lung-nodule-detection"))],
        "models": {
            "dl-ct-segmentation": {"path": str(broken), "device": "cpu", "precision": "fp32", "batch_size": 2},
            "dl-lung-nodule-detection": {"path": str(missing)},
        },
    }
    phantom = make_ct_phantom(16, 64, 64, pixel_mm=4.8, slice_mm=10.0, seed=5, nodules=0)
    write_ct_series(phantom, tmp_path / "small", uid_seed="dl-broken", series_description="DL small")
    with node_stack(tmp_path, overrides) as stack:
        assert storescu(stack.node_port, tmp_path / "small").returncode == 0
        try:
            wait_for(lambda: stack.jobs() == {"failed": 2}, 120, interval=0.5, what="both jobs failed")
        except TimeoutError:
            print(stack.logs()[-6000:])
            raise
        failed = json.loads(stack.status("--failed", "--json"))["failed_jobs"]
    reasons = {j["model"]: j["error"] for j in failed}
    print("\n".join(reasons.values()))
    assert str(weights) in reasons["dl-ct-segmentation"] and "BundleError" in reasons["dl-ct-segmentation"]
    assert str(missing) in reasons["dl-lung-nodule-detection"]
    assert "does not exist" in reasons["dl-lung-nodule-detection"]
    assert all(j["attempts"] == 1 for j in failed)  # permanent: not retried
