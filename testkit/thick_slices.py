"""Chest CT phantoms at a chosen slice thickness, and the nodule detector's sensitivity per thickness.

:func:`thick_phantom` builds a :func:`testkit.phantom.make_ct_phantom` on thin sub-slices
(``SUB_MM``) and averages each run of ``slice_mm / SUB_MM`` of them into one slice, as a scanner
reconstructs a thick slice: nodules get partial volume along z (a 6 mm nodule on a 5 mm slice keeps
only part of its contrast) and the noise falls with the square root of the thickness. The nodules'
true centres and diameters are those of the thin phantom (LPS mm), so detections are matched as
on any phantom (:func:`testkit.evaluate.match_detections`).

:func:`sensitivity_by_thickness` runs ``ct-lung-nodules`` on such phantoms (random nodules of
4-20 mm and vessel trees) and returns, per slice thickness, the sensitivity for nodules of 6 mm or
more and the false positives per scan; ``python -m testkit.thick_slices`` prints the table that
``models/ct_lung_nodules/manifest.yaml`` quotes (``sensitivity_by_slice_thickness``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from models.ct_lung_nodules import CtLungNodules, NoduleParams
from testkit.evaluate import match_detections
from testkit.phantom import Nodule, Phantom, make_ct_phantom

SUB_MM = 0.5
"""Thickness of the thin slices a thick one is averaged from."""
LENGTH_MM = 160.0
ROWS = COLS = 160
PIXEL_MM = 1.5
THICKNESSES = (1.0, 2.0, 3.0, 4.0, 5.0)
SEEDS = tuple(range(20_000, 20_012))
"""Held out from the unit tests (< 1000) and from ``dicom-node models evaluate`` (10000...)."""


def thick_phantom(
    seed: int,
    slice_mm: float,
    *,
    length_mm: float = LENGTH_MM,
    rows: int = ROWS,
    cols: int = COLS,
    pixel_mm: float = PIXEL_MM,
    **kwargs: object,
) -> Phantom:
    """A phantom of ``length_mm`` along z whose slices of ``slice_mm`` average thin sub-slices.

    ``kwargs`` go to :func:`make_ct_phantom` (``nodules``, ``vessels``...). Slice k covers
    ``[z0 + k * slice_mm, z0 + (k + 1) * slice_mm)`` of the thin phantom; its position is the
    centre of that slab. Labels are those of the sub-slice nearest the centre.
    """
    f = round(slice_mm / SUB_MM)
    if f < 1 or abs(f * SUB_MM - slice_mm) > 1e-6:
        raise ValueError(f"slice_mm must be a multiple of {SUB_MM} mm, got {slice_mm}")
    n = round(length_mm / slice_mm)
    thin = make_ct_phantom(n * f, rows, cols, pixel_mm=pixel_mm, slice_mm=SUB_MM, seed=seed,
                           **kwargs)  # type: ignore[arg-type]
    hu = thin.hu.reshape(n, f, rows, cols).mean(axis=1, dtype=np.float32)
    labels = thin.labels[f // 2 :: f][:n]
    z0 = thin.origin_lps[2] + (f - 1) * SUB_MM / 2.0  # centre of the first slab
    return replace(
        thin,
        hu=np.rint(hu).astype(np.int16),
        labels=np.ascontiguousarray(labels),
        slice_mm=float(slice_mm),
        origin_lps=(thin.origin_lps[0], thin.origin_lps[1], float(z0)),
    )


def mass_phantom(slice_mm: float, diameter_mm: float = 40.0, seed: int = 7) -> Phantom:
    """A thick-slice phantom with one solid mass of ``diameter_mm`` in the middle of the right lung."""
    return thick_phantom(seed, slice_mm, nodules=[Nodule(RIGHT_LUNG_CENTRE, diameter_mm, "Right")])


RIGHT_LUNG_CENTRE = (-0.47 * 0.40 * min(ROWS, COLS) * PIXEL_MM, 0.0, 0.15 * LENGTH_MM)
"""LPS centre (mm) of the right lung ellipsoid of :func:`thick_phantom` (make_ct_phantom's geometry)."""


@dataclass(frozen=True)
class ThicknessRow:
    """Sensitivity (nodules >= 6 mm) and false positives per scan at one slice thickness."""

    slice_mm: float
    found: int
    nodules: int
    false_positives: int
    scans: int
    seconds: float

    @property
    def sensitivity(self) -> float:
        return self.found / self.nodules if self.nodules else 1.0

    @property
    def fp_per_scan(self) -> float:
        return self.false_positives / self.scans


def sensitivity_by_thickness(
    thicknesses: Sequence[float] = THICKNESSES,
    seeds: Sequence[int] = SEEDS,
    params: NoduleParams | None = None,
) -> list[ThicknessRow]:
    """Run ``ct-lung-nodules`` on thick-slice phantoms (5 random nodules, 4 vessel trees per lung)."""
    model = CtLungNodules(params)
    rows = []
    for mm in thicknesses:
        tp = fn = fp = 0
        t0 = time.perf_counter()
        for seed in seeds:
            phantom = thick_phantom(seed, mm, nodules=5, vessels=4)
            score = match_detections(model.run(phantom.to_volume()).detections, phantom.nodules)
            tp, fn, fp = tp + score.true_positives, fn + score.false_negatives, fp + score.false_positives
        rows.append(ThicknessRow(mm, tp, tp + fn, fp, len(seeds), time.perf_counter() - t0))
    return rows


def format_rows(rows: Sequence[ThicknessRow]) -> str:
    lines = ["slice (mm)  sensitivity (>= 6 mm)  false positives/scan  seconds"]
    lines += [f"{r.slice_mm:10.1f}  {r.sensitivity:6.2f} ({r.found:2d}/{r.nodules:2d})       "
              f"{r.fp_per_scan:8.2f}             {r.seconds:6.1f}" for r in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=len(SEEDS), help="phantoms per thickness")
    ap.add_argument("--max-slice-mm", type=float, default=None, help="override NoduleParams.max_slice_mm")
    args = ap.parse_args(argv)
    params = NoduleParams() if args.max_slice_mm is None else NoduleParams(max_slice_mm=args.max_slice_mm)
    print(format_rows(sensitivity_by_thickness(seeds=SEEDS[: args.seeds], params=params)))


if __name__ == "__main__":
    main()
