"""Receiver.store: the status decision, without a network."""

from pathlib import Path

import pytest
from pydicom.uid import UID

from node.catalog import Catalog
from node.config import Settings
from node.receive.scp import (
    STATUS_CANNOT_PARSE,
    STATUS_INVALID,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SOP_CLASS_NOT_SUPPORTED,
    STATUS_SOP_MISMATCH,
    STATUS_SUCCESS,
    Receiver,
)
from node.schema import StudyState
from node.spool import Spool
from tests.dsfactory import ct_slice, encode

CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture
def receiver(tmp_path: Path) -> Receiver:
    settings = Settings.model_validate({"node": {"storage_dir": str(tmp_path), "min_free_mb": 0}})
    return Receiver(settings, Catalog.for_storage(tmp_path), Spool(tmp_path), clock=lambda: 5.0)


def test_success_is_durable_and_deduplicated(receiver: Receiver) -> None:
    ds = ct_slice("1.2.3", "1.2.3.4", "1.2.3.4.5")
    data = encode(ds)
    assert receiver.store(data, CT, "1.2.3.4.5", "SCANNER") == STATUS_SUCCESS
    assert receiver.store(data, CT, "1.2.3.4.5", "SCANNER") == STATUS_SUCCESS
    stored = list((receiver.spool.root / "instances").rglob("*.dcm"))
    assert [p.name for p in stored] == ["1.2.3.4.5.dcm"] and stored[0].read_bytes() == data
    assert receiver.catalog.counts()["instances"]["total"] == 1
    series = receiver.catalog.series_of_study(receiver.catalog.studies_in_state("receiving")[0].id)
    assert series[0].attributes["CallingAETitle"] == "SCANNER"


def test_uid_mismatch_is_a900(receiver: Receiver) -> None:
    data = encode(ct_slice("1.2.3", "1.2.3.4", "1.2.3.4.5"))
    assert receiver.store(data, CT, "1.2.3.4.6", "S") == STATUS_SOP_MISMATCH
    assert receiver.store(data, "1.2.840.10008.5.1.4.1.1.4", "1.2.3.4.5", "S") == STATUS_SOP_MISMATCH
    assert receiver.catalog.counts()["instances"]["total"] == 0


def test_garbage_is_c210(receiver: Receiver) -> None:
    assert receiver.store(b"\x00" * 128 + b"DICM" + b"\xff" * 50, CT, "1.2", "S") == STATUS_CANNOT_PARSE
    assert receiver.store(b"not dicom at all", CT, "1.2", "S") == STATUS_CANNOT_PARSE


def test_truncated_pixel_data_is_refused(receiver: Receiver) -> None:
    ds = ct_slice("1.2.3", "1.2.3.4", "1.2.3.4.7")
    ds.PixelData = ds.PixelData[:-10]
    assert receiver.store(encode(ds), CT, "1.2.3.4.7", "S") == STATUS_INVALID
    assert not list((receiver.spool.root / "instances").rglob("*.dcm"))


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI:UserWarning")  # the point of the test
def test_invalid_study_uid_is_refused(receiver: Receiver) -> None:
    ds = ct_slice("1.2.03", "1.2.3.4", "1.2.3.4.8")
    assert receiver.store(encode(ds), CT, "1.2.3.4.8", "S") == STATUS_INVALID


def test_below_free_space_floor_is_a700(tmp_path: Path) -> None:
    huge = 10**9  # MB: more than any test machine has free
    settings = Settings.model_validate({"node": {"storage_dir": str(tmp_path), "min_free_mb": huge}})
    r = Receiver(settings, Catalog.for_storage(tmp_path), Spool(tmp_path), clock=lambda: 0.0)
    data = encode(ct_slice("1.2.3", "1.2.3.4", "1.2.3.4.9"))
    assert r.store(data, CT, "1.2.3.4.9", "S") == STATUS_OUT_OF_RESOURCES
    assert not list((tmp_path / "instances").rglob("*.dcm"))


def test_catalog_failure_leaves_no_file(receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    """An instance answered with a failure status is not kept in the spool."""

    def broken(**kwargs: object) -> None:
        raise RuntimeError("database is locked")

    monkeypatch.setattr(receiver.catalog, "record_instance", broken)
    data = encode(ct_slice("1.2.3", "1.2.3.4", "1.2.3.4.50"))
    assert receiver.store(data, CT, "1.2.3.4.50", "S") == STATUS_OUT_OF_RESOURCES
    assert not list((receiver.spool.root / "instances").rglob("*.dcm"))


# ---- the file door (STOW-RS streams each part to a temp file of the spool) -----------------
def receive_file(r: Receiver, data: bytes) -> int:
    tmp = r.spool.new_temp()
    tmp.write_bytes(data)
    status = r.receive_file(tmp, "STOW-RS").status
    assert not tmp.exists() and list(r.spool.tmp.iterdir()) == []  # consumed, whatever the outcome
    return status


def test_receive_file_stores_durably_like_receive(receiver: Receiver) -> None:
    data = encode(ct_slice("1.2.3", "1.2.3.4", "1.2.3.4.5"))
    tmp = receiver.spool.new_temp()
    tmp.write_bytes(data)
    got = receiver.receive_file(tmp, "STOW-RS")
    assert (got.status, got.sop_class_uid, got.sop_instance_uid) == (STATUS_SUCCESS, CT, "1.2.3.4.5")
    assert receive_file(receiver, data) == STATUS_SUCCESS  # a duplicate: success, stored once
    stored = list((receiver.spool.root / "instances").rglob("*.dcm"))
    assert [p.name for p in stored] == ["1.2.3.4.5.dcm"] and stored[0].read_bytes() == data
    assert receiver.catalog.counts()["instances"]["total"] == 1
    series = receiver.catalog.series_of_study(receiver.catalog.studies_in_state(StudyState.RECEIVING)[0].id)
    assert series[0].attributes["CallingAETitle"] == "STOW-RS"


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI:UserWarning")
def test_receive_file_refuses_like_receive(receiver: Receiver) -> None:
    truncated = ct_slice("1.2.3", "1.2.3.4", "1.2.3.4.7")
    truncated.PixelData = truncated.PixelData[:-10]
    ecg = ct_slice("1.2.3", "1.2.3.4", "1.2.3.4.8")
    ecg.SOPClassUID = ecg.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.9.1.1")  # ECG
    assert receive_file(receiver, b"not dicom at all") == STATUS_CANNOT_PARSE
    assert receive_file(receiver, encode(truncated)) == STATUS_INVALID
    assert receive_file(receiver, encode(ct_slice("1.2.03", "1.2.3.4", "1.2.3.4.9"))) == STATUS_INVALID
    assert receive_file(receiver, encode(ecg)) == STATUS_SOP_CLASS_NOT_SUPPORTED
    assert receive_file(receiver, encode(ct_slice("1.2.3", "1.2.3.4", "1.2.3.4.10"))[:140]) == STATUS_CANNOT_PARSE
    assert not list((receiver.spool.root / "instances").rglob("*.dcm"))
    assert receiver.catalog.counts()["instances"]["total"] == 0


def test_receive_file_below_floor_or_catalog_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings.model_validate({"node": {"storage_dir": str(tmp_path), "min_free_mb": 10**9}})
    r = Receiver(settings, Catalog.for_storage(tmp_path), Spool(tmp_path), clock=lambda: 0.0)
    assert receive_file(r, encode(ct_slice("1.2.3", "1.2.3.4", "1.2.3.4.9"))) == STATUS_OUT_OF_RESOURCES
    r = Receiver(settings.model_copy(update={"node": settings.node.model_copy(update={"min_free_mb": 0})}),
                 r.catalog, r.spool, clock=lambda: 0.0)

    def broken(**kwargs: object) -> None:
        raise RuntimeError("database is locked")

    monkeypatch.setattr(r.catalog, "record_instance", broken)
    assert receive_file(r, encode(ct_slice("1.2.3", "1.2.3.4", "1.2.3.4.50"))) == STATUS_OUT_OF_RESOURCES
    assert not list((tmp_path / "instances").rglob("*.dcm"))
