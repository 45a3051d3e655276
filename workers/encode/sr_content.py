"""Measurement groups of the TID 1500 report built by :mod:`workers.encode.sr`, and their codes.

One builder per kind of finding:

* :func:`detection_group`: TID 1410 Planar ROI group, a circle (or ellipse) on the source image
  (or frame of a multi-frame source) nearest to the detection centre, with Diameter and Certainty
  of Finding;
* :func:`segment_group`: TID 1411 Volumetric ROI group referencing a SEG segment, with Volume,
  Mean and Standard Deviation;
* :func:`classification_group`: TID 1501 group with the score and the category (qualitative
  evaluation);
* :func:`registration_group`: TID 1501 group with the registration residual;
* :func:`absence_group`: TID 1501 group saying that a looked-for finding is absent, or was not
  assessed and why (a negative result or a declined series is a result too).

Codes (all standard, none private):

* Diameter: SCT 81827009 "Diameter" (CID 7470), mm. ``Detection.diameter_mm`` is the diameter of
  the sphere with the finding's volume.
* Confidence: DCM 111012 "Certainty of Finding" (CID 6048 "CAD Operating Point Axis Label"),
  defined as "the likelihood that the finding detected is in fact the type of finding
  identified", in percent (``100 * Detection.confidence``) as the CAD templates use it. Models
  document whether their confidence is a calibrated probability or a ranking score.
* Classification score: SCT 246262008 "Score" with the model's UCUM unit; the category is a
  qualitative evaluation ``Classification.concept`` = ``Classification.value``.
* Registration residual: DCM 121206 "Distance" (CID 7470), mm, derivation UMLS C2347976 "Root Mean
  Square" (CID 7464), finding DCM 112353 "Spatial Registration".
* Absence: a TID 1501 group whose Finding is the looked-for concept (e.g. SCT 27925004 "Nodule")
  with the qualitative evaluation DCM 121052 "Presence of property" = SCT 272519000 "Absent", or
  SCT 373068000 "Undetermined" when the model did not assess the series (both from CID 240
  "Present-Absent", the value set of TID 1501's qualitative evaluations of presence); the reason
  or the figures' notes as TEXT DCM 121106 "Comment". Figures about the run (``ModelResult.figures``,
  e.g. DCM 111089 "Lesion Sensitivity" of CID 6048 "CAD Operating Point Axis Label", %) are
  numeric items of that group, and of each detection's group.

Spatial coordinates (SCOORD) follow PS3.3 C.18.6.1: (column, row) with (0, 0) at the top left
corner of the top left pixel, so the centre of voxel (i, j) is (i + 0.5, j + 0.5).
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code as PydicomCode

from models.base import Classification, Code, Detection, ModelResult, Registration, Segment
from workers.encode.measure import SegmentMeasurement, voxels_per_slice
from workers.encode.seg import to_pydicom_code
from workers.encode.uids import derive_uid, segment_tracking_uid

#: Measurement names.
VOLUME = codes.SCT.Volume  # SCT 118565006
AREA = codes.SCT.Area  # SCT 42798000 (segments of a projection radiograph)
MEAN = codes.SCT.Mean  # SCT 373098007
STANDARD_DEVIATION = codes.SCT.StandardDeviation  # SCT 386136009
DIAMETER = codes.SCT.Diameter  # SCT 81827009
CERTAINTY_OF_FINDING = codes.DCM.CertaintyOfFinding  # DCM 111012
SCORE = PydicomCode("246262008", "SCT", "Score")
DISTANCE = codes.DCM.Distance  # DCM 121206
ROOT_MEAN_SQUARE = codes.cid7464.RootMeanSquare  # UMLS C2347976
SPATIAL_REGISTRATION = codes.DCM.SpatialRegistration  # DCM 112353
PRESENCE = PydicomCode("121052", "DCM", "Presence of property")
ABSENT = codes.cid240.Absent  # SCT 272519000, CID 240 "Present-Absent"
UNDETERMINED = codes.cid240.Undetermined  # SCT 373068000, CID 240 "Present-Absent"
COMMENT = codes.DCM.Comment  # DCM 121106

#: Units (UCUM).
MILLILITER = PydicomCode("ml", "UCUM", "milliliter")
MILLIMETER = PydicomCode("mm", "UCUM", "millimeter")
SQUARE_MILLIMETER = PydicomCode("mm2", "UCUM", "square millimeter")
PERCENT = codes.UCUM.Percent  # %
HOUNSFIELD_UNIT = codes.UCUM.HounsfieldUnit  # [hnsf'U]
NO_UNITS = codes.UCUM.NoUnits  # "1"
_UNITS: dict[str, PydicomCode] = {u.value: u for u in (MILLILITER, MILLIMETER, PERCENT, HOUNSFIELD_UNIT, NO_UNITS)}

_ANATOMICAL_STRUCTURE = ("123037004", "SCT")
_LO_MAX = 64


def ucum(unit: str) -> PydicomCode:
    """A UCUM unit code for ``unit`` (``"%"``, ``"1"``, ``"mm"``...)."""
    if not unit:
        raise ValueError("empty UCUM unit")
    return _UNITS.get(unit, PydicomCode(unit, "UCUM", unit))


def intensity_unit(modality: str) -> PydicomCode:
    """Unit of mean/SD voxel values: Hounsfield units for CT, no units otherwise."""
    return HOUNSFIELD_UNIT if modality.upper() == "CT" else NO_UNITS


def algorithm_of(result: ModelResult) -> hd.sr.AlgorithmIdentification:
    """Algorithm Identification (TID 4019) of the model that produced ``result``."""
    return hd.sr.AlgorithmIdentification(
        name=result.model_name,
        version=result.model_version,
        family=codes.cid7162.ArtificialIntelligence,
    )


def _identifier(text: str) -> str:
    """A Tracking Identifier, at most as long as the SEG's (LO)."""
    if not text or len(text) > _LO_MAX:
        raise ValueError(f"tracking identifier must be 1-{_LO_MAX} characters: {text!r}")
    return text


# --- tracking UIDs (stable for reruns and model versions; one namespace per kind) ------------------


def detection_tracking_uid(source_series_uid: str, model_name: str, tracking_id: str) -> str:
    """Tracking UID of a detection (``Detection.tracking_id``) of a model on a series."""
    return derive_uid("detection-tracking", source_series_uid, model_name, tracking_id)


def classification_tracking_uid(source_series_uid: str, model_name: str, name: str) -> str:
    """Tracking UID of a classification (``Classification.name``) of a model on a series."""
    return derive_uid("classification-tracking", source_series_uid, model_name, name)


def absence_tracking_uid(source_series_uid: str, model_name: str, concept: Code) -> str:
    """Tracking UID of the absent / not assessed statement of a looked-for concept."""
    return derive_uid("absence-tracking", source_series_uid, model_name, concept.scheme, concept.value)


def registration_tracking_uid(source_series_uid: str, model_name: str) -> str:
    """Tracking UID of the registration of a model on a (current) series."""
    return derive_uid("registration-tracking", source_series_uid, model_name)


# --- detections (TID 1410) ------------------------------------------------------------------------


def nearest_slice(detection: Detection, n_slices: int) -> int:
    """Index in ``sources`` (k order) of the slice nearest the detection centre (halves round up)."""
    k = detection.centre_ijk[2]
    index = int(np.floor(k + 0.5))
    if not 0 <= index < n_slices:
        raise ValueError(f"detection {detection.tracking_id!r}: centre k={k:g} outside the {n_slices} slices")
    return index


def is_multiframe_source(sources: Sequence[pydicom.Dataset]) -> bool:
    """True for one multi-frame image (frames described by functional groups) as the only source."""
    if len(sources) != 1:
        return False
    ds = sources[0]
    return "PerFrameFunctionalGroupsSequence" in ds or int(ds.get("NumberOfFrames", 1) or 1) > 1


def source_of_slice(
    sources: Sequence[pydicom.Dataset], k: int, source_frames: Sequence[int] | None
) -> tuple[pydicom.Dataset, int | None]:
    """The image holding volume slice ``k``, and its 1-based frame number for a multi-frame source."""
    if not is_multiframe_source(sources):
        if source_frames is not None:
            raise ValueError("source_frames is only for one multi-frame source image")
        return sources[k], None
    if source_frames is None:
        raise ValueError("a multi-frame source needs source_frames (Volume.source_frames) to place detections")
    frame = int(source_frames[k])
    n = int(sources[0].get("NumberOfFrames", 1) or 1)
    if not 1 <= frame <= n:
        raise ValueError(f"source frame {frame} outside the {n} frames of the source image")
    return sources[0], frame


def _slice_count(sources: Sequence[pydicom.Dataset], source_frames: Sequence[int] | None) -> int:
    if not is_multiframe_source(sources):
        return len(sources)
    return len(source_frames) if source_frames is not None else int(sources[0].get("NumberOfFrames", 1) or 1)


def pixel_spacing(ds: pydicom.Dataset, frame: int | None = None) -> tuple[float, float]:
    """(between rows, between columns) in mm of a single-frame image, or of frame ``frame`` (1-based)
    of a multi-frame image (Pixel Measures functional group, per-frame or shared)."""
    holder: pydicom.Dataset = ds
    if frame is None:
        if int(ds.get("NumberOfFrames", 1) or 1) != 1:
            raise ValueError("a multi-frame source image needs the frame number of the slice")
    else:
        per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
        shared = ds.get("SharedFunctionalGroupsSequence") or []
        if not 1 <= frame <= len(per_frame):
            raise ValueError(f"source {ds.SOPInstanceUID} has no per-frame functional groups for frame {frame}")
        groups = [g for g in (per_frame[frame - 1], *shared[:1]) if g.get("PixelMeasuresSequence")]
        if not groups:
            raise ValueError(f"source {ds.SOPInstanceUID} frame {frame} has no Pixel Measures")
        holder = groups[0].PixelMeasuresSequence[0]
    if "PixelSpacing" not in holder:
        raise ValueError(f"source {ds.SOPInstanceUID} has no Pixel Spacing")
    row, col = (float(v) for v in holder.PixelSpacing)
    if not (row > 0 and col > 0):
        raise ValueError(f"source {ds.SOPInstanceUID}: invalid Pixel Spacing {holder.PixelSpacing}")
    return row, col


def detection_outline(
    detection: Detection, image: pydicom.Dataset, frame: int | None = None
) -> tuple[hd.sr.GraphicTypeValues, npt.NDArray[np.float64]]:
    """SCOORD graphic type and data (column, row) of the detection's equivalent circle on ``image``
    (on its frame ``frame``, 1-based, for a multi-frame image).

    A CIRCLE (centre, point on the perimeter) for square pixels, else an axis-aligned ELLIPSE (major
    then minor axis end points); the radius is ``diameter_mm / 2`` in pixels.
    """
    row_mm, col_mm = pixel_spacing(image, frame)
    cx, cy = detection.centre_ijk[0] + 0.5, detection.centre_ijk[1] + 0.5
    radius_mm = detection.diameter_mm / 2.0
    if not radius_mm > 0:
        raise ValueError(f"detection {detection.tracking_id!r}: diameter must be positive")
    rx, ry = radius_mm / col_mm, radius_mm / row_mm  # in columns, in rows
    if np.isclose(rx, ry, rtol=1e-6):
        return hd.sr.GraphicTypeValues.CIRCLE, np.array([[cx, cy], [cx + rx, cy]])
    x_axis = [[cx - rx, cy], [cx + rx, cy]]
    y_axis = [[cx, cy - ry], [cx, cy + ry]]
    major, minor = (x_axis, y_axis) if rx > ry else (y_axis, x_axis)
    return hd.sr.GraphicTypeValues.ELLIPSE, np.array([*major, *minor])


VIEWER_TOOL_PREFIX = "Cornerstone3DTools@^0.1.0:"
"""Tracking Identifier prefix of the measurements OHIF (dcmjs/cornerstone3D adapters) writes and
reads back: OHIF 3.12 lists a planar ROI in its measurement panel only when the identifier names one
of its tools (``...:CircleROI``, ``...:EllipticalROI``); anything else is drawn but not listed. The
identifier is free text (LO) in TID 1410; the per-finding identity is the Tracking UID."""


def viewer_tracking_identifier(graphic_type: hd.sr.GraphicTypeValues) -> str:
    """``Cornerstone3DTools@^0.1.0:CircleROI`` for a CIRCLE, ``...:EllipticalROI`` for an ELLIPSE."""
    tool = "CircleROI" if graphic_type == hd.sr.GraphicTypeValues.CIRCLE else "EllipticalROI"
    return VIEWER_TOOL_PREFIX + tool


def _source_image(image: pydicom.Dataset, frame: int | None) -> hd.sr.SourceImageForRegion:
    """A reference to ``image`` (to its frame ``frame``, 1-based, if a multi-frame image); a new
    content item per call, one per place in the tree."""
    return hd.sr.SourceImageForRegion(
        referenced_sop_class_uid=image.SOPClassUID,
        referenced_sop_instance_uid=image.SOPInstanceUID,
        referenced_frame_numbers=[frame] if frame is not None else None,
    )


def _add_inferred_from(
    measurement: hd.sr.Measurement,
    graphic_type: hd.sr.GraphicTypeValues,
    graphic_data: npt.NDArray[np.float64],
    image: pydicom.Dataset,
    frame: int | None,
) -> None:
    """Make ``measurement`` (a TID 300 with no other content) INFERRED FROM a SCOORD on ``image``.

    highdicom refuses coordinates under the numeric items of a TID 1410 or 1411 group (its authors'
    choice; TID 1419 includes TID 300 with its INFERRED FROM TID 320 rows), so the groups' builders
    add them with this once highdicom has built the group.
    """
    coordinates = hd.sr.CoordinatesForMeasurement(
        graphic_type=graphic_type, graphic_data=graphic_data, source_image=_source_image(image, frame)
    )
    measurement[0].ContentSequence = hd.sr.ContentSequence([coordinates])


def detection_group(
    detection: Detection,
    sources: Sequence[pydicom.Dataset],
    result: ModelResult,
    algorithm: hd.sr.AlgorithmIdentification,
    finding_site: Code | None = None,
    source_frames: Sequence[int] | None = None,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410 group of one detection on the source image (or frame) nearest its centre.

    ``sources`` are single-frame images in k order, or one multi-frame image whose frame
    ``source_frames[k]`` (1-based, ``Volume.source_frames``) holds slice k; the SCOORD then
    references that frame. The outline is both the group's Image Region and the source of the
    Diameter ("inferred from"), the layout viewers such as OHIF list in their measurement panel.
    """
    k = nearest_slice(detection, _slice_count(sources, source_frames))
    image, frame = source_of_slice(sources, k, source_frames)
    graphic_type, graphic_data = detection_outline(detection, image, frame)
    source_series_uid = str(sources[0].SeriesInstanceUID)
    diameter = hd.sr.Measurement(name=DIAMETER, value=float(detection.diameter_mm), unit=MILLIMETER)
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=detection_tracking_uid(source_series_uid, result.model_name, detection.tracking_id),
            identifier=viewer_tracking_identifier(graphic_type),
        ),
        referenced_region=hd.sr.ImageRegion(
            graphic_type=graphic_type, graphic_data=graphic_data, source_image=_source_image(image, frame)
        ),
        finding_type=to_pydicom_code(detection.type),
        finding_sites=[hd.sr.FindingSite(to_pydicom_code(finding_site))] if finding_site is not None else None,
        algorithm_id=algorithm,
        measurements=[
            diameter,
            hd.sr.Measurement(name=CERTAINTY_OF_FINDING, value=100.0 * float(detection.confidence), unit=PERCENT),
            *figure_measurements(result),
        ],
    )
    _add_inferred_from(diameter, graphic_type, graphic_data, image, frame)
    return group


# --- segments (TID 1411) --------------------------------------------------------------------------


def _segment_finding_sites(segment: Segment) -> list[hd.sr.FindingSite] | None:
    """A lateralised anatomical structure is also its own finding site (with the laterality)."""
    if segment.laterality is None or (segment.category.value, segment.category.scheme) != _ANATOMICAL_STRUCTURE:
        return None
    return [
        hd.sr.FindingSite(
            anatomic_location=to_pydicom_code(segment.type),
            laterality=to_pydicom_code(segment.laterality),
        )
    ]


def segment_anchor(mask: npt.NDArray[np.bool_]) -> tuple[int, float, float]:
    """(k, column, row) of a point inside the segment: on its largest slice, the segment voxel
    nearest that slice's centroid (pixel centre, SCOORD convention: 0.5 = centre of the first)."""
    k = int(np.argmax(voxels_per_slice(mask)))
    rows, cols = np.nonzero(mask[k])
    if rows.size == 0:
        raise ValueError("empty segment has no anchor")
    nearest = int(np.argmin((rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2))
    return k, float(cols[nearest]) + 0.5, float(rows[nearest]) + 0.5


def segment_group(
    segment: Segment,
    measurement: SegmentMeasurement,
    seg: pydicom.Dataset,
    sources: Sequence[pydicom.Dataset],
    result: ModelResult,
    algorithm: hd.sr.AlgorithmIdentification,
    modality: str,
    source_frames: Sequence[int] | None = None,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """TID 1411 group of one non-empty segment: Volume (ml; Area in mm2 on a projection radiograph),
    Mean and Standard Deviation.

    The Volume is also "inferred from" a SCOORD POINT inside the segment on a source image: TID 300
    allows it, and OHIF (3.12) crashes on any SR group that has no image coordinates at all; with
    the point it opens the report and shows the values there.
    """
    if measurement.mean is None or measurement.sd is None:
        raise ValueError(f"segment {segment.name!r}: non-empty but mean/sd missing")
    unit = intensity_unit(modality)
    source_series_uid = str(sources[0].SeriesInstanceUID)
    volume = (hd.sr.Measurement(name=VOLUME, value=float(measurement.volume_ml), unit=MILLILITER)
              if measurement.area_mm2 is None  # a projection radiograph: its area instead
              else hd.sr.Measurement(name=AREA, value=float(measurement.area_mm2), unit=SQUARE_MILLIMETER))
    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
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
        finding_sites=_segment_finding_sites(segment),
        algorithm_id=algorithm,
        measurements=[
            volume,
            hd.sr.Measurement(name=MEAN, value=float(measurement.mean), unit=unit),
            hd.sr.Measurement(name=STANDARD_DEVIATION, value=float(measurement.sd), unit=unit),
        ],
    )
    k, column, row = segment_anchor(segment.mask)
    image, frame = source_of_slice(sources, k, source_frames)
    _add_inferred_from(volume, hd.sr.GraphicTypeValues.POINT, np.array([[column, row]]), image, frame)
    return group


# --- classifications and registration (TID 1501) --------------------------------------------------


def classification_group(
    classification: Classification,
    source_series_uid: str,
    result: ModelResult,
    algorithm: hd.sr.AlgorithmIdentification,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group: finding = the concept, Score (model unit), concept = category; then the
    classification's own measurements (with their finding site) and coded evaluations."""
    concept = to_pydicom_code(classification.concept)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=classification_tracking_uid(source_series_uid, result.model_name, classification.name),
            identifier=_identifier(classification.name),
        ),
        finding_type=concept,
        algorithm_id=algorithm,
        measurements=[
            hd.sr.Measurement(name=SCORE, value=float(classification.score), unit=ucum(classification.score_unit)),
            *(hd.sr.Measurement(name=to_pydicom_code(m.concept), value=float(m.value), unit=ucum(m.unit),
                                finding_sites=[hd.sr.FindingSite(to_pydicom_code(m.site))] if m.site else None)
              for m in classification.measurements),
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=concept, value=to_pydicom_code(classification.value)),
            *(hd.sr.QualitativeEvaluation(name=to_pydicom_code(c), value=to_pydicom_code(v))
              for c, v in classification.evaluations),
        ],
    )


def registration_group(
    registration: Registration,
    source_series_uid: str,
    result: ModelResult,
    algorithm: hd.sr.AlgorithmIdentification,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group: finding = Spatial Registration, residual as an RMS Distance (mm)."""
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=registration_tracking_uid(source_series_uid, result.model_name),
            identifier="Registration",
        ),
        finding_type=SPATIAL_REGISTRATION,
        algorithm_id=algorithm,
        measurements=[
            hd.sr.Measurement(
                name=DISTANCE,
                value=float(registration.residual_mm),
                unit=MILLIMETER,
                derivation=ROOT_MEAN_SQUARE,
            )
        ],
    )


# --- absent or not assessed (TID 1501) -----------------------------------------------------------


def figure_measurements(result: ModelResult) -> list[hd.sr.Measurement]:
    """The result's figures about the run (e.g. Lesion Sensitivity, %) as TID 300 measurements."""
    return [hd.sr.Measurement(name=to_pydicom_code(f.concept), value=float(f.value), unit=ucum(f.unit))
            for f in result.figures]


def absence_group(
    concept: Code,
    source_series_uid: str,
    result: ModelResult,
    algorithm: hd.sr.AlgorithmIdentification,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group: Finding = ``concept``, Presence of property = Absent, or Undetermined with the
    reason as a Comment when ``result.not_assessed``; the result's figures as measurements (their
    notes as a Comment)."""
    assessed = result.not_assessed is None
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=absence_tracking_uid(source_series_uid, result.model_name, concept),
            identifier=_identifier(f"{concept.meaning[:40]}: {'absent' if assessed else 'not assessed'}"),
        ),
        finding_type=to_pydicom_code(concept),
        algorithm_id=algorithm,
        measurements=figure_measurements(result) if assessed else None,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=PRESENCE, value=ABSENT if assessed else UNDETERMINED)
        ],
    )
    comments = [f"Not assessed: {result.not_assessed}"] if not assessed else [
        f"{f.concept.meaning}: {f.note}" for f in result.figures if f.note]
    for text in comments:
        group[0].ContentSequence.append(hd.sr.TextContentItem(
            name=COMMENT, value=text[:1024], relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    return group
