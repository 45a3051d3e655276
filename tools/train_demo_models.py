"""Train the four demonstration networks on synthetic phantoms and write their bundles.

Run from the repository root (CPU, deterministic seeds; a few minutes in total on 2 cores)::

    .venv/bin/python -m tools.train_demo_models                 # all four
    .venv/bin/python -m tools.train_demo_models --only seg det  # some of them

Each model's bundle goes to ``models/dl_<name>/`` (``configs/metadata.json``,
``configs/inference.json``, ``models/model.pt``) next to its hand-written ``manifest.yaml``.
These are demonstration models trained on :mod:`testkit.phantom` cases, NOT clinical models.
Training cases come from seeds that :mod:`testkit.dl_evaluate` never uses (it draws held-out
cases from its own seeds).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from models.ct_emphysema import GRADES
from models.dl.bundle import parse_network_def, rewrite_configs, write_bundle
from models.dl.core import MODELS_DIR
from models.dl.runtime import hu_to_unit, resample, to_work_grid
from models.dl_ct_registration import model as reg
from models.dl_ct_segmentation.model import OUT_LEFT, OUT_RIGHT, DlCtSegmentation
from models.dl_emphysema_classification.model import ClsParams, classifier_input
from testkit import dl_synth
from testkit.phantom import (
    AIR,
    BONE,
    LEFT_EMPHYSEMA,
    LEFT_LUNG,
    RIGHT_EMPHYSEMA,
    RIGHT_LUNG,
    TABLE,
    Phantom,
)
from tools.demo_bundle_items import (
    BUNDLE_ITEMS,
    CLS_ITEMS,
    CLS_NODE_PARAMS,
    CLS_PARAMS,
    DATA_FORMATS,
    DET_NODE_PARAMS,
    DET_PARAMS,
    REG_NODE_PARAMS,
    REG_PARAMS,
    SEG_NODE_PARAMS,
    SEG_PARAMS,
    grid_items,
    reg_items,
    seg_items,
)

VERSION = "0.1.0-demo"
DESCRIPTION = "Demonstration model trained on synthetic phantoms, not a clinical model."
TRAIN_SEED = 20240601  # evaluate.py uses other seeds


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def seed_all(seed: int) -> np.random.Generator:
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def random_crop(
    tensors: list[torch.Tensor],
    size: tuple[int, int, int],
    rng: np.random.Generator,
    centre: npt.NDArray[np.int_] | None = None,
) -> list[torch.Tensor]:
    """Crop (and zero-pad) same-shaped (C, D, H, W) tensors to ``size`` around a random or given centre."""
    shape = tensors[0].shape[1:]
    out = []
    starts = []
    for a in range(3):
        n, s = int(shape[a]), size[a]
        if centre is not None:
            lo = int(centre[a]) - s // 2 + int(rng.integers(-s // 4, s // 4 + 1))
        else:
            lo = int(rng.integers(min(0, n - s), max(0, n - s) + 1))
        starts.append(lo)
    for t in tensors:
        pad = torch.zeros((t.shape[0], *size), dtype=t.dtype)
        src = []
        dst = []
        for a in range(3):
            lo = starts[a]
            s0, s1 = max(0, lo), min(int(shape[a]), lo + size[a])
            src.append(slice(s0, s1))
            dst.append(slice(s0 - lo, s1 - lo))
        pad[(slice(None), *dst)] = t[(slice(None), *src)]
        out.append(pad)
    return out


# ---------------------------------------------------------------------------------------------
# Segmentation


SEG_NET = {
    "_target_": "monai.networks.nets.UNet",
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 4,
    "channels": [8, 16, 32],
    "strides": [2, 2],
    "num_res_units": 1,
    "norm": "INSTANCE",
}


def seg_classes(labels: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """Phantom labels -> background 0, other body tissue 1, lung 2 (emphysema included), bone 3."""
    lut = np.ones(256, dtype=np.uint8)
    lut[[AIR, TABLE]] = 0
    lut[[RIGHT_LUNG, LEFT_LUNG, RIGHT_EMPHYSEMA, LEFT_EMPHYSEMA]] = 2
    lut[BONE] = 3
    return lut[labels]


def seg_sample(phantom: Phantom, params: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Input (1, D, H, W) and soft target (4, D, H, W) on the working grid."""
    spacing = (phantom.slice_mm, phantom.pixel_mm, phantom.pixel_mm)
    x = to_work_grid(phantom.hu, spacing, params["spacing_mm"], params["hu_window"])[0]
    onehot = F.one_hot(torch.from_numpy(seg_classes(phantom.labels)).long(), 4).permute(3, 0, 1, 2)[None].float()
    y = resample(onehot, x.shape[1:])[0]
    return x, y


def soft_dice_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with soft targets + soft Dice (mean over classes)."""
    logp = F.log_softmax(logits, dim=1)
    ce = -(target * logp).sum(dim=1).mean()
    p = logp.exp()
    dims = (0, 2, 3, 4)
    inter = (p * target).sum(dims)
    dice = (2 * inter + 1.0) / (p.sum(dims) + target.sum(dims) + 1.0)
    return ce + (1 - dice).mean()


def train_segmentation(root: Path, iters: int, n_cases: int) -> None:
    rng = seed_all(TRAIN_SEED + 1)
    netdef = parse_network_def(SEG_NET)
    net = netdef.build()
    log(f"segmentation: {n_cases} phantoms")
    cases = []
    for i in range(n_cases):
        ph_rng = np.random.default_rng([TRAIN_SEED, 1, i])
        if i % 3 == 0:
            ph = dl_synth.emphysema_case(ph_rng, int(ph_rng.integers(1, 4))).phantom
        else:
            ph = dl_synth.random_phantom(ph_rng)
        cases.append(seg_sample(ph, SEG_PARAMS))
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=iters, pct_start=0.1)
    roi = tuple(SEG_PARAMS["roi_size"])
    net.train()
    t0 = time.time()
    for it in range(iters):
        xs, ys = [], []
        for _ in range(2):
            x, y = cases[int(rng.integers(len(cases)))]
            xc, yc = random_crop([x, y], roi, rng)
            xs.append(xc)
            ys.append(yc)
        logits = net(torch.stack(xs))
        loss = soft_dice_ce(logits, torch.stack(ys))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if it % 50 == 0 or it == iters - 1:
            log(f"  it {it:4d} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    net.eval()
    write_bundle(
        root / "dl_ct_segmentation",
        net,
        netdef,
        name="dl-ct-segmentation",
        version=VERSION,
        description=DESCRIPTION,
        params=SEG_NODE_PARAMS,
        metadata=_training_metadata("segmentation", iters, n_cases, "dl_ct_segmentation"),
        items=seg_items(SEG_PARAMS),
    )


def _training_metadata(what: str, iters: int, n_cases: int, package: str) -> dict[str, Any]:
    return {
        "task": f"demo {what} on synthetic CT phantoms",
        "network_data_format": DATA_FORMATS[package],
        "training": {
            "tool": "tools/train_demo_models.py",
            "seed": TRAIN_SEED,
            "iterations": iters,
            "phantoms": n_cases,
            "threads": torch.get_num_threads(),
        },
    }


# ---------------------------------------------------------------------------------------------
# Detection


DET_NET = {
    "_target_": "monai.networks.nets.UNet",
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 2,
    "channels": [8, 16, 32, 64],
    "strides": [2, 2, 2],
    "num_res_units": 1,
    "norm": "INSTANCE",
}


def nodule_work_centres(phantom: Phantom, work_shape: tuple[int, ...]) -> npt.NDArray[np.float64]:
    """Nodule centres as working-grid (z, y, x) indices (phantoms are in canonical orientation)."""
    if not phantom.nodules:
        return np.zeros((0, 3))
    lps = np.array([n.center_lps for n in phantom.nodules])
    ijk = (lps - phantom.affine[:3, 3]) @ np.linalg.inv(phantom.affine[:3, :3]).T
    zyx = ijk[:, ::-1]
    n = np.asarray(phantom.shape, dtype=np.float64)
    m = np.asarray(work_shape, dtype=np.float64)
    return (zyx + 0.5) * (m / n) - 0.5


def det_sample(phantom: Phantom, params: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, npt.NDArray[np.float64]]:
    """Input (1, D, H, W), target (3, D, H, W): heat, diameter / scale, diameter mask; centres (n, 3)."""
    spacing = (phantom.slice_mm, phantom.pixel_mm, phantom.pixel_mm)
    sp = params["spacing_mm"]
    x = to_work_grid(phantom.hu, spacing, sp, params["hu_window"])[0]
    shape = tuple(int(v) for v in x.shape[1:])
    target = torch.zeros((3, *shape))
    centres = nodule_work_centres(phantom, shape)
    grids = [torch.arange(n, dtype=torch.float32) for n in shape]
    for c, nod in zip(centres, phantom.nodules, strict=True):
        sigma = max(1.0, nod.diameter_mm / (4 * sp[0]))
        d2 = (
            ((grids[0] - c[0]) ** 2)[:, None, None]
            + ((grids[1] - c[1]) ** 2)[None, :, None]
            + ((grids[2] - c[2]) ** 2)[None, None, :]
        )
        target[0] = torch.maximum(target[0], torch.exp(-d2 / (2 * sigma**2)))
        peak = tuple(int(np.clip(round(v), 0, n - 1)) for v, n in zip(c, shape, strict=True))
        target[0][peak] = 1.0
        near = d2 <= 1.0 + 1e-6
        target[1][near] = nod.diameter_mm / params["diameter_scale_mm"]
        target[2][near] = 1.0
    return x, target, centres


def init_output_bias(net: torch.nn.Module, channel: int, value: float) -> None:
    """Shift the last convolution's bias so that output ``channel`` averages ``value`` at start."""
    last = [m for m in net.modules() if isinstance(m, torch.nn.Conv3d | torch.nn.ConvTranspose3d)][-1]
    assert last.bias is not None
    with torch.no_grad():
        for _ in range(3):
            mean = float(net(torch.rand(1, 1, 32, 32, 32))[0, channel].mean())
            last.bias[channel] += value - mean


def centernet_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CenterNet focal loss on the heatmap + L1 on the diameter at the centres."""
    p = torch.sigmoid(out[:, 0]).clamp(1e-4, 1 - 1e-4)
    t = target[:, 0]
    pos = t >= 1.0
    n_pos = max(1, int(pos.sum()))
    pos_loss = -(torch.log(p) * (1 - p) ** 2)[pos].sum()
    neg_loss = -(torch.log(1 - p) * p**2 * (1 - t) ** 4)[~pos].sum()
    m = target[:, 2]
    size_loss = (torch.abs(out[:, 1] - target[:, 1]) * m).sum() / m.sum().clamp(min=1.0)
    return (pos_loss + neg_loss) / n_pos + size_loss


def train_detection(root: Path, iters: int, n_cases: int) -> None:
    rng = seed_all(TRAIN_SEED + 2)
    netdef = parse_network_def(DET_NET)
    net = netdef.build()
    init_output_bias(net, channel=0, value=-4.6)  # heat ~ 0.01 at start (CenterNet's prior)
    log(f"detection: {n_cases} phantoms")
    cases = []
    for i in range(n_cases):
        ph_rng = np.random.default_rng([TRAIN_SEED, 2, i])
        if i % 4 == 0:
            ph = dl_synth.emphysema_case(ph_rng, int(ph_rng.integers(0, 4)), nodules=(2, 10)).phantom
        else:
            ph = dl_synth.random_phantom(ph_rng, nodules=(2, 10))
        cases.append(det_sample(ph, DET_PARAMS))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[int(iters * 0.75)], gamma=0.3)
    roi = (48, 48, 48)
    net.train()
    t0 = time.time()
    for it in range(iters):
        xs, ys = [], []
        for _ in range(2):
            x, y, centres = cases[int(rng.integers(len(cases)))]
            centre = None
            if len(centres) and rng.random() < 0.8:
                centre = centres[int(rng.integers(len(centres)))].round().astype(int)
            xc, yc = random_crop([x, y], roi, rng, centre)
            xs.append(xc)
            ys.append(yc)
        loss = centernet_loss(net(torch.stack(xs)), torch.stack(ys))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if it % 50 == 0 or it == iters - 1:
            log(f"  it {it:4d} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    net.eval()
    write_bundle(
        root / "dl_lung_nodule_detection",
        net,
        netdef,
        name="dl-lung-nodule-detection",
        version=VERSION,
        description=DESCRIPTION,
        params=DET_NODE_PARAMS,
        metadata=_training_metadata("nodule detection (centre heatmap)", iters, n_cases, "dl_lung_nodule_detection"),
        items=grid_items(DET_PARAMS, "constant"),
    )


# ---------------------------------------------------------------------------------------------
# Classification


CLS_NET = {
    "_target_": "monai.networks.nets.Classifier",
    "in_shape": [2, 48, 48, 48],
    "classes": 4,
    "channels": [8, 16, 32, 32],
    "strides": [2, 2, 2, 2],
    "num_res_units": 1,
}


def soft_grade(fraction: float, sigma_points: float = 1.0) -> torch.Tensor:
    """Grade probabilities for an LAA fraction known to about ``sigma_points`` percentage points.

    Near a cut-off the target shares its weight with the neighbouring grade: the network learns
    an ordered, smooth function of the low-attenuation fraction rather than four unrelated labels.
    """
    edges = torch.tensor([-np.inf, 5.0, 15.0, 25.0, np.inf], dtype=torch.float64)
    cdf = torch.distributions.Normal(100.0 * fraction, sigma_points).cdf(edges)
    return (cdf[1:] - cdf[:-1]).float()


def train_classification(root: Path, iters: int, n_cases: int) -> None:
    """Trained on lung masks from the segmentation bundle in ``root`` (as at inference) and on truth masks."""
    rng = seed_all(TRAIN_SEED + 3)
    netdef = parse_network_def(CLS_NET)
    net = netdef.build()
    params = ClsParams.model_validate(CLS_PARAMS)
    segmenter = DlCtSegmentation(root / "dl_ct_segmentation", device="cpu")
    log(f"classification: {n_cases} phantoms, lungs from {segmenter.loaded.source}")
    xs_all, ys_all, soft_all = [], [], []
    for i in range(n_cases):
        case = dl_synth.emphysema_case(np.random.default_rng([TRAIN_SEED, 3, i]), i % len(GRADES))
        ph = case.phantom
        labels = segmenter.label_map(ph.to_volume())
        spacing = (ph.slice_mm, ph.pixel_mm, ph.pixel_mm)
        for lung in ((labels == OUT_RIGHT) | (labels == OUT_LEFT), ph.truth("Right Lung") | ph.truth("Left Lung")):
            xs_all.append(classifier_input(ph.hu, lung, spacing, params)[0])
            ys_all.append(case.grade)
            soft_all.append(soft_grade(case.fraction))  # two samples per phantom: predicted and truth lungs
    x_all, y_all, soft = torch.stack(xs_all), torch.tensor(ys_all), torch.stack(soft_all)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[int(iters * 0.7)], gamma=0.3)
    net.train()
    t0 = time.time()
    for it in range(iters):
        idx = torch.from_numpy(rng.choice(len(xs_all), 8, replace=False))
        x = x_all[idx]
        flips = [d for d in (2, 3, 4) if rng.random() < 0.5]  # grades do not depend on orientation
        if flips:
            x = x.flip(flips)
        loss = -(soft[idx] * F.log_softmax(net(x), dim=1)).sum(dim=1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if it % 50 == 0 or it == iters - 1:
            log(f"  it {it:4d} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    net.eval()
    with torch.no_grad():
        acc = float((net(x_all).argmax(1) == y_all).float().mean())
    log(f"  training-set agreement {acc:.3f}")
    write_bundle(
        root / "dl_emphysema_classification",
        net,
        netdef,
        name="dl-emphysema-classification",
        version=VERSION,
        description=DESCRIPTION,
        params=CLS_NODE_PARAMS,
        metadata=_training_metadata("emphysema grading", iters, n_cases, "dl_emphysema_classification"),
        items=CLS_ITEMS,
    )


# ---------------------------------------------------------------------------------------------
# Registration


REG_NET = {
    "_target_": "monai.networks.nets.Regressor",
    "in_shape": [2, 80, 80, 80],
    "out_shape": [6],
    "channels": [8, 16, 32, 64, 64],
    "strides": [2, 2, 2, 2, 2],
    "num_res_units": 0,
}
REG_MAX_ANGLE_DEG = np.array([6.0, 6.0, 12.0])
REG_MAX_SHIFT_MM = 35.0


def reg_sample(pair: dl_synth.RigidPair, params: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Working-grid current image, downsampled prior and the geometry of one training pair."""
    sp, grid = params["spacing_mm"], tuple(params["grid"])
    cur, cur_aff = reg.downsample(pair.current, sp)
    pri, pri_aff = reg.downsample(pair.prior, sp)
    centre = pair.current.to_patient((np.asarray(pair.current.voxels.shape[::-1], dtype=np.float64) - 1) / 2)
    g_aff = reg.grid_affine(centre, grid, sp)
    d = lambda a: torch.as_tensor(a, dtype=torch.float64)[None]  # noqa: E731
    fixed = reg.warp(hu_to_unit(cur, params["hu_window"]), d(cur_aff), d(np.eye(4)), d(g_aff), grid)
    return {
        "fixed": fixed[0],
        "prior": hu_to_unit(pri, params["hu_window"])[0],
        "prior_aff": d(pri_aff)[0],
        "grid_aff": d(g_aff)[0],
        "truth": d(pair.current_to_prior)[0],
        "centre": torch.as_tensor(centre, dtype=torch.float64),
    }


def random_rigid(rng: np.random.Generator, centre: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """A random rigid error about ``centre``: up to the training range, often much smaller."""
    scale = float(rng.uniform(0.1, 1.0))
    angles = rng.uniform(-1, 1, 3) * REG_MAX_ANGLE_DEG * scale
    shift = rng.uniform(-1, 1, 3) * REG_MAX_SHIFT_MM * scale
    return dl_synth.rigid_matrix(angles, shift, centre)


def train_registration(root: Path, iters: int, n_cases: int) -> None:
    rng = seed_all(TRAIN_SEED + 4)
    netdef = parse_network_def(REG_NET)
    net = netdef.build()
    log(f"registration: {n_cases} phantom pairs")
    cases = [
        reg_sample(dl_synth.rigid_pair(np.random.default_rng([TRAIN_SEED, 4, i]), length_mm=(180.0, 420.0)), REG_PARAMS)
        for i in range(n_cases)
    ]
    p = REG_PARAMS
    grid = tuple(p["grid"])
    offsets = torch.stack(torch.meshgrid(*(torch.tensor([-80.0, 0.0, 80.0]),) * 3, indexing="ij"), -1).reshape(-1, 3)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[int(iters * 0.7), int(iters * 0.9)], gamma=0.3)
    net.train()
    t0 = time.time()
    for it in range(iters):
        xs, targets, centres = [], [], []
        for _ in range(4):
            c = cases[int(rng.integers(len(cases)))]
            err = random_rigid(rng, c["centre"].numpy())
            start = c["truth"] @ torch.as_tensor(err)
            moving = reg.warp(c["prior"][None], c["prior_aff"][None], start[None], c["grid_aff"][None], grid)
            xs.append(torch.cat([c["fixed"], moving[0]], dim=0))
            targets.append(torch.as_tensor(np.linalg.inv(err)))
            centres.append(c["centre"])
        out = net(torch.stack(xs))
        centre = torch.stack(centres)
        pred = torch.stack(
            [
                reg.rigid_from_params(out[b : b + 1].double(), centre[b], p["angle_scale_deg"], p["shift_scale_mm"])[0]
                for b in range(len(xs))
            ]
        )
        pts = centre[:, None, :] + offsets[None].double()  # (B, 27, 3)
        tgt = torch.stack(targets)
        diff = (pred[:, :3, :3] - tgt[:, :3, :3]) @ pts.transpose(1, 2) + (pred[:, :3, 3:] - tgt[:, :3, 3:])
        loss = diff.norm(dim=1).mean()
        opt.zero_grad()
        loss.float().backward()
        opt.step()
        sched.step()
        if it % 50 == 0 or it == iters - 1:
            log(f"  it {it:4d} TRE {loss.item():.2f} mm ({time.time() - t0:.0f}s)")
    net.eval()
    write_bundle(
        root / "dl_ct_registration",
        net,
        netdef,
        name="dl-ct-registration",
        version=VERSION,
        description=DESCRIPTION,
        params=REG_NODE_PARAMS,
        metadata=_training_metadata("rigid registration", iters, n_cases, "dl_ct_registration"),
        items=reg_items(REG_PARAMS),
    )


# ---------------------------------------------------------------------------------------------


TRAINERS: dict[str, Callable[[Path, int, int], None]] = {
    "seg": train_segmentation,
    "det": train_detection,
    "cls": train_classification,
    "reg": train_registration,
}
DEFAULTS: dict[str, tuple[int, int]] = {"seg": (600, 24), "det": (2000, 30), "cls": (300, 64), "reg": (3000, 128)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", choices=list(TRAINERS), default=list(TRAINERS), help="cls needs seg's bundle")
    ap.add_argument("--out", type=Path, default=MODELS_DIR, help="where the models/dl_*/ bundles go")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=0, help="override the iteration count (0: default per model)")
    ap.add_argument("--configs-only", action="store_true",
                    help="rewrite the bundles' configs (ordinary MONAI format, channel_def) without training")
    args = ap.parse_args(argv)
    if args.configs_only:
        for package, data_format in DATA_FORMATS.items():
            rewrite_configs(args.out / package, data_format, *BUNDLE_ITEMS[package])
            log(f"{package}: configs rewritten")
        return 0
    torch.set_num_threads(args.threads)
    start = time.time()
    for name in (n for n in TRAINERS if n in args.only):  # seg before cls: cls uses seg's lung masks
        iters, n_cases = DEFAULTS[name]
        t0 = time.time()
        TRAINERS[name](args.out, args.iters or iters, n_cases)
        log(f"{name}: trained in {time.time() - t0:.0f}s")
    log(f"total {time.time() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
