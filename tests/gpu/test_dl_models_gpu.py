"""The deep-learning models on CUDA (fp32 and amp) give what they give on the CPU.

Marked ``gpu`` and skipped where torch sees no CUDA device. Each model is built through the
registry with the options a site would configure (``device: cuda``, ``precision``), run on one
chest phantom from the training distribution, and compared with the same model on the CPU (fp32):
segment Dice > 0.98, the same confident detections, the same emphysema grade, and the same
registration to within a millimetre.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

from models import registry  # noqa: E402
from models.base import Model, ModelResult, Volume, is_pair_model  # noqa: E402
from testkit import dl_synth  # noqa: E402
from testkit.dl_evaluate import DICE_TARGET  # noqa: E402
from testkit.evaluate import body_points, dice, match_detections, target_errors  # noqa: E402
from testkit.phantom import Phantom, make_ct_phantom  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEVICE = "cuda"
PRECISIONS = ("fp32", "amp")
SEGMENTS = ("Body", "Right Lung", "Left Lung", "Bone")
CONFIDENT = 0.4  # detections this strong must be found on both devices (the threshold is 0.25)
MOTION = dl_synth.rigid_matrix((2.0, -2.0, 6.0), (10.0, -8.0, 6.0), (0.0, 0.0, 0.0))


@pytest.fixture(scope="module")
def chest() -> Phantom:
    """96 x 256 x 256 at 1.4 x 1.4 x 2.5 mm: several sliding windows for every network."""
    return make_ct_phantom(96, 256, 256, pixel_mm=1.4, slice_mm=2.5, seed=101, nodules=5, vessels=2,
                           emphysema=0.2, noise_seed=1)


@pytest.fixture(scope="module")
def prior(chest: Phantom) -> Volume:
    """The same anatomy, other noise, lying moved by ``MOTION`` (put into its affine)."""
    other = make_ct_phantom(96, 256, 256, pixel_mm=1.4, slice_mm=2.5, seed=101, nodules=chest.nodules, vessels=2,
                            emphysema=0.2, noise_seed=2).to_volume()
    return Volume(other.voxels, MOTION @ other.affine, "CT", other.sop_instance_uids, "2.25.1")


def build(name: str, device: str, precision: str = "fp32") -> Model:
    options = registry.ModelOptions(device=device, precision=precision, batch_size=4)  # type: ignore[arg-type]
    model = registry.load(name, options)
    network = model.network  # type: ignore[attr-defined]
    assert model.device.type == device  # type: ignore[attr-defined]
    params = list(network.parameters())
    assert params and all(p.device.type == device for p in params)
    return model


def run(name: str, device: str, precision: str, chest: Phantom, prior: Volume) -> ModelResult:
    model = build(name, device, precision)
    volume = chest.to_volume()
    result = model.run_pair(volume, prior) if is_pair_model(model) else model.run(volume)
    assert any(f"on {device}, {precision}" in note for note in result.notes), result.notes
    return result


@pytest.fixture(scope="module")
def on_cpu(chest: Phantom, prior: Volume) -> dict[str, ModelResult]:
    names = ("dl-ct-segmentation", "dl-lung-nodule-detection", "dl-emphysema-classification", "dl-ct-registration")
    return {name: run(name, "cpu", "fp32", chest, prior) for name in names}


def test_auto_device_is_cuda() -> None:
    model = registry.load("dl-ct-segmentation", registry.ModelOptions(device="auto"))
    assert model.device.type == "cuda"  # type: ignore[attr-defined]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_segmentation(precision: str, chest: Phantom, prior: Volume, on_cpu: dict[str, ModelResult]) -> None:
    gpu = {s.name: s.mask for s in run("dl-ct-segmentation", DEVICE, precision, chest, prior).segments}
    cpu = {s.name: s.mask for s in on_cpu["dl-ct-segmentation"].segments}
    assert tuple(gpu) == SEGMENTS
    for name in SEGMENTS:
        agreement, accuracy = dice(gpu[name], cpu[name]), dice(gpu[name], chest.truth(name))
        print(f"{precision} {name}: Dice with the CPU {agreement:.4f}, with the truth {accuracy:.3f}")
        assert agreement > 0.98, (name, agreement)
        assert accuracy >= DICE_TARGET[name], (name, accuracy)


def _centres(result: ModelResult, min_confidence: float = 0.0) -> npt.NDArray[np.float64]:
    return np.asarray([d.centre_lps for d in result.detections if d.confidence >= min_confidence]).reshape(-1, 3)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_detection(precision: str, chest: Phantom, prior: Volume, on_cpu: dict[str, ModelResult]) -> None:
    gpu = run("dl-lung-nodule-detection", DEVICE, precision, chest, prior)
    cpu = on_cpu["dl-lung-nodule-detection"]
    print(f"{precision}: {len(gpu.detections)} detections on {DEVICE}, {len(cpu.detections)} on the CPU")
    assert cpu.detections, "no detection to compare"
    # every confident detection of one device is a detection of the other (centres within 2 mm)
    for strong, other in ((_centres(cpu, CONFIDENT), _centres(gpu)), (_centres(gpu, CONFIDENT), _centres(cpu))):
        for c in strong:
            assert len(other) and float(np.min(np.linalg.norm(other - c, axis=1))) < 2.0, c
    by_centre = {tuple(np.round(d.centre_lps, 0)): d for d in cpu.detections}
    for d in gpu.detections:
        match = [c for k, c in by_centre.items() if np.linalg.norm(np.subtract(k, d.centre_lps)) < 2.5]
        if match:
            assert abs(match[0].diameter_mm - d.diameter_mm) < 1.5
            assert abs(match[0].confidence - d.confidence) < 0.1
    truth = match_detections(gpu.detections, chest.nodules, min_diameter_mm=6.0)
    assert truth.true_positives == match_detections(cpu.detections, chest.nodules, min_diameter_mm=6.0).true_positives


@pytest.mark.parametrize("precision", PRECISIONS)
def test_classification(precision: str, chest: Phantom, prior: Volume, on_cpu: dict[str, ModelResult]) -> None:
    [gpu] = run("dl-emphysema-classification", DEVICE, precision, chest, prior).classifications
    [cpu] = on_cpu["dl-emphysema-classification"].classifications
    print(f"{precision}: {gpu.value.meaning} (p = {gpu.score:.3f}) on {DEVICE}, {cpu.value.meaning} "
          f"(p = {cpu.score:.3f}) on the CPU")
    assert gpu.value == cpu.value
    assert abs(gpu.score - cpu.score) < 0.05
    assert gpu.details["lung volume (ml)"] == pytest.approx(cpu.details["lung volume (ml)"], rel=0.02)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_registration(precision: str, chest: Phantom, prior: Volume, on_cpu: dict[str, ModelResult]) -> None:
    gpu = run("dl-ct-registration", DEVICE, precision, chest, prior).registration
    cpu = on_cpu["dl-ct-registration"].registration
    assert gpu is not None and cpu is not None
    points = body_points(chest)
    between = target_errors(gpu.transform, cpu.transform, points)
    tre = target_errors(gpu.transform, MOTION, points)
    print(f"{precision}: {DEVICE} vs CPU mean {between.mean():.3f} mm, max {between.max():.3f} mm; "
          f"TRE mean {tre.mean():.2f} mm (CPU {target_errors(cpu.transform, MOTION, points).mean():.2f} mm)")
    assert between.mean() < 1.0 and between.max() < 2.0
    assert tre.mean() < 4.0
    assert gpu.resampled.shape == cpu.resampled.shape == chest.shape
    assert abs(gpu.residual_mm - cpu.residual_mm) < 1.0
