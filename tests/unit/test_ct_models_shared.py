"""The speed-ups of the classical chest CT models: in-plane morphology, thread map, shared chest masks."""

from __future__ import annotations

import dataclasses
import gc

import numpy as np
import pytest
from scipy import ndimage as ndi
from threadpoolctl import threadpool_limits

from models.base import Model, Volume
from models.ct_emphysema import CtEmphysema
from models.ct_hu_segmentation import CtHuSegmentation
from models.ct_hu_segmentation.airways import AirwayParams
from models.ct_hu_segmentation.inplane import both, diamond, dilate, erode, run_filter, thread_map, threads
from models.ct_hu_segmentation.model import HuSegParams, _inplane_disk, body_mask, chest_masks, forget_chest_masks
from models.ct_lung_nodules import CtLungNodules
from models.ct_lung_nodules.model import _block_any, _upsample
from testkit.phantom import Phantom, make_ct_phantom

FOOTPRINTS = [
    diamond(1),
    diamond(3),
    _inplane_disk(4.0, 1.4, 1.4)[0],
    _inplane_disk(8.0, 0.7, 0.9)[0],
    np.ones((3, 5), dtype=bool),
]


@pytest.mark.parametrize("index", range(len(FOOTPRINTS)))
@pytest.mark.parametrize("density", [0.3, 0.9])
def test_erode_and_dilate_equal_scipy(index: int, density: float) -> None:
    footprint = FOOTPRINTS[index]
    mask = np.random.default_rng(index).random((4, 41, 37)) < density
    assert np.array_equal(erode(mask, footprint), ndi.binary_erosion(mask, structure=footprint[None]))
    assert np.array_equal(dilate(mask, footprint), ndi.binary_dilation(mask, structure=footprint[None]))


def test_diamond_is_iterated_cross_erosion() -> None:
    mask = np.random.default_rng(1).random((5, 40, 40)) < 0.85
    cross = np.zeros((3, 3, 3), dtype=bool)
    cross[1] = ndi.generate_binary_structure(2, 1)
    assert np.array_equal(erode(mask, diamond(3)), ndi.binary_erosion(mask, structure=cross, iterations=3))


def test_footprint_must_be_centred_runs() -> None:
    with pytest.raises(ValueError, match="union of centred rectangles"):
        erode(np.ones((1, 5, 5), dtype=bool), np.array([[1, 0, 1], [1, 1, 1], [1, 0, 1]], dtype=bool))


@pytest.mark.parametrize("length", [1, 3, 5, 8 + 1])
def test_run_filter_equals_scipy(length: int) -> None:
    values = np.random.default_rng(length).normal(size=(6, 30, 25)).astype(np.float32)
    for axis in (1, 2):
        assert np.array_equal(run_filter(values, length, axis, np.minimum, np.inf),
                              ndi.minimum_filter1d(values, length, axis=axis, mode="nearest"))
        assert np.array_equal(run_filter(values, length, axis, np.maximum, -np.inf),
                              ndi.maximum_filter1d(values, length, axis=axis, mode="nearest"))


def test_thread_map_keeps_order_and_threads_follow_the_cap() -> None:
    assert thread_map(lambda x: x * x, range(20), workers=3) == [x * x for x in range(20)]
    assert both(lambda: 1, lambda: "two") == (1, "two")
    assert threads() >= 1
    with threadpool_limits(1):
        assert threads() == 1


@pytest.mark.parametrize("f", [(1, 1, 1), (2, 3, 3), (3, 5, 4)])
def test_block_any_and_upsample(f: tuple[int, int, int]) -> None:
    mask = np.random.default_rng(2).random((11, 23, 19)) < 0.02
    blocks = _block_any(mask, f)
    for idx in np.ndindex(*blocks.shape):
        box = tuple(slice(i * fi, (i + 1) * fi) for i, fi in zip(idx, f, strict=True))
        assert blocks[idx] == mask[box].any()
    up = _upsample(blocks, f, mask.shape)
    assert up.shape == mask.shape and np.all(up[mask])  # every set voxel lies in a set block


def _read_only(volume: Volume) -> Volume:
    voxels = volume.voxels.copy()
    voxels.setflags(write=False)
    return dataclasses.replace(volume, voxels=voxels)


@pytest.fixture
def chest() -> Phantom:
    forget_chest_masks()
    return make_ct_phantom(40, 128, 128, pixel_mm=2.5, slice_mm=2.5, seed=5, vessels=2)


def test_chest_masks_are_computed_once_per_read_only_volume(chest: Phantom) -> None:
    volume = _read_only(chest.to_volume())
    p, a = HuSegParams(), AirwayParams()
    first = chest_masks(volume, p, a)
    assert chest_masks(volume, p, a) is first
    assert not first.right.flags.writeable and not first.airways.flags.writeable
    assert chest_masks(volume, dataclasses.replace(p, lung_hu=-450.0), a) is not first  # other parameters
    assert chest_masks(_read_only(volume), p, a) is not chest_masks(_read_only(volume), p, a)  # other arrays
    writable = chest.to_volume()
    assert chest_masks(writable, p, a) is not chest_masks(writable, p, a)  # never cached: voxels may change
    fresh = chest_masks(volume, p, a)
    np.testing.assert_array_equal(fresh.right, first.right)
    body = body_mask(volume, p)
    assert body_mask(volume, p) is body and fresh.body is body[0]  # segment_ct's first step, shared too


def test_cached_masks_go_with_their_volume(chest: Phantom) -> None:
    volume = _read_only(chest.to_volume())
    masks = chest_masks(volume, HuSegParams(), AirwayParams())
    from models.ct_hu_segmentation import model as hu

    assert hu._CHEST._value is masks
    del volume
    gc.collect()
    assert hu._CHEST._value is None


def test_shared_masks_give_the_same_results(chest: Phantom) -> None:
    """The three models on one read-only volume (masks shared) find what each finds alone."""
    writable = chest.to_volume()
    shared = _read_only(writable)
    models: list[Model] = [CtHuSegmentation(), CtLungNodules(), CtEmphysema()]
    alone = [m.run(writable) for m in models]
    together = [m.run(shared) for m in models]
    for a, b in zip(alone, together, strict=True):
        assert a.notes == b.notes
        assert [(d.label, d.centre_ijk, d.diameter_mm, d.confidence) for d in a.detections] == [
            (d.label, d.centre_ijk, d.diameter_mm, d.confidence) for d in b.detections
        ]
        assert [(c.value, c.score, c.details) for c in a.classifications] == [
            (c.value, c.score, c.details) for c in b.classifications
        ]
        for sa, sb in zip(a.segments, b.segments, strict=True):
            assert sa.name == sb.name and np.array_equal(sa.mask, sb.mask)
    assert any(d for r in alone for d in r.detections), "the phantom has nodules to find"
