"""Rebuild ``tests/data/ct-real-20-bone-reference.npz``: a full-bone reference of the real CT.

A semi-manual segmentation, made differently from ``ct-hu-segmentation``'s Bone (which finds
marrow by enclosure, see models/ct_hu_segmentation/bone.py): per slice, a 3x3 median filter;
cortex seeds ``> 250 HU``; region growing from the seeds into ``> 110 HU`` (cancellous bone);
then corrections written down after looking at every slice (axial bone-window renderings of all
20 slices and sagittal reformats through the spine) for this series only:

- the contrast-filled aorta (about 150 HU, connected to the vertebra through its calcified wall)
  and its wall calcifications, the splenic and renal artery calcifications and the brachial
  artery calcifications in the arms are removed (located by position);
- the costal cartilage of the anterior chest wall (120-150 HU, like marrow) is removed; only its
  ossified/calcified parts (> 200 HU, grown by 3 pixels) stay;
- holes enclosed by bone are bone (marrow below 110 HU, rib and pedicle interiors, the fatty
  medullary cavity of the humeri), except the spinal canal and, on slices 0, 1, 15, 16 and 17
  (the two intervertebral discs seen on the sagittal reformat), the disc inside its endplate ring.

``canal`` holds the spinal canal where the neural arch closes around it (slices 3-8 and 12-14):
not bone. The body outline (air and the CT table excluded) is ct-hu-segmentation's Body.
Run: ``python -m tools.bone_reference [OUT.npz]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
from scipy import ndimage as ndi

from models.base import Volume
from models.ct_hu_segmentation import CtHuSegmentation

BoolArray = npt.NDArray[np.bool_]
SERIES = Path(__file__).resolve().parent.parent / "tests" / "data" / "ct-real-20"
OUT = SERIES.parent / "ct-real-20-bone-reference.npz"

DISC_SLICES = frozenset({0, 1, 15, 16, 17})
AORTA_SEED = (298, 268)  # (row, column) inside the aortic lumen on every slice
ARTERY_BOX = (slice(260, 336), slice(285, 346))  # splenic/renal artery calcifications (centroids)
ARM_BOXES = ((slice(270, 370), slice(0, 75)), (slice(270, 370), slice(420, 512)))
ANTERIOR_WALL = (slice(0, 214), slice(130, 390))  # costal cartilage region
CANAL_BOX = (slice(340, 366), slice(240, 257))  # centroid of the spinal canal hole
DISC_BOX = (slice(310, 346), slice(238, 263))  # centroid of a disc hole
_S4 = ndi.generate_binary_structure(2, 1)
_S8 = ndi.generate_binary_structure(2, 2)


def _load() -> tuple[npt.NDArray[np.float32], BoolArray]:
    """HU (k, j, i; k from feet to head) and the body mask of the series."""
    datasets = sorted((pydicom.dcmread(p) for p in SERIES.iterdir()), key=lambda d: float(d.ImagePositionPatient[2]))
    stack = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in datasets])
    hu: npt.NDArray[np.float32] = stack.astype(np.float32)
    row, col = (np.asarray(datasets[0].ImageOrientationPatient[i : i + 3], dtype=np.float64) for i in (0, 3))
    dj, di = (float(v) for v in datasets[0].PixelSpacing)
    first = np.asarray(datasets[0].ImagePositionPatient, dtype=np.float64)
    last = np.asarray(datasets[-1].ImagePositionPatient, dtype=np.float64)
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1] = row * di, col * dj
    affine[:3, 2] = (last - first) / (len(datasets) - 1)
    affine[:3, 3] = first
    uids = tuple(str(d.SOPInstanceUID) for d in datasets)
    volume = Volume(hu, affine, "CT", uids, str(datasets[0].FrameOfReferenceUID))
    body = {s.name: s.mask for s in CtHuSegmentation().run(volume).segments}["Body"]
    return hu, body


def _in_box(mask: BoolArray, box: tuple[slice, slice]) -> bool:
    r, c = np.argwhere(mask).mean(axis=0)
    return bool(box[0].start <= r < box[0].stop and box[1].start <= c < box[1].stop)


def _components(mask: BoolArray) -> list[BoolArray]:
    lab, n = ndi.label(mask, structure=_S8)
    return [lab == i for i in range(1, n + 1)]


def reference_slice(hu: npt.NDArray[np.float32], body: BoolArray, k: int) -> tuple[BoolArray, BoolArray]:
    """(bone, canal) of slice ``k`` (2-D)."""
    med = ndi.median_filter(hu, size=3)
    seeds = (med > 250.0) & body
    lab, n = ndi.label(seeds, structure=_S8)
    counts = np.bincount(lab.ravel(), minlength=n + 1)
    counts[0] = 0
    seeds = (counts >= 3)[lab]
    cand = (med > 110.0) & body
    lab, n = ndi.label(cand, structure=_S4)
    keep = np.zeros(n + 1, dtype=bool)
    keep[np.unique(lab[seeds])] = True
    keep[0] = False
    bone = keep[lab]
    # The aorta: its lumen (opened 100-260 HU region at the seed), 3 pixels around it, and
    # small pieces (its wall calcifications) within 9 pixels.
    al, _ = ndi.label(ndi.binary_opening((med > 100.0) & (med < 260.0), iterations=3))
    if al[AORTA_SEED]:
        lumen = al == al[AORTA_SEED]
        bone &= ~ndi.binary_dilation(lumen, iterations=3)
        near = ndi.binary_dilation(lumen, iterations=9)
        for comp in _components(bone):
            if comp.sum() < 80 and (comp & near).any():
                bone &= ~comp
    for comp in _components(bone):
        if _in_box(comp, ARTERY_BOX):
            bone &= ~comp
    canal = np.zeros(bone.shape, dtype=bool)
    holes, n = ndi.label(ndi.binary_fill_holes(bone) & ~bone, structure=_S4)
    for i in range(1, n + 1):
        hole = holes == i
        if hole.sum() > 100 and _in_box(hole, CANAL_BOX):
            canal |= hole
        elif not (k in DISC_SLICES and hole.sum() > 300 and _in_box(hole, DISC_BOX)):
            bone |= hole
    for box in ARM_BOXES:
        bone[box] |= ndi.binary_fill_holes(ndi.binary_closing(bone[box], structure=_S8))
    dense = (med[ANTERIOR_WALL] > 200.0) & bone[ANTERIOR_WALL]
    keep_wall = ndi.binary_dilation(dense, structure=_S4, iterations=3, mask=bone[ANTERIOR_WALL])
    keep_wall |= ndi.binary_fill_holes(dense)
    for comp in _components(keep_wall):
        if comp.sum() < 8:
            keep_wall &= ~comp
    bone[ANTERIOR_WALL] &= keep_wall
    for box in ARM_BOXES:
        for comp in _components(bone[box]):
            if comp.sum() < 100:
                bone[box] &= ~comp
    return bone & body, canal


def build() -> tuple[BoolArray, BoolArray]:
    """The reference (bone, canal) masks, (k, j, i) in the order of increasing z."""
    hu, body = _load()
    pairs = [reference_slice(hu[k], body[k], k) for k in range(hu.shape[0])]
    return np.stack([b for b, _ in pairs]), np.stack([c for _, c in pairs])


def save(path: Path = OUT) -> None:
    bone, canal = build()
    np.savez_compressed(path, shape=np.array(bone.shape), bone=np.packbits(bone), canal=np.packbits(canal))
    print(f"{path}: bone {int(bone.sum())} voxels, canal {int(canal.sum())} voxels")


def load(path: Path = OUT) -> tuple[BoolArray, BoolArray]:
    """The saved (bone, canal) masks."""
    with np.load(path) as data:
        shape = tuple(int(v) for v in data["shape"])
        count = int(np.prod(shape))
        bone = np.unpackbits(data["bone"], count=count).astype(bool).reshape(shape)
        canal = np.unpackbits(data["canal"], count=count).astype(bool).reshape(shape)
    return bone, canal


if __name__ == "__main__":
    save(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
