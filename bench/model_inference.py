"""Inference time per study for each registered model, on the CPU and (when present) on CUDA.

Run by hand from the repository root:

    .venv/bin/python -m bench.model_inference [--slices 300] [--size 512] [--model NAME ...]
        [--device cpu|cuda ...] [--precision fp32|amp ...] [--threads N] [--batch-size 4]

Each model is loaded once through the registry (as a worker keeps it warm, with the options a site
would configure), then timed on a generated chest phantom of the given size (1 mm slices, 360 mm
field of view); registration models get a moved prior of the same anatomy. Deep-learning models
run on every requested device (default: cpu, plus cuda when torch sees a GPU) and precision
(default: fp32 on the CPU, fp32 and amp on CUDA); on CUDA an untimed warm-up run comes first
(cuDNN autotuning, allocator). Classical models run on the CPU only. The table gives the load
time, the inference time, the ratio against ct-hu-segmentation on the CPU, and what was found.

:func:`rows` gives the figures for the unified table (``bench.all``): each chest CT model of the
turnaround (ct-hu-segmentation, ct-lung-nodules, ct-emphysema) alone on the CPU beside
ct-hu-segmentation, the three together on one read-only volume as a worker runs a study's jobs
(they compute the body, lung and airway masks once:
:func:`models.ct_hu_segmentation.model.chest_masks`), and, when torch sees CUDA, each
deep-learning model's inference time per study and studies per hour on the GPU, fp32 and AMP.
Classical models use the threads that threadpoolctl reports (the worker caps them per child).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass
from typing import Any

from bench.report import Row
from models import registry
from models.base import Model, ModelResult, Volume, is_pair_model
from models.ct_hu_segmentation.inplane import threads
from models.ct_hu_segmentation.model import forget_chest_masks
from testkit.phantom import make_ct_phantom

REFERENCE = "ct-hu-segmentation"
CHEST_MODELS = ("ct-hu-segmentation", "ct-lung-nodules", "ct-emphysema")
"""The models of the issue's turnaround target, in the order a study's jobs run."""
NO_CUDA = "GPU: no CUDA device in this run (GPU figures need the lent GPU machine)"


@dataclass(frozen=True)
class Timing:
    model: str
    device: str
    precision: str
    load_s: float
    warmup_s: float | None
    infer_s: float
    found: str


def _found(result: ModelResult) -> str:
    parts = []
    if result.segments:
        parts.append(f"{sum(bool(s.mask.any()) for s in result.segments)}/{len(result.segments)} segments")
    if result.detections or result.model_name.endswith(("nodules", "detection")):
        parts.append(f"{len(result.detections)} detections")
    parts += [f"{c.value.meaning}" for c in result.classifications]
    if result.registration is not None:
        parts.append(f"residual {result.registration.residual_mm:.1f} mm")
    return ", ".join(parts) or "-"


def _synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _run(model: Model, current: Volume, prior: Volume) -> ModelResult:
    return model.run_pair(current, prior) if is_pair_model(model) else model.run(current)


def _time(name: str, device: registry.Device, precision: registry.Precision, batch_size: int, current: Volume,
          prior: Volume) -> Timing:
    options = registry.ModelOptions(device=device, precision=precision, batch_size=batch_size)
    t = time.perf_counter()
    model = registry.load(name, options)
    load_s = time.perf_counter() - t
    warmup_s = None
    if device == "cuda":
        t = time.perf_counter()
        _run(model, current, prior)
        _synchronize(device)
        warmup_s = time.perf_counter() - t
    t = time.perf_counter()
    result = _run(model, current, prior)
    _synchronize(device)
    return Timing(name, device, precision, load_s, warmup_s, time.perf_counter() - t, _found(result))


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _table(rows: list[Timing], reference: float | None) -> str:
    head = f"{'model':<28} {'device':<6} {'prec':<5} {'load s':>7} {'warm-up s':>9} {'infer s':>8} {'x ref':>6}  found"
    lines = [head, "-" * len(head)]
    for r in rows:
        warm = f"{r.warmup_s:9.2f}" if r.warmup_s is not None else f"{'-':>9}"
        ratio = f"{r.infer_s / reference:6.2f}" if reference else f"{'-':>6}"
        lines.append(f"{r.model:<28} {r.device:<6} {r.precision:<5} {r.load_s:7.2f} {warm} {r.infer_s:8.2f} {ratio}  "
                     f"{r.found}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--model", action="append", help="only these models (default: all)")
    ap.add_argument("--device", action="append", choices=["cpu", "cuda"],
                    help="devices for the deep-learning models (default: cpu, and cuda when available)")
    ap.add_argument("--precision", action="append", choices=["fp32", "amp"],
                    help="precisions for the deep-learning models (default: fp32 on cpu, fp32 and amp on cuda)")
    ap.add_argument("--batch-size", type=int, default=4, help="sliding-window batch size (default: 4)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's own choice)")
    args = ap.parse_args(argv)
    names = sorted(args.model or registry.available(), key=lambda n: n != REFERENCE)
    registry.validate_names(names)
    cuda = _cuda_available()
    devices = args.device or (["cpu", "cuda"] if cuda else ["cpu"])
    if "cuda" in devices and not cuda:
        ap.error("--device cuda: torch sees no CUDA device")
    if args.threads and any(registry.is_deep_learning(n) for n in names):
        import torch

        torch.set_num_threads(args.threads)

    t = time.perf_counter()
    current, prior = _phantom(args.slices, args.size), _phantom(args.slices, args.size, prior=True)
    print(f"phantoms {args.slices}x{args.size}x{args.size}: {time.perf_counter() - t:.1f} s to generate")

    rows: list[Timing] = []
    for name in names:
        if not registry.is_deep_learning(name):
            rows.append(_time(name, "cpu", "fp32", args.batch_size, current, prior))
        else:
            for device in devices:
                for precision in args.precision or (["fp32", "amp"] if device == "cuda" else ["fp32"]):
                    rows.append(_time(name, device, precision, args.batch_size, current, prior))
        print(_table(rows[-1:], None).splitlines()[-1], flush=True)
    reference = next((r.infer_s for r in rows if r.model == REFERENCE), None)
    print()
    print(_table(rows, reference))
    if reference is not None:
        print(f"x ref: inference time / {REFERENCE} on the CPU in this run")


def _phantom(slices: int, size: int, prior: bool = False) -> Volume:
    """The chest phantom (1 mm slices, 360 mm field of view), or a moved prior of the same anatomy."""
    kw: dict[str, Any] = {"n_slices": slices, "rows": size, "cols": size, "pixel_mm": 360.0 / size, "slice_mm": 1.0}
    if prior:
        return make_ct_phantom(**kw, seed=12, shift_mm=(6.0, -4.0, 3.0), rotation_deg=4.0).to_volume()
    return make_ct_phantom(**kw, seed=11).to_volume()


def _read_only(volume: Volume) -> Volume:
    """A copy of ``volume`` whose voxels are read-only, as the worker's loader gives them (cacheable)."""
    voxels = volume.voxels.copy()
    voxels.setflags(write=False)
    return dataclasses.replace(volume, voxels=voxels)


def rows(slices: int = 300) -> list[Row]:
    """The unified table's rows: CPU inference of the turnaround's chest models and, with CUDA, the
    deep-learning models on the GPU (else one row saying there was no GPU)."""
    size = 512
    current = _phantom(slices, size)
    shape = f"{slices}x{size}x{size} CT"
    cpu = threads()
    # Each model alone: a writable volume, so nothing is shared between them.
    alone = {name: _time(name, "cpu", "fp32", 4, current, current) for name in CHEST_MODELS}
    ref = alone[REFERENCE].infer_s
    out = [
        Row(f"{name} inference, {shape}", t.infer_s, "s", f"{REFERENCE} (CPU)", ref, higher_is_better=False,
            note=f"{name} alone on the CPU, {cpu} thread(s): {t.found}")
        for name, t in alone.items()
    ]
    # Together on one read-only volume, in a study's job order: the chest masks are computed once.
    shared = _read_only(current)
    models = [registry.load(name, registry.ModelOptions()) for name in CHEST_MODELS]
    parts = []
    for model in models:
        t = time.perf_counter()
        model.run(shared)
        parts.append(time.perf_counter() - t)
    together = sum(parts)
    shares = ", ".join(f"{n} {s:.2f} s" for n, s in zip(CHEST_MODELS, parts, strict=True))
    out.append(Row(f"3 chest models on one volume, {shape}", together, "s", "the same 3 apart",
                   sum(t.infer_s for t in alone.values()), higher_is_better=False,
                   note=f"body, lung and airway masks computed once ({shares}; {cpu} CPU thread(s))"))
    del shared, models
    forget_chest_masks()
    out.extend(_gpu_rows(current, ref, slices, size))
    return out


def _gpu_rows(current: Volume, cpu_ref_s: float, slices: int, size: int) -> list[Row]:
    """Per deep-learning model on CUDA: seconds per study and studies per hour, fp32 and AMP."""
    if not _cuda_available():
        return [Row("GPU inference", 0.0, "", note=NO_CUDA)]
    prior = _phantom(slices, size, prior=True)
    out: list[Row] = []
    for name in (n for n in registry.available() if registry.is_deep_learning(n)):
        fp32_s: float | None = None
        for precision in ("fp32", "amp"):
            t = _time(name, "cuda", precision, 4, current, prior)
            fp32_s = t.infer_s if precision == "fp32" else fp32_s
            ref_name, ref_s = (f"{REFERENCE} (CPU)", cpu_ref_s) if precision == "fp32" else (f"{name} fp32", fp32_s)
            out.append(Row(f"{name} GPU {precision}, per study", t.infer_s, "s", ref_name, ref_s,
                           higher_is_better=False, note=f"{name} on CUDA, {precision}: {t.found}"))
            out.append(Row(f"{name} GPU {precision}, studies/hour", 3600.0 / t.infer_s, "studies/h"))
    return out


if __name__ == "__main__":
    main()
