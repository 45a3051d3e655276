"""mr-brain-segmentation on synthetic MR heads (testkit.mr_phantom): T1 and T2, noise, bias field,
arbitrary scanner scale; the intensity tools; refusals."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from models.base import UnsuitableInput
from models.mr_brain_segmentation import MrBrainParams, MrBrainSegmentation
from models.mr_brain_segmentation.intensity import correct_bias, has_simpleitk, kmeans_1d, otsu, otsu3
from testkit.mr_phantom import make_mr_phantom


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


SMOOTH = MrBrainSegmentation(MrBrainParams(bias="smooth"))


@pytest.mark.parametrize(("weighting", "noise"), [("T1", 0.03), ("T1", 0.06), ("T2", 0.03), ("T2", 0.06)])
def test_head_and_brain_against_truth(weighting: str, noise: float) -> None:
    phantom = make_mr_phantom(weighting, noise=noise, bias=0.3, seed=11)  # type: ignore[arg-type]
    result = SMOOTH.run(phantom.to_volume())
    got = {s.name: s.mask for s in result.segments}
    brain_err = (got["Brain"].sum() - phantom.truth("Brain").sum()) / phantom.truth("Brain").sum()
    print(f"{weighting} noise {noise}: head Dice {dice(got['Head'], phantom.truth('Head')):.3f}, brain Dice "
          f"{dice(got['Brain'], phantom.truth('Brain')):.3f}, brain volume error {100 * brain_err:+.1f} %")
    assert dice(got["Head"], phantom.truth("Head")) >= 0.95
    assert dice(got["Brain"], phantom.truth("Brain")) >= 0.95
    assert abs(brain_err) <= 0.06
    assert f"{weighting}-like" in result.notes[0]  # the weighting is recognised from the image
    assert not (got["Brain"] & ~got["Head"]).any()


def test_no_absolute_thresholds_scale_and_offset_free() -> None:
    """The same head at another scanner gain gives the same masks (Otsu and percentiles only)."""
    phantom = make_mr_phantom("T1", seed=12)
    volume = phantom.to_volume()
    scaled = replace(volume, voxels=(volume.voxels * 7.3).astype(np.float32))
    a = {s.name: s.mask for s in SMOOTH.run(volume).segments}
    b = {s.name: s.mask for s in SMOOTH.run(scaled).segments}
    assert dice(a["Brain"], b["Brain"]) > 0.995 and dice(a["Head"], b["Head"]) > 0.995


def test_strong_bias_field_is_corrected() -> None:
    phantom = make_mr_phantom("T1", bias=0.6, seed=13)
    brain = next(s.mask for s in SMOOTH.run(phantom.to_volume()).segments if s.name == "Brain")
    assert dice(brain, phantom.truth("Brain")) >= 0.93


@pytest.mark.skipif(not has_simpleitk(), reason="N4 needs SimpleITK (the ml extra)")
def test_n4_when_simpleitk_is_installed() -> None:
    phantom = make_mr_phantom("T2", seed=14)
    result = MrBrainSegmentation(MrBrainParams(bias="n4")).run(phantom.to_volume())
    brain = next(s.mask for s in result.segments if s.name == "Brain")
    assert "bias field: n4" in result.notes[0]
    assert dice(brain, phantom.truth("Brain")) >= 0.95


def test_refuses_other_modalities_and_non_heads() -> None:
    volume = make_mr_phantom("T1", seed=15).to_volume()
    with pytest.raises(UnsuitableInput, match="modality"):
        SMOOTH.check(replace(volume, modality="CT"))
    small = np.zeros_like(volume.voxels)
    small[10:20, 60:70, 60:70] = 1000.0  # a 40 ml block: not a head
    small += np.random.default_rng(0).normal(20.0, 5.0, small.shape).astype(np.float32)
    with pytest.raises(UnsuitableInput, match="not a head"):
        SMOOTH.run(replace(volume, voxels=small))


def test_intensity_tools() -> None:
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.normal(10, 1, 5000), rng.normal(50, 2, 3000), rng.normal(100, 3, 2000)])
    t = otsu(values[:8000])
    assert (values[:5000] < t).all() and (values[5000:8000] > t).all()
    lo, hi = otsu3(values)
    classes = np.searchsorted([lo, hi], values)
    assert (classes[:5000] == 0).mean() > 0.99 and (classes[5000:8000] == 1).mean() > 0.99
    assert (classes[8000:] == 2).mean() > 0.99
    assert np.allclose(kmeans_1d(values, 3), [10, 50, 100], atol=1.0)
    field = np.linspace(0.8, 1.25, 64, dtype=np.float32)[None, None, :] * np.ones((8, 32, 64), np.float32)
    levels = np.array([20.0, 100.0, 250.0], dtype=np.float32)[(np.arange(64) // 6) % 3]
    truth = levels[None, None, :] * np.ones_like(field)
    corrected, method = correct_bias(truth * field, np.ones(field.shape, bool), (4.0, 2.0, 2.0), "smooth")
    assert method == "smooth"
    ratio = (corrected / truth)[..., levels > 20]
    assert float(ratio.std() / ratio.mean()) < 0.5 * float(field.std() / field.mean())  # the field at least halved
