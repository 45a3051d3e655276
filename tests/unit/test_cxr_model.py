"""cxr-lung-fields on synthetic chest radiographs (testkit.cxr_phantom): lung Dice, widths, CTR and
its classification, sides from the geometry, refusals."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from models.base import UnsuitableInput
from models.cxr_lung_fields import CARDIOMEGALY, CxrLungFields
from testkit.cxr_phantom import make_cxr_phantom

MODEL = CxrLungFields()


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.mark.parametrize("ctr", [0.40, 0.46, 0.55, 0.60])
def test_lungs_widths_and_ratio(ctr: float) -> None:
    phantom = make_cxr_phantom(ctr=ctr, seed=int(ctr * 100))
    result = MODEL.run(phantom.to_volume())
    lungs = {s.name: s.mask[0] for s in result.segments}
    (c,) = result.classifications
    heart, thorax = (m.value for m in c.measurements)
    d_right, d_left = dice(lungs["Right Lung"], phantom.right_lung), dice(lungs["Left Lung"], phantom.left_lung)
    print(f"CTR {phantom.ctr:.3f} -> {c.score:.3f}; heart {phantom.heart_width_mm:.0f} -> {heart:.0f} mm, "
          f"thorax {phantom.thoracic_width_mm:.0f} -> {thorax:.0f} mm; Dice R {d_right:.3f} L {d_left:.3f}")
    assert d_right >= 0.92 and d_left >= 0.92
    assert abs(thorax - phantom.thoracic_width_mm) <= 6.0
    assert abs(heart - phantom.heart_width_mm) <= 10.0
    assert abs(c.score - phantom.ctr) <= 0.04
    assert c.concept == CARDIOMEGALY
    assert c.value.meaning == ("Present" if c.score > 0.5 else "Absent")
    assert [m.site.meaning for m in c.measurements if m.site] == ["Heart", "Thorax"]


def test_clear_cases_are_classified_right() -> None:
    normal = MODEL.run(make_cxr_phantom(ctr=0.40, seed=31).to_volume()).classifications[0]
    enlarged = MODEL.run(make_cxr_phantom(ctr=0.62, seed=32).to_volume()).classifications[0]
    assert (normal.value.meaning, enlarged.value.meaning) == ("Absent", "Present")


def test_sides_follow_the_geometry_not_the_screen() -> None:
    """Mirrored pixels with columns running towards the patient's right: the same lungs, same sides."""
    phantom = make_cxr_phantom(ctr=0.5, seed=33)
    volume = phantom.to_volume()
    mirrored_affine = volume.affine.copy()
    mirrored_affine[:3, 0] *= -1.0
    mirrored = replace(volume, voxels=volume.voxels[:, :, ::-1].copy(), affine=mirrored_affine)
    a = {s.name: s.mask[0] for s in MODEL.run(volume).segments}
    b = {s.name: s.mask[0][:, ::-1] for s in MODEL.run(mirrored).segments}
    assert dice(a["Right Lung"], b["Right Lung"]) > 0.99 and dice(a["Left Lung"], b["Left Lung"]) > 0.99
    assert dice(a["Right Lung"], phantom.right_lung) > 0.9


def test_widths_scale_with_the_pixel_size_ratio_does_not() -> None:
    phantom = make_cxr_phantom(ctr=0.5, seed=34)
    volume = phantom.to_volume()
    bigger = replace(volume, affine=np.diag([1.2, 1.2, 1.0, 1.0]) @ volume.affine)
    c1, c2 = MODEL.run(volume).classifications[0], MODEL.run(bigger).classifications[0]
    assert c2.measurements[0].value == pytest.approx(1.2 * c1.measurements[0].value, rel=0.03)
    assert c2.score == pytest.approx(c1.score, abs=0.02)


def test_refusals() -> None:
    volume = make_cxr_phantom(seed=35).to_volume()
    with pytest.raises(UnsuitableInput, match="modality"):
        MODEL.check(replace(volume, modality="CT"))
    with pytest.raises(UnsuitableInput, match="one image"):
        MODEL.check(replace(volume, voxels=np.repeat(volume.voxels, 2, axis=0),
                            sop_instance_uids=("1.2.3", "1.2.4")))
    flat = np.random.default_rng(0).normal(100.0, 1.0, volume.voxels.shape).astype(np.float32)
    with pytest.raises(UnsuitableInput, match="lung fields not found"):
        MODEL.run(replace(volume, voxels=flat))


def test_evaluate_reports_the_radiograph_figures() -> None:
    """``dicom-node models evaluate --family xray``: held-out radiographs, every target met."""
    from testkit.evaluate import evaluate, format_table

    rows = evaluate(["xray"], seed=3)
    print("\n" + format_table(rows))
    assert {r.model for r in rows} == {"cxr-lung-fields"} and len(rows) == 7
    assert all(r.passed for r in rows), [r for r in rows if not r.passed]
