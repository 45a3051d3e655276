"""End to end for MR and chest radiographs: storescu -> dicom-node -> Orthanc.

A T1 and a T2 MR head series (the rule picks the T1 one by SeriesDescription regex, ScanningSequence
and an EchoTime range) and a DX chest radiograph (MONOCHROME1, non-linear VOI LUT, Imager Pixel
Spacing with a magnification factor) are pushed; mr-brain-segmentation and cxr-lung-fields write SEG,
SR, key images and PDF into Orthanc. Every result passes dciodvfy with 0 errors, highdicom reads the
SEGs back, and the masks match the phantoms' truth on the source images.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from testkit.cxr_phantom import CxrPhantom, make_cxr_phantom, write_cxr
from testkit.harness import Orthanc, free_port, node_config, start_node_process, stop_process, storescu, wait_for
from testkit.mr_phantom import MrPhantom, make_mr_phantom, write_mr_series
from tests.e2e.test_end_to_end import QUIET_SECONDS, Stack, _dice, _validate

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

MR, CXR = "mr-brain-segmentation", "cxr-lung-fields"
RULES = [
    {"name": "mr-t1-head", "models": [MR], "send_to": ["pacs"],
     "match": {"Modality": "MR", "SeriesDescription": {"regex": r".*\bT1\b.*"}, "ScanningSequence": ["SE", "GR"],
               "EchoTime": {"max": 30}}},
    {"name": "chest-frontal", "models": [CXR], "send_to": ["pacs"],
     "match": {"Modality": ["CR", "DX"], "ViewPosition": ["PA", "AP"]}},
]


def results_of(orthanc: Orthanc, study_uid: str, model: str) -> dict[str, list[bytes]] | None:
    """SEG, SR, OT and DOC files of ``model`` in the study once all four series are there, else None
    (also used by tests/viewer/test_ohif_mr_xray.py)."""
    kinds = {"SEG": f"AI SEG {model}", "SR": f"AI SR {model}", "OT": f"AI KEY IMAGES {model}",
             "DOC": f"AI PDF REPORT {model}"}
    series = {s["MainDicomTags"].get("SeriesDescription"): s for s in orthanc.series_of_study(study_uid)}
    if not all(name in series and series[name]["Instances"] for name in kinds.values()):
        return None
    return {kind: [orthanc.get_bytes(f"/instances/{i}/file") for i in series[name]["Instances"]]
            for kind, name in kinds.items()}


def start_stack(tmp_path: Path) -> Iterator[Stack]:
    """The node (embedded workers) with the MR and radiograph rules, and Orthanc as its PACS (also used
    by tests/viewer/test_ohif_mr_xray.py)."""
    node_port, http_port = free_port(), free_port()
    orthanc = Orthanc(tmp_path, node_port=node_port).start()
    procs = []
    try:
        cfg = node_config(tmp_path, node_port=node_port, orthanc=orthanc, quiet_seconds=QUIET_SECONDS,
                          models=(MR, CXR), overrides={"rules": RULES}, http_port=http_port)
        procs.append(start_node_process(cfg, "run", "node.log", port=node_port))
        yield Stack(tmp_path, node_port, http_port, orthanc, procs)
    finally:
        for p in reversed(procs):
            stop_process(p)
        orthanc.stop()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    yield from start_stack(tmp_path)


def inputs(tmp_path: Path) -> tuple[Path, MrPhantom, list[Path], CxrPhantom, Path]:
    """Under ``tmp_path/push``: the T1 and T2 series of one MR head study, and one DX chest image.
    Returns (that folder, the T1 phantom, its files, the chest phantom, its file)."""
    push = tmp_path / "push"
    t1 = make_mr_phantom("T1", shape=(30, 112, 112), pixel_mm=2.0, slice_mm=5.0, seed=51)
    t1_files = write_mr_series(t1, push / "t1", uid_seed="e2e-mr-t1")
    t2 = make_mr_phantom("T2", shape=(30, 112, 112), pixel_mm=2.0, slice_mm=5.0, seed=51)
    write_mr_series(t2, push / "t2", uid_seed="e2e-mr-t2",
                    study_uid=str(pydicom.dcmread(t1_files[0], stop_before_pixels=True).StudyInstanceUID))
    cxr = make_cxr_phantom(ctr=0.58, seed=52)
    cxr_file = write_cxr(cxr, push / "dx" / "cxr.dcm", photometric="MONOCHROME1", voi_lut=True, magnification=1.1)
    return push, t1, t1_files, cxr, cxr_file


def test_mr_head_and_chest_radiograph(stack: Stack, tmp_path: Path) -> None:
    push, t1, t1_files, cxr, cxr_file = inputs(tmp_path)
    mr_study = str(pydicom.dcmread(t1_files[0], stop_before_pixels=True).StudyInstanceUID)
    dx_study = str(pydicom.dcmread(cxr_file, stop_before_pixels=True).StudyInstanceUID)
    t0 = time.monotonic()
    out = storescu(stack.node_port, push, "-R")  # propose the files' own SOP classes (MR, DX)
    assert out.returncode == 0, out.stderr
    try:
        mr = wait_for(lambda: results_of(stack.orthanc, mr_study, MR), 120, what="MR results in Orthanc")
        dx = wait_for(lambda: results_of(stack.orthanc, dx_study, CXR), 60, what="DX results in Orthanc")
    except TimeoutError:
        print(stack.logs()[-6000:])
        raise
    print(f"results of both studies in Orthanc {time.monotonic() - t0:.1f} s after the push")
    for model, files in ((MR, mr), (CXR, dx)):
        for kind, items in files.items():
            for n, data in enumerate(items):
                _validate(tmp_path, f"{model}-{kind}-{n}.dcm", data)

    # MR: one SEG (T1 only: the T2 series is not routed), on the T1 slices, matching the truth
    assert len(mr["SEG"]) == 1
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(io.BytesIO(mr["SEG"][0])))
    t1_sources = sorted((pydicom.dcmread(f, stop_before_pixels=True) for f in t1_files),
                        key=lambda d: float(d.ImagePositionPatient[2]))
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == t1_sources[0].SeriesInstanceUID
    pixels = seg.get_pixels_by_source_instance([str(d.SOPInstanceUID) for d in t1_sources], segment_numbers=[1, 2],
                                               combine_segments=False)
    labels = [seg.get_segment_description(n).segment_label for n in (1, 2)]
    assert labels == ["Head", "Brain"]
    brain_dice = _dice(pixels[..., 1] > 0, t1.truth("Brain"))
    print(f"MR brain Dice through Orthanc {brain_dice:.3f}")
    assert brain_dice >= 0.93

    # DX: a 2-D SEG on the radiograph, lung fields matching the truth; the SR states the view
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(io.BytesIO(dx["SEG"][0])))
    dx_uid = str(pydicom.dcmread(cxr_file, stop_before_pixels=True).SOPInstanceUID)
    lungs = seg.get_pixels_by_source_instance([dx_uid], segment_numbers=[1, 2], combine_segments=False)[0]
    for n, truth in enumerate((cxr.right_lung, cxr.left_lung)):
        assert _dice(lungs[..., n] > 0, truth) >= 0.9
    sr = pydicom.dcmread(io.BytesIO(dx["SR"][0]))
    text = str(sr.ContentSequence)
    assert "postero-anterior" in text and "Cardiomegaly" in text and "Thorax" in text
