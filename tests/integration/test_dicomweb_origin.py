"""The node as a DICOMweb origin: QIDO-RS and WADO-RS on a real HttpServer (loopback, port 0) over a
real Receiver, Catalog and Spool, driven by the real ``dicomweb-client``. The real JPEG 2000 CT
(tests/data/ct-real-20) arrives by STOW-RS, a small uncompressed study of another patient by the
C-STORE door (``Receiver.receive``), and a result set of ct-lung-nodules (SEG, SR, key images, PDF)
is recorded through ``Catalog.record_results`` as a worker does."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom.dataset import Dataset

from models import registry
from models.base import ModelResult, Segment
from node.catalog import Catalog, JobSpec
from node.config import parse_settings
from node.http.app import create_app
from node.http.auth import issue_token
from node.http.context import NodeContext
from node.http.server import HttpServer
from node.receive.scp import Receiver
from node.schema import StudyState
from node.spool import Spool
from tests.dsfactory import ct_slice, encode
from tests.httpkit import bearer
from tests.unit.encode_helpers import SCT_ANATOMICAL_STRUCTURE, SCT_BODY, box, load_ct_real_20
from workers.load import volume_from_datasets
from workers.outputs import encode_results
from workers.pipeline import result_file

REAL_CT = Path(__file__).resolve().parents[1] / "data" / "ct-real-20"
FILES = sorted(p for p in REAL_CT.iterdir() if p.is_file())
J2K = "1.2.840.10008.1.2.4.90"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
OTHER_STUDY = "1.2.826.0.1.3680043.8.498.4242"


@dataclass
class Origin:
    server: HttpServer
    client: DICOMwebClient
    catalog: Catalog
    spool: Spool
    study: str
    series: str
    results: dict[str, Dataset]
    """Modality of each result object (the LABELMAP SEG/SR under SEG-LABELMAP/SR-LABELMAP) -> dataset."""

    viewer: dict[str, str]
    """The Authorization header of a viewer token (the client's)."""

    @property
    def base(self) -> str:
        return self.server.url + "/dicom-web"

    def get(self, url: str, *, headers: dict[str, str] | None = None, **kw: Any) -> httpx.Response:
        """httpx.get with the viewer's token."""
        return httpx.get(url, headers={**self.viewer, **(headers or {})}, **kw)


def _other_study(receiver: Receiver) -> None:
    """Three uncompressed slices of another patient, an earlier date, an MR series."""
    for i in range(3):
        ds = ct_slice(OTHER_STUDY, OTHER_STUDY + ".1", f"{OTHER_STUDY}.1.{i + 1}", z=float(i), rows=8, cols=8)
        ds.PatientName, ds.PatientID, ds.StudyDate, ds.StudyTime = "Other^Person", "P-OTHER", "20200115", "101500"
        ds.AccessionNumber, ds.InstanceNumber = "ACC-2", i + 1
        ds.PixelData = (np.arange(64, dtype=np.int16).reshape(8, 8) * (i + 1)).tobytes()
        ds.WindowCenter, ds.WindowWidth = 40, 80
        assert receiver.receive(encode(ds), "MODALITY").status == 0


def _record_results(catalog: Catalog, spool: Spool, study: str) -> dict[str, Dataset]:
    """Encode a ct-lung-nodules result on the real CT and record it as the worker does."""
    [row] = [s for s in catalog.studies_in_state(StudyState.READY) if s.study_uid == study]
    [series] = catalog.series_of_study(row.id)
    [job_id] = catalog.create_jobs(row.id, row.generation, [JobSpec(series.id, "ct-lung-nodules", "r", ("pacs",))],
                                   2000.0)
    sources = load_ct_real_20()
    shape = (len(sources), int(sources[0].Rows), int(sources[0].Columns))
    result = ModelResult("ct-lung-nodules", "9.9", (
        Segment("Nodule 1", SCT_ANATOMICAL_STRUCTURE, SCT_BODY, box(shape, (2, 100, 100), (6, 130, 140))),))
    volume, ordered = volume_from_datasets(sources)
    encoded = encode_results(registry.load("ct-lung-nodules"), ordered, volume, result, software_version="test")
    files, out = [], {}
    for item in encoded:
        buf = io.BytesIO()
        item.dataset.save_as(buf, enforce_file_format=True)
        rel = spool.result_relpath(study, str(item.dataset.SOPInstanceUID))
        spool.write(rel, buf.getvalue(), replace=True)
        files.append(result_file(item.dataset, rel, buf.getvalue(), item.variant))
        name = str(item.dataset.Modality) + ("-LABELMAP" if item.variant == "labelmap" else "")
        out[name] = pydicom.dcmread(spool.path(rel))
    catalog.record_results(job_id, files, ["pacs"], 2001.0)
    return out


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Origin]:
    storage = tmp_path_factory.mktemp("origin")
    settings = parse_settings({"node": {"storage_dir": str(storage), "min_free_mb": 0}, "http": {"port": 0}})
    catalog, spool = Catalog.for_storage(storage), Spool(storage)
    receiver = Receiver(settings, catalog, spool, clock=lambda: 1000.0)
    server = HttpServer(create_app(NodeContext(settings, catalog, spool, receiver, lambda: 1000.0, lambda: True)),
                        "127.0.0.1", 0)
    server.start()
    try:
        viewer = bearer(issue_token(catalog, "viewer"))  # QIDO-RS and WADO-RS
        client = DICOMwebClient(server.url + "/dicom-web", headers=viewer)
        sender = DICOMwebClient(server.url + "/dicom-web", headers=bearer(issue_token(catalog, "sender")))
        first = pydicom.dcmread(FILES[0])
        sender.store_instances([pydicom.dcmread(p) for p in FILES])  # STOW-RS
        _other_study(receiver)
        catalog.mark_quiet_studies_ready(1500.0)
        results = _record_results(catalog, spool, str(first.StudyInstanceUID))
        yield Origin(server, client, catalog, spool, str(first.StudyInstanceUID), str(first.SeriesInstanceUID),
                     results, viewer)
    finally:
        server.stop()


def _uids(found: list[dict[str, dict[str, list[str]]]], tag: str) -> list[str]:
    return [str(d[tag]["Value"][0]) for d in found]


# ---- QIDO-RS --------------------------------------------------------------------------------------
def test_search_for_studies(origin: Origin) -> None:
    c = origin.client
    [study] = c.search_for_studies(search_filters={"PatientID": "TSCT001"})
    assert study["0020000D"]["Value"] == [origin.study]
    assert study["00100010"]["Value"] == [{"Alphabetic": "TS^EXAMPLE"}] and study["00080050"]["Value"] == ["TS1"]
    assert set(study["00080061"]["Value"]) == {"CT", "SEG", "SR", "OT", "DOC"}  # results are in the study
    # 20 CT slices and 4 result objects: the LABELMAP SEG and the SR citing it are not served
    assert study["00201206"]["Value"] == [5] and study["00201208"]["Value"] == [20 + 4]
    assert study["00081190"]["Value"] == [f"{origin.base}/studies/{origin.study}"]
    assert _uids(c.search_for_studies(search_filters={"StudyDate": "20221201-20221231"}), "0020000D") == [origin.study]
    assert _uids(c.search_for_studies(search_filters={"StudyDate": "-20211231"}), "0020000D") == [OTHER_STUDY]
    assert len(c.search_for_studies(search_filters={"StudyDate": "20200101-"})) == 2
    assert _uids(c.search_for_studies(search_filters={"ModalitiesInStudy": "SEG"}), "0020000D") == [origin.study]
    assert _uids(c.search_for_studies(search_filters={"00100010": "other*"}), "0020000D") == [OTHER_STUDY]
    assert c.search_for_studies(search_filters={"PatientID": "NOBODY"}) == []
    assert len(c.search_for_studies(search_filters={"StudyInstanceUID": f"{origin.study},{OTHER_STUDY}"})) == 2
    page = c.search_for_studies(limit=1, offset=1)
    assert _uids(page, "0020000D") == [OTHER_STUDY]  # newest study first
    [with_fields] = c.search_for_studies(search_filters={"AccessionNumber": "ACC-2"}, fields=["00081030"])
    assert "00081030" in with_fields


def test_search_for_series_and_instances(origin: Origin) -> None:
    c = origin.client
    series = c.search_for_series(origin.study)
    by_modality = {s["00080060"]["Value"][0]: s for s in series}
    assert set(by_modality) == {"CT", "SEG", "SR", "OT", "DOC"}
    assert by_modality["SEG"]["00200011"]["Value"] == [900]
    assert by_modality["SEG"]["0008103E"]["Value"] == ["AI SEG ct-lung-nodules"]
    assert by_modality["SEG"]["00201209"]["Value"] == [1]  # the BINARY copy; the LABELMAP SEG is not served
    assert _uids(c.search_for_series(search_filters={"Modality": "SEG"}), "0020000E") == [
        str(origin.results["SEG"].SeriesInstanceUID)]
    instances = c.search_for_instances(origin.study, origin.series)
    assert len(instances) == 20 and {i["00080016"]["Value"][0] for i in instances} == {"1.2.840.10008.5.1.4.1.1.2"}
    assert instances[0]["00280010"]["Value"] == [512]
    pdf = c.search_for_instances(origin.study, search_filters={"SOPClassUID": "1.2.840.10008.5.1.4.1.1.104.1"})
    assert _uids(pdf, "00080018") == [str(origin.results["DOC"].SOPInstanceUID)]
    assert len(c.search_for_instances(search_filters={"PatientID": "P-OTHER", "InstanceNumber": "2"})) == 1


def test_query_errors_and_warnings(origin: Origin) -> None:
    r = origin.get(f"{origin.base}/studies", params={"NoSuchAttribute": "x"})
    assert r.status_code == 400 and r.headers["content-type"] == "application/problem+json"
    assert origin.get(f"{origin.base}/studies", params={"Rows": "512"}).status_code == 400  # instance-level key
    r = origin.get(f"{origin.base}/studies", params={"PatientID": "TSCT001", "fuzzymatching": "true"})
    assert r.status_code == 200 and "fuzzymatching" in r.headers["warning"]
    r = origin.get(f"{origin.base}/studies", params={"limit": "1"})
    assert len(r.json()) == 1 and "additional results" in r.headers["warning"]
    r = origin.get(f"{origin.base}/studies", params={"PatientID": "NOBODY"})
    assert r.status_code == 200 and r.json() == [] and r.headers["content-type"] == "application/dicom+json"


# ---- WADO-RS --------------------------------------------------------------------------------------
def test_retrieve_compressed_instance_as_stored_and_transcoded(origin: Origin) -> None:
    c, original = origin.client, pydicom.dcmread(FILES[0])
    sop = str(original.SOPInstanceUID)
    got = c.retrieve_instance(origin.study, origin.series, sop)
    assert got.file_meta.TransferSyntaxUID == J2K and got == original
    plain = c.retrieve_instance(origin.study, origin.series, sop, media_types=(("application/dicom", EXPLICIT_LE),))
    assert plain.file_meta.TransferSyntaxUID == EXPLICIT_LE
    assert np.array_equal(plain.pixel_array, original.pixel_array)
    jpeg_baseline = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50'
    r = origin.get(f"{origin.base}/studies/{origin.study}/series/{origin.series}/instances/{sop}",
                  headers={"Accept": jpeg_baseline})
    assert r.status_code == 406 and r.headers["content-type"] == "application/problem+json"


def test_retrieve_series_study_and_metadata(origin: Origin) -> None:
    c = origin.client
    series = c.retrieve_series(origin.study, origin.series)
    assert sorted(str(d.SOPInstanceUID) for d in series) == sorted(p.name[3:] for p in FILES)
    metadata = c.retrieve_study_metadata(origin.study)
    assert len(metadata) == 20 + 4  # CT slices and every result object but the LABELMAP set
    ct = next(m for m in metadata if m["00080018"]["Value"][0] == FILES[0].name[3:])
    assert ct["7FE00010"]["BulkDataURI"].endswith("/bulkdata/7FE00010")
    inline = re.findall(r'"InlineBinary": "([^"]*)"', json.dumps(metadata))
    assert max(map(len, inline)) <= 4 * 1024 // 3 + 4  # no bulk data inline (small private values may be)
    assert ct["00083002"]["Value"] == [J2K] and ct["00100020"]["Value"] == ["TSCT001"]
    study = c.retrieve_study(origin.study)
    assert len(study) == 20 + 4


def test_frames(origin: Origin) -> None:
    c, original = origin.client, pydicom.dcmread(FILES[3])
    sop = str(original.SOPInstanceUID)
    [frame] = c.retrieve_instance_frames(origin.study, origin.series, sop, frame_numbers=[1])
    assert frame == original.pixel_array.astype("<u2").tobytes()
    url = f"{origin.base}/studies/{origin.study}/series/{origin.series}/instances/{sop}/frames/2"
    assert origin.get(url).status_code == 404
    seg = origin.results["SEG"]  # BINARY: 1 bit per pixel, frames packed
    [seg_frame] = c.retrieve_instance_frames(origin.study, str(seg.SeriesInstanceUID), str(seg.SOPInstanceUID),
                                             frame_numbers=[int(seg.NumberOfFrames)])
    assert len(seg_frame) == (int(seg.Rows) * int(seg.Columns) + 7) // 8
    seg_meta = c.retrieve_instance_metadata(origin.study, str(seg.SeriesInstanceUID), str(seg.SOPInstanceUID))
    assert c.retrieve_bulkdata(seg_meta["7FE00010"]["BulkDataURI"]) == [seg.PixelData]  # native: as stored
    ct_meta = c.retrieve_instance_metadata(origin.study, origin.series, sop)
    assert c.retrieve_bulkdata(ct_meta["7FE00010"]["BulkDataURI"]) == [frame]  # JPEG 2000: decoded


def test_rendered(origin: Origin) -> None:
    c, original = origin.client, pydicom.dcmread(FILES[0])
    sop = str(original.SOPInstanceUID)
    jpeg = Image.open(io.BytesIO(c.retrieve_instance_rendered(origin.study, origin.series, sop)))
    assert jpeg.format == "JPEG" and jpeg.size == (512, 512) and jpeg.mode == "L"
    png = Image.open(io.BytesIO(c.retrieve_instance_rendered(origin.study, origin.series, sop,
                                                             media_types=("image/png",),
                                                             params={"viewport": "128,64"})))
    assert png.format == "PNG" and png.size == (64, 64)
    url = f"{origin.base}/studies/{origin.study}/series/{origin.series}/instances/{sop}"
    narrow = np.asarray(Image.open(io.BytesIO(origin.get(f"{url}/rendered", params={"window": "0,1"},
                                                        headers={"Accept": "image/png"}).content)))
    assert set(np.unique(narrow)) <= {0, 255}  # a 1 HU window is a threshold
    assert origin.get(f"{url}/frames/1/rendered").headers["content-type"] == "image/jpeg"
    assert origin.get(f"{url}/rendered", headers={"Accept": "image/gif"}).status_code == 406


def test_unknown_uids_are_404(origin: Origin) -> None:
    for path in ("/studies/1.2.3.4", f"/studies/{origin.study}/series/1.2.3/metadata",
                 f"/studies/{origin.study}/series/{origin.series}/instances/1.2.3/rendered"):
        r = origin.get(origin.base + path)
        assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json", path


# ---- our results, served --------------------------------------------------------------------------
def test_result_objects_are_found_and_retrieved(origin: Origin) -> None:
    c, seg = origin.client, origin.results["SEG"]
    found = c.search_for_instances(origin.study, str(seg.SeriesInstanceUID))
    assert _uids(found, "00080018") == [str(seg.SOPInstanceUID)]  # the BINARY copy every viewer opens
    labelmap = origin.results["SEG-LABELMAP"]
    r = origin.get(f"{origin.base}/studies/{origin.study}/series/{labelmap.SeriesInstanceUID}/instances/"
                  f"{labelmap.SOPInstanceUID}")
    assert r.status_code == 404
    got = c.retrieve_instance(origin.study, str(seg.SeriesInstanceUID), str(seg.SOPInstanceUID))
    assert got == seg
    sr = origin.results["SR"]
    meta = c.retrieve_instance_metadata(origin.study, str(sr.SeriesInstanceUID), str(sr.SOPInstanceUID))
    assert "0040A730" in meta  # the SR content tree is metadata, not bulk data
    key = origin.results["OT"]
    rendered = c.retrieve_instance_rendered(origin.study, str(key.SeriesInstanceUID), str(key.SOPInstanceUID))
    assert Image.open(io.BytesIO(rendered)).mode == "RGB"
    doc = origin.results["DOC"]
    pdf_url = f"{origin.base}/studies/{origin.study}/series/{doc.SeriesInstanceUID}/instances/{doc.SOPInstanceUID}"
    r = origin.get(f"{pdf_url}/rendered")
    assert r.headers["content-type"] == "application/pdf" and r.content.startswith(b"%PDF")
    meta = c.retrieve_instance_metadata(origin.study, str(doc.SeriesInstanceUID), str(doc.SOPInstanceUID))
    bulk = meta["00420011"]["BulkDataURI"]
    assert origin.get(bulk, headers={"Accept": "application/pdf"}).content.startswith(b"%PDF")


def test_the_origin_needs_a_token_of_the_right_role(origin: Origin) -> None:
    anonymous = DICOMwebClient(origin.base)
    with pytest.raises(requests.HTTPError) as refused:
        anonymous.search_for_studies()
    assert refused.value.response.status_code == 401
    assert refused.value.response.headers["WWW-Authenticate"].startswith("Bearer")
    with pytest.raises(requests.HTTPError) as refused:  # a viewer cannot store
        origin.client.store_instances([pydicom.dcmread(FILES[0])])
    assert refused.value.response.status_code == 403


def test_results_leave_receive_bookkeeping_and_routing_alone(origin: Origin) -> None:
    [study] = [s for s in origin.catalog.studies_in_state(StudyState.ROUTED) if s.study_uid == origin.study]
    assert study.instance_count == 20 and study.generation == 1 and study.last_received_at == 1000.0
    assert [s.series_uid for s in origin.catalog.series_of_study(study.id)] == [origin.series]
    assert origin.catalog.counts()["instances"]["total"] == 20 + 3
