"""Accuracy of the deep-learning models on held-out synthetic phantoms.

:func:`evaluate_dl` builds fresh phantoms from its own seeds (the training tool uses others),
runs each model and returns :class:`testkit.evaluate.EvalRow` figures (the same rows and
matching rules as the classical models' :func:`testkit.evaluate.evaluate`; render them with
:func:`testkit.evaluate.format_table`). Targets are the thresholds the unit tests hold the demo
models to.

* ``dl-ct-segmentation``: Dice per structure, mean over random phantoms (half with emphysema,
  many with vessel trees); the minimum is in the notes.
* ``dl-lung-nodule-detection``: sensitivity for nodules >= 6 mm and over all sizes (4-20 mm),
  false positives per scan (:func:`testkit.evaluate.match_detections`).
* ``dl-emphysema-classification``: grade agreement (one case per grade and round), and within
  one grade.
* ``dl-ct-registration``: mean and max target registration error (mm) over body voxels on a
  ~1 cm grid (:func:`testkit.evaluate.body_points`) for random rigid motions of up to 10 degrees
  and 30 mm, and the mean error before registration for reference.

Importing this module does not import torch; :func:`evaluate_dl` does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from testkit.evaluate import EvalRow, body_points, dice, match_detections, target_errors

EVAL_SEED = 7919  # the training tool uses other seeds
DL_MODELS = ("dl-ct-segmentation", "dl-lung-nodule-detection", "dl-emphysema-classification", "dl-ct-registration")
SEGMENTS = ("Body", "Right Lung", "Left Lung", "Bone")
# Targets (also asserted by tests/unit/test_models_dl_*.py on their own, smaller case sets).
DICE_TARGET = {"Body": 0.97, "Right Lung": 0.93, "Left Lung": 0.93, "Bone": 0.85}
SENSITIVITY_TARGET = 0.8
FP_PER_SCAN_TARGET = 1.0
AGREEMENT_TARGET = 0.75
TRE_MEAN_TARGET_MM = 4.0
TRE_MAX_TARGET_MM = 10.0


def evaluate_dl(
    seed: int = 0,
    *,
    cases: int = 3,
    models: Sequence[str] = DL_MODELS,
    device: str | None = None,
    bundles: Mapping[str, str | Path] | None = None,
) -> list[EvalRow]:
    """Run the DL models on held-out phantoms (``cases`` per model; one per grade and case for
    classification).

    ``bundles`` maps a model name to a bundle directory or TorchScript file (default: the shipped
    demo bundles). Unknown names in ``models`` raise ``ValueError``.
    """
    unknown = [m for m in models if m not in DL_MODELS]
    if unknown:
        raise ValueError(f"not DL models: {unknown}; known: {', '.join(DL_MODELS)}")
    runners: dict[str, Callable[..., list[EvalRow]]] = {
        "dl-ct-segmentation": _eval_segmentation,
        "dl-lung-nodule-detection": _eval_detection,
        "dl-emphysema-classification": _eval_classification,
        "dl-ct-registration": _eval_registration,
    }
    rows: list[EvalRow] = []
    for name in models:
        bundle = (bundles or {}).get(name)
        rows += runners[name](seed, cases, device, None if bundle is None else Path(bundle), bundles or {})
    return rows


def _rng(seed: int, model: int, case: int) -> np.random.Generator:
    return np.random.default_rng([EVAL_SEED, seed, model, case])


def _eval_segmentation(seed: int, n: int, device: str | None, bundle: Path | None, _: object) -> list[EvalRow]:
    from models.dl_ct_segmentation import DlCtSegmentation
    from testkit import dl_synth

    model = DlCtSegmentation(bundle, device=device)
    scores: dict[str, list[float]] = {s: [] for s in SEGMENTS}
    t0 = time.perf_counter()
    for i in range(n):
        rng = _rng(seed, 0, i)
        phantom = dl_synth.emphysema_case(rng).phantom if i % 2 else dl_synth.random_phantom(rng)
        masks = {s.name: s.mask for s in model.run(phantom.to_volume()).segments}
        for name in SEGMENTS:
            scores[name].append(dice(masks[name], phantom.truth(name)))
    note = f"{n} random phantoms, {time.perf_counter() - t0:.1f} s"
    name = model.manifest.name
    return [
        EvalRow(name, f"Dice {s}", float(np.mean(v)), DICE_TARGET[s], True, f"min {min(v):.3f}; {note}")
        for s, v in scores.items()
    ]


def _eval_detection(seed: int, n: int, device: str | None, bundle: Path | None, _: object) -> list[EvalRow]:
    from models.dl_lung_nodule_detection import DlNoduleDetection
    from testkit import dl_synth

    model = DlNoduleDetection(bundle, device=device)
    tp = fn = fp = tp_all = fn_all = 0
    t0 = time.perf_counter()
    for i in range(n):
        phantom = dl_synth.random_phantom(_rng(seed, 1, i), nodules=(2, 8))
        found = model.run(phantom.to_volume()).detections
        big = match_detections(found, phantom.nodules, min_diameter_mm=6.0)
        every = match_detections(found, phantom.nodules, min_diameter_mm=0.0)
        tp, fn, fp = tp + big.true_positives, fn + big.false_negatives, fp + every.false_positives
        tp_all, fn_all = tp_all + every.true_positives, fn_all + every.false_negatives
    name = model.manifest.name
    note = f"{n} random phantoms (vessels in most), {tp + fn} nodules >= 6 mm, {time.perf_counter() - t0:.1f} s"
    return [
        EvalRow(name, "sensitivity (>= 6 mm)", tp / max(tp + fn, 1), SENSITIVITY_TARGET, True, note),
        EvalRow(name, "sensitivity (all, 4-20 mm)", tp_all / max(tp_all + fn_all, 1), None, True),
        EvalRow(name, "false positives per scan", fp / n, FP_PER_SCAN_TARGET, False),
    ]


def _eval_classification(
    seed: int, n: int, device: str | None, bundle: Path | None, bundles: Mapping[str, str | Path]
) -> list[EvalRow]:
    from models.ct_emphysema import GRADES
    from models.dl_emphysema_classification import DlEmphysemaClassification
    from testkit import dl_synth

    model = DlEmphysemaClassification(bundle, device=device, segmentation_bundle=bundles.get("dl-ct-segmentation"))
    total = n * len(GRADES)
    confusion = np.zeros((len(GRADES), len(GRADES)), dtype=int)
    t0 = time.perf_counter()
    for i in range(total):
        case = dl_synth.emphysema_case(_rng(seed, 2, i), i % len(GRADES))
        got = GRADES.index(model.run(case.phantom.to_volume()).classifications[0].value)
        confusion[case.grade, got] += 1
    agree = float(np.trace(confusion)) / total
    near = float(sum(confusion[i, j] for i in range(len(GRADES)) for j in range(len(GRADES)) if abs(i - j) <= 1))
    name = model.manifest.name
    note = f"{total} phantoms; confusion (rows: truth) {confusion.tolist()}; {time.perf_counter() - t0:.1f} s"
    return [
        EvalRow(name, "grade agreement", agree, AGREEMENT_TARGET, True, note),
        EvalRow(name, "agreement within one grade", near / total, None, True),
    ]


def _eval_registration(seed: int, n: int, device: str | None, bundle: Path | None, _: object) -> list[EvalRow]:
    from models.dl_ct_registration import DlCtRegistration
    from testkit import dl_synth

    model = DlCtRegistration(bundle, device=device)
    means, maxes, before = [], [], []
    t0 = time.perf_counter()
    for i in range(n):
        pair = dl_synth.rigid_pair(_rng(seed, 3, i), max_angle_deg=(3.0, 3.0, 10.0), max_shift_mm=30.0)
        transform, _, _ = model.register(pair.current, pair.prior)
        points = body_points(pair.current_phantom)
        err = target_errors(transform, pair.current_to_prior, points)
        means.append(float(err.mean()))
        maxes.append(float(err.max()))
        before.append(float(target_errors(np.eye(4), pair.current_to_prior, points).mean()))
    name = model.manifest.name
    note = f"{n} pairs, before registration {np.mean(before):.1f} mm; {time.perf_counter() - t0:.1f} s"
    return [
        EvalRow(name, "mean TRE (mm)", float(np.mean(means)), TRE_MEAN_TARGET_MM, False, note),
        EvalRow(name, "max TRE (mm)", float(np.max(maxes)), TRE_MAX_TARGET_MM, False),
    ]
