"""dl-ct-segmentation (MONAI U-Net demo weights) on held-out phantoms: shapes, geometry, accuracy."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

from models import registry  # noqa: E402
from models.base import ModelResult, Volume  # noqa: E402
from models.dl_ct_segmentation.model import DlCtSegmentation  # noqa: E402
from testkit.evaluate import dice  # noqa: E402
from testkit.phantom import Phantom, make_ct_phantom  # noqa: E402

NAMES = ("Body", "Right Lung", "Left Lung", "Bone")
# Measured on these phantoms with the shipped 0.1.0-demo weights: Body >= 0.988, lungs >= 0.958,
# bone >= 0.898 (testkit.dl_evaluate reports more cases). The thresholds leave a margin for retraining.
DICE_MIN = {"Body": 0.97, "Right Lung": 0.93, "Left Lung": 0.93, "Bone": 0.85}


def held_out() -> list[Phantom]:
    """Phantoms the training tool never generated (it draws its own random geometry)."""
    return [
        make_ct_phantom(40, 128, 128, pixel_mm=2.4, slice_mm=5.0, seed=11),
        make_ct_phantom(56, 192, 192, pixel_mm=1.8, slice_mm=3.0, seed=12, vessels=2, shift_mm=(15.0, -10.0, 0.0)),
        make_ct_phantom(48, 160, 160, pixel_mm=2.2, slice_mm=4.0, seed=13, emphysema=0.2, table_gap_mm=0.0),
    ]


def flipped(volume: Volume, axes: tuple[int, ...]) -> Volume:
    """The same patient with the array reversed along ``axes`` (0=k, 1=j, 2=i) and the affine fixed."""
    voxels = volume.voxels
    affine = volume.affine.copy()
    for axis in axes:
        voxels = np.flip(voxels, axis=axis)
        col = 2 - axis
        affine[:3, 3] += (volume.voxels.shape[axis] - 1) * affine[:3, col]
        affine[:3, col] *= -1
    uids = volume.sop_instance_uids[::-1] if 0 in axes else volume.sop_instance_uids
    return Volume(np.ascontiguousarray(voxels), affine, volume.modality, uids, volume.frame_of_reference_uid)


def swapped_jk(volume: Volume) -> Volume:
    """The same patient stored with array axes 0 and 1 exchanged (a coronal stack of the same voxels)."""
    voxels = np.ascontiguousarray(np.swapaxes(volume.voxels, 0, 1))
    affine = volume.affine.copy()
    affine[:3, [1, 2]] = affine[:3, [2, 1]]
    n = voxels.shape[0]
    return Volume(voxels, affine, volume.modality, tuple(f"1.2.3.{k}" for k in range(n)), volume.frame_of_reference_uid)


def masks(result: ModelResult) -> dict[str, npt.NDArray[np.bool_]]:
    return {s.name: s.mask for s in result.segments}


@pytest.fixture(scope="module")
def model() -> DlCtSegmentation:
    return DlCtSegmentation(device="cpu")


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    return held_out()[0]


@pytest.fixture(scope="module")
def result(model: DlCtSegmentation, phantom: Phantom) -> ModelResult:
    return model.run(phantom.to_volume())


def test_result_shape_codes_and_notes(model: DlCtSegmentation, phantom: Phantom, result: ModelResult) -> None:
    assert (result.model_name, result.model_version) == ("dl-ct-segmentation", "0.1.0-demo")
    assert tuple(s.name for s in result.segments) == NAMES
    declared = {o.name: o for o in model.manifest.outputs}
    for seg in result.segments:
        assert seg.mask.dtype == np.bool_ and seg.mask.shape == phantom.shape and seg.mask.flags.c_contiguous
        assert seg.category == declared[seg.name].category and seg.type == declared[seg.name].type
    lat = {s.name: s.laterality for s in result.segments}
    assert lat["Right Lung"] is not None and lat["Right Lung"].value == "24028007"
    assert lat["Left Lung"] is not None and lat["Left Lung"].value == "7771000"
    assert lat["Body"] is None and lat["Bone"] is None
    assert any("0.1.0-demo" in note and "cpu" in note for note in result.notes)
    got = masks(result)
    for name in NAMES[1:]:
        assert not (got[name] & ~got["Body"]).any(), name
    assert not (got["Right Lung"] & got["Left Lung"]).any()


def test_dice_on_held_out_phantoms(model: DlCtSegmentation) -> None:
    for phantom in held_out():
        got = masks(model.run(phantom.to_volume()))
        scores = {name: dice(got[name], phantom.truth(name)) for name in NAMES}
        print(phantom.shape, {k: round(v, 3) for k, v in scores.items()})
        for name in NAMES:
            assert scores[name] >= DICE_MIN[name], (phantom.seed, name, scores[name])


@pytest.mark.parametrize("axes", [(2,), (0, 1, 2)])
def test_left_right_follow_patient_coordinates(
    model: DlCtSegmentation, phantom: Phantom, axes: tuple[int, ...]
) -> None:
    """Mirrored arrays (negative affine columns): 'Left Lung' is still the +x (patient left) lung."""
    got = masks(model.run(flipped(phantom.to_volume(), axes)))
    for name in ("Right Lung", "Left Lung"):
        assert dice(got[name], np.flip(phantom.truth(name), axis=axes)) >= DICE_MIN[name], (axes, name)


def test_permuted_array_axes(model: DlCtSegmentation, phantom: Phantom) -> None:
    """Array axes that are not (slice, row, column) = (z, y, x) are brought to canonical order and back."""
    got = masks(model.run(swapped_jk(phantom.to_volume())))
    for name in NAMES:
        truth = np.swapaxes(phantom.truth(name), 0, 1)
        assert got[name].shape == truth.shape
        assert dice(got[name], truth) >= DICE_MIN[name], name


def test_bf16_autocast_on_cpu_agrees(phantom: Phantom, result: ModelResult) -> None:
    amp = DlCtSegmentation(device="cpu", precision="amp", batch_size=2)
    got = masks(amp.run(phantom.to_volume()))
    for seg in result.segments:
        assert dice(got[seg.name], seg.mask) >= 0.97, seg.name


def test_bad_constructor_arguments() -> None:
    with pytest.raises(ValueError, match="precision"):
        DlCtSegmentation(device="cpu", precision="fp8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size"):
        DlCtSegmentation(device="cpu", batch_size=0)


def test_registry_instance() -> None:
    model = registry.load("dl-ct-segmentation")
    assert isinstance(model, DlCtSegmentation)
    assert model.manifest == registry.manifest("dl-ct-segmentation")
    assert model.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_segmentation_on_cuda(phantom: Phantom, result: ModelResult) -> None:
    for precision in ("fp32", "amp"):
        gpu = DlCtSegmentation(device="cuda", precision=precision)
        assert next(gpu.network.parameters()).device.type == "cuda"
        got = masks(gpu.run(phantom.to_volume()))
        for seg in result.segments:
            assert got[seg.name].shape == phantom.shape
            assert dice(got[seg.name], seg.mask) >= 0.97, (precision, seg.name)
            assert dice(got[seg.name], phantom.truth(seg.name)) >= DICE_MIN[seg.name], (precision, seg.name)
