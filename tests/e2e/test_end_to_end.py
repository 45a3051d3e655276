"""End to end: storescu -> dicom-node -> models -> SEG + SR -> Orthanc, with real processes.

Embedded default (``dicom-node run`` starts its own worker over the file-system broker) and Redis
mode (a real redis-server and a separately started ``dicom-node worker``).
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from node.receive.stow import stow_request
from testkit.dicom import write_ct_series
from testkit.harness import (
    VENV_BIN,
    Orthanc,
    Redis,
    create_token,
    dcentvfy,
    dciodvfy,
    free_port,
    node_config,
    pdf_text,
    port_open,
    start_node_process,
    stop_process,
    storescu,
    study_files,
    wait_for,
)
from testkit.phantom import Phantom, make_ct_phantom

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

REAL_CT = Path(__file__).resolve().parents[1] / "data" / "ct-real-20"
QUIET_SECONDS = 2.0
EXPECTED_SEGMENTS = {"Body", "Right Lung", "Left Lung", "Bone", "Airway"}


@dataclass
class Stack:
    workdir: Path
    node_port: int
    http_port: int
    orthanc: Orthanc
    procs: list[subprocess.Popen[bytes]]

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.workdir.glob("*.log")))


def _start(tmp_path: Path, redis_mode: bool, models: tuple[str, ...] = ("ct-hu-segmentation",)) -> Iterator[Stack]:
    node_port = free_port()
    orthanc = Orthanc(tmp_path, node_port=node_port).start()
    procs: list[subprocess.Popen[bytes]] = []
    redis = Redis(tmp_path).start() if redis_mode else None
    try:
        http_port = free_port()
        cfg = node_config(tmp_path, node_port=node_port, orthanc=orthanc, quiet_seconds=QUIET_SECONDS,
                          broker_url=redis.url if redis else "", embedded_workers=not redis_mode, models=models,
                          http_port=http_port)
        procs.append(start_node_process(cfg, "run", "node.log", port=node_port))
        if redis_mode:
            procs.append(start_node_process(cfg, "worker", "worker.log"))
        yield Stack(tmp_path, node_port, http_port, orthanc, procs)
    finally:
        for p in reversed(procs):
            stop_process(p)
        if redis is not None:
            redis.stop()
        orthanc.stop()


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[Stack]:
    yield from _start(tmp_path, redis_mode=False)


@pytest.fixture
def redis_stack(tmp_path: Path) -> Iterator[Stack]:
    yield from _start(tmp_path, redis_mode=True)


def _push_and_wait(stack: Stack, series_dir: Path, *storescu_args: str) -> tuple[str, list[bytes], list[bytes], float]:
    """Push a series, wait for SEG + SR in Orthanc; returns (study uid, SEG files, SR files, latency)."""
    first = pydicom.dcmread(next(iter(sorted(series_dir.iterdir()))), stop_before_pixels=True)
    study_uid = str(first.StudyInstanceUID)
    out = storescu(stack.node_port, series_dir, *storescu_args)
    assert out.returncode == 0, out.stderr
    pushed = time.monotonic()

    def results_ready() -> bool:  # SEG, SR, key images (OT) and the PDF (DOC) of one job
        mods = stack.orthanc.modalities_of_study(study_uid)
        return all(mods.get(m, 0) >= 1 for m in ("SEG", "SR", "OT", "DOC"))

    try:
        wait_for(results_ready, 240, interval=0.25, what="SEG and SR in Orthanc")
    except TimeoutError:
        print(stack.logs()[-6000:])
        raise
    latency = time.monotonic() - pushed - QUIET_SECONDS
    print(f"last instance pushed -> SEG+SR in Orthanc: {latency:.2f} s (quiet period subtracted)")
    segs = stack.orthanc.instance_files(study_uid, "SEG")
    srs = stack.orthanc.instance_files(study_uid, "SR")
    return study_uid, segs, srs, latency


def _validate(tmp: Path, name: str, data: bytes) -> None:
    path = tmp / name
    path.write_bytes(data)
    errors, warnings = dciodvfy(path)
    print(f"dciodvfy {name}: {len(errors)} error(s), {len(warnings)} warning(s)")
    for w in warnings:
        print("  ", w)
    assert errors == [], errors


def _status(stack: Stack) -> dict[str, dict[str, int]]:
    out = subprocess.run([str(VENV_BIN / "dicom-node"), "status", "--json", "--config",
                          str(stack.workdir / "node.yaml")], capture_output=True, text=True, check=True, timeout=60)
    return dict(json.loads(out.stdout))


def _check_no_phi_in_logs(stack: Stack, patient_name: str, patient_id: str) -> None:
    logs = stack.logs()
    assert "job" in logs and "delivered" in logs  # the stage lines are there...
    assert patient_name not in logs and patient_id not in logs  # ...and no patient data


def _seg_masks(seg_bytes: bytes, source_uids: list[str]) -> tuple[hd.seg.Segmentation, dict[str, np.ndarray]]:
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(io.BytesIO(seg_bytes)))
    numbers = seg.get_segment_numbers()
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=source_uids, segment_numbers=numbers, combine_segments=False,
        assert_missing_frames_are_empty=True,
    )
    masks = {seg.get_segment_description(n).segment_label: pixels[..., i] > 0 for i, n in enumerate(numbers)}
    return seg, masks


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum()))


def _sr_volumes(sr_bytes: bytes, seg_uid: str) -> dict[str, float]:
    """Volume (ml) per segment from the TID 1500 SR, checking each group references the SEG."""
    sr = hd.sr.srread(io.BytesIO(sr_bytes))
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)
    volumes: dict[str, float] = {}
    for group in report.get_volumetric_roi_measurement_groups():
        ref = group.referenced_segment
        assert ref is not None and ref[0].referenced_sop_instance_uid == seg_uid
        (volume,) = group.get_measurements(name=codes.SCT.Volume)
        assert len(group.get_measurements(name=codes.SCT.Mean)) == 1
        volumes[str(group.tracking_identifier)] = float(volume.value)
    return volumes


def _check_phantom_roundtrip(stack: Stack, tmp_path: Path) -> float:
    phantom = make_ct_phantom(n_slices=48, rows=192, cols=192, seed=3)
    series_dir = tmp_path / "phantom"
    files = write_ct_series(phantom, series_dir, reverse_slices=True)
    study_uid, segs, srs, latency = _push_and_wait(stack, series_dir)
    assert len(segs) == 1 and len(srs) == 1
    _validate(tmp_path, "seg.dcm", segs[0])
    _validate(tmp_path, "sr.dcm", srs[0])

    # the SEG on the source geometry: compare with the phantom truth slice by slice (k order = +z)
    sources = sorted((pydicom.dcmread(f, stop_before_pixels=True) for f in files),
                     key=lambda d: float(d.ImagePositionPatient[2]))
    seg, masks = _seg_masks(segs[0], [str(d.SOPInstanceUID) for d in sources])
    assert set(masks) == EXPECTED_SEGMENTS
    ref_series = seg.ReferencedSeriesSequence[0].SeriesInstanceUID
    assert ref_series == sources[0].SeriesInstanceUID
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    for name in ("Body", "Right Lung", "Left Lung"):
        d = _dice(masks[name], phantom.truth(name))
        print(f"{name}: Dice {d:.3f}")
        assert d >= 0.9, (name, d)
    volumes = _sr_volumes(srs[0], str(seg.SOPInstanceUID))
    voxel_ml = abs(np.linalg.det(phantom.affine[:3, :3])) / 1000
    assert set(volumes) == EXPECTED_SEGMENTS
    for name, ml in volumes.items():  # the SR measures exactly what the SEG shows
        assert ml == pytest.approx(masks[name].sum() * voxel_ml, rel=1e-9), name
    _check_no_phi_in_logs(stack, "Phantom^Test", "PHANTOM-001")
    assert study_uid == str(sources[0].StudyInstanceUID)
    _check_key_images_and_pdf(stack, study_uid, tmp_path, sources, EXPECTED_SEGMENTS)
    _check_study_consistency(stack, study_uid, files, tmp_path)
    return latency


def _check_key_images_and_pdf(stack: Stack, study_uid: str, tmp_path: Path, sources: Sequence[pydicom.Dataset],
                              names: set[str]) -> None:
    """Key images: valid RGB SCs on source slices with the SEG colours drawn; the PDF names the segments."""
    key_images = [pydicom.dcmread(io.BytesIO(b)) for b in stack.orthanc.instance_files(study_uid, "OT")]
    assert 1 <= len(key_images) <= 4
    source_uids = {str(d.SOPInstanceUID) for d in sources}
    for i, sc in enumerate(key_images):
        _validate(tmp_path, f"sc-{i}.dcm", _bytes(sc))
        assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID in source_uids
        rgb = sc.pixel_array.reshape(-1, 3)
        coloured = np.abs(rgb.astype(int) - rgb.mean(axis=1, keepdims=True)).max(axis=1) > 40
        assert coloured.mean() > 0.001, "no outline drawn"  # grey CT + colour outlines and legend
    [pdf_bytes] = stack.orthanc.instance_files(study_uid, "DOC")
    _validate(tmp_path, "report.dcm", pdf_bytes)
    pdf = pydicom.dcmread(io.BytesIO(pdf_bytes))
    document = bytes(pdf.EncapsulatedDocument)[: int(pdf.EncapsulatedDocumentLength)]
    assert document.startswith(b"%PDF") and document.rstrip().endswith(b"%%EOF")
    text = " ".join(pdf_text(document))
    for name in names:
        assert name in text, name
    assert "not" in text.lower() and "diagnos" in text.lower()  # the disclaimer


def _bytes(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _check_study_consistency(stack: Stack, study_uid: str, source_files: list[Path], tmp_path: Path,
                             extra: Sequence[Path] = ()) -> None:
    """dcentvfy over the source series plus every result Orthanc holds for the study: 0 errors in
    our objects (a real scanner series may itself reference instances nobody sent, e.g. localizers)."""
    results = study_files(stack.orthanc, study_uid, tmp_path / f"study-{study_uid[-8:]}")
    errors, warnings = dcentvfy([*source_files, *results, *extra])
    inherited = [e for e in errors if "Missing SOPInstanceUID that was referenced" in e
                 and any(f"<{f}>" in e for f in [*source_files, *extra])]
    if inherited:
        print(f"dcentvfy: {len(inherited)} missing reference(s) inherited from the source files, e.g. {inherited[0]}")
    errors = [e for e in errors if e not in inherited]
    print(f"dcentvfy over {len(source_files) + len(results) + len(extra)} files: {len(errors)} error(s), "
          f"{len(warnings)} warning(s)")
    for w in sorted({re.sub(r" for file .*", "", w) for w in warnings}):
        print("  ", w)
    assert errors == [], errors[:10]


def test_embedded_phantom_and_real_ct(embedded: Stack, tmp_path: Path) -> None:
    _check_phantom_roundtrip(embedded, tmp_path)

    # the real, JPEG 2000 compressed scanner series
    study_uid, segs, srs, _ = _push_and_wait(embedded, REAL_CT, "-xv")
    assert len(segs) == 1 and len(srs) == 1
    _validate(tmp_path, "real-seg.dcm", segs[0])
    _validate(tmp_path, "real-sr.dcm", srs[0])
    sources = sorted((pydicom.dcmread(f, stop_before_pixels=True) for f in REAL_CT.iterdir()),
                     key=lambda d: float(d.ImagePositionPatient[2]))
    seg, masks = _seg_masks(segs[0], [str(d.SOPInstanceUID) for d in sources])
    assert set(masks) <= EXPECTED_SEGMENTS and "Body" in masks
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert (masks["Body"].shape[1], masks["Body"].shape[2]) == (512, 512)
    body = masks["Body"]
    for name, m in masks.items():
        assert not np.any(m & ~body) or name == "Body", f"{name} outside the body"
    # a single result set per study: pushing the same series again stores and reruns nothing
    jobs_before = _status(embedded)["jobs"]
    assert jobs_before == {"done": 2}
    assert storescu(embedded.node_port, REAL_CT, "-xv").returncode == 0
    time.sleep(QUIET_SECONDS + 2)
    status = _status(embedded)
    assert status["jobs"] == jobs_before and status["instances"]["total"] == 48 + 20
    results = embedded.orthanc.modalities_of_study(study_uid)
    assert results["SEG"] == 1 and results["SR"] == 1 and results["DOC"] == 1 and set(results) == {
        "SEG", "SR", "OT", "DOC"}
    _check_study_consistency(embedded, study_uid, sorted(REAL_CT.iterdir()), tmp_path)


@pytest.mark.redis
def test_redis_mode_with_separate_worker(redis_stack: Stack, tmp_path: Path) -> None:
    _check_phantom_roundtrip(redis_stack, tmp_path)
    worker_log = (redis_stack.workdir / "worker.log").read_text()
    assert re.search(r"job #\d+ .* done", worker_log), worker_log[-3000:]


def test_stow_rs_door(embedded: Stack, tmp_path: Path) -> None:
    """The second door (STOW-RS on the node's HTTP service): a series posted with STOW-RS comes back
    as SEG + SR like a C-STORE'd one."""
    phantom = make_ct_phantom(n_slices=30, rows=128, cols=128, pixel_mm=3.0, seed=5)
    files = write_ct_series(phantom, tmp_path / "stow", uid_seed="stow-door")
    wait_for(lambda: port_open(embedded.http_port), 30, what="the node's HTTP service")
    token = create_token(embedded.workdir / "node.yaml", "sender")  # the config node_config wrote
    status, body = stow_request(f"http://127.0.0.1:{embedded.http_port}/dicom-web", [f.read_bytes() for f in files],
                                token=token)
    assert status == 200 and len(body["00081199"]["Value"]) == 30
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    wait_for(lambda: {"SEG": 1, "SR": 1, "DOC": 1}.items() <= embedded.orthanc.modalities_of_study(study_uid).items(),
             240, what="SEG, SR and PDF from the STOW-RS study")


def test_detection_and_classification_reach_the_pacs(tmp_path: Path) -> None:
    """Segmentation, nodule detection and emphysema grading on one chest CT: SEG + three SRs."""
    stack_gen = _start(tmp_path, redis_mode=False,
                       models=("ct-hu-segmentation", "ct-lung-nodules", "ct-emphysema"))
    stack = next(stack_gen)
    try:
        phantom = make_ct_phantom(n_slices=48, rows=160, cols=160, pixel_mm=2.2, slice_mm=2.5, seed=21,
                                  emphysema=0.2, blur_mm=0.0)
        files = write_ct_series(phantom, tmp_path / "chest", uid_seed="chest-families")
        study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        assert storescu(stack.node_port, tmp_path / "chest").returncode == 0
        def all_results() -> bool:  # SEG of the organs and of the nodules; an SR and a PDF per model
            mods = stack.orthanc.modalities_of_study(study_uid)
            return {"SEG": 2, "SR": 3, "DOC": 3}.items() <= mods.items() and mods.get("OT", 0) >= 3

        try:
            wait_for(all_results, 300, what="2 SEG + 3 SR + 3 PDF + key images")
        except TimeoutError:
            print(stack.logs()[-5000:])
            raise
        time.sleep(1.0)  # nothing more should come
        sr_files = stack.orthanc.instance_files(study_uid, "SR")
        for modality in ("SEG", "SR", "OT", "DOC"):
            for i, data in enumerate(stack.orthanc.instance_files(study_uid, modality)):
                _validate(tmp_path, f"{modality}-{i}.dcm", data)
        _check_study_consistency(stack, study_uid, files, tmp_path)
        # Orthanc (1.10) does not accept Label Map Segmentation: the nodules came as the BINARY fallback
        segs = {str(ds.SeriesDescription): ds for ds in
                (pydicom.dcmread(io.BytesIO(b)) for b in stack.orthanc.instance_files(study_uid, "SEG"))}
        nodule_seg = segs["AI SEG ct-lung-nodules"]
        assert nodule_seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
        assert _status(stack)["deliveries"].get("not-needed") == 1  # the LABELMAP SEG
        srs = [pydicom.dcmread(io.BytesIO(b)) for b in sr_files]
        reports = {str(ds.SeriesDescription): hd.sr.Comprehensive3DSR.from_dataset(ds) for ds in srs}

        nodules = reports["AI SR ct-lung-nodules"].content
        assert isinstance(nodules, hd.sr.MeasurementReport)
        # findings only (their cores are in the SEG): OHIF cannot open planar + volumetric groups
        assert nodules.get_volumetric_roi_measurement_groups() == []
        planar = nodules.get_planar_roi_measurement_groups()
        source_uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
        big = [n for n in phantom.nodules if n.diameter_mm >= 6]
        assert len(big) >= 1 and len(big) <= len(planar) <= len(big) + 2  # found, few false positives
        for group in planar:
            assert isinstance(group.roi, hd.sr.ImageRegion)
            (image,) = group.roi.ContentSequence[0].ReferencedSOPSequence
            assert image.ReferencedSOPInstanceUID in source_uids  # drawn on a source slice
            (diameter,) = group.get_measurements(name=codes.SCT.Diameter)
            assert 3.0 <= float(diameter.value) <= 32.0

        emphysema = reports["AI SR ct-emphysema"].content
        assert isinstance(emphysema, hd.sr.MeasurementReport)
        [grading] = emphysema.get_image_measurement_groups()
        lungs = phantom.truth("Right Lung") | phantom.truth("Left Lung")
        truth_laa = float((phantom.hu[lungs] < -950).mean() * 100)
        [score] = grading.get_measurements(name=Code("246262008", "SCT", "Score"))
        assert abs(float(score.value) - truth_laa) <= 3.0, (float(score.value), truth_laa)
        [grade] = grading.get_qualitative_evaluations(name=Code("87433001", "SCT", "Pulmonary emphysema"))
        # absent < 5 <= mild < 15 <= moderate < 25 <= severe (LAA-950 %)
        grades = [(5, "272519000"), (15, "255604002"), (25, "6736007"), (101, "24484000")]
        expected = next(code for limit, code in grades if truth_laa < limit)
        assert grade.value.value == expected, (truth_laa, grade.value)  # type: ignore[union-attr]
    finally:
        for _ in stack_gen:  # runs the generator's clean-up
            pass


def _lung_centroid(phantom: Phantom) -> np.ndarray:
    """LPS centroid (mm) of the phantom's true lungs (the table does not move with the patient)."""
    k, j, i = np.nonzero(phantom.truth("Right Lung") | phantom.truth("Left Lung"))
    ijk1 = np.stack([i, j, k, np.ones_like(i)]).astype(float)
    return (phantom.affine @ ijk1)[:3].mean(axis=1)


@pytest.mark.parametrize("multiframe", [False, True], ids=["single-frame", "multi-frame-current"])
def test_registration_of_the_prior_study(tmp_path: Path, multiframe: bool) -> None:
    """A patient's second study: the prior is found in the catalog, registered, and sent back as a
    derived series on the current frame of reference plus an SR with the residual. The current
    series comes as single-frame slices, or as ONE Legacy Converted Enhanced CT image (then the
    registered prior is still one CT image per slice, on the frames' positions)."""
    stack_gen = _start(tmp_path, redis_mode=False, models=("ct-registration",))
    stack = next(stack_gen)
    try:
        kw = {"n_slices": 40, "rows": 128, "cols": 128, "pixel_mm": 3.0, "slice_mm": 2.5}
        prior = make_ct_phantom(seed=31, **kw)  # type: ignore[arg-type]
        current = make_ct_phantom(seed=32, shift_mm=(6.0, -4.0, 5.0), rotation_deg=4.0, **kw)  # type: ignore[arg-type]
        prior_files = write_ct_series(prior, tmp_path / "prior", uid_seed="reg-prior", patient_id="REG-1")
        current_files = write_ct_series(current, tmp_path / "current", uid_seed="reg-current", patient_id="REG-1")
        assert storescu(stack.node_port, tmp_path / "prior").returncode == 0
        wait_for(lambda: _status(stack)["jobs"] == {"skipped": 1}, 120, what="the first study skipped: no prior")
        pushed, sources, args = tmp_path / "current", current_files, ()
        if multiframe:
            mf = hd.legacy.LegacyConvertedEnhancedCTImage(
                [pydicom.dcmread(f) for f in current_files], series_instance_uid=pydicom.uid.generate_uid(),
                series_number=3, sop_instance_uid=pydicom.uid.generate_uid(), instance_number=1)
            pushed = tmp_path / "current-multiframe"
            pushed.mkdir()
            sources = [pushed / "enhanced.dcm"]
            mf.save_as(sources[0], enforce_file_format=True)
            args = ("-R",)  # propose the file's own SOP class
        assert storescu(stack.node_port, pushed, *args).returncode == 0
        study_uid = str(pydicom.dcmread(current_files[0], stop_before_pixels=True).StudyInstanceUID)
        expected = {"CT": 40, "SR": 1, "REG": 1, "DOC": 1}
        try:
            wait_for(lambda: expected.items() <= stack.orthanc.modalities_of_study(study_uid).items(), 300,
                     what="registered prior series, SR, spatial registration and PDF")
        except TimeoutError:
            print(stack.logs()[-5000:])
            raise
        time.sleep(1.0)
        assert set(stack.orthanc.modalities_of_study(study_uid)) == {*expected, "OT"}
        [reg_bytes] = stack.orthanc.instance_files(study_uid, "REG")
        _validate(tmp_path, "spatial-registration.dcm", reg_bytes)
        sro = pydicom.dcmread(io.BytesIO(reg_bytes))
        prior_ds = pydicom.dcmread(prior_files[0], stop_before_pixels=True)
        current_ds = pydicom.dcmread(current_files[0], stop_before_pixels=True)
        assert sro.FrameOfReferenceUID == current_ds.FrameOfReferenceUID
        [prior_item] = [r for r in sro.RegistrationSequence if r.FrameOfReferenceUID == prior_ds.FrameOfReferenceUID]
        matrix = np.array(
            prior_item.MatrixRegistrationSequence[0].MatrixSequence[0].FrameOfReferenceTransformationMatrix,
            dtype=float).reshape(4, 4)
        # the phantoms share their anatomy: the prior's lung centroid maps onto the current one's
        assert np.allclose(matrix[3], [0, 0, 0, 1])
        mapped = matrix @ np.append(_lung_centroid(prior), 1.0)
        distance = float(np.linalg.norm(mapped[:3] - _lung_centroid(current)))
        print(f"spatial registration: prior lung centroid lands {distance:.2f} mm from the current one")
        assert distance < 3.0
        _check_study_consistency(stack, study_uid, sources, tmp_path, extra=prior_files)
        registered = sorted((pydicom.dcmread(io.BytesIO(b)) for b in stack.orthanc.instance_files(study_uid, "CT")),
                            key=lambda d: float(d.ImagePositionPatient[2]))
        _validate(tmp_path, "registered.dcm", stack.orthanc.instance_files(study_uid, "CT")[0])
        cur = sorted((pydicom.dcmread(f) for f in current_files), key=lambda d: float(d.ImagePositionPatient[2]))
        assert {d.FrameOfReferenceUID for d in registered} == {cur[0].FrameOfReferenceUID}
        assert [d.ImagePositionPatient for d in registered] == [d.ImagePositionPatient for d in cur]
        reg = np.stack([d.pixel_array.astype(np.float32) for d in registered])
        now = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in cur])
        before = np.stack([pydicom.dcmread(f).pixel_array * 1.0 - 1024 for f in sorted(
            prior_files, key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]))])
        inner = (slice(8, -8), slice(16, -16), slice(16, -16))  # away from the field-of-view edge
        err_registered = float(np.abs(reg[inner] - now[inner]).mean())
        err_unregistered = float(np.abs(before[inner] - now[inner]).mean())
        print(f"mean |HU difference| to the current study: {err_unregistered:.1f} before, "
              f"{err_registered:.1f} after registration")
        assert err_registered < 0.5 * err_unregistered
        [sr] = [pydicom.dcmread(io.BytesIO(b)) for b in stack.orthanc.instance_files(study_uid, "SR")]
        report = hd.sr.Comprehensive3DSR.from_dataset(sr).content
        assert isinstance(report, hd.sr.MeasurementReport)
        [group] = report.get_image_measurement_groups()
        [residual] = group.get_measurements(name=Code("121206", "DCM", "Distance"))
        assert 0 <= float(residual.value) < 5.0
    finally:
        for _ in stack_gen:
            pass
