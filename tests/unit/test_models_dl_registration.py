"""dl-ct-registration (learned rigid registration, demo weights) on held-out phantom pairs."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

from models.base import UnsuitableInput, Volume, is_pair_model  # noqa: E402
from models.dl_ct_registration.model import DlCtRegistration, grid_affine, resample_to, rigid_from_params  # noqa: E402
from testkit.dl_synth import RigidPair, rigid_matrix, rigid_pair  # noqa: E402
from testkit.evaluate import body_points, target_errors  # noqa: E402

# Measured with the shipped 0.1.0-demo weights on these pairs (motions up to 10 degrees and
# 30 mm, 28-36 mm of error before registration): mean TRE 2.5 and 1.2 mm, max 5.3 and 1.8 mm.
# On 16 pairs of testkit.dl_evaluate the mean is 2.1 mm but single pairs reach 5.7 mm (mostly
# along z, where the phantom's regular ribs give weak cues).
TRE_MEAN_MAX_MM = 4.0
TRE_MAX_MAX_MM = 8.0


def held_out() -> list[RigidPair]:
    return [
        rigid_pair(np.random.default_rng([41, i]), max_angle_deg=(3.0, 3.0, 10.0), max_shift_mm=30.0) for i in range(2)
    ]


@pytest.fixture(scope="module")
def model() -> DlCtRegistration:
    return DlCtRegistration(device="cpu")


def test_tre_on_held_out_pairs(model: DlCtRegistration) -> None:
    for pair in held_out():
        result = model.run_pair(pair.current, pair.prior)
        assert (result.model_name, result.model_version) == ("dl-ct-registration", "0.1.0-demo")
        reg = result.registration
        assert reg is not None
        points = body_points(pair.current_phantom, step_mm=20.0)
        err = target_errors(reg.transform, pair.current_to_prior, points)
        before = target_errors(np.eye(4), pair.current_to_prior, points)
        print(f"TRE mean {err.mean():.2f} max {err.max():.2f} (before {before.mean():.1f}) mm, {reg}")
        assert err.mean() <= TRE_MEAN_MAX_MM and err.max() <= TRE_MAX_MAX_MM
        assert reg.resampled.shape == pair.current.voxels.shape and reg.resampled.dtype == np.float32
        assert reg.prior_frame_of_reference_uid == pair.prior.frame_of_reference_uid
        assert reg.metric_value > 0.8 and reg.residual_mm < 4.0
        # the resampled prior shows the current anatomy: lungs where the current scan has lungs
        lungs = pair.current_phantom.truth("Right Lung") | pair.current_phantom.truth("Left Lung")
        assert np.median(reg.resampled[lungs]) < -700
        assert np.allclose(reg.map_to_prior(points[:3]), (np.c_[points[:3], np.ones(3)] @ reg.transform.T)[:, :3])


def test_same_scan_gives_identity(model: DlCtRegistration) -> None:
    pair = held_out()[0]
    transform, ncc, _ = model.register(pair.current, pair.current)
    err = target_errors(transform, np.eye(4), body_points(pair.current_phantom, step_mm=20.0))
    assert err.mean() <= 2.5 and ncc > 0.95


def test_pair_model_contract(model: DlCtRegistration) -> None:
    assert is_pair_model(model)
    pair = held_out()[0]
    with pytest.raises(UnsuitableInput, match="run_pair"):
        model.run(pair.current)
    mr = Volume(pair.prior.voxels, pair.prior.affine, "MR", pair.prior.sop_instance_uids, "1.2.3")
    with pytest.raises(UnsuitableInput, match="modality"):
        model.run_pair(pair.current, mr)


def test_rigid_parameters_match_the_numpy_convention() -> None:
    centre = np.array([10.0, -20.0, 5.0])
    p = torch.tensor([[0.3, -0.2, 0.5, 0.1, -0.4, 0.2]], dtype=torch.float64)
    got = rigid_from_params(p, torch.as_tensor(centre), 10.0, 30.0)[0].numpy()
    want = rigid_matrix([3.0, -2.0, 5.0], [3.0, -12.0, 6.0], centre)
    assert np.allclose(got, want)
    g = grid_affine(centre, (5, 7, 9), 2.0)
    assert np.allclose(g @ [2, 3, 4, 1], [*centre, 1])  # the grid centre is the middle voxel
    assert np.allclose(g @ [0, 0, 1, 1] - g @ [0, 0, 0, 1], [2.0, 0, 0, 0])  # last array axis is +x


@pytest.mark.parametrize("slices", [33, 17, 16, 3])
def test_resampling_in_slabs_matches_one_pass(slices: int) -> None:
    """Slab by slab (a last slab of one slice is merged: a unit-size grid axis used to resample it
    wrongly, with a torch warning) gives what one pass over the whole grid gives."""
    from testkit.phantom import make_ct_phantom

    current = make_ct_phantom(slices, 48, 48, pixel_mm=6.0, slice_mm=6.0, seed=2, nodules=0).to_volume()
    prior = make_ct_phantom(20, 40, 40, pixel_mm=7.0, slice_mm=8.0, seed=2, nodules=0).to_volume()
    motion = rigid_matrix((2.0, -3.0, 8.0), (5.0, -4.0, 3.0), (0.0, 0.0, 0.0))
    cpu = torch.device("cpu")
    whole = resample_to(prior, current, motion, device=cpu, chunk=1000)
    assert whole.shape == current.voxels.shape
    np.testing.assert_allclose(resample_to(prior, current, motion, device=cpu, chunk=16), whole, atol=0.05)
