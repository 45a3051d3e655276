"""Held-out phantom figures of the MR head and chest-radiograph models (``dicom-node models evaluate``,
families ``mr`` and ``xray``; see :mod:`testkit.evaluate`).

mr-brain-segmentation: per weighting (T1, T2) and Rician noise (3 %, 6 % of white matter), with a
30 % bias field and 1.8 x 1.8 x 4.5 mm voxels: Dice of Head and Brain and the brain volume error (%).
cxr-lung-fields: on chest radiographs with CTR from 0.38 to 0.62: Dice per lung, mean and maximum
absolute CTR error, mean absolute heart and thoracic width errors (mm), and how often the
Cardiomegaly category (CTR > 0.5) agrees with the truth's.
"""

from __future__ import annotations

import time

import numpy as np

from models.cxr_lung_fields import CxrLungFields
from models.mr_brain_segmentation import MrBrainSegmentation
from testkit.cxr_phantom import make_cxr_phantom
from testkit.evaluate import EvalRow, dice
from testkit.mr_phantom import make_mr_phantom

CXR_RATIOS = (0.38, 0.42, 0.46, 0.49, 0.53, 0.56, 0.60, 0.62)


def mr_rows(base: int) -> list[EvalRow]:
    """Family ``mr``: mr-brain-segmentation on four held-out heads."""
    model = MrBrainSegmentation()
    name = model.manifest.name
    rows: list[EvalRow] = []
    for n, (weighting, noise) in enumerate((("T1", 0.03), ("T1", 0.06), ("T2", 0.03), ("T2", 0.06))):
        t0 = time.perf_counter()
        phantom = make_mr_phantom(weighting, noise=noise, bias=0.3, seed=base + 500 + n)  # type: ignore[arg-type]
        result = model.run(phantom.to_volume())
        got = {s.name: s.mask for s in result.segments}
        truth = phantom.truth("Brain")
        error = 100.0 * (float(got["Brain"].sum()) - float(truth.sum())) / float(truth.sum())
        where = f"{weighting} noise {noise * 100:.0f}%"
        note = f"{result.notes[0].split(';')[0]}, {time.perf_counter() - t0:.1f} s"
        rows += [
            EvalRow(name, f"Dice Head, {where}", dice(got["Head"], phantom.truth("Head")), 0.95, True, note),
            EvalRow(name, f"Dice Brain, {where}", dice(got["Brain"], truth), 0.95, True),
            EvalRow(name, f"|brain volume error| (%), {where}", abs(error), 5.0, False, f"signed {error:+.1f} %"),
        ]
    return rows


def cxr_rows(base: int) -> list[EvalRow]:
    """Family ``xray``: cxr-lung-fields on eight held-out chest radiographs."""
    model = CxrLungFields()
    name = model.manifest.name
    t0 = time.perf_counter()
    right: list[float] = []
    left: list[float] = []
    ctr_err: list[float] = []
    heart_err: list[float] = []
    thorax_err: list[float] = []
    agree = 0
    for n, ratio in enumerate(CXR_RATIOS):
        phantom = make_cxr_phantom(ctr=ratio, seed=base + 600 + n)
        result = model.run(phantom.to_volume())
        got = {s.name: s.mask[0] for s in result.segments}
        right.append(dice(got["Right Lung"], phantom.right_lung))
        left.append(dice(got["Left Lung"], phantom.left_lung))
        (c,) = result.classifications
        heart, thorax = (m.value for m in c.measurements)
        ctr_err.append(abs(c.score - phantom.ctr))
        heart_err.append(abs(heart - phantom.heart_width_mm))
        thorax_err.append(abs(thorax - phantom.thoracic_width_mm))
        agree += (c.score > 0.5) == (phantom.ctr > 0.5)
    note = f"{len(CXR_RATIOS)} radiographs, CTR {CXR_RATIOS[0]}-{CXR_RATIOS[-1]}, {time.perf_counter() - t0:.1f} s"
    return [
        EvalRow(name, "Dice Right Lung", float(np.mean(right)), 0.92, True, note),
        EvalRow(name, "Dice Left Lung", float(np.mean(left)), 0.92, True),
        EvalRow(name, "mean |CTR error|", float(np.mean(ctr_err)), 0.03, False),
        EvalRow(name, "max |CTR error|", float(np.max(ctr_err)), 0.05, False),
        EvalRow(name, "mean |heart width error| (mm)", float(np.mean(heart_err)), 8.0, False),
        EvalRow(name, "mean |thoracic width error| (mm)", float(np.mean(thorax_err)), 5.0, False),
        EvalRow(name, "Cardiomegaly (CTR > 0.5) agreement", agree / len(CXR_RATIOS), 0.75, True,
                "ratios near 0.5 may fall either side"),
    ]
