"""TID 1500 Measurement Report (Comprehensive 3D SR) of a :class:`models.base.ModelResult`.

Content tree (every group carries a Tracking Identifier, a Tracking UID and the algorithm)::

    Imaging Measurement Report (TID 1500)
      Language, Observer = the model as a device, Procedure reported
      Imaging Measurements
        1. per detection, TID 1410 Planar ROI group: Finding = Detection.type, [Finding site],
           Image Region = CIRCLE/ELLIPSE (SCOORD) on the source slice (or frame) nearest the centre,
           Diameter (mm, INFERRED FROM the same SCOORD), Certainty of Finding (%)
        2. per non-empty segment, TID 1411 Volumetric ROI group: Referenced Segment (the SEG),
           Volume (ml), Mean, Standard Deviation (HU for CT)
        3. per classification, TID 1501 group: Finding = concept, Score (model unit),
           qualitative evaluation concept = category
        4. the registration, TID 1501 group: Finding = Spatial Registration, RMS Distance (mm)
        5. only when there is none of the above, per looked-for concept (``ModelResult.looked_for``),
           TID 1501 group: Finding = the concept, Presence of property = Absent (a negative
           result, with the run's figures, e.g. the detector's sensitivity at this slice
           thickness) or Undetermined with the reason (``ModelResult.not_assessed``: the model
           declined the series)

Why this layout: planar groups come first because OHIF (3.12) fails to load a report whose first
group is a volumetric SEG reference without image coordinates; it draws SCOORDs on the slice,
and lists in its measurement panel the numeric items with an "inferred from" SCOORD (the dcmjs
layout), hence the outline under Diameter too. Classifications are TID 1501 groups rather than
TID 1500's report-level "Qualitative Evaluations" container because highdicom (0.28) builds
only the former, and a score needs a numeric item, which that container does not hold. Absent / not
assessed groups are written only in a report that has no other group: OHIF 3.12 fails to load
a report with a group without image coordinates, so a report with findings stays as it was
(what was not found there is in the PDF). Codes and the SCOORD pixel convention: see
:mod:`workers.encode.sr_content`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code as PydicomCode

from models.base import Code, ModelResult
from node.conformance import LABEL_MAP_SEGMENTATION_STORAGE, SEGMENTATION_STORAGE
from workers.encode.measure import SegmentMeasurement
from workers.encode.seg import (
    DEFAULT_MANUFACTURER,
    EmptyResultError,
    binary_fallback_uid,
    to_pydicom_code,
)
from workers.encode.series import series_description, series_number
from workers.encode.sr_content import (
    HOUNSFIELD_UNIT,
    MEAN,
    MILLILITER,
    NO_UNITS,
    STANDARD_DEVIATION,
    VOLUME,
    absence_group,
    algorithm_of,
    classification_group,
    detection_group,
    intensity_unit,
    registration_group,
    segment_group,
)
from workers.encode.uids import device_uid, input_fingerprint, result_uids

__all__ = [
    "HOUNSFIELD_UNIT",
    "MEAN",
    "MILLILITER",
    "NO_UNITS",
    "SR_KIND",
    "STANDARD_DEVIATION",
    "VOLUME",
    "build_sr",
    "intensity_unit",
    "procedure_for_modality",
]

SR_KIND = "SR"

Group = (
    hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    | hd.sr.MeasurementsAndQualitativeEvaluations
)

#: Procedure Reported per source modality (CID 100); anything else is "Imaging procedure".
_PROCEDURES: dict[str, PydicomCode] = {
    "CT": codes.cid100.CTUnspecifiedBodyRegion,  # LN 25045-6
    "MR": codes.cid100.MRIUnspecifiedBodyRegion,  # LN 25056-3
    "PT": codes.cid100.PETUnspecifiedBodyRegion,  # LN 44136-0
}

_SR_STORAGE = {
    "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
}


def procedure_for_modality(modality: str) -> PydicomCode:
    """Procedure Reported code for a source modality."""
    return _PROCEDURES.get(modality.upper(), codes.cid100.ImagingProcedure)


def _check_seg(
    sources: Sequence[pydicom.Dataset],
    seg: pydicom.Dataset | None,
    result: ModelResult,
    measurements: Sequence[SegmentMeasurement],
) -> None:
    if seg is None:
        if measurements:
            raise ValueError("measurements given without the seg they refer to")
        if any(bool(np.any(segment.mask)) for segment in result.segments):
            raise ValueError("the result has non-empty segments: pass the SEG built from it (seg=...)")
        return
    if seg.get("SOPClassUID") not in (SEGMENTATION_STORAGE, LABEL_MAP_SEGMENTATION_STORAGE):
        raise ValueError(f"seg is not a Segmentation Storage instance (SOP Class {seg.get('SOPClassUID')})")
    if seg.StudyInstanceUID != sources[0].StudyInstanceUID:
        raise ValueError("seg and sources belong to different studies")
    source_series = str(sources[0].SeriesInstanceUID)
    referenced = {str(item.SeriesInstanceUID) for item in seg.get("ReferencedSeriesSequence", [])}
    if source_series not in referenced:
        raise ValueError(f"seg does not reference the source series {source_series}")
    if len(measurements) != len(result.segments):
        raise ValueError(f"{len(measurements)} measurements for {len(result.segments)} segments")
    labels = {int(item.SegmentNumber): str(item.SegmentLabel) for item in seg.SegmentSequence}
    for index, (segment, measurement) in enumerate(zip(result.segments, measurements, strict=True)):
        number = index + 1
        if measurement.segment_number != number or measurement.name != segment.name:
            raise ValueError(
                f"measurement {measurement.segment_number} {measurement.name!r} does not match "
                f"segment {number} {segment.name!r}"
            )
        if labels.get(number) != segment.name:
            raise ValueError(f"seg segment {number} is {labels.get(number)!r}, expected {segment.name!r}")


def _check_predecessor(predecessor: pydicom.Dataset, sources: Sequence[pydicom.Dataset]) -> None:
    if predecessor.get("SOPClassUID") not in _SR_STORAGE:
        raise ValueError(f"predecessor is not an SR document (SOP Class {predecessor.get('SOPClassUID')})")
    if predecessor.StudyInstanceUID != sources[0].StudyInstanceUID:
        raise ValueError("predecessor belongs to another study")


def _check_unique(kind: str, names: Sequence[str]) -> None:
    if len(set(names)) != len(names):
        raise ValueError(f"{kind} must be unique within a result: {list(names)}")


def _groups(
    sources: Sequence[pydicom.Dataset],
    result: ModelResult,
    seg: pydicom.Dataset | None,
    measurements: Sequence[SegmentMeasurement],
    finding_site: Code | None,
    source_frames: Sequence[int] | None = None,
) -> list[Group]:
    """All measurement groups, in report order (planar first); absent / not assessed statements
    when there is nothing else."""
    _check_unique("detection tracking ids", [d.tracking_id for d in result.detections])
    _check_unique("classification names", [c.name for c in result.classifications])
    _check_unique("looked-for concepts", [f"{c.scheme}:{c.value}" for c in result.looked_for])
    source_series_uid = str(sources[0].SeriesInstanceUID)
    modality = str(sources[0].Modality)
    algorithm = algorithm_of(result)
    if result.not_assessed is not None:
        if result.detections or result.segments or result.classifications or result.registration is not None:
            raise ValueError("a result that was not assessed cannot have findings")
        return [absence_group(c, source_series_uid, result, algorithm) for c in result.looked_for]
    groups: list[Group] = [
        detection_group(detection, sources, result, algorithm, finding_site, source_frames)
        for detection in result.detections
    ]
    if seg is not None:
        groups.extend(
            segment_group(segment, measurement, seg, sources, result, algorithm, modality, source_frames)
            for segment, measurement in zip(result.segments, measurements, strict=True)
            if not measurement.is_empty
        )
    groups.extend(
        classification_group(classification, source_series_uid, result, algorithm)
        for classification in result.classifications
    )
    if result.registration is not None:
        groups.append(registration_group(result.registration, source_series_uid, result, algorithm))
    if not groups:  # a negative result: each looked-for concept is absent
        groups = [absence_group(c, source_series_uid, result, algorithm) for c in result.looked_for]
    return groups


def build_sr(
    sources: Sequence[pydicom.Dataset],
    result: ModelResult,
    *,
    seg: pydicom.Dataset | None = None,
    measurements: Sequence[SegmentMeasurement] = (),
    series_number: int = series_number("SR"),
    manufacturer: str = DEFAULT_MANUFACTURER,
    software_version: str,
    procedure_reported: Code | None = None,
    predecessor: pydicom.Dataset | None = None,
    finding_site: Code | None = None,
    source_frames: Sequence[int] | None = None,
    fallback_for: str | None = None,
) -> pydicom.Dataset:
    """Encode ``result`` as a TID 1500 Measurement Report (layout: see the module docstring).

    Args:
        sources: the source images in the volume's k order (only attributes are read); detections
            are drawn on ``sources[round(centre k)]``. Or one multi-frame image: detections are
            then drawn on its frame ``source_frames[round(centre k)]``.
        result: the model result: detections, segments, classifications, registration; with none
            of them, ``looked_for`` concepts are reported absent, or not assessed when
            ``not_assessed`` gives the reason.
        seg: the SEG built by :func:`workers.encode.seg.build_seg` for ``result``; required when
            the result has non-empty segments, which are reported only with it.
        measurements: from :func:`workers.encode.measure.measure_segments`, one per segment
            (``measurements[i]`` belongs to ``result.segments[i]``); only with ``seg``.
        series_number: Series Number of the SR series.
        manufacturer: Manufacturer of the creating device (this node).
        software_version: Software Versions of the creating device (this node).
        procedure_reported: defaults to "<modality> unspecified body region" (CID 100).
        predecessor: an earlier SR this one supersedes (e.g. the same model's SR before late
            instances arrived); referenced in Predecessor Documents Sequence. Ignored when it has
            the SOP Instance UID this SR gets (a rerun on the same input replaces it in place).
        finding_site: anatomic location of every detection (e.g. SCT 39607008 Lung), optional.
        source_frames: with one multi-frame source, the 1-based frame of each volume slice
            (``Volume.source_frames``); required when there are detections, else unused.
        fallback_for: SOP Instance UID of the SR this one stands in for, when ``seg`` is the BINARY
            fallback of a LABELMAP SEG: the same report citing the other SEG, in the same series,
            with its own instance UID (``binary_fallback_uid`` of that SR's).

    Raises:
        EmptyResultError: nothing to report (every segment empty, no detection, classification or
            registration, and nothing in ``result.looked_for``); TID 1500 needs at least one group.
        ValueError: inconsistent inputs (seg not built from these sources/segments, measurements
            out of order, a detection outside the slices, a predecessor from another study...).
    """
    if len(sources) == 0:
        raise ValueError("at least one source dataset is required")
    _check_seg(sources, seg, result, measurements)
    if predecessor is not None:
        _check_predecessor(predecessor, sources)
    groups = _groups(sources, result, seg, measurements, finding_site, source_frames)
    if not groups:
        raise EmptyResultError(
            "every segment is empty and there is no detection, classification, registration or looked-for "
            "concept to report"
        )

    modality = str(sources[0].Modality)
    uids = result_uids(
        str(sources[0].SeriesInstanceUID), result.model_name, result.model_version, SR_KIND,
        input_fingerprint(str(ds.SOPInstanceUID) for ds in sources),
    )
    if fallback_for is not None:
        uids = replace(uids, sop_instance_uid=binary_fallback_uid(fallback_for))
    algorithm_device_uid = device_uid(manufacturer, result.model_name, result.model_version)
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=algorithm_device_uid,
        name=result.model_name,
        manufacturer_name=manufacturer,
        model_name=result.model_name,
        serial_number=algorithm_device_uid,
    )
    observation_context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.cid270.Device,
            observer_identifying_attributes=device,
        )
    )
    procedure = (
        to_pydicom_code(procedure_reported) if procedure_reported is not None else procedure_for_modality(modality)
    )
    report = hd.sr.MeasurementReport(
        observation_context=observation_context,
        procedure_reported=procedure,
        imaging_measurements=groups,
    )
    previous = (
        [predecessor]
        if predecessor is not None and str(predecessor.SOPInstanceUID) != uids.sop_instance_uid
        else None
    )
    return hd.sr.Comprehensive3DSR(
        evidence=[*([seg] if seg is not None else []), *sources],
        content=report[0],
        series_instance_uid=uids.series_uid,
        series_number=series_number,
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=1,
        manufacturer=manufacturer,
        is_complete=True,
        is_final=False,  # unreviewed AI output: PRELIMINARY
        previous_versions=previous,
        series_description=series_description("SR", result.model_name),
        manufacturer_model_name=result.model_name,
        software_versions=software_version,
        device_serial_number=algorithm_device_uid,
    )
