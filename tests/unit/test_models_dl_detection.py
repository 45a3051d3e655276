"""dl-lung-nodule-detection (centre-heatmap U-Net demo weights) on held-out phantoms."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

from models.base import ModelResult, Volume  # noqa: E402
from models.dl_lung_nodule_detection.model import DlNoduleDetection, decode_peaks  # noqa: E402
from testkit.evaluate import match_detections  # noqa: E402
from testkit.phantom import Nodule, Phantom, make_ct_phantom  # noqa: E402

# Measured with the shipped 0.1.0-demo weights on these three phantoms: every nodule of 6 mm or
# more found, no false positive. testkit.dl_evaluate reports more cases (random geometry, thick
# slices), where sensitivity is lower.
SENSITIVITY_MIN = 0.8
FP_PER_SCAN_MAX = 1.0


def held_out() -> list[Phantom]:
    return [
        make_ct_phantom(60, 192, 192, pixel_mm=1.8, slice_mm=2.5, seed=21, nodules=5, vessels=2),
        make_ct_phantom(48, 160, 160, pixel_mm=2.2, slice_mm=3.0, seed=22, nodules=4, emphysema=0.1),
        make_ct_phantom(
            64,
            160,
            160,
            pixel_mm=2.0,
            slice_mm=2.5,
            seed=23,
            nodules=[
                Nodule((-60.0, 0.0, 20.0), 12.0, "Right"),
                Nodule((70.0, -10.0, 30.0), 8.0, "Left"),
                Nodule((55.0, 15.0, -10.0), 16.0, "Left"),
            ],
        ),
    ]


@pytest.fixture(scope="module")
def model() -> DlNoduleDetection:
    return DlNoduleDetection(device="cpu")


@pytest.fixture(scope="module")
def cases(model: DlNoduleDetection) -> list[tuple[Phantom, ModelResult]]:
    return [(p, model.run(p.to_volume())) for p in held_out()]


def test_sensitivity_and_false_positives(cases: list[tuple[Phantom, ModelResult]]) -> None:
    tp = fn = fp = 0
    for phantom, result in cases:
        score = match_detections(result.detections, phantom.nodules, min_diameter_mm=6.0)
        every = match_detections(result.detections, phantom.nodules, min_diameter_mm=0.0)
        print(phantom.seed, [round(n.diameter_mm, 1) for n in phantom.nodules], score)
        tp, fn, fp = tp + score.true_positives, fn + score.false_negatives, fp + every.false_positives
    assert tp / (tp + fn) >= SENSITIVITY_MIN, (tp, fn)
    assert fp / len(cases) <= FP_PER_SCAN_MAX, fp


def test_detection_fields_are_consistent(model: DlNoduleDetection, cases: list[tuple[Phantom, ModelResult]]) -> None:
    phantom, result = cases[2]
    assert (result.model_name, result.model_version) == ("dl-lung-nodule-detection", "0.1.0-demo")
    assert result.segments == () and result.classifications == () and result.registration is None
    assert result.detections, "the explicit nodules must be found"
    volume = phantom.to_volume()
    scores = [d.confidence for d in result.detections]
    assert scores == sorted(scores, reverse=True)
    for n, d in enumerate(result.detections, start=1):
        assert d.label == f"Nodule {n}" and d.tracking_id == f"nodule-{n}"
        assert d.type == model.manifest.outputs[0].type
        assert np.allclose(volume.to_patient(d.centre_ijk), d.centre_lps, atol=1e-6)
        assert all(lo <= c <= hi for lo, c, hi in zip(d.bbox_ijk_min, d.centre_ijk, d.bbox_ijk_max, strict=True))
        assert all(0 <= v < s for v, s in zip(d.bbox_ijk_max, volume.voxels.shape[::-1], strict=True))
        assert 0.0 < d.confidence <= 1.0 and d.diameter_mm >= model.params.min_diameter_mm
    truth = {n.diameter_mm: np.asarray(n.center_lps) for n in phantom.nodules}
    for diameter, centre in truth.items():
        nearest = min(result.detections, key=lambda d: float(np.linalg.norm(np.subtract(d.centre_lps, centre))))
        assert np.linalg.norm(np.subtract(nearest.centre_lps, centre)) <= 3.0
        assert abs(nearest.diameter_mm - diameter) <= 0.5 * diameter


def test_mirrored_volume_gives_the_same_patient_positions(
    model: DlNoduleDetection, cases: list[tuple[Phantom, ModelResult]]
) -> None:
    phantom, result = cases[2]
    v = phantom.to_volume()
    affine = v.affine.copy()
    affine[:3, 3] += (v.voxels.shape[2] - 1) * affine[:3, 0]
    affine[:3, 0] *= -1
    mirrored = Volume(np.ascontiguousarray(v.voxels[:, :, ::-1]), affine, "CT", v.sop_instance_uids, "1.2.3")
    again = model.run(mirrored).detections
    assert len(again) == len(result.detections)
    for a, b in zip(
        sorted(again, key=lambda d: d.centre_lps), sorted(result.detections, key=lambda d: d.centre_lps), strict=True
    ):
        assert np.linalg.norm(np.subtract(a.centre_lps, b.centre_lps)) <= 2.0


def test_decode_peaks_finds_subvoxel_maxima() -> None:
    heat = torch.zeros(20, 20, 20)
    heat[5, 6, 7] = 0.9
    heat[5, 6, 8] = 0.9 / 2  # pulls the centre towards +x
    heat[15, 15, 15] = 0.2  # below the threshold
    peaks = decode_peaks(heat, 0.3, 10)
    assert len(peaks) == 1
    zyx, score = peaks[0]
    assert score == pytest.approx(0.9)
    assert zyx[:2] == pytest.approx([5.0, 6.0]) and 7.0 < zyx[2] < 7.5
