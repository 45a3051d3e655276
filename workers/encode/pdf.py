"""A one-page PDF report of a result, as a DICOM Encapsulated PDF in the source study.

The page (ReportLab, real text): title, study date and accession number (no other patient data:
the viewer shows the header), a disclaimer, findings tables (segments: volume, mean and SD;
detections: diameter, confidence, LPS position; classifications: category and score;
registration: residual), what the model looked for and did not find (``ModelResult.looked_for``:
"none found"), or did not assess and why (``ModelResult.not_assessed``), the figures of the run
(e.g. the detector's sensitivity at this slice thickness), the key images of
:func:`workers.encode.render.render_key_images` (the same pictures as the SC images) and the model and
node versions. Everything is fitted onto one A4 page (tables are cut after :data:`MAX_TABLE_ROWS`
rows and the content is shrunk when needed).
ReportLab runs in invariant mode, so the same input gives the same PDF bytes.

The DICOM object (highdicom has no PDF class; built with pydicom): Patient, General Study,
Encapsulated Document Series, General Equipment, SC Equipment, Encapsulated Document and SOP
Common modules, deterministic UIDs of kind ``PDF`` and Series Number/Description of kind ``PDF``.
"""

from __future__ import annotations

import datetime
import io
from collections.abc import Sequence
from xml.sax.saxutils import escape

import numpy as np
import numpy.typing as npt
from PIL import Image as PilImage
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian
from reportlab import rl_config
from reportlab.lib import colors
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle, getSampleStyleSheet
from reportlab.lib.units import mm
from reportlab.platypus import Flowable, Image, KeepInFrame, Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle

from models.base import Code, ModelResult, Volume
from workers.encode.header import copy_patient_and_study
from workers.encode.measure import SegmentMeasurement, measure_segments
from workers.encode.render import has_content, render_key_images, source_slice_labels
from workers.encode.seg import DEFAULT_MANUFACTURER, EmptyResultError
from workers.encode.series import series_description, series_number
from workers.encode.uids import device_uid, input_fingerprint, result_uids

PDF_KIND = "PDF"
ENCAPSULATED_PDF_STORAGE = "1.2.840.10008.5.1.4.1.1.104.1"
MAX_TABLE_ROWS = 24
JPEG_QUALITY = 90
#: Concept Name of the document (LOINC): Diagnostic imaging report.
DOCUMENT_CONCEPT = ("18748-4", "LN", "Diagnostic imaging report")
DISCLAIMER = (
    "Generated automatically by an AI model for demonstration. This is not a diagnosis and has not been "
    "reviewed by a physician; verify every finding against the images."
)
_LO_MAX = 64
def build_pdf_report(
    sources: Sequence[Dataset],
    volume: Volume,
    result: ModelResult,
    *,
    software_version: str,
    manufacturer: str = DEFAULT_MANUFACTURER,
    measurements: Sequence[SegmentMeasurement] = (),
    key_images: Sequence[npt.NDArray[np.uint8]] = (),
) -> Dataset:
    """Encapsulated PDF Storage instance with a one-page report of ``result``.

    Args:
        sources: the source images (attributes only) in the volume's k order.
        volume: the volume the model ran on.
        result: the model result.
        software_version, manufacturer: this node, as the creating device.
        measurements: per-segment measurements (:func:`~workers.encode.measure.measure_segments`); measured
            here when empty and the result has segments.
        key_images: RGB uint8 arrays (rows, columns, 3), normally the ``pixels`` of the
            :class:`~workers.encode.render.KeyImage` given to the SC encoder; rendered here when empty.

    Raises:
        EmptyResultError: nothing to report (no segment voxels, detections, classifications or
            registration, and nothing looked for).
        ValueError: no sources, or measurements that do not match the segments.
    """
    if not sources:
        raise ValueError("at least one source dataset is required")
    if not has_content(result) and not result.looked_for:
        raise EmptyResultError("nothing to report: no segment voxels, detections, classifications, registration "
                               "or looked-for concepts")
    if result.segments and not measurements:
        measurements = measure_segments(volume, result.segments)
    if [m.name for m in measurements] != [s.name for s in result.segments]:
        raise ValueError("measurements do not match the result's segments (one per segment, in order)")
    if not key_images:
        key_images = [k.pixels for k in render_key_images(
            volume, result, slice_labels=source_slice_labels(sources, volume))]
    pdf = render_pdf(sources[0], volume, result, software_version, measurements, key_images)
    return _encapsulate(sources, result, pdf, software_version, manufacturer)


def render_pdf(
    source: Dataset,
    volume: Volume,
    result: ModelResult,
    software_version: str,
    measurements: Sequence[SegmentMeasurement],
    key_images: Sequence[npt.NDArray[np.uint8]],
) -> bytes:
    """The PDF bytes of the one-page report (``source`` gives study date, accession and series number)."""
    styles = getSampleStyleSheet()
    body = ParagraphStyle("body", parent=styles["BodyText"], fontSize=8.5, leading=11)
    small = ParagraphStyle("small", parent=body, fontSize=7.5, leading=9.5, textColor=colors.HexColor("#444444"))
    warn = ParagraphStyle("warn", parent=body, textColor=colors.HexColor("#B00020"), fontName="Helvetica-Bold")
    h1, h2 = styles["Title"], ParagraphStyle("h2", parent=styles["Heading2"], fontSize=11, spaceBefore=6)
    buf = io.BytesIO()
    doc = SimpleDocTemplate(
        buf, pagesize=A4, leftMargin=14 * mm, rightMargin=14 * mm, topMargin=12 * mm, bottomMargin=12 * mm,
        title=f"AI report {result.model_name}", author=DEFAULT_MANUFACTURER, invariant=1,
        subject=f"{result.model_name} {result.model_version}", creator=f"dicom-ai-node {software_version}",
    )
    width, height = doc.width, doc.height
    study = [f"Study date {_date(str(source.get('StudyDate', '') or ''))}"]
    if source.get("AccessionNumber"):
        study.append(f"accession {source.AccessionNumber}")
    if source.get("SeriesNumber") is not None:
        study.append(f"series {source.SeriesNumber}")
    story: list[Flowable] = [
        Paragraph(escape(f"AI analysis report: {result.model_name}"), h1),
        Paragraph(escape(", ".join(study)), body),
        Paragraph(escape(f"AI result - not for diagnosis. {DISCLAIMER}"), warn),
        Paragraph("Findings", h2),
    ]
    story += _findings(volume, result, measurements, width, body)
    if key_images:
        story += [Paragraph("Key images", h2), _image_grid(key_images, width)]
    story += [
        Spacer(1, 3 * mm),
        Paragraph(escape(
            f"Model {result.model_name} {result.model_version}; node software dicom-ai-node {software_version}."
        ), small),
    ]
    if result.notes:
        notes = "; ".join(result.notes[:8]) + (" ..." if len(result.notes) > 8 else "")
        story.append(Paragraph(escape(f"Model notes: {notes}"), small))
    a85 = rl_config.useA85
    rl_config.useA85 = 0  # binary streams: JPEG images a quarter smaller than in ASCII85
    try:
        doc.build([KeepInFrame(width, height, story, mode="shrink")])
    finally:
        rl_config.useA85 = a85
    return buf.getvalue()


def _date(da: str) -> str:
    return f"{da[:4]}-{da[4:6]}-{da[6:8]}" if len(da) == 8 and da.isdigit() else (da or "unknown")


def _table(header: Sequence[str], rows: list[list[str]], widths: Sequence[float]) -> Table:
    if len(rows) > MAX_TABLE_ROWS:
        more = len(rows) - MAX_TABLE_ROWS + 1
        rows = [*rows[: MAX_TABLE_ROWS - 1], [f"... {more} more (see the DICOM SR)"] + [""] * (len(header) - 1)]
    table = Table([list(header), *rows], colWidths=list(widths), repeatRows=1, hAlign="LEFT")
    table.setStyle(TableStyle([
        ("FONT", (0, 0), (-1, -1), "Helvetica", 8),
        ("FONT", (0, 0), (-1, 0), "Helvetica-Bold", 8),
        ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#E6E6E6")),
        ("GRID", (0, 0), (-1, -1), 0.4, colors.HexColor("#999999")),
        ("TOPPADDING", (0, 0), (-1, -1), 1.5),
        ("BOTTOMPADDING", (0, 0), (-1, -1), 1.5),
    ]))
    return table


def _findings(
    volume: Volume, result: ModelResult, measurements: Sequence[SegmentMeasurement], width: float,
    body: ParagraphStyle,
) -> list[Flowable]:
    out: list[Flowable] = []
    unit = " (HU)" if volume.modality.upper() == "CT" else ""
    if result.segments:
        rows = [
            [m.name, f"{m.volume_ml:.1f}" if m.area_mm2 is None else f"{m.area_mm2 / 100.0:.1f} cm2",
             "-" if m.mean is None else f"{m.mean:.1f}",
             "-" if m.sd is None else f"{m.sd:.1f}"]
            for m in measurements
        ]
        size = "Area" if any(m.area_mm2 is not None for m in measurements) else "Volume (ml)"
        out += [_table(["Segment", size, f"Mean{unit}", f"SD{unit}"], rows,
                       [0.4 * width, 0.2 * width, 0.2 * width, 0.2 * width]), Spacer(1, 2 * mm)]
    if result.detections:
        rows = [
            [str(i), d.type.meaning, f"{d.diameter_mm:.1f}", f"{d.confidence * 100:.0f}",
             "({:.1f}, {:.1f}, {:.1f})".format(*d.centre_lps)]
            for i, d in enumerate(result.detections, start=1)
        ]
        out += [_table(["#", "Finding", "Diameter (mm)", "Confidence (%)", "Location LPS (mm)"], rows,
                       [0.06 * width, 0.28 * width, 0.16 * width, 0.16 * width, 0.34 * width]), Spacer(1, 2 * mm)]
    if result.classifications:
        rows = []
        for c in result.classifications:
            unit_c = "" if c.score_unit == "1" else f" {c.score_unit}"
            details = "; ".join(f"{k} {v:.1f}" for k, v in list(c.details.items())[:6])
            rows.append([c.name, c.value.meaning, f"{c.score:.1f}{unit_c}", details])
        out += [_table(["Assessment", "Category", "Score", "Details"], rows,
                       [0.2 * width, 0.15 * width, 0.13 * width, 0.52 * width]), Spacer(1, 2 * mm)]
    reg = result.registration
    if reg is not None:
        out.append(_table(["Registration of the prior study", "Residual (mm)", "Metric"],
                          [["prior resampled onto this series", f"{reg.residual_mm:.2f}", f"{reg.metric_value:.4g}"]],
                          [0.5 * width, 0.25 * width, 0.25 * width]))
    out += _looked_for(result, width, body)
    if not out:
        out.append(Paragraph("No findings.", body))
    return out


def found_count(result: ModelResult, concept: Code) -> int:
    """How many findings of ``concept`` the result has (detections, non-empty segments, classifications)."""
    return (sum(d.type == concept for d in result.detections)
            + sum(s.type == concept and bool(s.mask.any()) for s in result.segments)
            + sum(c.concept == concept for c in result.classifications))


def _looked_for(result: ModelResult, width: float, body: ParagraphStyle) -> list[Flowable]:
    """What was looked for: not assessed (and why), or each concept found / none found, and the
    run's figures; nothing when every looked-for concept was found."""
    out: list[Flowable] = []
    concepts = result.looked_for
    if result.not_assessed is not None:
        warn = ParagraphStyle("not-assessed", parent=body, fontName="Helvetica-Bold")
        names = ", ".join(c.meaning for c in concepts) or "anything"
        out += [Paragraph(escape(f"Not assessed: {names}. Reason: {result.not_assessed}"), warn),
                Paragraph(escape("The model did not analyse this series; absence of findings here means nothing."),
                          body)]
        return out
    counts = [found_count(result, c) for c in concepts]
    if concepts and not all(counts):
        rows = [[c.meaning, f"{n} found" if n else "none found"] for c, n in zip(concepts, counts, strict=True)]
        out += [_table(["Looked for", "Result"], rows, [0.5 * width, 0.5 * width]), Spacer(1, 2 * mm)]
    if result.figures:
        for f in result.figures:
            unit = "" if f.unit == "1" else f" {f.unit}"
            out.append(Paragraph(escape(f"{f.concept.meaning}: {f.value:.0f}{unit}"
                                        + (f" ({f.note})" if f.note else "")), body))
    return out


def _image_grid(images: Sequence[npt.NDArray[np.uint8]], width: float) -> Table:
    """Images two per row, each scaled to half the text width, embedded as JPEG."""
    cell = width / 2 - 2 * mm
    flowables: list[Flowable] = []
    for pixels in images:
        arr = np.ascontiguousarray(pixels, dtype=np.uint8)
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"key images must be RGB (rows, columns, 3), got shape {arr.shape}")
        jpeg = io.BytesIO()
        PilImage.fromarray(arr).save(jpeg, format="JPEG", quality=JPEG_QUALITY)
        jpeg.seek(0)
        flowables.append(Image(jpeg, width=cell, height=cell * arr.shape[0] / arr.shape[1]))
    if len(flowables) % 2:
        flowables.append(Spacer(1, 1))
    rows = [flowables[i : i + 2] for i in range(0, len(flowables), 2)]
    grid = Table(rows, colWidths=[width / 2, width / 2], hAlign="LEFT")
    grid.setStyle(TableStyle([("VALIGN", (0, 0), (-1, -1), "TOP"), ("LEFTPADDING", (0, 0), (-1, -1), 0)]))
    return grid


def _encapsulate(
    sources: Sequence[Dataset], result: ModelResult, pdf: bytes, software_version: str, manufacturer: str
) -> Dataset:
    first = sources[0]
    uids = result_uids(
        str(first.SeriesInstanceUID), result.model_name, result.model_version, PDF_KIND,
        input_fingerprint(str(ds.SOPInstanceUID) for ds in sources),
    )
    now = datetime.datetime.now()
    ds = Dataset()
    copy_patient_and_study(ds, first)
    # Encapsulated Document Series
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = uids.series_uid
    ds.SeriesNumber = series_number(PDF_KIND)
    ds.SeriesDescription = series_description(PDF_KIND, result.model_name)
    # General Equipment + SC Equipment
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = result.model_name[:_LO_MAX]
    ds.SoftwareVersions = software_version
    ds.DeviceSerialNumber = device_uid(manufacturer, result.model_name, result.model_version)
    ds.ConversionType = "WSD"
    ds.SecondaryCaptureDeviceManufacturer = manufacturer
    ds.SecondaryCaptureDeviceManufacturerModelName = result.model_name[:_LO_MAX]
    ds.SecondaryCaptureDeviceSoftwareVersions = software_version
    # Encapsulated Document
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.AcquisitionDateTime = None
    ds.BurnedInAnnotation = "YES"
    items = []
    for src in sources:
        item = Dataset()
        item.ReferencedSOPClassUID = src.SOPClassUID
        item.ReferencedSOPInstanceUID = src.SOPInstanceUID
        items.append(item)
    ds.SourceInstanceSequence = items
    ds.DocumentTitle = f"AI report {result.model_name} {result.model_version}"
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = DOCUMENT_CONCEPT
    ds.ConceptNameCodeSequence = [concept]
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = pdf + b"\x00" * (len(pdf) % 2)  # OB: even length, one trailing NULL
    ds.EncapsulatedDocumentLength = len(pdf)
    # SOP Common
    ds.SOPClassUID = ENCAPSULATED_PDF_STORAGE
    ds.SOPInstanceUID = uids.sop_instance_uid
    ds.InstanceCreationDate, ds.InstanceCreationTime = ds.ContentDate, ds.ContentTime
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(ENCAPSULATED_PDF_STORAGE)
    meta.MediaStorageSOPInstanceUID = UID(uids.sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds
