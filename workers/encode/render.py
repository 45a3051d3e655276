"""Key images of a :class:`models.base.ModelResult`: windowed source slices with the findings drawn on.

Shared by the Secondary Capture encoder (:mod:`workers.encode.sc`) and the PDF report
(:mod:`workers.encode.pdf`), so both show the same pictures. An image is the source slice at its
own pixel grid (repeated by an integer ``scale`` for small matrices, so Pixel Spacing stays exact),
with a legend band below it; nothing is drawn on the patient but outlines, circles, lines and numbers.

What is drawn: segment outlines (optionally a translucent fill) in :data:`workers.encode.seg.PALETTE_RGB`,
the colour the SEG recommends for the same segment number; detection circles numbered 1..N in result
order; the classifications' measured distances (``Measured.line_ijk``, e.g. heart and thoracic
widths) as lines; a legend with the segments on the slice, the detections ("1: Nodule 8.3 mm 92%"),
classifications, the registration residual, and ``AI result - not for diagnosis``. No PHI is drawn.

Which slices (:func:`key_slices`): each detection's centre slice (most confident first); the slice
with the largest segmented area (sum over segments), then each segment's largest slice; for a
classification without segments, the middle of the lungs (CT) or the middle slice; for a
registration, the middle slice as current | registered prior side by side and as a checkerboard.
Families take turns until ``max_images`` are chosen, so each present family is shown.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset

from models.base import ModelResult, Volume, is_axial
from workers.encode.measure import voxels_per_slice
from workers.encode.seg import PALETTE_RGB

View = Literal["overlay", "side-by-side", "checkerboard"]
RGB = tuple[int, int, int]

LUNG_WINDOW = (-600.0, 1500.0)  # centre, width (HU)
SOFT_TISSUE_WINDOW = (40.0, 400.0)
_LUNG_WORDS = ("lung", "nodule", "emphysema", "pulmonary", "airway", "bronch")
MIN_IMAGE_SIDE = 384
"""Smaller source matrices are repeated by an integer factor up to at least this many pixels."""
DETECTION_RGB: RGB = (255, 255, 0)
DISCLAIMER = "AI result - not for diagnosis"
CHECKER_TILE_MM = 20.0
_MAX_LEGEND_ITEMS = 12


@dataclass(frozen=True)
class KeySlice:
    """A slice to show: ``k`` in the volume and how (overlay on the slice or a registration view)."""

    k: int
    view: View
    reason: str
    span: tuple[int, int] | None = None
    """Overlay slices in this k range (inclusive) already show the finding: the slice is then skipped."""


@dataclass(frozen=True)
class KeyImage:
    """A rendered key image.

    Attributes:
        pixels: uint8 RGB, shape (rows, columns, 3): the picture, legend band at the bottom.
        slice_index: ``k`` of the (current) source slice shown.
        scale: each source pixel covers ``scale`` x ``scale`` picture pixels (Pixel Spacing / scale).
        view: ``overlay``, ``side-by-side`` or ``checkerboard`` (registration).
        caption: one line saying what the image shows (no PHI).
    """

    pixels: npt.NDArray[np.uint8]
    slice_index: int
    scale: int
    view: View
    caption: str


def has_content(result: ModelResult) -> bool:
    """True if the result has something to draw (non-empty segment, detection, classification, registration)."""
    return bool(
        result.detections
        or result.classifications
        or result.registration is not None
        or any(s.mask.any() for s in result.segments)
    )


def window_for(volume: Volume, result: ModelResult) -> tuple[float, float] | None:
    """(centre, width) for CT: lung window when the findings concern the lung, else soft tissue.

    ``None`` for other modalities: each slice is then scaled between its 1st and 99th percentile.
    """
    if volume.modality.upper() != "CT":
        return None
    words = [s.name for s in result.segments if s.mask.any()] + [s.type.meaning for s in result.segments]
    words += [d.type.meaning for d in result.detections] + [d.label for d in result.detections]
    words += [c.name for c in result.classifications] + [c.concept.meaning for c in result.classifications]
    text = " ".join(words).lower()
    return LUNG_WINDOW if any(w in text for w in _LUNG_WORDS) else SOFT_TISSUE_WINDOW


def window_slice(values: npt.NDArray[np.floating], window: tuple[float, float] | None) -> npt.NDArray[np.uint8]:
    """Map a 2-D slice to 8-bit grey with ``window`` (centre, width) or the slice's 1-99 percentiles."""
    v = np.asarray(values, dtype=np.float32)
    if window is None:
        lo, hi = (float(x) for x in np.percentile(v, (1.0, 99.0)))
    else:
        lo, hi = window[0] - window[1] / 2.0, window[0] + window[1] / 2.0
    if not hi > lo:
        hi = lo + 1.0
    grey = (v - np.float32(lo)) * np.float32(255.0 / (hi - lo))
    return np.clip(grey, 0.0, 255.0).astype(np.uint8)


def key_slices(volume: Volume, result: ModelResult, max_images: int = 4) -> list[KeySlice]:
    """The slices to show, most important first (see the module docstring); ``[]`` if nothing to show."""
    if max_images < 1:
        raise ValueError("max_images must be at least 1")
    n = volume.voxels.shape[0]
    families: list[list[KeySlice]] = []
    dets = result.detections
    families.append([
        KeySlice(_clamp(round(dets[i].centre_ijk[2]), n), "overlay", f"detection {i + 1}",
                 (dets[i].bbox_ijk_min[2], dets[i].bbox_ijk_max[2]))
        for i in sorted(range(len(dets)), key=lambda i: -dets[i].confidence)
    ])
    areas = [voxels_per_slice(s.mask) for s in result.segments]
    seg_slices: list[KeySlice] = []
    if any(int(a.sum()) for a in areas):
        total = np.sum(areas, axis=0)
        gap = max(1, round(0.05 * n))
        k = _plateau_middle(total)
        seg_slices.append(KeySlice(k, "overlay", "largest segmented area", (k - gap + 1, k + gap - 1)))
        for segment, area in zip(result.segments, areas, strict=True):
            k = _plateau_middle(area)
            if area[k] and all(abs(k - s.k) >= gap for s in seg_slices):
                seg_slices.append(KeySlice(k, "overlay", f"largest area of {segment.name}", (k - gap + 1, k + gap - 1)))
    families.append(seg_slices)
    if result.classifications and not families[0] and not seg_slices:
        families.append([KeySlice(_lung_middle(volume), "overlay", "middle of the lungs")])
    if result.registration is not None:
        families.append([
            KeySlice(n // 2, "side-by-side", "current | registered prior"),
            KeySlice(n // 2, "checkerboard", f"checkerboard of current and registered prior ({CHECKER_TILE_MM:g} mm)"),
        ])
    chosen: list[KeySlice] = []
    for rank in range(max(len(f) for f in families)):
        for family in families:
            if rank < len(family) and len(chosen) < max_images:
                candidate = family[rank]
                lo, hi = candidate.span or (candidate.k, candidate.k)
                if not any(c.view == candidate.view and (c.k == candidate.k or lo <= c.k <= hi) for c in chosen):
                    chosen.append(candidate)
    return chosen


def render_key_images(
    volume: Volume,
    result: ModelResult,
    *,
    max_images: int = 4,
    slice_labels: Sequence[str] | None = None,
    fill_alpha: float = 0.0,
) -> list[KeyImage]:
    """Render the :func:`key_slices` of ``result`` on ``volume`` ([] when there is nothing to show).

    ``slice_labels[k]`` names slice ``k`` in the legend (e.g. ``Image 37``; default ``Slice k+1/n``);
    ``fill_alpha`` > 0 also fills the segments translucently.
    """
    if not has_content(result):
        return []
    n = volume.voxels.shape[0]
    if slice_labels is not None and len(slice_labels) != n:
        raise ValueError(f"{len(slice_labels)} slice labels for {n} slices")
    for segment in result.segments:
        if segment.mask.shape != volume.voxels.shape:
            raise ValueError(f"segment {segment.name!r}: mask shape {segment.mask.shape} != {volume.voxels.shape}")
    if result.registration is not None and result.registration.resampled.shape != volume.voxels.shape:
        raise ValueError(f"registration: resampled prior shape {result.registration.resampled.shape} != "
                         f"{volume.voxels.shape}")
    window = window_for(volume, result)
    return [
        _render(volume, result, ks, window, slice_labels[ks.k] if slice_labels else f"Slice {ks.k + 1}/{n}",
                fill_alpha)
        for ks in key_slices(volume, result, max_images)
    ]


def source_slice_labels(sources: Sequence[Dataset], volume: Volume) -> list[str] | None:
    """``Image <Instance Number>`` per volume slice for single-frame sources in k order (else None)."""
    if len(sources) != volume.voxels.shape[0] or any("InstanceNumber" not in ds for ds in sources):
        return None
    return [f"Image {ds.InstanceNumber}" for ds in sources]


def _clamp(k: int, n: int) -> int:
    return min(max(k, 0), n - 1)


def _plateau_middle(area: npt.NDArray[np.integer]) -> int:
    """The middle one of the slices whose area is within 2 % of the largest (not the first of a tie)."""
    ks = np.flatnonzero(area >= 0.98 * area.max())
    return int(ks[len(ks) // 2])


def _lung_middle(volume: Volume) -> int:
    """CT: the median slice of those with at least half the most lung-like voxels; else the middle."""
    n = volume.voxels.shape[0]
    if volume.modality.upper() != "CT":
        return n // 2
    sub = volume.voxels[:, ::4, ::4]
    counts = np.count_nonzero((sub > -950.0) & (sub < -600.0), axis=(1, 2))
    if counts.max() == 0:
        return n // 2
    ks = np.flatnonzero(counts >= 0.5 * counts.max())
    return int(ks[len(ks) // 2])


def _erode(m: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    out = m.copy()
    out[1:, :] &= m[:-1, :]
    out[:-1, :] &= m[1:, :]
    out[:, 1:] &= m[:, :-1]
    out[:, :-1] &= m[:, 1:]
    return out


def outline(mask: npt.NDArray[np.bool_], width: int = 2) -> npt.NDArray[np.bool_]:
    """The inner border of a 2-D mask, ``width`` pixels thick (4-neighbourhood)."""
    inner = mask
    for _ in range(width):
        inner = _erode(inner)
    return mask & ~inner


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _render(
    volume: Volume, result: ModelResult, ks: KeySlice, window: tuple[float, float] | None, label: str,
    fill_alpha: float,
) -> KeyImage:
    k, n = ks.k, volume.voxels.shape[0]
    grey = window_slice(volume.voxels[k], window)
    rows, cols = grey.shape
    scale = max(1, math.ceil(MIN_IMAGE_SIDE / max(rows, cols)))
    legend: list[str] = []
    swatches: list[tuple[RGB, str]] = []
    reg = result.registration
    if ks.view == "overlay":
        rgb = np.repeat(grey[:, :, None], 3, axis=2)
        for index, segment in enumerate(result.segments):
            m = segment.mask[k]
            if not m.any():
                continue
            colour = PALETTE_RGB[index % len(PALETTE_RGB)]
            if fill_alpha > 0:
                rgb[m] = ((1 - fill_alpha) * rgb[m] + fill_alpha * np.asarray(colour)).astype(np.uint8)
            rgb[outline(m, 2 if scale == 1 else 1)] = colour  # 2 picture pixels at least
            swatches.append((colour, segment.name))
    else:
        assert reg is not None
        prior = window_slice(reg.resampled[k], window)
        if ks.view == "side-by-side":
            panel = np.concatenate([grey, prior], axis=1)
        else:
            tile = max(4, round(CHECKER_TILE_MM / volume.spacing[2]))
            jj, ii = np.indices(grey.shape)
            panel = np.where(((jj // tile + ii // tile) % 2) == 0, grey, prior)
        rgb = np.repeat(panel[:, :, None], 3, axis=2)
    if scale > 1:
        rgb = np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)
    image = Image.fromarray(np.ascontiguousarray(rgb))
    draw = ImageDraw.Draw(image)
    width = image.width
    font_size = max(12, round(cols * scale / 40))
    font = _font(font_size)
    z = f", z {volume.to_patient((0.0, 0.0, float(k)))[2]:.1f} mm" if is_axial(volume) else ""
    head = f"{result.model_name} {result.model_version} | {label}{z}"
    if ks.view == "overlay":
        _draw_detections(draw, volume, result, k, scale, font)
        _draw_lines(draw, result, k, scale)
        for number, det in enumerate(result.detections, start=1):
            if det.bbox_ijk_min[2] <= k <= det.bbox_ijk_max[2] or _clamp(round(det.centre_ijk[2]), n) == k:
                legend.append(f"{number}: {det.type.meaning} {det.diameter_mm:.1f} mm {det.confidence * 100:.0f}%")
    else:
        assert reg is not None
        if ks.view == "side-by-side":
            draw.line((cols * scale, 0, cols * scale, image.height), fill=(255, 200, 0), width=1)
            for x0, text in ((4, "current"), (cols * scale + 4, "registered prior")):
                draw.text((x0, 2), text, fill=(255, 255, 255), font=font, stroke_width=2, stroke_fill=(0, 0, 0))
        legend.append(f"{ks.reason}; registration residual {reg.residual_mm:.2f} mm")
    for c in result.classifications:
        score = f"{c.score:.2f}" if c.score_unit == "1" else f"{c.score:.1f} {c.score_unit}"
        legend.append(f"{c.name}: {c.value.meaning} ({score})")
        legend += [f"{m.name} {m.value:.0f} {m.unit}" for m in c.measurements]
    if len(legend) > _MAX_LEGEND_ITEMS:
        legend = [*legend[: _MAX_LEGEND_ITEMS - 1], f"... {len(legend) - _MAX_LEGEND_ITEMS + 1} more"]
    band = _legend_band(width, font, font_size, head, swatches, legend)
    out = np.concatenate([np.asarray(image, dtype=np.uint8), band], axis=0)
    return KeyImage(pixels=out, slice_index=k, scale=scale, view=ks.view, caption=f"{label}{z}: {ks.reason}")


def _draw_detections(
    draw: ImageDraw.ImageDraw, volume: Volume, result: ModelResult, k: int, scale: int,
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
) -> None:
    n = volume.voxels.shape[0]
    _, sj, si = volume.spacing
    for number, det in enumerate(result.detections, start=1):
        if not (det.bbox_ijk_min[2] <= k <= det.bbox_ijk_max[2] or _clamp(round(det.centre_ijk[2]), n) == k):
            continue
        x, y = (det.centre_ijk[0] + 0.5) * scale, (det.centre_ijk[1] + 0.5) * scale
        rx = det.diameter_mm / 2.0 / si * scale + 4
        ry = det.diameter_mm / 2.0 / sj * scale + 4
        draw.ellipse((x - rx, y - ry, x + rx, y + ry), outline=DETECTION_RGB, width=2)
        size = getattr(font, "size", 11)
        draw.text((x + rx * 0.75 + 2, y - ry * 0.75 - size - 2), str(number), fill=DETECTION_RGB, font=font,
                  stroke_width=2, stroke_fill=(0, 0, 0))


LINE_RGB: RGB = (0, 255, 255)


def _draw_lines(draw: ImageDraw.ImageDraw, result: ModelResult, k: int, scale: int) -> None:
    """The classifications' measured distances on slice ``k`` (e.g. heart and thoracic widths), with end ticks."""
    for c in result.classifications:
        for m in c.measurements:
            if m.line_ijk is None or round(m.line_ijk[0][2]) != k:
                continue
            (i0, j0, _), (i1, j1, _) = m.line_ijk
            x0, y0, x1, y1 = ((v + 0.5) * scale for v in (i0, j0, i1, j1))
            draw.line((x0, y0, x1, y1), fill=LINE_RGB, width=2)
            tick = 6 * max(1, scale)
            for x, y in ((x0, y0), (x1, y1)):
                draw.line((x, y - tick, x, y + tick), fill=LINE_RGB, width=2)


def _legend_band(
    width: int, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, size: int, head: str,
    swatches: Sequence[tuple[RGB, str]], lines: Sequence[str],
) -> npt.NDArray[np.uint8]:
    """A black band with the title line, coloured segment swatches (flowed), the lines and the disclaimer."""
    line_h, pad = size + 5, 4
    measure = Image.new("RGB", (1, 1))
    text_width = ImageDraw.Draw(measure).textlength
    # Flow the swatches into rows first, to know the band height.
    rows: list[list[tuple[int, RGB, str]]] = [[]]
    x = pad
    if len(swatches) > _MAX_LEGEND_ITEMS * 3:
        lines = [f"... and {len(swatches) - _MAX_LEGEND_ITEMS * 3} more segments", *lines]
    for colour, name in swatches[: _MAX_LEGEND_ITEMS * 3]:
        w = size + 4 + int(text_width(name, font=font)) + 12
        if rows[-1] and x + w > width - pad:
            rows.append([])
            x = pad
        rows[-1].append((x, colour, name))
        x += w
    n_rows = len(rows) if swatches else 0
    height = pad * 2 + line_h * (2 + n_rows + len(lines))
    band = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(band)
    y = pad
    draw.text((pad, y), head, fill=(255, 255, 255), font=font)
    y += line_h
    for row in rows if swatches else []:
        for x0, colour, name in row:
            draw.rectangle((x0, y + 2, x0 + size - 2, y + size), fill=colour)
            draw.text((x0 + size + 4, y), name, fill=(255, 255, 255), font=font)
        y += line_h
    for line in lines:
        draw.text((pad, y), line, fill=(255, 255, 255), font=font)
        y += line_h
    draw.text((pad, y), DISCLAIMER, fill=(255, 200, 0), font=font)
    return np.asarray(band, dtype=np.uint8)
