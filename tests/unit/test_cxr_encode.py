"""The objects of cxr-lung-fields and mr-brain-segmentation: a 2-D SEG on one DX image (read back with
highdicom), the SR (areas, widths, CTR, view), key image, PDF; every object validated by dciodvfy."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from models.cxr_lung_fields import CxrLungFields
from models.mr_brain_segmentation import MrBrainParams, MrBrainSegmentation
from testkit.cxr_phantom import make_cxr_phantom, write_cxr
from testkit.mr_phantom import make_mr_phantom, write_mr_series
from tests.unit.encode_helpers import read_bytes, run_dciodvfy, write_bytes
from workers.load import load_series
from workers.outputs import Encoded, encode_results


def _walk(items: pydicom.Sequence) -> list[pydicom.Dataset]:
    out: list[pydicom.Dataset] = []
    for item in items:
        out.append(item)
        out += _walk(item.get("ContentSequence", []))
    return out


def _named(items: list[pydicom.Dataset], meaning: str) -> list[pydicom.Dataset]:
    return [i for i in items if "ConceptNameCodeSequence" in i and i.ConceptNameCodeSequence[0].CodeMeaning == meaning]


def _valid(objects: list[Encoded], tmp_path: Path) -> None:
    for n, item in enumerate(objects):
        errors, _ = run_dciodvfy(write_bytes(item.dataset), tmp_path, f"o{n}.dcm")
        if item.variant == "labelmap" and item.dataset.Modality == "SR":  # dciodvfy knows 66.4 only
            assert all("not segmentation" in e and "ReferencedSegmentNumber" in e for e in errors)
        else:
            assert errors == [], (item.dataset.Modality, item.variant)


@pytest.fixture(scope="module")
def cxr(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Encoded], np.ndarray]:
    phantom = make_cxr_phantom(ctr=0.56, seed=41)
    path = write_cxr(phantom, tmp_path_factory.mktemp("cxr") / "cxr.dcm", photometric="MONOCHROME1",
                     voi_lut=True, view_position="AP")
    volume, sources = load_series([path])
    model = CxrLungFields()
    return encode_results(model, sources, volume, model.run(volume), software_version="test"), phantom.right_lung


def test_cxr_objects_are_valid(cxr: tuple[list[Encoded], np.ndarray], tmp_path: Path) -> None:
    objects, _ = cxr
    assert sorted(str(o.dataset.Modality) for o in objects) == ["DOC", "OT", "SEG", "SEG", "SR", "SR"]
    _valid(objects, tmp_path)


def test_cxr_seg_on_the_2d_image(cxr: tuple[list[Encoded], np.ndarray]) -> None:
    objects, right_truth = cxr
    binary = next(o.dataset for o in objects if o.dataset.Modality == "SEG" and o.variant == "binary")
    seg = hd.seg.Segmentation.from_dataset(read_bytes(write_bytes(binary)))
    assert "FrameOfReferenceUID" not in seg and list(seg.PatientOrientation) == ["L", "F"]
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]  # OHIF needs them
    assert [float(v) for v in measures.PixelSpacing] == pytest.approx([0.495, 0.495])  # Imager Pixel Spacing
    assert "PlaneOrientationSequence" in seg.SharedFunctionalGroupsSequence[0]
    assert [seg.get_segment_description(n).segment_label for n in (1, 2)] == ["Right Lung", "Left Lung"]
    source_uid = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
    right = seg.get_pixels_by_source_instance([source_uid], segment_numbers=[1])[0, :, :, 0].astype(bool)
    assert 2.0 * (right & right_truth).sum() / (right.sum() + right_truth.sum()) > 0.92


def test_cxr_sr_reports_areas_widths_ratio_and_view(cxr: tuple[list[Encoded], np.ndarray]) -> None:
    objects, _ = cxr
    sr = next(o.dataset for o in objects if o.dataset.Modality == "SR" and o.variant == "binary")
    items = _walk(sr.ContentSequence)
    areas = _named(items, "Area")
    assert len(areas) == 2 and all(a.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == "mm2"
                                   for a in areas)
    assert not _named(items, "Volume")
    widths = {w.ContentSequence[0].ConceptCodeSequence[0].CodeMeaning: float(w.MeasuredValueSequence[0].NumericValue)
              for w in _named(items, "Width")}
    assert set(widths) == {"Heart", "Thorax"} and 0.5 < widths["Heart"] / widths["Thorax"] < 0.62
    (cardio,) = _named(items, "Cardiomegaly")
    assert cardio.ConceptCodeSequence[0].CodeValue == "52101004"  # Present
    (view,) = _named(items, "Image View")
    assert view.ConceptCodeSequence[0].CodeMeaning == "antero-posterior"


def test_mr_objects_are_valid_and_readable(tmp_path: Path) -> None:
    phantom = make_mr_phantom("T1", shape=(24, 96, 96), pixel_mm=2.4, slice_mm=6.0, seed=42)
    volume, sources = load_series(write_mr_series(phantom, tmp_path / "mr"))
    model = MrBrainSegmentation(MrBrainParams(bias="smooth"))
    objects = encode_results(model, sources, volume, model.run(volume), software_version="test")
    kinds = [str(o.dataset.Modality) for o in objects]
    assert set(kinds) == {"DOC", "OT", "SEG", "SR"} and kinds.count("SEG") == 1  # Brain inside Head: BINARY
    _valid(objects, tmp_path)
    seg = hd.seg.Segmentation.from_dataset(read_bytes(write_bytes(next(o.dataset for o in objects
                                                                       if o.dataset.Modality == "SEG"))))
    assert [seg.get_segment_description(n).segment_label for n in (1, 2)] == ["Head", "Brain"]
    sr = next(o.dataset for o in objects if o.dataset.Modality == "SR")
    volumes = [float(v.MeasuredValueSequence[0].NumericValue) for v in _named(_walk(sr.ContentSequence), "Volume")]
    assert volumes[1] == pytest.approx(phantom.truth_ml("Brain"), rel=0.08)
