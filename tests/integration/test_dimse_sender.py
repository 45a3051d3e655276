"""DimseSender over real loopback associations to an in-process pynetdicom SCP that accepts chosen
transfer syntaxes: a file whose syntax is accepted goes as it is encoded on disk (nothing decoded or
encoded again), otherwise it is converted (uncompressed syntaxes) or decompressed, as before."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    RLELossless,
)
from pynetdicom import AE, _config, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import split_dataset
from pynetdicom.events import Event

from node.config import DimseDestination
from node.send.dimse import DimseSender
from testkit.harness import free_port
from tests.dsfactory import ct_slice

STUDY, SERIES = "1.2.826.0.1.77", "1.2.826.0.1.77.1"


class Pacs:
    """A storage SCP accepting ``syntaxes`` for CT; keeps what it got: (transfer syntax, raw dataset bytes)."""

    def __init__(self, syntaxes: list[str]) -> None:
        self.port = free_port()
        self.ae = AE(ae_title="PACS")
        self.ae.add_supported_context(CTImageStorage, syntaxes)
        self.received: dict[str, tuple[str, bytes]] = {}
        self.lock = threading.Lock()

    def _store(self, event: Event) -> int:
        request = event.request
        assert isinstance(request, C_STORE) and request.DataSet is not None
        with self.lock:
            self.received[str(request.AffectedSOPInstanceUID)] = (str(event.context.transfer_syntax),
                                                                  request.DataSet.getvalue())
        return 0x0000

    @contextmanager
    def running(self) -> Iterator[Pacs]:
        server = self.ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])
        assert server is not None
        try:
            yield self
        finally:
            server.shutdown()

    def destination(self) -> DimseDestination:
        return DimseDestination(name="pacs", type="dimse", ae_title="PACS", host="127.0.0.1", port=self.port)


def _file(tmp_path: Path, i: int, syntax: str = ExplicitVRLittleEndian) -> Path:
    ds = ct_slice(STUDY, SERIES, f"{SERIES}.{i}", z=float(i), rows=32, cols=32)
    ds.PixelData = (np.arange(32 * 32, dtype=np.int16).reshape(32, 32) * (i + 1)).tobytes()
    if syntax == RLELossless:
        ds.compress(RLELossless)
    elif syntax == ImplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    path = tmp_path / f"{i}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _received(pacs: Pacs, sop_uid: str) -> tuple[str, Dataset]:
    """The transfer syntax and the dataset the SCP got for ``sop_uid`` (decoded here)."""
    ts, raw = pacs.received[sop_uid]
    ds = pydicom.dcmread(DicomBytesIO(raw), force=True)  # a bare dataset: no preamble, no file meta
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(ts)
    return ts, ds


def test_a_file_in_an_accepted_syntax_goes_as_it_is_on_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = [_file(tmp_path, i) for i in range(3)] + [_file(tmp_path, 3, RLELossless)]

    def no_decoding(*args: object, **kwargs: object) -> Dataset:
        raise AssertionError("a file was decoded")

    monkeypatch.setattr("node.send.dimse.pydicom.dcmread", no_decoding)
    monkeypatch.setattr("pynetdicom.association.dcmread", no_decoding)
    with Pacs([ExplicitVRLittleEndian, RLELossless]).running() as pacs:
        report = DimseSender(pacs.destination(), "AI-NODE", 10).send(files)
    assert sorted(report.sent) == sorted(files) and not report.failed
    assert _config.STORE_SEND_CHUNKED_DATASET is False  # turned on for each call only
    for path in files:
        meta, offset = split_dataset(path)
        ts, raw = pacs.received[str(meta.MediaStorageSOPInstanceUID)]
        assert ts == meta.TransferSyntaxUID and raw == path.read_bytes()[offset:]  # byte for byte


def test_an_explicit_file_goes_implicit_when_only_that_is_accepted(tmp_path: Path) -> None:
    files = [_file(tmp_path, 0), _file(tmp_path, 1, ImplicitVRLittleEndian)]
    with Pacs([ImplicitVRLittleEndian]).running() as pacs:
        report = DimseSender(pacs.destination(), "AI-NODE", 10).send(files)
    assert sorted(report.sent) == sorted(files) and not report.failed
    for path in files:
        original = pydicom.dcmread(path)
        ts, got = _received(pacs, str(original.SOPInstanceUID))
        assert ts == ImplicitVRLittleEndian and got.SOPInstanceUID == original.SOPInstanceUID
        assert np.array_equal(got.pixel_array, original.pixel_array)


def test_a_compressed_file_is_decompressed_for_a_destination_without_its_codec(tmp_path: Path) -> None:
    path = _file(tmp_path, 0, RLELossless)
    with Pacs([ExplicitVRLittleEndian]).running() as pacs:
        report = DimseSender(pacs.destination(), "AI-NODE", 10).send([path])
    assert report.sent == [path] and not report.failed
    original = pydicom.dcmread(path)
    ts, got = _received(pacs, str(original.SOPInstanceUID))
    assert ts == ExplicitVRLittleEndian
    assert np.array_equal(got.pixel_array, original.pixel_array)


def test_unreadable_files_and_refused_classes_fail_alone(tmp_path: Path) -> None:
    good = _file(tmp_path, 0)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not DICOM at all")
    mr = tmp_path / "mr.dcm"
    ds = pydicom.dcmread(_file(tmp_path, 1))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.save_as(mr, enforce_file_format=True)
    with Pacs([ExplicitVRLittleEndian]).running() as pacs:
        report = DimseSender(pacs.destination(), "AI-NODE", 10).send([junk, mr, good])
    assert report.sent == [good]
    assert report.failed[junk].startswith("unreadable: ")
    assert report.failed[mr] == "SOP class not accepted by the destination"
