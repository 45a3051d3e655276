"""Series -> Volume with patient geometry.

Slices are sorted by their position along the slice normal (row x column direction cosines), never
by Instance Number, file name or frame number; spacing comes from the positions, not from Slice
Thickness; the modality rescale is applied. The source datasets come back in the same k order, for
the encoders.

A series stored as ONE multi-frame instance with functional groups (Enhanced CT/MR, Legacy
Converted Enhanced CT/MR/PET...) is read frame by frame from its Shared and Per-frame Functional
Groups (Plane Position, Plane Orientation, Pixel Measures, Pixel Value Transformation); the sources
are then ``[that instance]`` and ``Volume.source_frames[k]`` is the 1-based frame number of slice k.
One CR/DX image is a projection radiograph: a one-slice volume, dense = bright, read by
:mod:`workers.load_radiograph`. A series that mixes multi-frame and single-frame instances, or holds several multi-frame
instances, is refused (the encoders reference either single-frame slices or one multi-frame image).

Each file is read once; the pixels are decoded straight into the volume (no copy kept on the
datasets). A worker process keeps the series it loaded last (:class:`SeriesCache`) for the next
jobs on the same files.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import pixel_array

from models.base import Volume
from models.errors import UnreadableInput, UnsuitableInput
from workers.load_radiograph import PROJECTION_MODALITIES, is_projection, volume_from_radiograph

ORIENTATION_TOLERANCE = 1e-3
"""Maximum difference between direction cosines of slices in one volume."""
SPACING_TOLERANCE = 0.05
"""Maximum relative deviation of a slice gap from the median gap (irregular spacing above this)."""
PIXEL_SPACING_TOLERANCE = 1e-4
"""Maximum relative difference between the Pixel Spacing of frames of one multi-frame image."""

_T = TypeVar("_T", bound=np.generic)


@dataclass(frozen=True)
class _Plane:
    """Geometry of one slice (a single-frame image or one frame of a multi-frame image)."""

    iop: npt.NDArray[np.float64]  # (6,) row then column direction cosines
    ipp: npt.NDArray[np.float64]  # (3,) LPS mm of the centre of the first transmitted pixel
    pixel_spacing: tuple[float, float]  # (between rows, between columns) mm
    thickness: float | None


def _floats(values: Any, n: int, what: str) -> npt.NDArray[np.float64]:
    try:
        arr = np.array([float(x) for x in values], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise UnreadableInput(f"malformed {what}") from exc
    if arr.shape != (n,) or not np.isfinite(arr).all():
        raise UnreadableInput(f"malformed {what}")
    return arr


def _geometry(ds: Dataset) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    if "ImageOrientationPatient" not in ds or "ImagePositionPatient" not in ds:
        raise UnreadableInput("slices lack Image Orientation/Position (Patient)")
    iop = _floats(ds.ImageOrientationPatient, 6, "Image Orientation (Patient)")
    ipp = _floats(ds.ImagePositionPatient, 3, "Image Position (Patient)")
    return iop, ipp


def _stack(planes: Sequence[_Plane], noun: str = "slices") -> tuple[list[int], npt.NDArray[np.float64]]:
    """Indices of ``planes`` sorted along the slice normal, and the 4x4 (i, j, k, 1) -> LPS affine.

    Raises UnsuitableInput for mixed orientations, shared positions and irregular spacing.
    """
    if not planes:
        raise UnsuitableInput("empty series")
    iop0 = planes[0].iop
    row, col = iop0[:3], iop0[3:]
    normal = np.cross(row, col)
    for plane in planes:
        if np.max(np.abs(plane.iop - iop0)) > ORIENTATION_TOLERANCE:
            raise UnsuitableInput(f"{noun} have different orientations")
    along = [float(p.ipp @ normal) for p in planes]
    order = sorted(range(len(planes)), key=lambda i: along[i])
    if len(set(np.round(along, 4))) != len(along):
        raise UnsuitableInput(f"several {noun} share one position (multiple stacks, phases or duplicates)")
    dr, dc = planes[0].pixel_spacing
    if len(order) > 1:
        steps = np.array([planes[order[i + 1]].ipp - planes[order[i]].ipp for i in range(len(order) - 1)])
        gaps = np.linalg.norm(steps, axis=1)
        median = float(np.median(gaps))
        if np.any(np.abs(gaps - median) > SPACING_TOLERANCE * median):
            raise UnsuitableInput(f"irregular {noun[:-1]} spacing")
        slice_vec = steps.mean(axis=0)
    else:
        slice_vec = normal * (planes[0].thickness or 1.0)
    affine = np.eye(4)
    affine[:3, 0] = row * dc
    affine[:3, 1] = col * dr
    affine[:3, 2] = slice_vec
    affine[:3, 3] = planes[order[0]].ipp
    return order, affine


def _pixel_spacing(item: Dataset | None) -> tuple[float, float]:
    if item is None or "PixelSpacing" not in item:
        raise UnreadableInput("Pixel Spacing missing")
    dr, dc = (float(x) for x in _floats(item.PixelSpacing, 2, "Pixel Spacing"))
    if not (dr > 0 and dc > 0):
        raise UnreadableInput("malformed Pixel Spacing")
    return dr, dc


def _thickness(item: Dataset | None) -> float | None:
    try:
        value = float(item.get("SliceThickness") or 0) if item is not None else 0.0
    except (TypeError, ValueError):
        return None
    return value if value > 0 else None


def sort_slices(datasets: Sequence[Dataset]) -> tuple[list[Dataset], npt.NDArray[np.float64]]:
    """Sort single-frame slices along the slice normal; returns them and the 4x4 affine."""
    if not datasets:
        raise UnsuitableInput("empty series")
    spacing = _pixel_spacing(datasets[0])
    planes = [_Plane(*_geometry(ds), pixel_spacing=spacing, thickness=_thickness(ds)) for ds in datasets]
    order, affine = _stack(planes)
    return [datasets[i] for i in order], affine


def _rescale_in_place(out: npt.NDArray[np.float32], ds: Dataset) -> npt.NDArray[np.float32]:
    """``out`` (the slice's stored values) with the slice's Rescale Slope and Intercept applied."""
    slope, intercept = _rescale(ds)
    if slope != 1.0:
        out *= slope
    if intercept != 0.0:
        out += intercept
    return out


def _rescaled(ds: Dataset) -> npt.NDArray[np.float32]:
    return _rescale_in_place(_pixels(ds).astype(np.float32), ds)


def _stacked(ordered: Sequence[Dataset], rows: int, cols: int) -> npt.NDArray[np.float32]:
    """The slices' pixels, decoded straight into one float32 array (no per-slice copies, no stacking)
    with each slice's rescale applied: the same values as ``_rescaled`` slice by slice."""
    voxels = np.empty((len(ordered), rows, cols), dtype=np.float32)
    for k, ds in enumerate(ordered):
        pixels = _pixels(ds)
        if pixels.shape != (rows, cols):
            raise UnreadableInput(f"pixel data of shape {pixels.shape} for a {rows}x{cols} slice")
        voxels[k] = pixels
        _rescale_in_place(voxels[k], ds)
    return voxels


def _rescale(item: Dataset | None, default: tuple[float, float] = (1.0, 0.0)) -> tuple[float, float]:
    """(slope, intercept) of ``item``; ``default`` where it has none."""
    if item is None or ("RescaleSlope" not in item and "RescaleIntercept" not in item):
        return default
    try:
        slope = float(item.get("RescaleSlope", 1) or 1)
        intercept = float(item.get("RescaleIntercept", 0) or 0)
    except (TypeError, ValueError) as exc:
        raise UnreadableInput("malformed Rescale Slope/Intercept") from exc
    if not (np.isfinite(slope) and np.isfinite(intercept)):
        raise UnreadableInput("malformed Rescale Slope/Intercept")
    return slope, intercept


def is_multiframe(ds: Dataset) -> bool:
    """True for an image whose frames are described by functional groups or that has several frames."""
    return "PerFrameFunctionalGroupsSequence" in ds or int(ds.get("NumberOfFrames") or 1) > 1


def _pixels(ds: Dataset) -> npt.NDArray[Any]:
    """The decoded Pixel Data, not kept on ``ds`` (``ds.pixel_array`` would keep a copy there);
    UnreadableInput when it is truncated or cannot be decoded."""
    try:
        return pixel_array(ds)
    except (AttributeError, ValueError) as exc:  # no Pixel Data, truncated, or a malformed stream
        raise UnreadableInput(f"pixel data cannot be decoded ({type(exc).__name__})") from exc


Loaded = tuple[Volume, list[Dataset]]
"""A series read: its volume and its source datasets in k order."""


def load_series(paths: Sequence[Path]) -> Loaded:
    """Read the image files of one series into a Volume and its sources (see the module docstring)."""
    datasets = [pydicom.dcmread(p) for p in paths]
    return volume_from_datasets(datasets)


class SeriesCache:
    """The series a worker process loaded last, for its next jobs on the same files: the jobs of one
    study that read one series (one job per model) load it once.

    The key names the exact files (:meth:`workers.source.JobSource.series_key`: the instances' paths,
    sizes and modification times, or the node's instance ids), so a series that changed (a late
    instance, other files) is loaded again; a None key is never cached. Each volume served has
    read-only arrays, cached or not: models share it, and one that wrote into its input would
    corrupt the next job's. The source datasets are shared as they are (the encoders only read them).

    Bounded: at most ``size`` series (two: the fair-share dispatch may alternate two studies), the
    least recently used dropped before a load; an older series is kept beside the newest only while
    their voxels take at most ``max_bytes`` (a 300 x 512 x 512 CT: 300 MB of voxels, and about 150 MB
    of datasets). The newest is always kept.
    """

    def __init__(self, size: int = 2, max_bytes: int = 1 << 30,
                 loader: Callable[[Sequence[Path]], Loaded] = load_series) -> None:
        self.size, self.max_bytes, self.loader = size, max_bytes, loader
        self._entries: OrderedDict[Hashable, Loaded] = OrderedDict()

    def load(self, key: Hashable | None, paths: Callable[[], Sequence[Path]]) -> Loaded:
        """The series of ``key``: from the cache, else read from ``paths()`` (and kept)."""
        found = None if key is None else self._entries.get(key)
        if found is not None:
            self._entries.move_to_end(key)
            return found[0], list(found[1])
        while self._entries and len(self._entries) >= self.size:
            self._entries.popitem(last=False)
        volume, sources = self.loader(paths())
        volume.voxels.flags.writeable = False
        volume.affine.flags.writeable = False
        if key is not None and self.size > 0:
            self._entries[key] = (volume, sources)
            while len(self._entries) > 1 and sum(v.voxels.nbytes for v, _ in self._entries.values()) > self.max_bytes:
                self._entries.popitem(last=False)
        return volume, list(sources)


def volume_from_datasets(datasets: Sequence[Dataset]) -> tuple[Volume, list[Dataset]]:
    """Volume of single-frame slices (sources in k order) or of one multi-frame image (``[it]``)."""
    multi = [ds for ds in datasets if is_multiframe(ds)]
    if multi:
        if len(multi) < len(datasets):
            raise UnsuitableInput("the series mixes multi-frame and single-frame images")
        if len(multi) > 1:
            raise UnsuitableInput(
                f"the series holds {len(multi)} multi-frame images; only a series stored as one is supported"
            )
        return volume_from_multiframe(multi[0]), [multi[0]]
    if not datasets:
        raise UnsuitableInput("empty series")
    if is_projection(list(datasets)):  # one CR/DX image: see workers.load_radiograph
        ds = datasets[0]
        return volume_from_radiograph(ds, _rescaled(ds), *_rescale(ds)), [ds]
    if {str(ds.get("Modality", "")).upper() for ds in datasets} & PROJECTION_MODALITIES:
        raise UnsuitableInput(f"a CR/DX series of {len(datasets)} images: one projection per series is analysed")
    modalities = {str(ds.get("Modality", "")) for ds in datasets}
    if len(modalities) != 1:
        raise UnsuitableInput("mixed modalities in one series")
    shapes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
    if len(shapes) != 1:
        raise UnsuitableInput("slices of different sizes")
    if any(int(ds.get("SamplesPerPixel") or 1) != 1 for ds in datasets):
        raise UnsuitableInput("colour images are not supported")
    ordered, affine = sort_slices(datasets)
    voxels = _stacked(ordered, *shapes.pop())
    volume = Volume(
        voxels=voxels,
        affine=affine,
        modality=modalities.pop(),
        sop_instance_uids=tuple(str(ds.SOPInstanceUID) for ds in ordered),
        frame_of_reference_uid=str(ordered[0].get("FrameOfReferenceUID", "")),
    )
    return volume, ordered


def _group(per_frame: Dataset | None, shared: Dataset | None, keyword: str) -> Dataset | None:
    """The (only) item of functional group macro ``keyword`` for a frame: per-frame, else shared."""
    for groups in (per_frame, shared):
        if groups is not None and keyword in groups and len(groups[keyword].value) > 0:
            item: Dataset = groups[keyword].value[0]
            return item
    return None


def _frame_planes(ds: Dataset) -> tuple[list[_Plane], list[tuple[float, float]]]:
    """Per-frame geometry and (slope, intercept) of a multi-frame image, in frame order."""
    n = int(ds.get("NumberOfFrames") or 1)
    if "PerFrameFunctionalGroupsSequence" not in ds:
        raise UnreadableInput("multi-frame image without functional groups (no per-frame geometry)")
    per_frame = list(ds.PerFrameFunctionalGroupsSequence)
    if len(per_frame) != n:
        raise UnreadableInput(f"{len(per_frame)} per-frame functional group items for {n} frames")
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    top_rescale = _rescale(ds)  # not in the enhanced IODs; honoured if a converter left it there
    planes: list[_Plane] = []
    rescales: list[tuple[float, float]] = []
    for item in per_frame:
        orientation = _group(item, shared, "PlaneOrientationSequence")
        position = _group(item, shared, "PlanePositionSequence")
        if orientation is None or position is None:
            raise UnreadableInput("frames lack Plane Orientation/Position (Patient)")
        measures = _group(item, shared, "PixelMeasuresSequence")
        planes.append(_Plane(*_geometry(_merged(orientation, position)), pixel_spacing=_pixel_spacing(measures),
                             thickness=_thickness(measures)))
        rescales.append(_rescale(_group(item, shared, "PixelValueTransformationSequence"), top_rescale))
    spacings = np.array([p.pixel_spacing for p in planes])
    if np.any(np.abs(spacings - spacings[0]) > PIXEL_SPACING_TOLERANCE * spacings[0]):
        raise UnsuitableInput("frames have different pixel spacings")
    return planes, rescales


def _merged(orientation: Dataset, position: Dataset) -> Dataset:
    out = Dataset()
    if "ImageOrientationPatient" in orientation:
        out.ImageOrientationPatient = orientation.ImageOrientationPatient
    if "ImagePositionPatient" in position:
        out.ImagePositionPatient = position.ImagePositionPatient
    return out


def volume_from_multiframe(ds: Dataset) -> Volume:
    """Volume of one multi-frame image; ``source_frames[k]`` is the frame (1-based) of slice k."""
    if int(ds.get("SamplesPerPixel") or 1) != 1:
        raise UnsuitableInput("colour images are not supported")
    planes, rescales = _frame_planes(ds)
    order, affine = _stack(planes, noun="frames")
    n, rows, cols = len(planes), int(ds.Rows), int(ds.Columns)
    pixels = _pixels(ds)  # decoded once: (frames, rows, columns)
    if pixels.ndim == 2:
        pixels = pixels[np.newaxis]
    if pixels.shape != (n, rows, cols):
        raise UnreadableInput(f"pixel data of shape {pixels.shape} for {n} frames of {rows}x{cols}")
    voxels = np.empty((n, rows, cols), dtype=np.float32)
    for k, f in enumerate(order):
        voxels[k] = pixels[f]
        slope, intercept = rescales[f]
        if slope != 1.0:
            voxels[k] *= slope
        if intercept != 0.0:
            voxels[k] += intercept
    return Volume(
        voxels=voxels,
        affine=affine,
        modality=str(ds.get("Modality", "")),
        sop_instance_uids=(str(ds.SOPInstanceUID),) * n,
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "")),
        source_frames=tuple(f + 1 for f in order),
    )


def mask_to_frame_order(mask: npt.NDArray[_T], source_frames: Sequence[int]) -> npt.NDArray[_T]:
    """``mask`` (k, rows, columns) in volume order -> the same in the source's frame order.

    ``source_frames[k]`` is the 1-based frame of slice k (:attr:`models.base.Volume.source_frames`);
    it must be a permutation of 1..n where n = ``mask.shape[0]``. Frame f of the result is ``mask[k]``
    with ``source_frames[k] == f``. Works for any trailing dimensions (e.g. a segment axis).
    """
    n = mask.shape[0]
    frames = np.asarray(source_frames, dtype=np.int64)
    if frames.shape != (n,) or sorted(frames.tolist()) != list(range(1, n + 1)):
        raise ValueError(f"source_frames must be a permutation of 1..{n}")
    out = np.empty_like(mask)
    out[frames - 1] = mask
    return out
