"""Size and encode time of every result object for one CT study (default 300 x 512 x 512).

Run by hand from the repository root:  .venv/bin/python -m bench.encode_objects [--slices 300] [--size 512]

A chest phantom is written as a real single-frame CT series and loaded back as the worker does;
the models run once (not timed here, see bench/model_inference.py); then each object is encoded
and written to bytes, and its encode+write time is printed with its size and the ratio against
the reference measured in the same process: pydicom writing the source series itself.

:func:`rows` gives the issue-15 figure for the unified table (``bench.all``): the objects a
segmentation model's result is delivered as (``workers.outputs.encode_results``: LABELMAP SEG and
its BINARY copy, the two SRs citing them, key images, PDF report) encoded and written to bytes,
with each object's share. ``main`` prints that row after the per-object table.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from io import BytesIO
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, RLELossless

from bench.report import Row, format_table
from models import registry
from models.base import ModelResult, Volume, is_pair_model
from testkit.dicom import write_ct_series
from testkit.phantom import make_ct_phantom
from workers.encode.measure import SegmentMeasurement, measure_segments
from workers.encode.seg import build_seg
from workers.encode.sr import build_sr
from workers.load import load_series
from workers.outputs import encode_results

REPEATS = 3
"""Timed runs of the delivered set (after one untimed warm-up run); the median is reported."""


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
    print()
    print(format_table([_delivered_row(volume, sources, seg_result, reference)]))


def rows(slices: int = 300) -> list[Row]:
    """The issue-15 encoding figure on a ``slices`` x 512 x 512 chest phantom (see the module docstring)."""
    with tempfile.TemporaryDirectory() as tmp:
        phantom = make_ct_phantom(n_slices=slices, rows=512, cols=512, pixel_mm=360.0 / 512, slice_mm=1.0, seed=11)
        t = time.perf_counter()
        paths = write_ct_series(phantom, Path(tmp) / "current", study_uid="2.25.1001", uid_seed="c")
        reference = time.perf_counter() - t
        volume, sources = load_series(paths)
    result = registry.load("ct-hu-segmentation").run(volume)
    return [_delivered_row(volume, sources, result, reference)]


def _delivered_row(volume: Volume, sources: list[Dataset], seg_result: ModelResult, reference: float) -> Row:
    """encode_results of ct-hu-segmentation's organs (disjoint: LABELMAP + BINARY copy, two SRs, key
    images, PDF) and writing every object to bytes: the median of :data:`REPEATS` runs after a
    warm-up (a worker process pays highdicom's one-time loading of its standard tables once). Each
    object's share comes from timing its encoder and writer on their own, as encode_results calls them."""
    model = registry.load("ct-hu-segmentation")
    organs = replace(seg_result, segments=tuple(s for s in seg_result.segments if s.name != "Body"))
    n = volume.voxels.shape[0]

    def delivered() -> tuple[float, float]:
        """Wall and CPU seconds (the CPU time of this process tells a busy machine from slow code)."""
        t, cpu = time.perf_counter(), time.process_time()
        for item in encode_results(model, sources, volume, organs, software_version="bench"):
            _bytes(item.dataset)
        return time.perf_counter() - t, time.process_time() - cpu

    delivered()
    timed = [delivered() for _ in range(REPEATS)]
    runs = [wall for wall, _ in timed]
    shares = _shares(volume, sources, organs)
    total = sum(shares.values())
    note = (f"encode+write of the delivered set, median of {REPEATS} runs ({min(runs):.2f}-{max(runs):.2f} s, "
            f"CPU {statistics.median(cpu for _, cpu in timed):.2f} s); "
            "shares: " + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in shares.items())
            + f"; reference: pydicom writing the {n}-slice source series")
    return Row(f"Encoding SEG(LABELMAP+BINARY)+SR+key images+PDF, {n} slices", statistics.median(runs), "s",
               reference="pydicom writes source", ref_value=reference, target=1.5, target_on_value=True,
               higher_is_better=False, note=note)


def _shares(volume: Volume, sources: list[Dataset], organs: ModelResult) -> dict[str, float]:
    """Seconds of each object of the delivered set (encode + write), timed on its own."""
    from workers.encode.pdf import build_pdf_report
    from workers.encode.render import render_key_images, source_slice_labels
    from workers.encode.sc import build_key_images

    sw = "bench"
    t = time.perf_counter()
    seg = build_seg(sources, organs, software_version=sw, segmentation_type="LABELMAP")
    _bytes(seg)
    t_labelmap = time.perf_counter() - t
    t = time.perf_counter()
    fallback = build_seg(sources, organs, software_version=sw, fallback_for=str(seg.SOPInstanceUID))
    _bytes(fallback)
    t_binary = time.perf_counter() - t
    t = time.perf_counter()
    measurements = measure_segments(volume, organs.segments)
    _bytes([build_sr(sources, organs, seg=s, measurements=measurements, software_version=sw) for s in (seg, fallback)])
    t_sr = time.perf_counter() - t
    t = time.perf_counter()
    shots = render_key_images(volume, organs, slice_labels=source_slice_labels(sources, volume))
    _bytes(build_key_images(sources, volume, organs, software_version=sw, rendered=shots))
    t_sc = time.perf_counter() - t
    t = time.perf_counter()
    _bytes(build_pdf_report(sources, volume, organs, software_version=sw, measurements=measurements,
                            key_images=[s.pixels for s in shots]))
    t_pdf = time.perf_counter() - t
    return {"SEG LABELMAP": t_labelmap, "SEG BINARY copy": t_binary, "2 SR (+measures)": t_sr,
            "key images": t_sc, "PDF": t_pdf}


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
