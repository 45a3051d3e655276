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
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any

from models import registry
from models.base import Model, ModelResult, Volume, is_pair_model
from testkit.phantom import make_ct_phantom

REFERENCE = "ct-hu-segmentation"


@dataclass(frozen=True)
class Row:
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
          prior: Volume) -> Row:
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
    return Row(name, device, precision, load_s, warmup_s, time.perf_counter() - t, _found(result))


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _table(rows: list[Row], reference: float | None) -> str:
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

    pixel = 360.0 / args.size
    t = time.perf_counter()
    kw: dict[str, Any] = {"n_slices": args.slices, "rows": args.size, "cols": args.size, "pixel_mm": pixel,
                          "slice_mm": 1.0}
    current = make_ct_phantom(**kw, seed=11).to_volume()
    prior = make_ct_phantom(**kw, seed=12, shift_mm=(6.0, -4.0, 3.0), rotation_deg=4.0).to_volume()
    print(f"phantoms {args.slices}x{args.size}x{args.size}: {time.perf_counter() - t:.1f} s to generate")

    rows: list[Row] = []
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


if __name__ == "__main__":
    main()
