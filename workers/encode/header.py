"""Header modules that encoders built with plain pydicom share: Patient, General Study, Patient Study
copied from the source, and General Series' Body Part Examined and Laterality."""

from __future__ import annotations

import copy

from pydicom.dataset import Dataset

PATIENT_STUDY_KEYWORDS = (
    # Patient (C.7.1.1); Type 2 ones are written empty when the source lacks them.
    "PatientName", "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence", "PatientBirthDate",
    "PatientBirthTime", "PatientSex", "OtherPatientIDsSequence", "PatientIdentityRemoved", "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    # General Study (C.7.2.1)
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
    "IssuerOfAccessionNumberSequence", "StudyDescription",
    # Patient Study (C.7.2.2)
    "PatientAge", "PatientSize", "PatientWeight",
)
"""Attributes copied from the source image into a result of the same study."""
TYPE_2 = frozenset({
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber",
})
"""Of those, the ones that must be present (empty when unknown)."""

UNPAIRED_BODY_PARTS = frozenset({
    "ABDOMEN", "ABDOMENPELVIS", "BLADDER", "BRAIN", "CHEST", "CHESTABDOMEN", "CHESTABDPELVIS", "COLON", "CSPINE",
    "HEAD", "HEADNECK", "HEART", "LIVER", "LSPINE", "NECK", "PANCREAS", "PELVIS", "PROSTATE", "SPINE", "SPLEEN",
    "SSPINE", "STOMACH", "TSPINE", "UTERUS", "WHOLEBODY",
})
"""Body Part Examined defined terms (PS3.16 CID 4031) of unpaired structures: no Laterality then."""


def copy_patient_and_study(ds: Dataset, source: Dataset) -> None:
    """Patient, General Study and Patient Study attributes of ``source`` (Type 2 ones empty if absent)."""
    if "SpecificCharacterSet" in source:
        ds.SpecificCharacterSet = source.SpecificCharacterSet
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword in source:
            ds.add(copy.deepcopy(source[keyword]))
        elif keyword in TYPE_2:
            setattr(ds, keyword, None)


def copy_body_part_and_laterality(ds: Dataset, source: Dataset) -> None:
    """Body Part Examined and Laterality (General Series, Type 3 and 2C) as the source series has them.

    Laterality is copied when the source has it, else written empty (unknown) unless the body part is
    known to be unpaired (then it must be absent).
    """
    body_part = str(source.get("BodyPartExamined", "") or "").upper()
    if body_part:
        ds.BodyPartExamined = body_part
    if source.get("Laterality"):
        ds.Laterality = source.Laterality
    elif body_part not in UNPAIRED_BODY_PARTS:
        ds.Laterality = None
