"""The classical ct-emphysema model (LAA-950 and grade) on phantoms with known emphysema and on the real CT."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from models import registry
from models.base import Classification, Code, ModelResult, UnsuitableInput, Volume
from models.ct_emphysema import GRADES, AirwayParams, CtEmphysema, EmphysemaParams, grade
from testkit.phantom import Phantom, make_ct_phantom

# Targets (written here, computed against the phantoms' truth below).
MIN_AGREEMENT = 7  # of 8 cases
MAX_LAA_ERROR = 3.0  # percentage points, overall and per lung
# Emphysema fractions spanning the grades (none < 5 <= mild < 15 <= moderate < 25 <= severe).
CASES = ((111, 0.0), (112, 0.02), (113, 0.07), (114, 0.13), (115, 0.17), (116, 0.23), (117, 0.28), (118, 0.42))
ABSENT, MILD, MODERATE, SEVERE = GRADES


def phantom(seed: int, emphysema: float = 0.0, **kwargs: object) -> Phantom:
    """64 x 160 x 160, 1.5 mm pixels. No in-plane blur: emphysema patches are a few pixels wide and
    partial volume with -850 HU lung would lift their rim above -950 HU, so that the truth LAA%
    (labelled voxels) would no longer be what a perfect LAA-950 measurement sees."""
    kwargs.setdefault("blur_mm", 0.0)
    return make_ct_phantom(64, 160, 160, pixel_mm=1.5, slice_mm=2.5, seed=seed, emphysema=emphysema, **kwargs)  # type: ignore[arg-type]


def truth_percent(p: Phantom, side: str | None = None) -> float:
    """Percentage of lung parenchyma (of one side or both) labelled emphysema."""
    sides = ("Right", "Left") if side is None else (side,)
    lung = np.zeros(p.shape, dtype=bool)
    emph = np.zeros(p.shape, dtype=bool)
    for s in sides:
        lung |= p.truth(f"{s} Lung")
        emph |= p.truth(f"{s} Emphysema")
    return 100.0 * float(emph.sum()) / float(lung.sum())


@pytest.fixture(scope="module")
def model() -> CtEmphysema:
    return CtEmphysema()


@pytest.fixture(scope="module")
def runs(model: CtEmphysema) -> list[tuple[Phantom, ModelResult]]:
    out = []
    for seed, fraction in CASES:
        p = phantom(seed, fraction)
        out.append((p, model.run(p.to_volume())))
    return out


def test_manifest_and_registry(model: CtEmphysema) -> None:
    m = registry.manifest("ct-emphysema")
    assert (m.name, m.version, m.family, m.modalities, m.objects) == (
        "ct-emphysema",
        "1.0.0",
        "classification",
        ("CT",),
        ("SR", "SC", "PDF"),
    )
    assert [o.type for o in m.outputs] == [Code("87433001", "SCT", "Pulmonary emphysema")]
    assert registry.load("ct-emphysema").manifest == m == model.manifest


def test_grade_bands() -> None:
    assert [grade(v) for v in (0.0, 4.99, 5.0, 14.99, 15.0, 24.99, 25.0, 80.0)] == [
        ABSENT,
        ABSENT,
        MILD,
        MILD,
        MODERATE,
        MODERATE,
        SEVERE,
        SEVERE,
    ]
    assert [g.value for g in GRADES] == ["272519000", "255604002", "6736007", "24484000"]
    assert all(g.scheme == "SCT" for g in GRADES)


def test_grades_and_laa_on_phantoms(runs: list[tuple[Phantom, ModelResult]]) -> None:
    truth_grades = {grade(truth_percent(p)) for p, _ in runs}
    assert truth_grades == set(GRADES), "the cases must span all grades"
    agree = 0
    for p, result in runs:
        (c,) = result.classifications
        truth = truth_percent(p)
        print(f"seed {p.seed}: truth {truth:5.2f} %, LAA {c.score:5.2f} %, {c.value.meaning}")
        agree += int(c.value == grade(truth))
        assert abs(c.score - truth) <= MAX_LAA_ERROR, (p.seed, truth, c.score)
        assert abs(c.details["LAA% right lung"] - truth_percent(p, "Right")) <= MAX_LAA_ERROR
        assert abs(c.details["LAA% left lung"] - truth_percent(p, "Left")) <= MAX_LAA_ERROR
    assert agree >= MIN_AGREEMENT


def test_classification_fields(runs: list[tuple[Phantom, ModelResult]]) -> None:
    p, result = runs[3]
    assert not result.detections and not result.segments and result.registration is None
    (c,) = result.classifications
    assert isinstance(c, Classification)
    assert c.name == "Emphysema" and c.concept == Code("87433001", "SCT", "Pulmonary emphysema")
    assert c.score_unit == "%" and c.value in GRADES
    d = c.details
    voxel_ml = p.pixel_mm**2 * p.slice_mm / 1000
    for side in ("right", "left"):
        truth_ml = p.truth(f"{side.title()} Lung").sum() * voxel_ml
        assert abs(d[f"{side} lung volume (ml)"] - truth_ml) <= 0.05 * truth_ml
    laa_ml = d["low-attenuation volume (ml)"]
    total_ml = d["right lung volume (ml)"] + d["left lung volume (ml)"]
    assert c.score == pytest.approx(100 * laa_ml / total_ml)


def test_airways_are_excluded(model: CtEmphysema) -> None:
    """No emphysema: the trachea and carina (-1000 HU) must not count as low attenuation."""
    p = phantom(119)
    airway_ml = float(p.truth("Airway").sum() * p.pixel_mm**2 * p.slice_mm / 1000)
    (c,) = model.run(p.to_volume()).classifications
    print(
        f"airways: truth {airway_ml:.1f} ml, excluded {c.details['airways excluded (ml)']:.1f} ml, LAA {c.score:.2f} %"
    )
    assert c.score < 1.0 and c.value == ABSENT
    # At least the trachea (about 40 % of the phantom's airway volume), and no leak beyond the airways.
    assert 0.4 * airway_ml <= c.details["airways excluded (ml)"] <= 1.2 * airway_ml
    # Negative control: without airway tracking the same scan shows all airways as LAA.
    blind = CtEmphysema(EmphysemaParams(airways=AirwayParams(seed_depth_mm=-1.0)))
    (c_blind,) = blind.run(p.to_volume()).classifications
    assert c_blind.details["airways excluded (ml)"] == 0.0
    assert c_blind.score - c.score > 0.4


def test_no_airway_leak_into_emphysema(runs: list[tuple[Phantom, ModelResult]]) -> None:
    """Emphysema next to the bronchi must not be taken for airway (it would lower LAA%)."""
    for p, result in runs:
        airway_ml = float(p.truth("Airway").sum() * p.pixel_mm**2 * p.slice_mm / 1000)
        assert result.classifications[0].details["airways excluded (ml)"] <= 1.2 * airway_ml, p.seed


def test_wrong_threshold_fails() -> None:
    """Negative control: a -850 HU threshold (normal lung) grades the empty case as severe."""
    p = phantom(111)
    (c,) = CtEmphysema(EmphysemaParams(laa_hu=-840.0)).run(p.to_volume()).classifications
    assert c.value == SEVERE and c.score - truth_percent(p) > MAX_LAA_ERROR


def test_real_ct_is_unsuitable(model: CtEmphysema, ct_real_20: Volume) -> None:
    """Upper abdomen with a sliver of lung: not a chest CT."""
    with pytest.raises(UnsuitableInput, match=r"only \d+ ml of lung .* not a chest CT"):
        model.run(ct_real_20)


def test_check_rejects_unsuitable_series(model: CtEmphysema) -> None:
    volume = phantom(120).to_volume()
    with pytest.raises(UnsuitableInput, match="modality"):
        model.check(dataclasses.replace(volume, modality="MR"))
    with pytest.raises(UnsuitableInput, match="slices"):
        model.check(
            dataclasses.replace(volume, voxels=volume.voxels[:4], sop_instance_uids=volume.sop_instance_uids[:4])
        )
    thick = volume.affine.copy()
    thick[2, 2] = 8.0
    with pytest.raises(UnsuitableInput, match="8 mm"):
        model.check(dataclasses.replace(volume, affine=thick))


def test_phantom_emphysema_option() -> None:
    base = phantom(121, nodules=2)
    for fraction in (0.05, 0.3):
        p = phantom(121, fraction, nodules=2)
        assert truth_percent(p) == pytest.approx(100 * fraction, abs=0.2)
        emph = p.truth("Emphysema")
        assert np.median(p.hu[emph]) == pytest.approx(-980, abs=5)
        # Only lung parenchyma changes; the rest of the phantom (and its noise) is untouched.
        lungs = base.truth("Right Lung") | base.truth("Left Lung")
        assert not (emph & ~lungs).any()
        assert np.array_equal(p.hu[~lungs], base.hu[~lungs])
        assert p.nodules == base.nodules
    assert not base.truth("Emphysema").any()
