"""ct-lung-nodules on 3-5 mm series (thick slices averaged from thin ones: partial volume along z)
and on masses over 30 mm, which it reports as masses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.base import Code, UnsuitableInput
from models.ct_lung_nodules import MANIFEST_PATH, CtLungNodules, NoduleParams
from models.ct_lung_nodules.model import LESION_SENSITIVITY
from models.errors import ManifestError
from models.manifest import load_manifest_file
from testkit.evaluate import match_detections
from testkit.phantom import NODULE
from testkit.thick_slices import RIGHT_LUNG_CENTRE, THICKNESSES, mass_phantom, thick_phantom

SCT_MASS = Code("4147007", "SCT", "Mass")
SCT_NODULE = Code("27925004", "SCT", "Nodule")
SEEDS = (301, 302)  # testkit.thick_slices measures the manifest's table on seeds 20000...


@pytest.fixture(scope="module")
def model() -> CtLungNodules:
    return CtLungNodules()


def test_thick_phantom_has_partial_volume_along_z() -> None:
    thin = thick_phantom(301, 1.0, nodules=5)
    thick = thick_phantom(301, 5.0, nodules=5)
    assert thick.shape == (32, 160, 160) and thin.shape == (160, 160, 160) and thick.nodules == thin.nodules
    # the same LPS extent; a slice of 5 mm is the mean of its ten 0.5 mm sub-slices
    assert thick.origin_lps[2] == pytest.approx(thin.origin_lps[2] + 2.0) == -77.5  # slab [-80, -75) vs [-80, -79)
    small = min(thick.nodules, key=lambda n: n.diameter_mm)
    k = round((small.center_lps[2] - thick.origin_lps[2]) / 5.0)
    peak_thin = thin.hu[thin.labels == NODULE].max()
    assert thick.hu[k][thick.labels[k] == NODULE].mean() < peak_thin  # contrast lost to the slab
    assert np.std(thick.hu[:, :8, :8]) < np.std(thin.hu[:, :8, :8])  # less noise in thicker slices


@pytest.mark.parametrize("slice_mm", [3.0, 4.0, 5.0])
def test_thick_series_are_analysed(model: CtLungNodules, slice_mm: float) -> None:
    tp = fn = fp = 0
    for seed in SEEDS:
        phantom = thick_phantom(seed, slice_mm, nodules=5, vessels=4)
        volume = phantom.to_volume()
        model.check(volume)  # no longer "needs slices at most 3 mm apart"
        result = model.run(volume)
        score = match_detections(result.detections, phantom.nodules)
        tp, fn, fp = tp + score.true_positives, fn + score.false_negatives, fp + score.false_positives
        assert all(d.type == SCT_NODULE for d in result.detections)
        [figure] = result.figures
        assert figure.concept == LESION_SENSITIVITY and figure.unit == "%"
        assert figure.value == 100.0 * model.sensitivity_at(slice_mm)  # type: ignore[operator]
        assert f"{slice_mm:.1f} mm slices" in figure.note
    print(f"{slice_mm} mm: {tp}/{tp + fn} nodules >= 6 mm found, {fp} false positive(s) in {len(SEEDS)} scans")
    assert tp / (tp + fn) >= 0.8
    assert fp / len(SEEDS) <= 1.0


def test_slices_over_5_mm_are_declined(model: CtLungNodules) -> None:
    with pytest.raises(UnsuitableInput, match="at most 5 mm apart, got 6 mm"):
        model.check(thick_phantom(301, 6.0, nodules=0).to_volume())


def test_manifest_states_the_sensitivity_per_thickness(model: CtLungNodules) -> None:
    table = load_manifest_file(MANIFEST_PATH).sensitivity_by_slice_thickness
    assert table is not None and sorted(table) == list(THICKNESSES)
    assert all(0.8 <= v <= 1.0 for v in table.values())
    assert model.sensitivity_at(2.5) == table[3.0]  # a tie takes the thicker slice's (lower or equal) figure
    assert model.sensitivity_at(0.6) == table[1.0] and model.sensitivity_at(5.0) == table[5.0]


@pytest.mark.parametrize(("slice_mm", "diameter"), [(1.0, 40.0), (5.0, 40.0), (3.0, 55.0)])
def test_masses_over_30_mm_are_masses(model: CtLungNodules, slice_mm: float, diameter: float) -> None:
    phantom = mass_phantom(slice_mm, diameter)
    result = model.run(phantom.to_volume())
    [mass] = [d for d in result.detections if np.linalg.norm(np.subtract(d.centre_lps, RIGHT_LUNG_CENTRE)) <= 5.0]
    assert (mass.label, mass.type, mass.tracking_id) == ("Mass 1", SCT_MASS, "mass-1")
    assert abs(mass.diameter_mm - diameter) <= 0.1 * diameter
    [segment] = [s for s in result.segments if s.name == "Mass 1"]
    assert segment.type == SCT_MASS and segment.mask.any()
    assert len(result.detections) <= 2


def test_masses_were_dropped_before(model: CtLungNodules) -> None:
    """Negative control: with the old size limit (30 mm, no mass scales) the same mass is not reported."""
    phantom = mass_phantom(3.0, 40.0)
    old = CtLungNodules(NoduleParams(max_mass_mm=30.0)).run(phantom.to_volume())
    assert [d for d in old.detections if np.linalg.norm(np.subtract(d.centre_lps, RIGHT_LUNG_CENTRE)) <= 10.0] == []


def test_a_clear_thick_scan_is_a_negative_result(model: CtLungNodules) -> None:
    result = model.run(thick_phantom(303, 5.0, nodules=0).to_volume())
    assert result.detections == () and result.segments == ()
    assert result.figures and result.not_assessed is None
    assert model.manifest.looked_for == (SCT_NODULE, SCT_MASS)


def test_manifest_refuses_a_sensitivity_outside_0_1(tmp_path: Path) -> None:
    text = MANIFEST_PATH.read_text().replace("5.0: 0.98}", "5.0: 98}")
    (tmp_path / "manifest.yaml").write_text(text)
    with pytest.raises(ManifestError, match=r"sensitivity_by_slice_thickness\.5\.0"):
        load_manifest_file(tmp_path / "manifest.yaml")
