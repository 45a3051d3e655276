"""The attributes the catalog keeps per study, series and instance for QIDO-RS, as DICOM JSON.

One extraction for every door: :func:`indexed_attributes` runs at receive time (C-STORE, STOW-RS,
priors) and on each result object a worker writes. UIDs are catalog columns and not repeated here.
Values are patient data: never log them above DEBUG.
"""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple

from pydicom.dataset import Dataset

STUDY_KEYWORDS: tuple[str, ...] = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "AccessionNumber", "StudyID", "StudyDescription", "ReferringPhysicianName",
)
SERIES_KEYWORDS: tuple[str, ...] = (
    "Modality", "SeriesNumber", "SeriesDescription", "BodyPartExamined", "SeriesDate", "SeriesTime",
    "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
)
INSTANCE_KEYWORDS: tuple[str, ...] = ("InstanceNumber", "Rows", "Columns", "NumberOfFrames", "BitsAllocated")

DicomJson = dict[str, Any]
"""One data set in the DICOM JSON model (PS3.18 F.2): tag (8 hex digits) -> {"vr", "Value"...}."""


class IndexedAttributes(NamedTuple):
    """What :meth:`node.catalog.Catalog.record_instance` (and ``record_results``) keep per level."""

    study: DicomJson
    series: DicomJson
    instance: DicomJson


JSON_BULK_DATA_THRESHOLD = 1024
"""pydicom's default for ``Dataset.to_json_dict`` (no indexed attribute comes near it)."""


def to_dicom_json(ds: Dataset, keywords: tuple[str, ...]) -> DicomJson:
    """The ``keywords`` present in ``ds`` as DICOM JSON; an element whose value cannot be
    converted (malformed IS/DS...) is left out rather than failing the instance."""
    out: DicomJson = {}
    for kw in keywords:
        if kw not in ds:
            continue
        elem = ds[kw]
        with contextlib.suppress(Exception):  # as Dataset.to_json_dict, without a Dataset per element
            out[f"{elem.tag:08X}"] = elem.to_json_dict(None, JSON_BULK_DATA_THRESHOLD)
    return out


def indexed_attributes(ds: Dataset) -> IndexedAttributes:
    return IndexedAttributes(to_dicom_json(ds, STUDY_KEYWORDS), to_dicom_json(ds, SERIES_KEYWORDS),
                             to_dicom_json(ds, INSTANCE_KEYWORDS))


def json_values(item: dict[str, Any] | None) -> list[str]:
    """The values of one DICOM JSON element as text (a PN by its Alphabetic group); [] if empty."""
    if not item:
        return []
    out: list[str] = []
    for v in item.get("Value") or []:
        if isinstance(v, dict):
            out.append(str(v.get("Alphabetic", "")))
        elif v is not None:
            out.append(str(v))
    return out


def json_text(data: DicomJson | None, tag: str) -> str:
    """The value of ``tag`` (8 hex digits) as text, several values joined with ``\\``."""
    return "\\".join(json_values((data or {}).get(tag)))


def study_columns(study: DicomJson) -> dict[str, str]:
    """The indexed scalar columns of :class:`node.schema.Study` (matched in SQL by QIDO-RS)."""
    return {
        "patient_id": json_text(study, "00100020")[:64],
        "patient_name": json_text(study, "00100010")[:324],
        "study_date": json_text(study, "00080020")[:8],
        "accession_number": json_text(study, "00080050")[:16],
    }
