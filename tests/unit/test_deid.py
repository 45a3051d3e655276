"""De-identification for remote worker pools (node/deid.py, issue 14).

Every byte a remote worker would get is searched for the original identifying values; results
built by the real encoders from de-identified sources are re-identified and checked with
highdicom and dciodvfy.
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, SecondaryCaptureImageStorage, UltrasoundImageStorage, generate_uid

from models.ct_hu_segmentation import CtHuSegmentation
from node.deid import (
    OFFSET_MAX_DAYS,
    OFFSET_MIN_DAYS,
    BurnedInAnnotation,
    Pseudonymizer,
    deidentify,
    ensure_key,
    reidentify,
    shift,
)
from testkit.dicom import write_ct_series
from testkit.harness import dciodvfy
from testkit.phantom import make_ct_phantom
from tests.dsfactory import ct_slice
from tests.unit.encode_helpers import load_ct_real_20, sort_by_normal, volume_from_datasets
from workers.outputs import encode_results

KEY = bytes(range(32))
GEOMETRY = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "RescaleSlope",
            "RescaleIntercept", "RescaleType", "Modality", "ImageType", "PhotometricInterpretation", "BitsAllocated",
            "BitsStored", "HighBit", "PixelRepresentation", "Rows", "Columns", "SamplesPerPixel", "SOPClassUID")
IDENTIFYING = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "AccessionNumber",
               "InstitutionName", "InstitutionAddress", "ReferringPhysicianName", "StationName", "DeviceSerialNumber",
               "RequestingPhysician", "PerformedProcedureStepID", "OtherPatientIDs", "ProtocolName")


@pytest.fixture(scope="module")
def p() -> Pseudonymizer:
    return Pseudonymizer(KEY)


def values(elem: DataElement) -> list[str]:
    v = elem.value
    if v is None or v == "":
        return []
    return [str(x) for x in v] if isinstance(v, pydicom.multival.MultiValue) else [str(v)]


def written(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def identifying_values(ds: Dataset) -> set[str]:
    """What must not reach a remote worker: identifying attributes anywhere (file meta included),
    every instance UID, every date, every private value of ``ds``."""
    found: set[str] = set()
    for elem in [*ds.file_meta.iterall(), *ds.iterall()]:
        if elem.keyword in IDENTIFYING or elem.keyword == "SourceApplicationEntityTitle":
            found.update(values(elem))
        elif elem.VR == "UI" and not elem.keyword.endswith("ClassUID"):
            found.update(v for v in values(elem) if not UID(v).type)
        elif elem.VR in ("DA", "DT"):
            found.update(v[:8] for v in values(elem) if len(v) >= 8)
        elif elem.tag.is_private and elem.VR in ("LO", "SH", "PN", "LT", "ST"):
            found.update(v for v in values(elem) if len(v) >= 4)
    found |= {line for v in list(found) for line in v.split("\r\n") if len(line) >= 4}  # address lines
    found.discard("")
    return found


def synthetic(patient_id: str = "PID-12345", study_date: str = "20190305", *, study: str | None = None) -> Dataset:
    """A CT slice with the identity a PACS gives it, private tags and a date inside a nested sequence."""
    ds = ct_slice(study or generate_uid(), generate_uid(), z=1.5)
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Doe^Jane", patient_id, "19700101"
    ds.IssuerOfPatientID = "Hospital-Issuer-77"
    ds.AccessionNumber, ds.InstitutionName = "ACC998877", "St Elsewhere Hospital"
    ds.ReferringPhysicianName, ds.StationName = "House^Gregory", "CT-ROOM-3"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date
    ds.StudyTime = "101500"
    ds.OtherPatientIDs = "OLD-PID-5555"
    ds.FrameOfReferenceUID = generate_uid()
    ref = Dataset()
    ref.SeriesInstanceUID = generate_uid()
    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = ds.SOPClassUID, generate_uid()
    item.InstanceCreationDate = "20180704"  # a date two levels down
    ref.ReferencedInstanceSequence = DicomSequence([item])
    ds.ReferencedSeriesSequence = DicomSequence([ref])
    block = ds.private_block(0x0011, "ACME SECRETS", create=True)
    block.add_new(0x01, "LO", "PRIVATE-PATIENT-NOTE")
    inner = Dataset()
    inner.PatientName = "Private^Nested"
    block.add_new(0x02, "SQ", DicomSequence([inner]))
    return ds


def test_real_ct_written_bytes_hold_no_identifying_value(p: Pseudonymizer) -> None:
    originals = load_ct_real_20()
    assert {str(ds.PatientName) for ds in originals} == {"TS^EXAMPLE"}  # the data has an identity to remove
    for ds in originals:
        before = written(ds)
        data = written(deidentify(ds, p))
        secrets = identifying_values(ds)
        assert len(secrets) > 20
        assert [s for s in secrets if s.encode() in data] == []
        assert written(ds) == before  # the input is untouched


def test_synthetic_written_bytes_hold_no_identifying_value(p: Pseudonymizer) -> None:
    ds = synthetic()
    secrets = identifying_values(ds) | {"PRIVATE-PATIENT-NOTE", "Private^Nested", "ACME SECRETS"}
    out = deidentify(ds, p)
    data = written(out)
    assert {"Doe^Jane", "19700101", "20180704", "ACC998877", "St Elsewhere Hospital"} <= secrets
    assert [s for s in secrets if s.encode() in data] == []
    assert not any(elem.tag.is_private for elem in out.iterall())
    offset = p.date_offset_days("PID-12345")
    nested = out.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
    assert nested.InstanceCreationDate == shift("20180704", "DA", offset) != ""
    assert nested.ReferencedSOPInstanceUID == p.uid(ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
                                                    .ReferencedSOPInstanceUID)
    assert out.StudyTime == "101500"  # the option keeps times of day
    assert "PatientBirthDate" in out and not out.PatientBirthDate  # Type 2: emptied
    assert "AccessionNumber" in out and not out.AccessionNumber and "OtherPatientIDs" not in out


def test_profile_marks_and_file_meta(p: Pseudonymizer) -> None:
    out = deidentify(load_ct_real_20()[0], p)
    assert out.PatientIdentityRemoved == "YES"
    assert len(out.DeidentificationMethod) <= 64
    assert {c.CodeValue for c in out.DeidentificationMethodCodeSequence} == {"113100", "113107"}
    assert out.LongitudinalTemporalInformationModified == "MODIFIED"
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert out.PatientID == p.patient_id("TSCT001") and out.PatientName == p.patient_name("TSCT001")
    reread = pydicom.dcmread(io.BytesIO(written(out)))
    assert reread.SOPInstanceUID == out.SOPInstanceUID


def test_uids_consistent_across_the_series(p: Pseudonymizer) -> None:
    originals = load_ct_real_20()
    outs = [deidentify(ds, p) for ds in originals]
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        new = {str(ds[keyword].value) for ds in outs}
        assert new == {p.uid(str(originals[0][keyword].value))}
        assert new.isdisjoint(str(ds[keyword].value) for ds in originals)
    sops = [str(ds.SOPInstanceUID) for ds in outs]
    assert len(set(sops)) == len(outs)
    assert all(UID(u).is_valid and u.startswith("2.25.") and len(u) <= 64 for u in sops)
    assert [ds.file_meta.MediaStorageSOPInstanceUID for ds in outs] == sops
    assert {str(ds.SOPClassUID) for ds in outs} == {str(originals[0].SOPClassUID)}  # well-known UIDs stay
    assert outs[0].file_meta.TransferSyntaxUID == originals[0].file_meta.TransferSyntaxUID


def test_pixel_data_and_geometry_unchanged(p: Pseudonymizer) -> None:
    for ds in load_ct_real_20()[:5]:
        out = deidentify(ds, p)
        assert out.PixelData == ds.PixelData  # compressed bytes, byte for byte
        for keyword in GEOMETRY:
            assert out[keyword].value == ds[keyword].value, keyword


def test_same_patient_same_offset_across_studies(p: Pseudonymizer) -> None:
    first, second = synthetic(study_date="20190305"), synthetic(study_date="20200117")
    a, b = deidentify(first, p), deidentify(second, p)
    offset = p.date_offset_days("PID-12345")
    assert -OFFSET_MAX_DAYS <= offset <= -OFFSET_MIN_DAYS
    assert a.StudyDate == shift("20190305", "DA", offset) and b.StudyDate == shift("20200117", "DA", offset)
    days = pydicom.valuerep.DA(b.StudyDate) - pydicom.valuerep.DA(a.StudyDate)
    assert days.days == 318  # the interval between the studies is true
    assert a.StudyInstanceUID != b.StudyInstanceUID and a.PatientID == b.PatientID
    other_offsets = {p.date_offset_days(f"PATIENT-{i}") for i in range(50)}
    assert len(other_offsets) > 40 and 0 not in other_offsets
    assert all(-OFFSET_MAX_DAYS <= o <= -OFFSET_MIN_DAYS for o in other_offsets)


def test_datetime_shift_keeps_time_and_drops_partial_dates() -> None:
    assert shift("20221208140352.457000+0100", "DT", -10) == "20221128140352.457000+0100"
    assert shift("2022.12.08", "DA", -8) == "20221130"
    assert shift("2022", "DT", -8) == "" and shift("202212", "DA", -8) == ""


def test_deterministic_with_the_key(p: Pseudonymizer) -> None:
    ds = load_ct_real_20()[3]
    assert written(deidentify(ds, p)) == written(deidentify(ds, Pseudonymizer(KEY)))
    other = deidentify(ds, Pseudonymizer(bytes(range(1, 33))))
    mine = deidentify(ds, p)
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "PatientID", "PatientName"):
        assert other[keyword].value != mine[keyword].value
    assert Pseudonymizer(bytes(range(1, 33))).date_offset_days("TSCT001") != p.date_offset_days("TSCT001")


@pytest.mark.parametrize("sop_class, modality, burned_in, refused", [
    ("1.2.840.10008.5.1.4.1.1.2", "CT", "YES", True),
    ("1.2.840.10008.5.1.4.1.1.2", "CT", None, False),
    (SecondaryCaptureImageStorage, "OT", None, True),
    (SecondaryCaptureImageStorage, "OT", "NO", False),
    (UltrasoundImageStorage, "US", None, True),
    ("1.2.840.10008.5.1.4.1.1.1.1", "DX", None, False),
])
def test_burned_in_annotation_refused(p: Pseudonymizer, sop_class: str, modality: str, burned_in: str | None,
                                      refused: bool) -> None:
    ds = synthetic()
    ds.SOPClassUID, ds.Modality = sop_class, modality
    if burned_in is not None:
        ds.BurnedInAnnotation = burned_in
    if refused:
        with pytest.raises(BurnedInAnnotation):
            deidentify(ds, p)
    else:
        assert deidentify(ds, p).Modality == modality


def test_key_file_created_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "deid.key"
    key = ensure_key(path)
    assert len(key) == 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ensure_key(path) == key
    assert [f.name for f in path.parent.iterdir()] == ["deid.key"]  # no temporary file left
    assert ensure_key(tmp_path / "other.key") != key


def test_key_file_refused_when_short_or_readable(tmp_path: Path) -> None:
    short = tmp_path / "short.key"
    short.write_bytes(b"x" * 31)
    os.chmod(short, 0o600)
    with pytest.raises(ValueError, match="at least 32"):
        ensure_key(short)
    readable = tmp_path / "readable.key"
    readable.write_bytes(b"x" * 32)
    os.chmod(readable, 0o640)
    with pytest.raises(ValueError, match="group or others"):
        ensure_key(readable)
    with pytest.raises(ValueError):
        Pseudonymizer(b"x" * 16)


@pytest.fixture(scope="module")
def round_trip(p: Pseudonymizer) -> tuple[list[Dataset], list[Dataset], list[Dataset]]:
    """(originals, de-identified sources, results the worker encoders made from them)."""
    originals = load_ct_real_20()
    sources = sort_by_normal([deidentify(ds, p) for ds in originals])
    volume = volume_from_datasets(sources)
    model = CtHuSegmentation()
    encoded = encode_results(model, sources, volume, model.run(volume), software_version="deid-test")
    return originals, sources, [e.dataset for e in encoded]


def _of_kind(results: list[Dataset], modality: str) -> Dataset:
    return next(ds for ds in results if ds.Modality == modality)


def test_reidentified_results_reference_the_originals(
    p: Pseudonymizer, round_trip: tuple[list[Dataset], list[Dataset], list[Dataset]], tmp_path: Path
) -> None:
    originals, sources, results = round_trip
    first = originals[0]
    original_uids = {v for ds in originals for e in ds.iterall() if e.VR == "UI" for v in values(e)}
    pseudonyms = {v for ds in sources for e in ds.iterall() if e.VR == "UI" for v in values(e)} - original_uids
    original_sops = {str(ds.SOPInstanceUID) for ds in originals}
    assert {"SEG", "SR", "OT", "DOC"} <= {str(r.Modality) for r in results}  # SEG, TID 1500 SR, key images, PDF
    for i, result in enumerate(results):
        kind = str(result.Modality)
        out = reidentify(result, originals, p)
        assert out.SOPInstanceUID == result.SOPInstanceUID and out.SeriesInstanceUID == result.SeriesInstanceUID
        assert out.StudyInstanceUID == first.StudyInstanceUID
        for keyword in ("PatientName", "PatientID", "IssuerOfPatientID", "StudyDate", "StudyTime",
                        "AccessionNumber", "StudyID"):
            assert out[keyword].value == first[keyword].value, (kind, keyword)
        assert "PatientIdentityRemoved" not in out and "DeidentificationMethod" not in out
        uids = {v for e in out.iterall() if e.VR == "UI" for v in values(e)}
        assert uids.isdisjoint(pseudonyms), kind
        referenced = {v for e in out.iterall() if e.keyword == "ReferencedSOPInstanceUID" for v in values(e)}
        assert referenced & original_sops, kind
        assert referenced <= original_sops | {str(r.SOPInstanceUID) for r in results}
        dates = {v for e in out.iterall() if e.VR == "DA" for v in values(e)}
        assert first.StudyDate in dates and not dates & {str(s.StudyDate) for s in sources}
        path = tmp_path / f"{i}-{kind}.dcm"
        out.save_as(path, enforce_file_format=True)
        data = path.read_bytes()
        assert str(sources[0].PatientID).encode() not in data and str(sources[0].PatientName).encode() not in data
        errors, _warnings = dciodvfy(path)
        assert errors == [], (kind, errors)
        if kind == "SEG":
            seg = hd.seg.segread(path)
            assert {u[2] for u in seg.get_source_image_uids()} <= original_sops
            assert seg.FrameOfReferenceUID == first.FrameOfReferenceUID
        elif kind == "SR":
            sr = hd.sr.srread(path)
            assert isinstance(sr, hd.sr.Comprehensive3DSR)
            assert str(sr.PatientName) == str(first.PatientName)


def test_deidentified_ct_is_as_valid_as_the_original(p: Pseudonymizer, tmp_path: Path) -> None:
    original = load_ct_real_20()[0]
    before, after = tmp_path / "original.dcm", tmp_path / "deidentified.dcm"
    before.write_bytes(written(original))
    after.write_bytes(written(deidentify(original, p)))
    assert set(dciodvfy(after)[0]) <= set(dciodvfy(before)[0])  # the source's own Laterality error only


def test_reidentify_maps_nested_shifted_dates_and_refuses_other_studies(
    p: Pseudonymizer, round_trip: tuple[list[Dataset], list[Dataset], list[Dataset]]
) -> None:
    originals, sources, results = round_trip
    result = _of_kind(results, "SR").copy()
    item = Dataset()
    item.ObservationDateTime = str(sources[0].AcquisitionDateTime)
    item.Date = sources[0].StudyDate
    result.AnatomicRegionSequence = DicomSequence([item])  # any nested place
    out = reidentify(result, originals, p)
    assert out.AnatomicRegionSequence[0].ObservationDateTime == originals[0].AcquisitionDateTime
    assert out.AnatomicRegionSequence[0].Date == originals[0].StudyDate
    assert result.AnatomicRegionSequence[0].Date == sources[0].StudyDate  # the input is untouched
    foreign = result.copy()
    foreign.StudyInstanceUID = p.uid(generate_uid())
    with pytest.raises(ValueError, match="Study Instance UID"):
        reidentify(foreign, originals, p)
    with pytest.raises(ValueError):
        reidentify(result, originals, Pseudonymizer(bytes(range(1, 33))))


def test_phantom_series_from_testkit(p: Pseudonymizer, tmp_path: Path) -> None:
    paths = write_ct_series(make_ct_phantom(6, 48, 48, pixel_mm=6.0, slice_mm=5.0, nodules=0), tmp_path,
                            patient_id="PHANTOM-PID-4242", patient_name="Phantom^Secret^Person")
    originals = [pydicom.dcmread(path) for path in paths]
    outs = [deidentify(ds, p) for ds in originals]
    for ds, out in zip(originals, outs, strict=True):
        secrets = identifying_values(ds)
        assert {"PHANTOM-PID-4242", "Phantom^Secret^Person"} <= secrets
        data = written(out)
        assert [s for s in secrets if s.encode() in data] == []
        assert out.PixelData == ds.PixelData
    assert len({str(out.SeriesInstanceUID) for out in outs}) == 1
    assert len({str(out.SOPInstanceUID) for out in outs}) == len(outs)
