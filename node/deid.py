"""De-identification for remote worker pools, and re-identification of their results.

:func:`deidentify` applies the PS3.15 Annex E Basic Application Level Confidentiality Profile
(node/deid_profile.py) with the Retain Longitudinal Temporal Information with Modified Dates Option:

* UIDs (instance, series, study, frame of reference, referenced ones; anywhere, sequences included)
  become keyed pseudonyms ``2.25.<HMAC-SHA256>``; well-known UIDs (SOP classes, transfer syntaxes,
  anything in the DICOM dictionary) and ``*ClassUID``/coding-scheme UIDs stay.
* Patient ID and Patient's Name become keyed pseudonyms of the Patient ID.
* Every DA and DT value, sequences included, moves by a per-patient offset of whole days, so
  intervals between a patient's studies stay true; times of day stay (a whole-day shift leaves them).
  Patient's Birth Date is emptied; dates and times the profile removes (X) are removed.
* Other attributes of Table E.1-1 are removed, emptied or replaced by a dummy; private tags go.
* Images that may carry burned-in text are refused: Burned In Annotation YES, or no Burned In
  Annotation on a Secondary Capture, US, XC or OT image (unknown counts as burned in where
  annotations are common). Other modalities without the attribute (CT, MR, ...) are accepted.

:func:`reidentify` maps a worker's result back: pseudonymous UIDs and shifted dates of the sources
to the originals, the patient and study attributes from the source, de-identification marks removed.
"""

from __future__ import annotations

import copy
import datetime as dt
import functools
import hashlib
import hmac
import os
import secrets
import stat
from collections.abc import Callable, Sequence
from pathlib import Path

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID

from node.deid_profile import MAY_REMOVE, TABLE_VERSION, Action, action_for

KEY_BYTES = 32
"""Length of a new key, and the least a key file may hold."""
OFFSET_MIN_DAYS, OFFSET_MAX_DAYS = 30, 3650
"""A patient's dates move back by this many days (inclusive range; never zero)."""
BURNED_IN_UNLESS_STATED = frozenset({"OT", "SC", "US", "XC"})
"""Modalities whose images without Burned In Annotation are treated as burned in."""
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
"""SOP Class UIDs of the Secondary Capture family (plain, multi-frame and its variants)."""
METHOD = f"PS3.15 Basic Profile, Modified Dates Option ({TABLE_VERSION})"
"""De-identification Method (0012,0063) written into each de-identified dataset."""
METHOD_CODES = (("113100", "Basic Application Confidentiality Profile"),
                ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"))
"""DCM codes of CID 7050 for the profile and option applied."""
MARKER_KEYWORDS = ("PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence",
                   "LongitudinalTemporalInformationModified")
"""Attributes that say a dataset was de-identified."""
PATIENT_STUDY_KEYWORDS = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
                          "PatientAge", "StudyDate", "StudyTime", "AccessionNumber", "StudyID",
                          "ReferringPhysicianName", "StudyDescription")
"""Patient and General Study attributes a re-identified result takes from its source."""
TYPE_2_KEYWORDS = frozenset({"PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                             "AccessionNumber", "StudyID", "ReferringPhysicianName"})
"""Of those, the ones a result must keep (empty) when the source lacks them."""
LEFT_OUT_OBJECTS = frozenset({"PDF"})
"""Result objects a worker given de-identified inputs does not make, and the node refuses from it: a PDF
page's text shows the (shifted) study date and (emptied) accession number, which re-identifying the
header cannot correct. SEG, SR and key images carry nothing re-identification cannot map back."""
_KEPT_UID_SUFFIXES = ("ClassUID", "TransferSyntaxUID", "CodingSchemeUID", "ContextUID", "MappingResourceUID")
_DUMMY_TEXT = "ANONYMIZED"
_PATIENT_BIRTH_DATE = 0x00100030  # emptied (Z), not shifted: the option need not keep it
_TEXT_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT"})
_NUMBER_VRS = frozenset({"FD", "FL", "SL", "SS", "SV", "UL", "US", "UV"})


class BurnedInAnnotation(ValueError):
    """The image may show identifying text in its pixels: it is not sent to a remote worker."""


def ensure_key(path: Path) -> bytes:
    """The pseudonymisation key in ``path``; a new one (32 random bytes, mode 0600) when missing.

    Raises ValueError for a key file shorter than 32 bytes or open to the group or others.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return _create_key(path)
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ValueError(f"pseudonymisation key {path} is accessible to group or others "
                             f"(mode {stat.S_IMODE(mode):04o}); chmod 600 it")
        key = f.read()
    if len(key) < KEY_BYTES:
        raise ValueError(f"pseudonymisation key {path} holds {len(key)} bytes; it needs at least {KEY_BYTES}")
    return key


def _create_key(path: Path) -> bytes:
    """Write a new key next to ``path`` and link it in place (no clobbering a concurrent writer's)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(KEY_BYTES)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(key)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:  # another process made one first: use theirs
            return ensure_key(path)
    finally:
        tmp.unlink(missing_ok=True)
    return key


class Pseudonymizer:
    """Keyed, deterministic pseudonyms (HMAC-SHA256): same key and value, same pseudonym."""

    def __init__(self, key: bytes) -> None:
        if len(key) < KEY_BYTES:
            raise ValueError(f"a pseudonymisation key needs at least {KEY_BYTES} bytes")
        self._key = key

    def _digest(self, purpose: str, value: str) -> bytes:
        message = purpose.encode() + b"\0" + value.encode("utf-8", "surrogatepass")
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def uid(self, original: str) -> str:
        """``2.25.`` and a version-8 (RFC 9562, custom) UUID as an integer: at most 44 characters."""
        n = int.from_bytes(self._digest("uid", original)[:16], "big")
        n = (n & ~(0xF << 76)) | (0x8 << 76)  # version 8
        n = (n & ~(0x3 << 62)) | (0x2 << 62)  # RFC 4122/9562 variant
        return f"2.25.{n}"

    def patient_id(self, original: str) -> str:
        """A pseudonymous Patient ID (``ANON`` and 20 hex digits)."""
        return "ANON" + self._digest("patient-id", original)[:10].hex().upper()

    def patient_name(self, original_id: str) -> str:
        """A pseudonymous Patient's Name for the patient with ``original_id``."""
        return "ANON^" + self._digest("patient-name", original_id)[:6].hex().upper()

    def date_offset_days(self, original_patient_id: str) -> int:
        """The patient's date shift in days, between -3650 and -30 (never 0)."""
        n = int.from_bytes(self._digest("date-offset", original_patient_id)[:8], "big")
        return -(OFFSET_MIN_DAYS + n % (OFFSET_MAX_DAYS - OFFSET_MIN_DAYS + 1))


def deidentify(ds: Dataset, p: Pseudonymizer) -> Dataset:
    """A de-identified copy of ``ds`` (``ds`` itself is untouched). Raises BurnedInAnnotation."""
    refuse_burned_in(ds)
    original_id = str(ds.get("PatientID", "") or "")
    out = copy.deepcopy(ds)
    _clean(out, p, p.date_offset_days(original_id))
    if "PatientID" in ds:
        out.PatientID = p.patient_id(original_id)
    if "PatientName" in ds:
        out.PatientName = p.patient_name(original_id)
    out.PatientIdentityRemoved = "YES"
    out.DeidentificationMethod = METHOD
    out.DeidentificationMethodCodeSequence = DicomSequence([_code(value, meaning) for value, meaning in METHOD_CODES])
    out.LongitudinalTemporalInformationModified = "MODIFIED"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = out.SOPClassUID
    meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    old_meta = getattr(ds, "file_meta", None)
    if old_meta is not None and "TransferSyntaxUID" in old_meta:
        meta.TransferSyntaxUID = old_meta.TransferSyntaxUID
    out.file_meta = meta
    return out


def refuse_burned_in(ds: Dataset) -> None:
    """Raise BurnedInAnnotation for an image that may show identifying text in its pixels (a header is
    enough: the check :func:`deidentify` makes first)."""
    stated = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    if stated == "YES":
        raise BurnedInAnnotation("Burned In Annotation is YES")
    if stated:
        return
    modality = str(ds.get("Modality", "") or "").upper()
    if modality in BURNED_IN_UNLESS_STATED or str(ds.get("SOPClassUID", "")).startswith(SECONDARY_CAPTURE_PREFIX):
        raise BurnedInAnnotation(f"no Burned In Annotation on a {modality or 'secondary capture'} image: "
                                 "treated as burned in")


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
    return item


def _clean(ds: Dataset, p: Pseudonymizer, offset: int) -> None:
    """Apply the profile to ``ds`` and, recursively, to the items of its sequences."""
    for elem in list(ds):
        tag = int(elem.tag)
        if elem.tag.is_private or elem.tag.element == 0:  # private, or a (retired) group length
            del ds[tag]
            continue
        action = action_for(tag)
        if elem.VR == "SQ":
            if action is Action.REMOVE or (action in (Action.EMPTY, Action.DUMMY) and tag in MAY_REMOVE):
                del ds[tag]
            elif action in (Action.EMPTY, Action.DUMMY):
                elem.value = DicomSequence()
            else:
                for item in elem.value:
                    _clean(item, p, offset)
        elif action is Action.REMOVE:
            del ds[tag]
        elif tag == _PATIENT_BIRTH_DATE:
            elem.value = None
        elif elem.VR in ("DA", "DT"):
            _map_values(elem, functools.partial(shift, vr=str(elem.VR), days=offset))
        elif elem.VR == "TM":
            continue  # the option keeps times: whole-day shifts leave them as they are
        elif elem.VR == "UI":
            if not _kept_uid(elem):
                _map_values(elem, p.uid)
        elif action is Action.EMPTY:
            elem.value = None
        elif action is Action.DUMMY:
            elem.value = _dummy(elem.VR)


def _kept_uid(elem: DataElement) -> bool:
    """Well-known UIDs (DICOM dictionary) and class / coding-scheme UIDs are not pseudonymised."""
    if elem.keyword.endswith(_KEPT_UID_SUFFIXES):
        return True
    values = elem.value if isinstance(elem.value, MultiValue) else [elem.value]
    return all(not v or UID(str(v)).type for v in values)


def _dummy(vr: str) -> object:
    if vr in _TEXT_VRS:
        return _DUMMY_TEXT
    if vr in ("DS", "IS"):
        return "0"
    if vr in _NUMBER_VRS:
        return 0
    if vr == "AS":
        return "000Y"
    return None  # binary and URI values: emptied rather than given made-up content


def _map_values(elem: DataElement, fn: Callable[[str], str]) -> None:
    """Replace each value of a (possibly multi-valued) string element by ``fn(value)``."""
    if elem.value is None or elem.value == "":
        return
    if isinstance(elem.value, MultiValue):
        elem.value = [fn(str(v)) for v in elem.value]
    else:
        elem.value = fn(str(elem.value))


def shift(value: str, vr: str, days: int) -> str:
    """A DA or DT value moved by ``days``; "" when it holds no full date (a partial one cannot move)."""
    text = value.strip()
    if vr == "DA" and len(text) == 10 and text[4] == text[7] == ".":  # ACR-NEMA YYYY.MM.DD
        text = text.replace(".", "")
    try:
        day = dt.datetime.strptime(text[:8], "%Y%m%d").date()
    except ValueError:
        return ""
    if vr == "DA" and len(text) != 8:
        return ""
    return (day + dt.timedelta(days=days)).strftime("%Y%m%d") + text[8:]


def _values(elem: DataElement) -> list[str]:
    if elem.value is None or elem.value == "":
        return []
    return [str(v) for v in elem.value] if isinstance(elem.value, MultiValue) else [str(elem.value)]


def reidentify(result: Dataset, sources: Sequence[Dataset], p: Pseudonymizer) -> Dataset:
    """A copy of ``result`` (made by a worker from de-identified ``sources``) with the identity put back.

    ``sources`` are the original datasets. UIDs and dates of the sources are mapped back wherever
    they occur; the patient and study attributes come from the source of the result's study; the
    result's own new UIDs stay. Raises ValueError when the result is not of the sources' study.
    """
    study = str(result.get("StudyInstanceUID", ""))
    source = next((s for s in sources if p.uid(str(s.get("StudyInstanceUID", ""))) == study), None)
    if source is None:
        raise ValueError("the result's Study Instance UID is not the pseudonym of the sources' study")
    uids: dict[str, str] = {}
    dates: dict[str, str] = {}
    names: dict[str, str] = {}
    for s in sources:
        original_id = str(s.get("PatientID", "") or "")
        offset = p.date_offset_days(original_id)
        names[p.patient_id(original_id)] = original_id
        names[p.patient_name(original_id)] = str(s.get("PatientName", "") or "")
        for elem in s.iterall():
            if elem.VR == "UI":
                uids.update((p.uid(v), v) for v in _values(elem))
            elif elem.VR in ("DA", "DT"):
                vr = str(elem.VR)
                dates.update((shift(v, vr, offset)[:8], shift(v, vr, 0)[:8]) for v in _values(elem))
    dates.pop("", None)
    out = copy.deepcopy(result)
    for elem in out.iterall():
        if elem.VR == "UI":
            _map_values(elem, lambda v: uids.get(v, v))
        elif elem.VR in ("DA", "DT"):
            _map_values(elem, lambda v: dates.get(v[:8], v[:8]) + v[8:] if len(v) >= 8 else v)
        elif elem.VR in ("LO", "PN", "SH"):
            _map_values(elem, lambda v: names.get(v, v))
    _copy_from_source(out, source, PATIENT_STUDY_KEYWORDS + MARKER_KEYWORDS)  # markers: as the source has them
    if "SpecificCharacterSet" in source and "ISO_IR 192" not in out.get("SpecificCharacterSet", ""):
        out.SpecificCharacterSet = source.SpecificCharacterSet  # for the names put back (UTF-8 holds them all)
    return out


def _copy_from_source(out: Dataset, source: Dataset, keywords: Sequence[str]) -> None:
    """Each keyword as ``source`` has it; absent from the source: removed, or empty when Type 2."""
    for keyword in keywords:
        if keyword in source:
            out.add(copy.deepcopy(source[keyword]))
        elif keyword in TYPE_2_KEYWORDS:
            setattr(out, keyword, None)
        elif keyword in out:
            delattr(out, keyword)
