"""What the catalog keeps for the DICOMweb origin: query attributes at receive time, result objects
served as instances of their own series (without touching receive bookkeeping or routing), and the
QIDO-RS search over it (SQL and Python matching, paging)."""

from __future__ import annotations

import random

import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from sqlalchemy import inspect, text

from node.catalog import Catalog, JobSpec, ResultFile
from node.dicomweb.attributes import IndexedAttributes, indexed_attributes, json_text
from node.dicomweb.query import Level, parse_query
from node.dicomweb.search import add_derived, search, stored_instances
from node.schema import Instance, Job, Series, SeriesOrigin, Study, StudyState

CT = "1.2.840.10008.5.1.4.1.1.2"
SEG = "1.2.840.10008.5.1.4.1.1.66.4"



def _ds(**values: object) -> Dataset:
    ds = Dataset()
    for k, v in values.items():
        setattr(ds, k, v)
    return ds


def _add(catalog: Catalog, study: str, series: str, sop: str, now: float = 1.0, **values: object) -> None:
    ds = _ds(**{"PatientID": "P1", "PatientName": "Doe^Jane", "StudyDate": "20240110", "AccessionNumber": "A1",
                "Modality": "CT", "SeriesNumber": 1, "InstanceNumber": 1, "Rows": 4, "Columns": 4, **values})
    catalog.record_instance(study_uid=study, series_uid=series, sop_instance_uid=sop, sop_class_uid=CT,
                            transfer_syntax_uid="1.2.840.10008.1.2.1", path=f"instances/{sop}.dcm", size=10,
                            series_attributes={"Modality": str(ds.Modality)}, now=now, indexed=indexed_attributes(ds),
                            patient_key="key", study_datetime=str(ds.StudyDate))


def _routed_job(catalog: Catalog, study_uid: str) -> int:
    catalog.mark_quiet_studies_ready(100.0)
    [study] = [s for s in catalog.studies_in_state(StudyState.READY) if s.study_uid == study_uid]
    [series] = catalog.series_of_study(study.id)
    [job] = catalog.create_jobs(study.id, study.generation, [JobSpec(series.id, "m", "r", ("pacs",))], 101.0)
    return job


def _seg(sop: str, series: str = "9.9.1", number: int = 900, frames: int = 2) -> ResultFile:
    ds = _ds(Modality="SEG", SeriesNumber=number, SeriesDescription="AI SEG m", InstanceNumber=1, Rows=4,
             Columns=4, NumberOfFrames=frames)
    return ResultFile("SEG", sop, SEG, f"results/1.2.1/{sop}.dcm", series_uid=series,
                      transfer_syntax_uid="1.2.840.10008.1.2.1", size=100, indexed=indexed_attributes(ds))


def test_receive_keeps_the_query_attributes(catalog: Catalog) -> None:
    _add(catalog, "1.2.1", "1.2.1.1", "1.2.1.1.1", StudyDescription="CHEST", SeriesDescription="AX")
    _add(catalog, "1.2.1", "1.2.1.1", "1.2.1.1.2", StudyDescription="ignored: the first instance's is kept")
    with catalog.session() as s:
        study = s.query(Study).one()
        series = s.query(Series).one()
        instance = s.query(Instance).order_by(Instance.id).first()
        assert (study.patient_id, study.patient_name, study.study_date, study.accession_number) == (
            "P1", "Doe^Jane", "20240110", "A1")
        assert json_text(study.dicom, "00081030") == "CHEST" and json_text(series.dicom, "0008103E") == "AX"
        assert series.origin == SeriesOrigin.RECEIVED
        assert instance is not None and json_text(instance.dicom, "00280010") == "4"


def test_results_are_served_without_touching_receive_bookkeeping(catalog: Catalog) -> None:
    _add(catalog, "1.2.1", "1.2.1.1", "1.2.1.1.1")
    job = _routed_job(catalog, "1.2.1")
    before = catalog.studies_in_state(StudyState.ROUTED)[0]
    catalog.record_results(job, [_seg("9.9.1.1"), ("SR", "9.9.2.1", "1.2.840.10008.5.1.4.1.1.88.34", "r/2.dcm")],
                           ["pacs"], 200.0)
    [after] = catalog.studies_in_state(StudyState.ROUTED)
    assert (after.instance_count, after.generation, after.last_received_at) == (
        before.instance_count, before.generation, before.last_received_at)
    assert [s.series_uid for s in catalog.series_of_study(after.id)] == ["1.2.1.1"]  # routing sees no results
    assert catalog.counts()["instances"]["total"] == 1 and catalog.counts()["results"]["total"] == 2
    [served] = stored_instances(catalog, "1.2.1", "9.9.1")  # the SR tuple has no series UID: sent, not served
    assert (served.sop_uid, served.path, served.frames) == ("9.9.1.1", "results/1.2.1/9.9.1.1.dcm", 2)
    with catalog.session() as s:
        series = s.query(Series).filter_by(series_uid="9.9.1").one()
        assert series.origin == SeriesOrigin.RESULT and series.instance_count == 1 and series.study_id == after.id


def test_a_rerun_updates_the_same_uids_and_adds_new_ones(catalog: Catalog) -> None:
    _add(catalog, "1.2.1", "1.2.1.1", "1.2.1.1.1")
    job = _routed_job(catalog, "1.2.1")
    catalog.record_results(job, [_seg("9.9.1.1")], ["pacs"], 200.0)
    catalog.record_results(job, [_seg("9.9.1.1", frames=3)._replace(size=222)], ["pacs"], 300.0)  # same UIDs
    catalog.record_results(job, [_seg("9.9.3.1", series="9.9.3")], ["pacs"], 400.0)  # a rerun with new UIDs
    with catalog.session() as s:
        rows = {i.sop_instance_uid: i for i in s.query(Instance).join(Series).filter(
            Series.origin == SeriesOrigin.RESULT)}
        assert set(rows) == {"9.9.1.1", "9.9.3.1"}
        assert rows["9.9.1.1"].size == 222 and rows["9.9.1.1"].received_at == 300.0
        assert json_text(rows["9.9.1.1"].dicom, "00280008") == "3"
        assert s.query(Series).filter_by(series_uid="9.9.1").one().instance_count == 1


def test_a_result_uid_the_pacs_sent_back_stays_received(catalog: Catalog) -> None:
    _add(catalog, "1.2.1", "1.2.1.1", "1.2.1.1.1")
    job = _routed_job(catalog, "1.2.1")
    _add(catalog, "1.2.1", "9.9.1", "9.9.1.1", now=150.0, Modality="SEG")  # our SEG came back by C-STORE first
    catalog.record_results(job, [_seg("9.9.1.1")], ["pacs"], 200.0)
    with catalog.session() as s:
        assert s.query(Series).filter_by(series_uid="9.9.1").one().origin == SeriesOrigin.RECEIVED
        assert s.query(Instance).filter_by(sop_instance_uid="9.9.1.1").one().path == "instances/9.9.1.1.dcm"


def test_a_result_series_is_never_a_prior(catalog: Catalog) -> None:
    """A registered prior (a CT result series) in an earlier study must not be taken as that study's CT."""
    _add(catalog, "1.2.1", "1.2.1.1", "1.2.1.1.1", StudyDate="20230101")
    job = _routed_job(catalog, "1.2.1")
    big = [_seg(f"9.9.5.{i}", series="9.9.5")._replace(kind="CT", sop_class_uid=CT) for i in range(1, 6)]
    catalog.record_results(job, big, [], 200.0)
    _add(catalog, "1.2.2", "1.2.2.1", "1.2.2.1.1", now=300.0, StudyDate="20240101")
    [current] = [s for s in catalog.studies_in_state(StudyState.RECEIVING) if s.study_uid == "1.2.2"]
    [series] = catalog.series_of_study(current.id)
    prior = catalog.prior_series(Job(study_id=current.id, series_id=series.id))
    assert prior is not None and prior.series_uid == "1.2.1.1"


def _many_studies(catalog: Catalog, n: int) -> list[tuple[str, str, str, str]]:
    """n studies (one series, one instance each) written in one transaction; (uid, patient, date, modality)."""
    rng = random.Random(7)
    made = []
    with catalog.session() as s:
        for i in range(n):
            uid, pid = f"1.2.9.{i}", f"P{rng.randrange(20)}"
            date = f"2024{rng.randrange(1, 13):02d}{rng.randrange(1, 28):02d}"
            modality = rng.choice(["CT", "MR", "SEG"])
            ds = _ds(PatientID=pid, PatientName=f"Name^{pid}", StudyDate=date, StudyDescription=f"D{i % 7}",
                     Modality=modality)
            attrs = indexed_attributes(ds)
            study = Study(study_uid=uid, first_received_at=0, last_received_at=0, patient_id=pid, study_date=date,
                          patient_name=f"Name^{pid}", dicom=attrs.study)
            s.add(study)
            s.flush()
            series = Series(series_uid=uid + ".1", study_id=study.id, attributes={"Modality": modality},
                            dicom=attrs.series, instance_count=1)
            s.add(series)
            s.flush()
            s.add(Instance(sop_instance_uid=uid + ".1.1", sop_class_uid=CT, series_id=series.id, path="x", size=1,
                           transfer_syntax_uid="1.2.840.10008.1.2.1", received_at=0, dicom=attrs.instance))
            made.append((uid, pid, date, modality))
    return made


def _all_pages(catalog: Catalog, items: list[tuple[str, str]], page: int) -> list[str]:
    out: list[str] = []
    while True:
        q = parse_query(Level.STUDY, [*items, ("limit", str(page)), ("offset", str(len(out)))])
        hits, more = search(catalog, q)
        out += [h.study_uid for h in hits]
        if not more:
            assert len(hits) <= page
            return out


@pytest.mark.parametrize("items, expected", [
    ([("PatientID", "P3")], lambda p, d, m, i: p == "P3"),  # SQL, exact: paged in SQL
    ([("PatientID", "P1*")], lambda p, d, m, i: p.startswith("P1")),  # SQL narrows, Python decides
    ([("StudyDate", "20240301-20240630")], lambda p, d, m, i: "20240301" <= d <= "20240630"),
    ([("ModalitiesInStudy", "SEG,MR")], lambda p, d, m, i: m in ("SEG", "MR")),
    ([("StudyDescription", "D3"), ("StudyDate", "-20240615")], lambda p, d, m, i: i % 7 == 3 and d <= "20240615"),
    ([("PatientName", "name^p1?")], lambda p, d, m, i: len(p) == 3 and p.startswith("P1")),
])
def test_search_pages_agree_with_brute_force(catalog: Catalog, items: list[tuple[str, str]], expected: object) -> None:
    made = _many_studies(catalog, 150)
    assert callable(expected)
    want = {uid for i, (uid, p, d, m) in enumerate(made) if expected(p, d, m, i)}
    assert want, "the data should match something"
    got = _all_pages(catalog, items, page=7)
    assert len(got) == len(set(got)) and set(got) == want
    dates = {uid: d for uid, _, d, _ in made}
    assert [dates[u] for u in got] == sorted((dates[u] for u in got), reverse=True)  # newest first


def test_derived_attributes_count_result_series(catalog: Catalog) -> None:
    _add(catalog, "1.2.1", "1.2.1.1", "1.2.1.1.1")
    _add(catalog, "1.2.1", "1.2.1.1", "1.2.1.1.2")
    job = _routed_job(catalog, "1.2.1")
    catalog.record_results(job, [_seg("9.9.1.1")], [], 200.0)
    hits, more = search(catalog, parse_query(Level.STUDY, [("ModalitiesInStudy", "SEG")]))
    add_derived(catalog, hits)
    [hit] = hits
    assert not more and hit.data["00080061"]["Value"] == ["CT", "SEG"]
    assert hit.data["00201206"]["Value"] == [2] and hit.data["00201208"]["Value"] == [3]
    series, _ = search(catalog, parse_query(Level.SERIES, [("Modality", "SEG")]), study_uid="1.2.1")
    assert [h.series_uid for h in series] == ["9.9.1"]


def test_study_columns_are_indexed(catalog: Catalog) -> None:
    indexes = {ix["name"] for ix in inspect(catalog.engine).get_indexes("studies")}
    assert {f"ix_studies_{c}" for c in ("patient_id", "study_date", "accession_number")} <= indexes
    if catalog.engine.dialect.name != "sqlite":
        return  # PostgreSQL's planner scans a near-empty table whatever its indexes
    with catalog.reading() as s:
        for column in ("patient_id", "study_date", "accession_number"):
            plan = " ".join(str(r[-1]) for r in s.execute(
                text(f"EXPLAIN QUERY PLAN SELECT id FROM studies WHERE {column} = 'x'")))
            assert f"ix_studies_{column}" in plan, plan


def test_reading_takes_no_write_lock(catalog: Catalog) -> None:
    _add(catalog, "1.2.1", "1.2.1.1", "1.2.1.1.1")
    with catalog.reading() as s:
        assert s.query(Study).count() == 1
        _add(catalog, "1.2.2", "1.2.2.1", "1.2.2.1.1")  # a writer commits while the read is open
    assert len(catalog.studies_in_state(StudyState.RECEIVING)) == 2


def test_indexed_attributes_skip_values_that_cannot_be_converted() -> None:
    ds = _ds(PatientID="P1", Modality="CT")
    ds[0x00200013] = RawDataElement(Tag(0x00200013), "IS", 12, b"not-a-number", 0, False, True)  # as read
    with pytest.warns(UserWarning):  # pydicom says so
        attrs = indexed_attributes(ds)
    assert isinstance(attrs, IndexedAttributes) and json_text(attrs.study, "00100020") == "P1"
    assert "00200013" not in attrs.instance
