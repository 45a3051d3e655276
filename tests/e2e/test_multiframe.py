"""End to end with a multi-frame input: a chest CT sent as ONE Legacy Converted Enhanced CT instance.

storescu -> dicom-node (ct-hu-segmentation, ct-lung-nodules) -> SEG + SR of each -> Orthanc. The frames are
stored head first (the reverse of the volume's k order), so frame references must be mapped, not
assumed: the SEG must reference the multi-frame instance frame by frame and match the phantom truth
there, and each nodule SCOORD must reference the frame through the nodule.
"""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from testkit.dicom import write_ct_series
from testkit.harness import Orthanc, storescu, wait_for
from testkit.phantom import make_ct_phantom, phantom_uid
from tests.e2e.test_end_to_end import _dice, _start, _validate

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def _frame_positions(mf: Dataset) -> np.ndarray:
    """(frames, 3) Image Position (Patient) of each frame, in frame order."""
    return np.array([[float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
                     for item in mf.PerFrameFunctionalGroupsSequence])


def _ready(orthanc: Orthanc, study_uid: str, names: tuple[str, ...]) -> dict[str, bytes] | None:
    """The one instance of each series described ``names`` once all are complete in Orthanc, else None."""
    series = {s["MainDicomTags"].get("SeriesDescription"): s for s in orthanc.series_of_study(study_uid)}
    if not all(name in series and series[name]["Instances"] for name in names):
        return None
    out = {}
    for name in names:
        [instance] = series[name]["Instances"]
        out[name] = orthanc.get_bytes(f"/instances/{instance}/file")
    return out


def test_legacy_converted_enhanced_ct(tmp_path: Path) -> None:
    phantom = make_ct_phantom(n_slices=48, rows=160, cols=160, pixel_mm=2.2, slice_mm=2.5, seed=21, blur_mm=0.0)
    written = write_ct_series(phantom, tmp_path / "single", uid_seed="multiframe-e2e", reverse_slices=True)
    single = [pydicom.dcmread(f) for f in written]  # instance order: head first
    mf = hd.legacy.LegacyConvertedEnhancedCTImage(
        single, series_instance_uid=phantom_uid("multiframe-e2e", "mf-series"), series_number=2,
        sop_instance_uid=phantom_uid("multiframe-e2e", "mf-sop"), instance_number=1,
        include_dimension_index=False,  # frames in the order given
    )
    series_dir = tmp_path / "multiframe"
    series_dir.mkdir()
    mf.save_as(series_dir / "enhanced.dcm", enforce_file_format=True)
    n = int(mf.NumberOfFrames)
    positions = _frame_positions(mf)
    assert n == phantom.shape[0] and positions[0, 2] > positions[-1, 2]  # stored against k
    # phantom slice (k, +z) of each frame
    k_of_frame = np.rint((positions[:, 2] - phantom.affine[2, 3]) / phantom.slice_mm).astype(int)
    mf_uid, study_uid = str(mf.SOPInstanceUID), str(mf.StudyInstanceUID)

    stack_gen = _start(tmp_path, redis_mode=False, models=("ct-hu-segmentation", "ct-lung-nodules"))
    stack = next(stack_gen)
    try:
        out = storescu(stack.node_port, series_dir, "-R")  # propose the SOP class of the file (not default)
        assert out.returncode == 0, out.stderr
        seg_name, sr_names = "AI SEG ct-hu-segmentation", ("AI SR ct-hu-segmentation", "AI SR ct-lung-nodules")
        try:
            results = wait_for(lambda: _ready(stack.orthanc, study_uid, (seg_name, *sr_names)), 300,
                             what="SEG + SR of both models from the multi-frame CT")
        except TimeoutError:
            print(stack.logs()[-6000:])
            raise
        for name, data in results.items():
            _validate(tmp_path, f"{name.replace(' ', '-')}.dcm", data)
        seg_bytes = results[seg_name]

        # SEG: references the multi-frame instance, frame by frame, and matches the truth there
        seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(io.BytesIO(seg_bytes)))
        [ref_series] = seg.ReferencedSeriesSequence
        assert ref_series.SeriesInstanceUID == mf.SeriesInstanceUID
        assert [str(r.ReferencedSOPInstanceUID) for r in ref_series.ReferencedInstanceSequence] == [mf_uid]
        referenced_frames = set()
        for item in seg.PerFrameFunctionalGroupsSequence:
            [source] = item.DerivationImageSequence[0].SourceImageSequence
            assert source.ReferencedSOPInstanceUID == mf_uid
            referenced_frames.add(int(source.ReferencedFrameNumber))
        assert referenced_frames and referenced_frames <= set(range(1, n + 1))
        numbers = seg.get_segment_numbers()
        pixels = seg.get_pixels_by_source_frame(
            source_sop_instance_uid=mf_uid, source_frame_numbers=list(range(1, n + 1)), segment_numbers=numbers,
            combine_segments=False, assert_missing_frames_are_empty=True)
        masks = {seg.get_segment_description(s).segment_label: pixels[..., i] > 0 for i, s in enumerate(numbers)}
        for name in ("Body", "Right Lung", "Left Lung"):
            d = _dice(masks[name], phantom.truth(name)[k_of_frame])
            print(f"{name}: Dice {d:.3f} (frame order)")
            assert d > 0.9, (name, d)

        # SR of the nodules: each SCOORD on the multi-frame instance, on the frame through a nodule
        nodules = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(io.BytesIO(results[sr_names[1]]))).content
        assert isinstance(nodules, hd.sr.MeasurementReport)
        planar = nodules.get_planar_roi_measurement_groups()
        big = [nd for nd in phantom.nodules if nd.diameter_mm >= 6]
        assert 1 <= len(big) <= len(planar) <= len(big) + 2
        shared = mf.SharedFunctionalGroupsSequence[0]
        iop = np.array([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient])
        dr, dc = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
        found = set()
        for group in planar:
            assert isinstance(group.roi, hd.sr.ImageRegion)
            [image] = group.roi.ContentSequence[0].ReferencedSOPSequence
            assert image.ReferencedSOPInstanceUID == mf_uid and image.ReferencedSOPClassUID == mf.SOPClassUID
            frame = int(image.ReferencedFrameNumber)
            assert 1 <= frame <= n
            col, row = np.asarray(group.roi.value, dtype=float)[0] - 0.5  # centre, pixel-centre convention
            centre = positions[frame - 1] + iop[:3] * dc * col + iop[3:] * dr * row
            hits = [i for i, nd in enumerate(phantom.nodules)
                    if np.linalg.norm(centre - np.array(nd.center_lps)) <= nd.diameter_mm / 2 + phantom.slice_mm]
            found.update(hits)
        assert {i for i, nd in enumerate(phantom.nodules) if nd.diameter_mm >= 6} <= found, found
    finally:
        for _ in stack_gen:  # runs the generator's clean-up
            pass
