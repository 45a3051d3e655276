"""TID 1500 Measurement Report (Comprehensive 3D SR) of per-segment measurements."""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code as PydicomCode
from pydicom.uid import SegmentationStorage

from models.base import Code, ModelResult, Segment
from workers.encode.measure import SegmentMeasurement
from workers.encode.seg import DEFAULT_MANUFACTURER, EmptyResultError, to_pydicom_code
from workers.encode.uids import device_uid, input_fingerprint, result_uids, segment_tracking_uid

SR_KIND = "SR"

#: Measurement names (CID 7469 "Generic Intensity and Size Measurements").
VOLUME = codes.SCT.Volume  # SCT 118565006
MEAN = codes.SCT.Mean  # SCT 373098007
STANDARD_DEVIATION = codes.SCT.StandardDeviation  # SCT 386136009

#: Units (UCUM).
MILLILITER = PydicomCode("ml", "UCUM", "milliliter")
HOUNSFIELD_UNIT = codes.UCUM.HounsfieldUnit  # [hnsf'U]
NO_UNITS = codes.UCUM.NoUnits  # "1"

_ANATOMICAL_STRUCTURE = ("123037004", "SCT")

#: Procedure Reported per source modality (CID 100); anything else is "Imaging procedure".
_PROCEDURES: dict[str, PydicomCode] = {
    "CT": codes.cid100.CTUnspecifiedBodyRegion,  # LN 25045-6
    "MR": codes.cid100.MRIUnspecifiedBodyRegion,  # LN 25056-3
    "PT": codes.cid100.PETUnspecifiedBodyRegion,  # LN 44136-0
}


def procedure_for_modality(modality: str) -> PydicomCode:
    """Procedure Reported code for a source modality."""
    return _PROCEDURES.get(modality.upper(), codes.cid100.ImagingProcedure)


def intensity_unit(modality: str) -> PydicomCode:
    """Unit of mean/SD voxel values: Hounsfield units for CT, no units otherwise."""
    return HOUNSFIELD_UNIT if modality.upper() == "CT" else NO_UNITS


def _check_inputs(
    sources: Sequence[pydicom.Dataset],
    seg: pydicom.Dataset,
    result: ModelResult,
    measurements: Sequence[SegmentMeasurement],
) -> None:
    if len(sources) == 0:
        raise ValueError("at least one source dataset is required")
    if seg.get("SOPClassUID") != SegmentationStorage:
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


def _finding_sites(segment: Segment) -> list[hd.sr.FindingSite] | None:
    """A lateralised anatomical structure is also its own finding site (with the laterality)."""
    if (
        segment.laterality is None
        or (segment.category.value, segment.category.scheme) != _ANATOMICAL_STRUCTURE
    ):
        return None
    return [
        hd.sr.FindingSite(
            anatomic_location=to_pydicom_code(segment.type),
            laterality=to_pydicom_code(segment.laterality),
        )
    ]


def build_sr(
    sources: Sequence[pydicom.Dataset],
    seg: pydicom.Dataset,
    result: ModelResult,
    measurements: Sequence[SegmentMeasurement],
    *,
    series_number: int = 901,
    manufacturer: str = DEFAULT_MANUFACTURER,
    software_version: str,
    procedure_reported: Code | None = None,
) -> pydicom.Dataset:
    """Encode ``measurements`` as a TID 1500 Measurement Report referencing ``seg``.

    Args:
        sources: the source images of the segmentation (only attributes are read).
        seg: the SEG built by :func:`workers.encode.seg.build_seg` for ``result``.
        result: the model result; ``measurements[i]`` belongs to ``result.segments[i]``.
        measurements: from :func:`workers.encode.measure.measure_segments`.
        series_number: Series Number of the SR series.
        manufacturer: Manufacturer of the creating device (this node).
        software_version: Software Versions of the creating device (this node).
        procedure_reported: defaults to "<modality> unspecified body region" (CID 100).

    One Volumetric ROI group (TID 1411) per non-empty segment, with Volume (ml), Mean and
    Standard Deviation (HU for CT, no units otherwise).

    Raises:
        EmptyResultError: every segment is empty (TID 1500 needs at least one group).
        ValueError: inconsistent inputs (seg not built from these sources/segments, measurements
            out of order).
    """
    _check_inputs(sources, seg, result, measurements)
    modality = str(sources[0].Modality)
    source_series_uid = str(sources[0].SeriesInstanceUID)
    uids = result_uids(
        source_series_uid, result.model_name, result.model_version, SR_KIND,
        input_fingerprint(str(ds.SOPInstanceUID) for ds in sources),
    )
    unit = intensity_unit(modality)
    algorithm = hd.sr.AlgorithmIdentification(
        name=result.model_name,
        version=result.model_version,
        family=codes.cid7162.ArtificialIntelligence,
    )

    groups: list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations] = []
    for segment, measurement in zip(result.segments, measurements, strict=True):
        if measurement.is_empty:
            continue
        if measurement.mean is None or measurement.sd is None:
            raise ValueError(f"segment {segment.name!r}: non-empty but mean/sd missing")
        values = [
            hd.sr.Measurement(name=VOLUME, value=float(measurement.volume_ml), unit=MILLILITER),
            hd.sr.Measurement(name=MEAN, value=float(measurement.mean), unit=unit),
            hd.sr.Measurement(name=STANDARD_DEVIATION, value=float(measurement.sd), unit=unit),
        ]
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=segment_tracking_uid(source_series_uid, result.model_name, segment.name),
                    identifier=segment.name,
                ),
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=seg.SOPClassUID,
                    sop_instance_uid=seg.SOPInstanceUID,
                    segment_number=measurement.segment_number,
                    source_series=hd.sr.SourceSeriesForSegmentation(source_series_uid),
                ),
                finding_type=to_pydicom_code(segment.type),
                finding_category=to_pydicom_code(segment.category),
                finding_sites=_finding_sites(segment),
                algorithm_id=algorithm,
                measurements=values,
            )
        )
    if not groups:
        raise EmptyResultError("every segment is empty: no measurement group to report")

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
        to_pydicom_code(procedure_reported)
        if procedure_reported is not None
        else procedure_for_modality(modality)
    )
    report = hd.sr.MeasurementReport(
        observation_context=observation_context,
        procedure_reported=procedure,
        imaging_measurements=groups,
    )
    return hd.sr.Comprehensive3DSR(
        evidence=[seg, *sources],
        content=report[0],
        series_instance_uid=uids.series_uid,
        series_number=series_number,
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=1,
        manufacturer=manufacturer,
        is_complete=True,
        is_final=False,  # unreviewed AI output: PRELIMINARY
        series_description=f"AI SR {result.model_name}"[:64],
        manufacturer_model_name=result.model_name,
        software_versions=software_version,
        device_serial_number=algorithm_device_uid,
    )
