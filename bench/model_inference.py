"""Inference time per study for each registered model (CPU here; CUDA when a GPU is present).

Run by hand:  .venv/bin/python bench/model_inference.py [--slices 300] [--size 512] [--model NAME ...]

Each model is loaded once (as a worker keeps it warm), then timed on a generated chest phantom of
the given size; registration models get a shifted, rotated prior of the same size. Prints the
load time, the inference time, and the ratio against ct-hu-segmentation measured in the same run.
"""

from __future__ import annotations

import argparse
import time

from models import registry
from models.base import is_pair_model
from models.phantom import make_ct_phantom


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--model", action="append", help="only these models (default: all)")
    args = ap.parse_args()
    pixel = 360.0 / args.size
    t = time.perf_counter()
    current = make_ct_phantom(n_slices=args.slices, rows=args.size, cols=args.size, pixel_mm=pixel, slice_mm=1.0,
                              seed=11).to_volume()
    prior = make_ct_phantom(n_slices=args.slices, rows=args.size, cols=args.size, pixel_mm=pixel, slice_mm=1.0,
                            seed=12, shift_mm=(6.0, -4.0, 3.0), rotation_deg=4.0).to_volume()
    print(f"phantoms {args.slices}x{args.size}x{args.size}: {time.perf_counter() - t:.1f} s to generate")
    names = sorted(args.model or registry.available(), key=lambda n: n != "ct-hu-segmentation")
    reference: float | None = None
    for name in names:
        t = time.perf_counter()
        model = registry.load(name)
        load_s = time.perf_counter() - t
        t = time.perf_counter()
        result = model.run_pair(current, prior) if is_pair_model(model) else model.run(current)
        infer_s = time.perf_counter() - t
        reference = reference or infer_s
        found = (f"{len(result.segments)} segments, {len(result.detections)} detections, "
                 f"{len(result.classifications)} classifications, registration={result.registration is not None}")
        print(f"{name:<30} load {load_s:6.2f} s  inference {infer_s:6.2f} s  "
              f"x{infer_s / reference:4.2f} of {names[0]}  ({found})")


if __name__ == "__main__":
    main()
