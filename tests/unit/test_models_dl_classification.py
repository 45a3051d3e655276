"""dl-emphysema-classification (MONAI Classifier demo weights) on held-out phantoms."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

from models.base import UnsuitableInput, Volume  # noqa: E402
from models.ct_emphysema import GRADES  # noqa: E402
from models.dl_emphysema_classification.model import DlEmphysemaClassification  # noqa: E402
from testkit.dl_synth import emphysema_grade  # noqa: E402
from testkit.phantom import Phantom, make_ct_phantom  # noqa: E402

# One phantom per grade, emphysema fraction in the middle of its band. Measured with the shipped
# 0.1.0-demo weights: all four graded correctly; the test allows one miss.
FRACTIONS = (0.0, 0.10, 0.20, 0.35)
AGREEMENT_MIN = 3


def held_out() -> list[Phantom]:
    return [
        make_ct_phantom(48, 160, 160, pixel_mm=2.2, slice_mm=4.0, seed=31 + i, emphysema=f, nodules=2)
        for i, f in enumerate(FRACTIONS)
    ]


@pytest.fixture(scope="module")
def model() -> DlEmphysemaClassification:
    return DlEmphysemaClassification(device="cpu")


def test_grades_on_held_out_phantoms(model: DlEmphysemaClassification) -> None:
    agree = 0
    for phantom, fraction in zip(held_out(), FRACTIONS, strict=True):
        result = model.run(phantom.to_volume())
        assert (result.model_name, result.model_version) == ("dl-emphysema-classification", "0.1.0-demo")
        (cls,) = result.classifications
        assert cls.name == "Emphysema" and cls.concept == model.manifest.outputs[0].type
        assert cls.value in GRADES and cls.score_unit == "1" and 0.0 < cls.score <= 1.0
        probs = [cls.details[f"P({g.meaning})"] for g in GRADES]
        assert sum(probs) == pytest.approx(1.0, abs=1e-4) and cls.score == pytest.approx(max(probs))
        assert cls.details["lung volume (ml)"] > 100
        print(fraction, cls.value.meaning, [round(p, 2) for p in probs])
        agree += GRADES.index(cls.value) == emphysema_grade(fraction)
    assert agree >= AGREEMENT_MIN


def test_shares_a_given_segmenter(model: DlEmphysemaClassification) -> None:
    other = DlEmphysemaClassification(device="cpu", segmenter=model.segmenter)
    assert other.segmenter is model.segmenter


def test_no_lungs_is_unsuitable(model: DlEmphysemaClassification) -> None:
    chest = make_ct_phantom(20, 96, 96, pixel_mm=3.2, slice_mm=5.0, seed=3, nodules=0)
    soft = chest.hu.astype(np.float32)
    soft[chest.truth("Right Lung") | chest.truth("Left Lung") | chest.truth("Airway")] = 40.0  # no air in the chest
    v = chest.to_volume()
    with pytest.raises(UnsuitableInput, match="ml of lung"):
        model.run(Volume(soft, v.affine, "CT", v.sop_instance_uids, v.frame_of_reference_uid))
    with pytest.raises(UnsuitableInput, match="modality"):
        model.run(Volume(v.voxels, v.affine, "MR", v.sop_instance_uids, v.frame_of_reference_uid))
