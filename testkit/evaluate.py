"""Evaluate the classical models on held-out generated phantoms with known truth.

:func:`evaluate` builds phantoms (:mod:`testkit.phantom`) from seeds the unit tests do not use,
runs each classical model on them and returns :class:`EvalRow` figures against the targets the
tests also hold the models to; :func:`format_table` renders them. Everything is deterministic for
a given ``seed`` and runs in well under two minutes on two CPU cores.

Figures:
    segmentation (ct-hu-segmentation): Dice per structure, airway precision and recall, mean over phantoms.
    detection (ct-lung-nodules): sensitivity for nodules >= 6 mm, false positives per scan (a
        detection matching no nodule of any size), mean centre error (mm) and mean absolute
        diameter error (%) of the matched nodules; phantoms with vessel trees.
    classification (ct-emphysema): grade agreement with the truth grade and mean/max absolute
        LAA% error (points); truth = percentage of lung parenchyma labelled emphysema.
    registration (ct-registration): mean and max target registration error (mm) over body
        voxels on a ~1 cm grid for shifted and rotated priors (same anatomy and nodules, other
        noise), and for a prior in the same pose.
    mr (mr-brain-segmentation), xray (cxr-lung-fields): see :mod:`testkit.evaluate_mr_xray`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from models.base import Detection, Volume
from models.ct_emphysema import CtEmphysema, grade
from models.ct_hu_segmentation import CtHuSegmentation
from models.ct_lung_nodules import CtLungNodules
from models.ct_registration import CtRegistration
from testkit.phantom import Nodule, Phantom, make_ct_phantom, phantom_uid

FAMILIES = ("segmentation", "detection", "classification", "registration", "mr", "xray")

# Phantom geometry shared with the unit tests (small enough to be quick, large enough to be fair).
SHAPE = (64, 160, 160)
PIXEL_MM = 1.5
SLICE_MM = 2.5
REG_SLICE_MM = 2.0  # registration shifts in z are whole slices (the phantom has no z partial volume)
HELD_OUT_BASE = 10_000  # the unit tests use seeds below 1000


@dataclass(frozen=True)
class EvalRow:
    """One figure: ``value`` of ``metric`` for ``model`` against ``target`` (None: no target)."""

    model: str
    metric: str
    value: float
    target: float | None = None
    higher_is_better: bool = True
    notes: str = ""

    @property
    def passed(self) -> bool | None:
        """Whether ``value`` meets ``target`` (None without a target)."""
        if self.target is None:
            return None
        return self.value >= self.target if self.higher_is_better else self.value <= self.target


def evaluate(families: Sequence[str] | None = None, seed: int = 0) -> list[EvalRow]:
    """Run the classical models of ``families`` (default: all) on held-out phantoms."""
    chosen = list(FAMILIES) if families is None else list(families)
    unknown = sorted(set(chosen) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown families {unknown}; known: {', '.join(FAMILIES)}")
    base = HELD_OUT_BASE + 100 * seed
    runners = {
        "segmentation": _segmentation,
        "detection": _detection,
        "classification": _classification,
        "registration": _registration,
        "mr": _mr_xray("mr"),
        "xray": _mr_xray("xray"),
    }
    rows: list[EvalRow] = []
    for family in FAMILIES:
        if family in chosen:
            rows.extend(runners[family](base))
    return rows


def _mr_xray(which: str) -> Callable[[int], list[EvalRow]]:
    """The MR head (``mr``) or chest radiograph (``xray``) figures of :mod:`testkit.evaluate_mr_xray`."""

    def run(base: int) -> list[EvalRow]:
        from testkit import evaluate_mr_xray  # imports this module: loaded on use

        return evaluate_mr_xray.mr_rows(base) if which == "mr" else evaluate_mr_xray.cxr_rows(base)

    return run


def format_table(rows: Sequence[EvalRow]) -> str:
    """A plain-text table: model, metric, value, target and whether it is met."""
    header = ("model", "metric", "value", "target", "ok", "notes")
    lines = [
        (
            r.model,
            r.metric,
            f"{r.value:.3f}",
            "" if r.target is None else f"{'>=' if r.higher_is_better else '<='} {r.target:g}",
            {True: "yes", False: "NO", None: ""}[r.passed],
            r.notes,
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header).rstrip(), fmt.format(*("-" * w for w in widths)).rstrip()]
    out.extend(fmt.format(*line).rstrip() for line in lines)
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Truth comparisons (also used by the tests of this module).


def dice(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_]) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


@dataclass(frozen=True)
class DetectionScore:
    """Detections against truth nodules of one or more scans."""

    true_positives: int  # truth nodules >= min size with a matching detection
    false_negatives: int  # truth nodules >= min size without one
    false_positives: int  # detections matching no truth nodule (of any size)
    centre_errors_mm: tuple[float, ...]
    diameter_errors: tuple[float, ...]  # (detected - true) / true, for matched nodules >= min size

    @property
    def sensitivity(self) -> float:
        n = self.true_positives + self.false_negatives
        return self.true_positives / n if n else 1.0


def match_detections(
    detections: Sequence[Detection], nodules: Sequence[Nodule], min_diameter_mm: float = 6.0
) -> DetectionScore:
    """Greedy matching: a detection matches the nearest unmatched nodule whose centre is within
    max(radius, 3 mm) of it; nodules under ``min_diameter_mm`` are neither counted as misses nor
    make their detection a false positive."""
    pairs = []
    for di, d in enumerate(detections):
        for ni, n in enumerate(nodules):
            dist = float(np.linalg.norm(np.subtract(d.centre_lps, n.center_lps)))
            if dist <= max(n.diameter_mm / 2.0, 3.0):
                pairs.append((dist, di, ni))
    pairs.sort()
    used_d: set[int] = set()
    matched: dict[int, tuple[int, float]] = {}
    for dist, di, ni in pairs:
        if di in used_d or ni in matched:
            continue
        used_d.add(di)
        matched[ni] = (di, dist)
    tp = fn = 0
    centre: list[float] = []
    diam: list[float] = []
    for ni, n in enumerate(nodules):
        if n.diameter_mm < min_diameter_mm:
            continue
        if ni in matched:
            di, dist = matched[ni]
            tp += 1
            centre.append(dist)
            diam.append((detections[di].diameter_mm - n.diameter_mm) / n.diameter_mm)
        else:
            fn += 1
    return DetectionScore(tp, fn, len(detections) - len(used_d), tuple(centre), tuple(diam))


def rigid_truth(shift_mm: Sequence[float], rotation_deg: float) -> npt.NDArray[np.float64]:
    """4x4 current -> prior LPS map for a prior made with ``shift_mm``/``rotation_deg`` (current: none)."""
    c, s = np.cos(np.deg2rad(rotation_deg)), np.sin(np.deg2rad(rotation_deg))
    out = np.eye(4)
    out[:2, :2] = [[c, -s], [s, c]]
    out[:3, 3] = shift_mm
    return out


def target_errors(
    transform: npt.NDArray[np.float64], truth: npt.NDArray[np.float64], points_lps: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """|transform(p) - truth(p)| (mm) for each LPS point (n, 3)."""
    est = points_lps @ transform[:3, :3].T + transform[:3, 3]
    ref = points_lps @ truth[:3, :3].T + truth[:3, 3]
    return np.asarray(np.linalg.norm(est - ref, axis=1), dtype=np.float64)


def body_points(phantom: Phantom, step_mm: float = 10.0) -> npt.NDArray[np.float64]:
    """LPS centres of body voxels on a grid of about ``step_mm``."""
    steps = [max(1, round(step_mm / s)) for s in (phantom.slice_mm, phantom.pixel_mm, phantom.pixel_mm)]
    body = phantom.truth("Body")[:: steps[0], :: steps[1], :: steps[2]]
    kji = np.argwhere(body) * np.array(steps)
    return phantom.to_volume().to_patient(kji[:, ::-1].astype(np.float64))


# --------------------------------------------------------------------------------------------
# Per family.


def _phantom(seed: int, **kwargs: Any) -> Phantom:
    return make_ct_phantom(*SHAPE, pixel_mm=PIXEL_MM, slice_mm=SLICE_MM, seed=seed, **kwargs)


def _segmentation(base: int) -> list[EvalRow]:
    model = CtHuSegmentation()
    names = ("Body", "Right Lung", "Left Lung", "Bone")
    scores: dict[str, list[float]] = {n: [] for n in names}
    t0 = time.perf_counter()
    seeds = [base + i for i in range(2)]
    precision: list[float] = []
    recall: list[float] = []
    for s in seeds:
        phantom = _phantom(s)
        got = {seg.name: seg.mask for seg in model.run(phantom.to_volume()).segments}
        for n in names:
            scores[n].append(dice(got[n], phantom.truth(n)))
        airway, truth = got["Airway"], phantom.truth("Airway")
        precision.append(float((airway & truth).sum() / max(1, airway.sum())))
        recall.append(float((airway & truth).sum() / max(1, truth.sum())))
    note = f"{len(seeds)} phantoms, {time.perf_counter() - t0:.1f} s"
    targets = {"Body": 0.9, "Right Lung": 0.9, "Left Lung": 0.9, "Bone": 0.8}
    name = model.manifest.name
    return [EvalRow(name, f"Dice {n}", float(np.mean(scores[n])), targets[n], True, note) for n in names] + [
        # the airway is tracked conservatively: what it marks is airway, but it stops in the bronchi
        EvalRow(name, "Airway precision", float(np.mean(precision)), 0.95, True),
        EvalRow(name, "Airway recall (trachea + main bronchi of the tree)", float(np.mean(recall)), 0.3, True),
        *_bone_rows(model, base),
    ]


def _bone_rows(model: CtHuSegmentation, base: int) -> list[EvalRow]:
    """Bone on a phantom whose bones have marrow and a spinal canal (``make_ct_phantom(marrow=True)``)."""
    phantom = _phantom(base, marrow=True)
    bone = next(seg.mask for seg in model.run(phantom.to_volume()).segments if seg.name == "Bone")
    canal = phantom.truth("Spinal Canal")
    name = model.manifest.name
    return [
        EvalRow(name, "Dice Bone (cortex + marrow phantom)", dice(bone, phantom.truth("Bone")), 0.95, True),
        # only the canal's rim, blurred into the cortex, may be counted as bone
        EvalRow(name, "spinal canal labelled bone (%)", 100.0 * float((bone & canal).sum() / canal.sum()), 25.0, False),
    ]


def _detection(base: int) -> list[EvalRow]:
    model = CtLungNodules()
    tp = fn = fp = 0
    centre: list[float] = []
    diam: list[float] = []
    seeds = [base + i for i in range(5)]
    t0 = time.perf_counter()
    for s in seeds:
        phantom = _phantom(s, nodules=5, vessels=4)
        score = match_detections(model.run(phantom.to_volume()).detections, phantom.nodules)
        tp, fn, fp = tp + score.true_positives, fn + score.false_negatives, fp + score.false_positives
        centre.extend(score.centre_errors_mm)
        diam.extend(score.diameter_errors)
    name = model.manifest.name
    note = f"{len(seeds)} phantoms with vessels, {tp + fn} nodules >= 6 mm, {time.perf_counter() - t0:.1f} s"
    return [
        EvalRow(name, "sensitivity (>= 6 mm)", tp / max(tp + fn, 1), 0.8, True, note),
        EvalRow(name, "false positives per scan", fp / len(seeds), 2.0, False),
        EvalRow(name, "mean centre error (mm)", float(np.mean(centre)) if centre else float("nan"), 3.0, False),
        EvalRow(
            name,
            "mean |diameter error| (%)",
            100.0 * float(np.mean(np.abs(diam))) if diam else float("nan"),
            30.0,
            False,
        ),
    ]


# One case per band edge region and inside every band: none, mild, moderate, severe.
EMPHYSEMA_FRACTIONS = (0.0, 0.03, 0.08, 0.12, 0.18, 0.22, 0.30, 0.40)


def _classification(base: int) -> list[EvalRow]:
    model = CtEmphysema()
    rng = np.random.default_rng(base)
    agree = 0
    errors: list[float] = []
    t0 = time.perf_counter()
    for i, fraction in enumerate(EMPHYSEMA_FRACTIONS):
        f = float(np.clip(fraction + rng.uniform(-0.01, 0.01), 0.0, 0.95)) if fraction else 0.0
        phantom = _phantom(base + i, emphysema=f, blur_mm=0.0)
        truth = emphysema_truth_percent(phantom)
        result = model.run(phantom.to_volume()).classifications[0]
        agree += int(result.value == grade(truth))
        errors.append(abs(result.score - truth))
    name = model.manifest.name
    n = len(EMPHYSEMA_FRACTIONS)
    note = f"{n} phantoms, LAA 0-40 %, {time.perf_counter() - t0:.1f} s"
    return [
        EvalRow(name, "grade agreement", agree / n, 7 / 8, True, note),
        EvalRow(name, "mean |LAA% error| (points)", float(np.mean(errors)), 3.0, False),
        EvalRow(name, "max |LAA% error| (points)", float(np.max(errors)), 3.0, False),
    ]


def emphysema_truth_percent(phantom: Phantom) -> float:
    """Truth LAA%: emphysema voxels over lung parenchyma voxels (both lungs), in percent."""
    lung = phantom.truth("Right Lung") | phantom.truth("Left Lung")
    return 100.0 * float(phantom.truth("Emphysema").sum()) / float(lung.sum())


def _registration(base: int) -> list[EvalRow]:
    model = CtRegistration()
    rng = np.random.default_rng(base)
    mean_tre: list[float] = []
    max_tre: list[float] = []
    t0 = time.perf_counter()
    identity = 0.0
    for i in range(4):
        s = base + i
        current = make_ct_phantom(*SHAPE, pixel_mm=PIXEL_MM, slice_mm=REG_SLICE_MM, seed=s)
        if i == 3:
            shift, angle = (0.0, 0.0, 0.0), 0.0
        else:
            shift = (float(rng.uniform(-10, 10)), float(rng.uniform(-10, 10)), REG_SLICE_MM * int(rng.integers(-4, 5)))
            angle = float(rng.uniform(-8, 8))
        same = [Nodule(_add(n.center_lps, shift), n.diameter_mm, n.side) for n in current.nodules]
        prior = make_ct_phantom(
            *SHAPE,
            pixel_mm=PIXEL_MM,
            slice_mm=REG_SLICE_MM,
            seed=s,
            shift_mm=shift,
            rotation_deg=angle,
            noise_seed=s + 1,
            nodules=same,
        )
        registration = model.run_pair(current.to_volume(), _other_frame(prior.to_volume(), s)).registration
        if registration is None:
            raise RuntimeError(f"{model.manifest.name} returned no registration")
        err = target_errors(registration.transform, rigid_truth(shift, angle), body_points(current))
        if i == 3:
            identity = float(err.mean())
        else:
            mean_tre.append(float(err.mean()))
            max_tre.append(float(err.max()))
    name = model.manifest.name
    note = f"3 shifted (<= 10 mm) and rotated (<= 8 deg) priors, {time.perf_counter() - t0:.1f} s"
    return [
        EvalRow(name, "mean TRE (mm)", float(np.mean(mean_tre)), 2.0, False, note),
        EvalRow(name, "max TRE (mm)", float(np.max(max_tre)), 4.0, False),
        EvalRow(name, "mean TRE, same pose (mm)", identity, 0.5, False, "identical anatomy, other noise"),
    ]


def _add(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    x, y, z = (float(u) + float(v) for u, v in zip(a, b, strict=True))
    return x, y, z


def _other_frame(volume: Volume, seed: int) -> Volume:
    """The same volume labelled with another Frame of Reference (as a prior study would be)."""
    uid = phantom_uid(seed, "prior-frame-of-reference")
    return Volume(volume.voxels, volume.affine, volume.modality, volume.sop_instance_uids, uid)
