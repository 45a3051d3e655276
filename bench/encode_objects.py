"""Size and encode time of every result object for one CT study (default 300 x 512 x 512).

Run by hand from the repository root:  .venv/bin/python -m bench.encode_objects [--slices 300] [--size 512]

A chest phantom is written as a real single-frame CT series and loaded back as the worker does;
the models run once (not timed here, see bench/model_inference.py); then each object is encoded
and written to bytes, and its encode+write time is printed with its size and the ratio against
the reference measured in the same process: pydicom writing the source series itself.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from io import BytesIO
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, RLELossless

from models import registry
from models.base import ModelResult, Volume, is_pair_model
from testkit.dicom import write_ct_series
from testkit.phantom import make_ct_phantom
from workers.encode.measure import SegmentMeasurement, measure_segments
from workers.encode.seg import build_seg
from workers.encode.sr import build_sr
from workers.load import load_series


def _bytes(objects: Dataset | list[Dataset]) -> int:
    total = 0
    for ds in objects if isinstance(objects, list) else [objects]:
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        total += len(buf.getvalue())
    return total


def _timed(fn: Callable[[], Dataset | list[Dataset]]) -> tuple[float, int, Dataset | list[Dataset]]:
    t = time.perf_counter()
    out = fn()
    size = _bytes(out)
    return time.perf_counter() - t, size, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    args = ap.parse_args()
    pixel = 360.0 / args.size
    sw = "bench"
    with tempfile.TemporaryDirectory() as tmp:
        current = make_ct_phantom(n_slices=args.slices, rows=args.size, cols=args.size, pixel_mm=pixel,
                                  slice_mm=1.0, seed=11)
        prior = make_ct_phantom(n_slices=args.slices, rows=args.size, cols=args.size, pixel_mm=pixel,
                                slice_mm=1.0, seed=12, shift_mm=(6.0, -4.0, 3.0), rotation_deg=4.0)
        t = time.perf_counter()
        paths = write_ct_series(current, Path(tmp) / "current", study_uid="2.25.1001", uid_seed="c")
        reference = time.perf_counter() - t
        ref_size = sum(p.stat().st_size for p in paths)
        prior_paths = write_ct_series(prior, Path(tmp) / "prior", study_uid="2.25.1002", uid_seed="p")
        volume, sources = load_series(paths)
        prior_volume, prior_sources = load_series(prior_paths)
        print(f"reference: pydicom writes the {len(paths)}-slice source series in {reference:.2f} s "
              f"({ref_size / 1e6:.1f} MB)")
        results: dict[str, ModelResult] = {}
        for name in ("ct-hu-segmentation", "ct-lung-nodules", "ct-emphysema", "ct-registration"):
            model = registry.load(name)
            results[name] = model.run_pair(volume, prior_volume) if is_pair_model(model) else model.run(volume)
        seg_result = results["ct-hu-segmentation"]
        organs = ModelResult(seg_result.model_name, seg_result.model_version,
                             segments=tuple(s for s in seg_result.segments if s.name != "Body"))
        rows: list[tuple[str, float, int]] = []

        def add(label: str, fn: Callable[[], Dataset | list[Dataset]]) -> Dataset | list[Dataset]:
            seconds, size, out = _timed(fn)
            rows.append((label, seconds, size))
            return out

        n_all, n_organs = len(seg_result.segments), len(organs.segments)
        seg = add(f"SEG BINARY, {n_all} overlapping segments, uncompressed",
                  lambda: build_seg(sources, seg_result, software_version=sw))
        add(f"SEG LABELMAP, {n_organs} organs, RLE Lossless",
            lambda: build_seg(sources, organs, software_version=sw, segmentation_type="LABELMAP",
                              transfer_syntax_uid=RLELossless))
        add(f"SEG LABELMAP, {n_organs} organs, JPEG-LS Lossless",
            lambda: build_seg(sources, organs, software_version=sw, segmentation_type="LABELMAP",
                              transfer_syntax_uid=JPEGLSLossless))
        add(f"SEG LABELMAP, {n_organs} organs, uncompressed",
            lambda: build_seg(sources, organs, software_version=sw, segmentation_type="LABELMAP",
                              transfer_syntax_uid=ExplicitVRLittleEndian))
        add(f"SEG BINARY, {n_organs} organs, uncompressed (fallback)",
            lambda: build_seg(sources, organs, software_version=sw))
        assert isinstance(seg, Dataset)
        measurements = measure_segments(volume, seg_result.segments)
        add("SR TID 1500, segmentation", lambda: build_sr(sources, seg_result, seg=seg, measurements=measurements,
                                                          software_version=sw))
        findings = replace(results["ct-lung-nodules"], segments=())  # as workers/outputs.py: findings only
        add("SR TID 1500, nodules", lambda: build_sr(sources, findings, software_version=sw))
        add("SR TID 1500, emphysema", lambda: build_sr(sources, results["ct-emphysema"], software_version=sw))
        add("SR TID 1500, registration", lambda: build_sr(sources, results["ct-registration"], software_version=sw))
        for extra in _extra_objects(sources, prior_sources, volume, results, seg_result, measurements, sw):
            add(*extra)
    print(f"\n{'object':<58} {'encode+write':>12} {'size':>10} {'x reference':>12}")
    for label, seconds, size in rows:
        print(f"{label:<58} {seconds:10.2f} s {size / 1e6:8.2f} MB {seconds / reference:11.2f}")


def _extra_objects(sources: list[Dataset], prior_sources: list[Dataset], volume: Volume,
                   results: dict[str, ModelResult], seg_result: ModelResult, measurements: list[SegmentMeasurement],
                   sw: str) -> list[tuple[str, Callable[[], Dataset | list[Dataset]]]]:
    """Key images, PDF, registered prior and spatial registration."""
    from workers.encode.pdf import build_pdf_report
    from workers.encode.registered import build_registered_prior
    from workers.encode.sc import build_key_images
    from workers.encode.sro import build_spatial_registration

    reg = results["ct-registration"]
    nodules = results["ct-lung-nodules"]
    return [
        ("SEG LABELMAP, nodule cores (ct-lung-nodules)",
         lambda: build_seg(sources, nodules, software_version=sw, segmentation_type="LABELMAP")),
        ("Key images (SC RGB), segmentation", lambda: build_key_images(sources, volume, seg_result,
                                                                       software_version=sw)),
        ("Key images (SC RGB), nodules", lambda: build_key_images(sources, volume, nodules, software_version=sw)),
        ("PDF report, segmentation", lambda: build_pdf_report(sources, volume, seg_result, software_version=sw,
                                                              measurements=measurements)),
        ("PDF report, nodules", lambda: build_pdf_report(sources, volume, nodules, software_version=sw)),
        ("Registered prior series (derived CT)", lambda: build_registered_prior(sources, prior_sources, reg,
                                                                                 software_version=sw)),
        ("Spatial Registration (transform)", lambda: build_spatial_registration(sources, prior_sources, reg,
                                                                                software_version=sw)),
    ]


if __name__ == "__main__":
    main()
