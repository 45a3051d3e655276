"""Which DICOM objects a model result becomes: the one place that decides, per manifest.

Manifest ``objects`` and what they give (each only when the result has something to show):

    SEG   segmentation: LABELMAP when the segments do not overlap (JPEG-LS), else BINARY. A
          LABELMAP SEG comes with a BINARY copy and an SR citing that copy, marked as the two
          delivery variants: a destination gets one set, by what it accepts (node.send.dimse).
    SR    TID 1500 measurement report (volumes, findings, classification, registration); when the
          model found nothing, what it looked for as absent; when it declined the series
          (``ModelResult.not_assessed``), what it did not assess and why.
    REG   registration: the registered prior series on the current frame of reference, and a
          Spatial Registration object holding the transform (prior -> current frame).
    SC    key images: RGB Secondary Captures with the findings drawn on the source slices and a
          legend, for viewers that show neither SEG nor SR.
    PDF   a one-page Encapsulated PDF report: findings table, what was looked for and not found
          (or not assessed, and why), the key images, model versions and a disclaimer.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace

from pydicom.dataset import Dataset

from models.base import Model, ModelResult, Volume
from node.schema import BINARY_VARIANT, LABELMAP_VARIANT
from workers.encode.measure import measure_segments
from workers.encode.pdf import build_pdf_report
from workers.encode.registered import build_registered_prior
from workers.encode.render import has_content, render_key_images, source_slice_labels
from workers.encode.sc import build_key_images
from workers.encode.seg import EmptyResultError, build_seg_with_fallback
from workers.encode.sr import build_sr
from workers.encode.sro import build_spatial_registration
from workers.encode.view import with_view_position

log = logging.getLogger("workers.outputs")


@dataclass(frozen=True)
class Encoded:
    """One object to store and deliver; ``variant`` is "" (for every destination) or a delivery variant."""

    dataset: Dataset
    variant: str = ""


def encode_results(
    model: Model,
    sources: Sequence[Dataset],
    volume: Volume,
    result: ModelResult,
    *,
    software_version: str,
    predecessors: Mapping[str, Dataset] | None = None,
    prior_sources: Sequence[Dataset] = (),
    leave_out: Collection[str] = (),
) -> list[Encoded]:
    """The objects the model's manifest promises for ``result``: with nothing found, or with
    ``result.not_assessed``, the SR and PDF say so (the looked-for concepts default to the manifest's).

    ``predecessors`` maps a variant ("" or ``binary``) to the SR of an earlier run on this series
    that the new SR of that variant supersedes. ``prior_sources`` are the prior series' images
    of a registration. ``leave_out`` names manifest objects not to make (``PDF`` for a worker given
    de-identified inputs: :data:`node.deid.LEFT_OUT_OBJECTS`).
    """
    objects = tuple(o for o in model.manifest.objects if o not in leave_out)
    if not result.looked_for:
        result = replace(result, looked_for=model.manifest.looked_for)
    result = with_view_position(result, sources)  # CR/DX: PA or AP, stated with each classification
    predecessors = predecessors or {}
    sw = software_version
    frames = volume.source_frames
    out: list[Encoded] = []
    seg: Dataset | None = None
    fallback: Dataset | None = None
    if "SEG" in objects and any(s.mask.any() for s in result.segments):
        seg, fallback = build_seg_with_fallback(sources, result, software_version=sw, source_frames=frames)
        if fallback is not None:
            out += [Encoded(seg, LABELMAP_VARIANT), Encoded(fallback, BINARY_VARIANT)]
        else:
            out.append(Encoded(seg))
    measurements = measure_segments(volume, result.segments) if seg is not None else ()
    if "SR" in objects or ("REG" in objects and result.registration is not None):
        # With detections, the SR holds the findings only: their segments are in the SEG, and OHIF
        # (3.12) cannot open a report that mixes planar findings with volumetric SEG references.
        reported, sr_seg = (replace(result, segments=()), None) if result.detections else (result, seg)
        sr_fallback = fallback if sr_seg is not None else None  # an SR citing no SEG serves both variants
        try:
            sr = build_sr(sources, reported, seg=sr_seg, measurements=measurements if sr_seg is not None else (),
                          software_version=sw, predecessor=predecessors.get(""), source_frames=frames)
        except EmptyResultError:
            log.info("model %s found nothing to report; no SR written", model.manifest.name)
        else:
            if sr_fallback is None:
                out.append(Encoded(sr))
            else:
                binary_sr = build_sr(sources, result, seg=sr_fallback, measurements=measurements, software_version=sw,
                                     predecessor=predecessors.get(BINARY_VARIANT), source_frames=frames,
                                     fallback_for=str(sr.SOPInstanceUID))
                out += [Encoded(sr, LABELMAP_VARIANT), Encoded(binary_sr, BINARY_VARIANT)]
    shows = has_content(result)
    if ("SC" in objects and shows) or ("PDF" in objects and (shows or result.looked_for)):
        shots = render_key_images(volume, result, slice_labels=source_slice_labels(sources, volume)) if shows else []
        if "SC" in objects and shows:
            out += [Encoded(ds) for ds in build_key_images(sources, volume, result, software_version=sw,
                                                           rendered=shots)]
        if "PDF" in objects:
            out.append(Encoded(build_pdf_report(sources, volume, result, software_version=sw,
                                                measurements=measurements, key_images=[s.pixels for s in shots])))
    if "REG" in objects and result.registration is not None:
        out += [Encoded(ds) for ds in build_registered_prior(sources, prior_sources, result, software_version=sw,
                                                             volume=volume)]
        out.append(Encoded(build_spatial_registration(sources, prior_sources, result, software_version=sw)))
    for item in out:
        copy_study_attributes(item.dataset, sources[0])
    return out


STUDY_ATTRIBUTES = ("StudyDescription", "StudyID", "AccessionNumber", "ReferringPhysicianName", "StudyDate",
                    "StudyTime", "PhysiciansOfRecord", "IssuerOfPatientID", "PatientAge", "PatientSize",
                    "PatientWeight", "PregnancyStatus")
"""Patient- and study-level attributes every result repeats exactly as the source has them (dcentvfy
checks that all instances of a study agree; the encoders leave some out, e.g. Study Description).
Procedure Code Sequence is left out on purpose: the SR states the procedure it reports on, and
scanners fill it with private coding schemes."""


def copy_study_attributes(ds: Dataset, source: Dataset) -> None:
    """Make ``ds``'s study-level attributes equal to the source's (only those the source has), and
    drop Referenced Study Sequence: it points at (retired) study management objects that no PACS
    holds, which dcentvfy reports as missing references."""
    for keyword in STUDY_ATTRIBUTES:
        if keyword in source:
            setattr(ds, keyword, source[keyword].value)
    if "ReferencedStudySequence" in ds:
        del ds.ReferencedStudySequence
