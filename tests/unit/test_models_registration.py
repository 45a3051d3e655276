"""The classical ct-registration model (rigid then affine, SimpleITK) on phantoms with known motion."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import numpy.typing as npt
import pytest

from models import registry
from models.base import Code, ModelResult, PairModel, Registration, UnsuitableInput, Volume, is_pair_model
from models.ct_registration import CtRegistration, RegistrationParams, to_sitk
from testkit.phantom import NODULE, Nodule, Phantom, make_ct_phantom, phantom_uid

# Targets (written here, computed against the phantoms' known motion below).
MAX_MEAN_TRE_MM = 2.0
MAX_TRE_MM = 3.0
MAX_IDENTITY_TRE_MM = 0.5
MAX_SECONDS = 20.0
SHIFT = (8.0, -5.0, 6.0)  # z: three 2 mm slices (the phantom has no through-plane partial volume)
ANGLE = 5.0


def phantom(seed: int, **kwargs: object) -> Phantom:
    return make_ct_phantom(64, 160, 160, pixel_mm=1.5, slice_mm=2.0, seed=seed, **kwargs)  # type: ignore[arg-type]


def same_nodules(current: Phantom, shift: tuple[float, float, float]) -> list[Nodule]:
    """The current phantom's nodules for a prior with ``shift_mm=shift`` (explicit centres are absolute)."""
    out = []
    for n in current.nodules:
        x, y, z = (float(v) for v in np.add(n.center_lps, shift))
        out.append(Nodule((x, y, z), n.diameter_mm, n.side))
    return out


def as_prior(volume: Volume, seed: int) -> Volume:
    """A prior study has its own Frame of Reference."""
    return dataclasses.replace(volume, frame_of_reference_uid=phantom_uid(seed, "prior"))


def truth_map(shift: tuple[float, float, float], angle_deg: float) -> npt.NDArray[np.float64]:
    """Current -> prior LPS for a prior made with ``shift_mm=shift, rotation_deg=angle`` (current: neither)."""
    c, s = np.cos(np.deg2rad(angle_deg)), np.sin(np.deg2rad(angle_deg))
    out = np.eye(4)
    out[:2, :2] = [[c, -s], [s, c]]
    out[:3, 3] = shift
    return out


def apply(t: npt.NDArray[np.float64], pts: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return pts @ t[:3, :3].T + t[:3, 3]


def body_grid(p: Phantom) -> npt.NDArray[np.float64]:
    """LPS centres of body voxels on a ~10 mm grid."""
    kji = np.argwhere(p.truth("Body")[::5, ::7, ::7]) * np.array([5, 7, 7])
    return p.to_volume().to_patient(kji[:, ::-1].astype(np.float64))


def tre(result: ModelResult, truth: npt.NDArray[np.float64], pts: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    assert result.registration is not None
    return np.asarray(np.linalg.norm(apply(result.registration.transform, pts) - apply(truth, pts), axis=1))


@pytest.fixture(scope="module")
def model() -> CtRegistration:
    return CtRegistration()


@pytest.fixture(scope="module")
def moved(model: CtRegistration) -> tuple[Phantom, Phantom, ModelResult, float]:
    """Current phantom, prior shifted by SHIFT and rotated by ANGLE (other noise), result, seconds."""
    current = phantom(131)
    prior = phantom(131, shift_mm=SHIFT, rotation_deg=ANGLE, noise_seed=9131, nodules=same_nodules(current, SHIFT))
    t0 = time.perf_counter()
    result = model.run_pair(current.to_volume(), as_prior(prior.to_volume(), 131))
    return current, prior, result, time.perf_counter() - t0


def test_manifest_registry_and_protocol(model: CtRegistration) -> None:
    m = registry.manifest("ct-registration")
    assert (m.name, m.version, m.family, m.modalities, m.objects) == (
        "ct-registration",
        "1.0.0",
        "registration",
        ("CT", "MR"),
        ("REG", "SC", "PDF"),
    )
    assert m.outputs[0].category == Code("125024", "DCM", "Image Content-based Alignment")
    loaded = registry.load("ct-registration")
    assert loaded.manifest == m and is_pair_model(loaded)
    pair: PairModel = model  # static check: CtRegistration implements PairModel
    assert is_pair_model(pair)
    assert not is_pair_model(registry.load("ct-hu-segmentation"))
    with pytest.raises(UnsuitableInput, match="prior"):
        model.run(phantom(132, nodules=0).to_volume())


def test_recovers_shift_and_rotation(moved: tuple[Phantom, Phantom, ModelResult, float]) -> None:
    current, prior, result, seconds = moved
    reg = result.registration
    assert isinstance(reg, Registration)
    errors = tre(result, truth_map(SHIFT, ANGLE), body_grid(current))
    print(
        f"TRE mean {errors.mean():.2f} mm, max {errors.max():.2f} mm, residual {reg.residual_mm:.2f} mm, "
        f"MI {reg.metric_value:.3f}, {seconds:.1f} s"
    )
    assert errors.mean() <= MAX_MEAN_TRE_MM and errors.max() <= MAX_TRE_MM
    # The nodules (distinct landmarks) land on their counterparts in the prior.
    for a, b in zip(current.nodules, prior.nodules, strict=True):
        assert np.linalg.norm(reg.map_to_prior(a.center_lps) - np.asarray(b.center_lps)) <= MAX_TRE_MM
    assert reg.residual_mm <= 2.0 and reg.metric_value < 0
    assert reg.prior_frame_of_reference_uid == phantom_uid(131, "prior")
    assert seconds <= MAX_SECONDS


def test_resampled_prior_matches_current(moved: tuple[Phantom, Phantom, ModelResult, float]) -> None:
    current, prior, result, _ = moved
    assert result.registration is not None
    resampled = result.registration.resampled
    assert resampled.dtype == np.float32 and resampled.shape == current.shape
    body = current.truth("Body")
    inner = body & (np.abs(np.arange(current.shape[0]) - current.shape[0] / 2) < 20)[:, None, None]
    before = np.abs(prior.hu[inner].astype(np.float32) - current.hu[inner]).mean()
    after = np.abs(resampled[inner] - current.hu[inner]).mean()
    print(f"mean |prior - current| inside the body: {before:.0f} HU before, {after:.0f} HU after")
    assert after < 0.25 * before
    # Nodules of the resampled prior sit where the current nodules are.
    for nod in current.nodules:
        i, j, k = np.rint(np.linalg.solve(current.affine, [*nod.center_lps, 1.0])[:3]).astype(int)
        if nod.diameter_mm >= 8:
            assert resampled[k, j, i] > -300, nod


def test_identical_pose_gives_identity(model: CtRegistration) -> None:
    current = phantom(133)
    prior = phantom(133, noise_seed=9133)  # same anatomy (nodules included) and pose, other noise
    assert prior.nodules == current.nodules
    result = model.run_pair(current.to_volume(), as_prior(prior.to_volume(), 133))
    errors = tre(result, np.eye(4), body_grid(current))
    print(f"identity TRE mean {errors.mean():.3f} mm, max {errors.max():.3f} mm")
    assert errors.mean() <= MAX_IDENTITY_TRE_MM
    assert result.registration is not None and result.registration.residual_mm <= 0.5


def test_affine_stage_recovers_scaling(model: CtRegistration) -> None:
    """A prior with 2.7 mm instead of 2.5 mm pixels holds the anatomy 8 % larger in-plane (smaller phantoms)."""
    current = make_ct_phantom(48, 96, 96, pixel_mm=2.5, slice_mm=3.0, seed=134, nodules=0)
    prior = make_ct_phantom(48, 96, 96, pixel_mm=2.7, slice_mm=3.0, seed=134, nodules=0, noise_seed=9134)
    truth = np.diag([2.7 / 2.5, 2.7 / 2.5, 1.0, 1.0])
    pts = body_grid(current)
    affine = tre(model.run_pair(current.to_volume(), as_prior(prior.to_volume(), 134)), truth, pts)
    rigid_only = CtRegistration(dataclasses.replace(model.params, affine=False))
    rigid = tre(rigid_only.run_pair(current.to_volume(), as_prior(prior.to_volume(), 134)), truth, pts)
    print(f"scaling: TRE mean {affine.mean():.2f} mm (rigid only {rigid.mean():.2f} mm)")
    assert affine.mean() <= MAX_MEAN_TRE_MM
    assert rigid.mean() > MAX_MEAN_TRE_MM, "negative control: a rigid transform cannot absorb the scaling"


def test_deterministic(model: CtRegistration, moved: tuple[Phantom, Phantom, ModelResult, float]) -> None:
    current, prior, first, _ = moved
    again = CtRegistration(model.params).run_pair(current.to_volume(), as_prior(prior.to_volume(), 131))
    assert first.registration is not None and again.registration is not None
    assert np.array_equal(first.registration.transform, again.registration.transform)
    assert np.array_equal(first.registration.resampled, again.registration.resampled)


def test_real_ct_moved_origin(model: CtRegistration, ct_real_20: Volume) -> None:
    """The real CT against itself with its origin moved by d: the map is p -> p + d."""
    d = np.array([6.0, -4.0, 4.0])
    affine = ct_real_20.affine.copy()
    affine[:3, 3] += d
    prior = dataclasses.replace(ct_real_20, affine=affine, frame_of_reference_uid="1.2.3.4")
    result = model.run_pair(ct_real_20, prior)
    truth = np.eye(4)
    truth[:3, 3] = d
    body = ct_real_20.voxels[::2, ::16, ::16] > -500
    pts = ct_real_20.to_patient((np.argwhere(body) * np.array([2, 16, 16]))[:, ::-1].astype(np.float64))
    errors = tre(result, truth, pts)
    print(f"real CT: TRE mean {errors.mean():.3f} mm")
    assert errors.mean() <= MAX_IDENTITY_TRE_MM


def test_mr_pair(model: CtRegistration) -> None:
    """MR intensities (no HU): a shifted prior is recovered as well (Otsu boundary for the residual)."""
    small = {"nodules": 0, "noise_hu": 10.0}
    current = make_ct_phantom(40, 96, 96, pixel_mm=2.5, slice_mm=3.0, seed=135, **small)  # type: ignore[arg-type]
    prior = make_ct_phantom(40, 96, 96, pixel_mm=2.5, slice_mm=3.0, seed=135, shift_mm=(5.0, 5.0, 6.0), **small)  # type: ignore[arg-type]

    def mr(p: Phantom) -> Volume:
        v = p.to_volume("MR")
        return dataclasses.replace(v, voxels=np.clip(v.voxels + 1024.0, 0, None) * 0.5)

    result = model.run_pair(mr(current), as_prior(mr(prior), 135))
    errors = tre(result, truth_map((5.0, 5.0, 6.0), 0.0), body_grid(current))
    assert errors.mean() <= MAX_MEAN_TRE_MM
    assert result.registration is not None and np.isfinite(result.registration.residual_mm)


def test_sitk_image_geometry_matches_volume() -> None:
    """SimpleITK index (x, y, z) = (i, j, k) maps to the same LPS point as Volume.to_patient."""
    rng = np.random.default_rng(0)
    rot, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    affine = np.eye(4)
    affine[:3, :3] = rot * np.array([0.8, 0.9, 2.5])  # columns: i, j, k steps
    affine[:3, 3] = [-120.0, 33.0, 410.0]
    voxels = rng.standard_normal((4, 5, 6)).astype(np.float32)
    volume = Volume(voxels, affine, "CT", tuple(str(k) for k in range(4)), "1.2")
    image = to_sitk(volume)
    assert image.GetSize() == (6, 5, 4)
    for ijk in [(0, 0, 0), (5, 4, 3), (2, 1, 3)]:
        np.testing.assert_allclose(image.TransformIndexToPhysicalPoint(ijk), volume.to_patient(ijk), atol=1e-9)
        assert image.GetPixel(ijk) == voxels[ijk[2], ijk[1], ijk[0]]


def test_check_rejects_unsuitable_series(model: CtRegistration) -> None:
    volume = phantom(136, nodules=0).to_volume()
    with pytest.raises(UnsuitableInput, match="modality"):
        model.run_pair(volume, dataclasses.replace(volume, modality="PT"))
    with pytest.raises(UnsuitableInput, match="slices"):
        model.check(
            dataclasses.replace(volume, voxels=volume.voxels[:3], sop_instance_uids=volume.sop_instance_uids[:3])
        )
    with pytest.raises(ValueError, match="one entry per level"):
        CtRegistration(RegistrationParams(shrink_factors=(4, 2, 1), smoothing_mm=(2.0,)))


def test_phantom_rotation_option() -> None:
    """rotation_deg rotates the whole scene about z through the anatomy centre; nodules follow."""
    base = phantom(137, shift_mm=(10.0, 0.0, 0.0))
    turned = phantom(137, shift_mm=(10.0, 0.0, 0.0), rotation_deg=30.0)
    inv = np.linalg.inv(turned.affine)
    for a, b in zip(base.nodules, turned.nodules, strict=True):
        expected = apply(truth_map((10.0, 0.0, 0.0), 30.0), np.subtract(a.center_lps, (10.0, 0.0, 0.0)))
        np.testing.assert_allclose(b.center_lps, expected, atol=1e-9)
        i, j, k = np.rint(inv[:3, :3] @ b.center_lps + inv[:3, 3]).astype(int)
        assert turned.labels[k, j, i] == NODULE
    assert phantom(137, shift_mm=(10.0, 0.0, 0.0), rotation_deg=0.0).labels.tobytes() == base.labels.tobytes()
