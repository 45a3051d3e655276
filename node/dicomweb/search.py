"""QIDO-RS searches and WADO-RS look-ups on the catalog.

Keys the catalog indexes are matched in SQL (UID lists, Patient ID, Accession Number and Study Date
on indexed study columns, Modality and ModalitiesInStudy on the series' routing attributes); every
other key is matched in Python (:mod:`node.dicomweb.query`) while the rows stream from one ordered
query, which stops once the page is full. Everything runs in :meth:`Catalog.reading` (no write lock).
Received series and our result series (``Series.origin``) are served alike.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from contextlib import closing
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Select, exists, select

from node.catalog import Catalog
from node.dicomweb.attributes import DicomJson, json_values
from node.dicomweb.query import LEVEL_OF, Level, Matcher, Query, like_pattern, tag_of
from node.schema import Instance, Series, Study

_SCAN_CHUNK = 500


@dataclass
class Hit:
    """One matching study, series or instance: its UIDs, row ids and held attributes (flat DICOM JSON)."""

    study_id: int
    study_uid: str
    data: DicomJson
    series_id: int | None = None
    series_uid: str | None = None
    sop_uid: str | None = None


@dataclass(frozen=True)
class StoredInstance:
    """Where a WADO-RS retrieval reads one instance."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    path: str
    transfer_syntax_uid: str
    frames: int
    """Number of Frames (1 when the object has none); 0 for objects without pixel data."""


def _series_modality() -> ColumnElement[Any]:
    return Series.attributes["Modality"].as_string()


def _sql_condition(m: Matcher) -> tuple[ColumnElement[bool], bool] | None:
    """The SQL form of a matcher and whether it is exact (True) or only narrows the rows (False);
    None when it is matched in Python only."""
    column = {"StudyInstanceUID": Study.study_uid, "SeriesInstanceUID": Series.series_uid,
              "SOPInstanceUID": Instance.sop_instance_uid, "SOPClassUID": Instance.sop_class_uid}.get(m.keyword)
    if column is not None:
        return column.in_(m.values), True
    indexed = {"PatientID": Study.patient_id, "AccessionNumber": Study.accession_number}.get(m.keyword)
    if indexed is not None:
        if m.kind == "single":
            return indexed == m.values[0], True
        if m.kind == "wildcard":
            return indexed.like(like_pattern(m.pattern), escape="\\"), False
        return None
    if m.keyword == "PatientName" and m.kind in ("single", "wildcard"):
        return Study.patient_name.ilike(like_pattern(m.pattern or m.values[0]), escape="\\"), False
    if m.keyword == "StudyDate":
        eight = re.compile(r"[0-9]{8}")
        if m.kind == "single" and eight.fullmatch(m.values[0]):
            return Study.study_date == m.values[0], True
        if m.kind == "range" and all(eight.fullmatch(b) for b in (m.low, m.high) if b):
            cond = Study.study_date != ""
            if m.low:
                cond = cond & (Study.study_date >= m.low)
            if m.high:
                cond = cond & (Study.study_date <= m.high)
            return cond, True
        return None
    if m.keyword == "Modality" and m.kind == "list":
        return _series_modality().in_(m.values), True
    if m.keyword == "ModalitiesInStudy" and m.kind == "list":
        return exists(select(Series.id).where(Series.study_id == Study.id, _series_modality().in_(m.values))), True
    return None


def _flat(study_uid: str, study: DicomJson | None, series_uid: str | None = None, series: DicomJson | None = None,
          series_attributes: dict[str, Any] | None = None, sop_uid: str | None = None, sop_class: str | None = None,
          instance: DicomJson | None = None) -> DicomJson:
    data: DicomJson = {**(study or {}), tag_of("StudyInstanceUID"): {"vr": "UI", "Value": [study_uid]}}
    if series_uid is not None:
        data.update(series or {})
        modality = tag_of("Modality")
        if modality not in data and (series_attributes or {}).get("Modality"):  # a row older than Series.dicom
            data[modality] = {"vr": "CS", "Value": [str((series_attributes or {})["Modality"])]}
        data[tag_of("SeriesInstanceUID")] = {"vr": "UI", "Value": [series_uid]}
    if sop_uid is not None:
        data.update(instance or {})
        data[tag_of("SOPInstanceUID")] = {"vr": "UI", "Value": [sop_uid]}
        data[tag_of("SOPClassUID")] = {"vr": "UI", "Value": [sop_class]}
    return data


def _statement(query: Query, study_uid: str | None, series_uid: str | None) -> Select[Any]:
    if query.level == Level.STUDY:
        stmt: Select[Any] = select(Study.id, Study.study_uid, Study.dicom).order_by(
            Study.study_date.desc(), Study.id.desc())
    elif query.level == Level.SERIES:
        stmt = (select(Study.id, Study.study_uid, Study.dicom, Series.id, Series.series_uid, Series.dicom,
                       Series.attributes)
                .join(Study, Study.id == Series.study_id).order_by(Series.id))
    else:
        stmt = (select(Study.id, Study.study_uid, Study.dicom, Series.id, Series.series_uid, Series.dicom,
                       Series.attributes, Instance.sop_instance_uid, Instance.sop_class_uid, Instance.dicom)
                .join(Series, Series.id == Instance.series_id).join(Study, Study.id == Series.study_id)
                .order_by(Instance.id))
    if study_uid is not None:
        stmt = stmt.where(Study.study_uid == study_uid)
    if series_uid is not None:
        stmt = stmt.where(Series.series_uid == series_uid)
    return stmt


def _hit(level: Level, row: Any) -> Hit:
    if level == Level.STUDY:
        return Hit(row[0], row[1], _flat(row[1], row[2]))
    if level == Level.SERIES:
        return Hit(row[0], row[1], _flat(row[1], row[2], row[4], row[5], row[6]), row[3], row[4])
    return Hit(row[0], row[1], _flat(row[1], row[2], row[4], row[5], row[6], row[7], row[8], row[9]),
               row[3], row[4], row[7])


def search(catalog: Catalog, query: Query, *, study_uid: str | None = None,
           series_uid: str | None = None) -> tuple[list[Hit], bool]:
    """The page of matches (``query.offset``, ``query.limit``) and whether more follow it."""
    stmt = _statement(query, study_uid, series_uid)
    in_python: list[Matcher] = []
    for m in query.matchers:
        sql = _sql_condition(m)
        if sql is not None:
            stmt = stmt.where(sql[0])
        if sql is None or not sql[1]:
            in_python.append(m)
    want = query.limit + 1
    hits: list[Hit] = []
    with catalog.reading() as s:
        if not in_python:
            rows: Iterable[Any] = s.execute(stmt.offset(query.offset).limit(want))
            hits = [_hit(query.level, r) for r in rows]
        else:
            skipped = 0
            # PostgreSQL streams through a server-side cursor: closed when the page is full early
            with closing(s.execute(stmt.execution_options(yield_per=_SCAN_CHUNK))) as scan:
                for row in scan:
                    hit = _hit(query.level, row)
                    if not all(m.matches(json_values(hit.data.get(m.tag))) for m in in_python):
                        continue
                    if skipped < query.offset:
                        skipped += 1
                        continue
                    hits.append(hit)
                    if len(hits) >= want:
                        break
    return hits[:query.limit], len(hits) > query.limit


def add_derived(catalog: Catalog, hits: list[Hit]) -> None:
    """Fill ModalitiesInStudy, NumberOfStudyRelatedSeries/Instances and NumberOfSeriesRelatedInstances
    (result series included) into the hits' data, for the studies and series of this page only."""
    study_ids = sorted({h.study_id for h in hits})
    series_ids = sorted({h.series_id for h in hits if h.series_id is not None})
    if not study_ids:
        return
    per_study: dict[int, tuple[set[str], int, int]] = {}
    per_series: dict[int, int] = {}
    with catalog.reading() as s:
        for sid, modality, n in s.execute(select(Series.study_id, _series_modality(), Series.instance_count)
                                          .where(Series.study_id.in_(study_ids))):
            mods, n_series, n_inst = per_study.get(sid, (set(), 0, 0))
            if modality:
                mods.add(str(modality))
            per_study[sid] = (mods, n_series + 1, n_inst + int(n or 0))
        if series_ids:
            per_series = {sid: int(n) for sid, n in s.execute(
                select(Series.id, Series.instance_count).where(Series.id.in_(series_ids)))}
    for h in hits:
        mods, n_series, n_inst = per_study.get(h.study_id, (set(), 0, 0))
        h.data[tag_of("ModalitiesInStudy")] = {"vr": "CS", "Value": sorted(mods)} if mods else {"vr": "CS"}
        h.data[tag_of("NumberOfStudyRelatedSeries")] = {"vr": "IS", "Value": [n_series]}
        h.data[tag_of("NumberOfStudyRelatedInstances")] = {"vr": "IS", "Value": [n_inst]}
        if h.series_id is not None:
            h.data[tag_of("NumberOfSeriesRelatedInstances")] = {"vr": "IS", "Value": [per_series.get(h.series_id, 0)]}


def to_dicom_json(hit: Hit, keywords: list[str], base_url: str) -> DicomJson:
    """The response data set of one hit: ``keywords`` it holds (empty when it holds none of a known
    attribute), RetrieveURL and InstanceAvailability; keys in tag order."""
    from pydicom.datadict import dictionary_VR

    retrieve = f"{base_url}/studies/{hit.study_uid}"
    if hit.series_uid is not None:
        retrieve += f"/series/{hit.series_uid}"
    if hit.sop_uid is not None:
        retrieve += f"/instances/{hit.sop_uid}"
    out: DicomJson = {}
    for kw in keywords:
        tag = tag_of(kw)
        if kw == "RetrieveURL":
            out[tag] = {"vr": "UR", "Value": [retrieve]}
        elif kw == "InstanceAvailability":
            out[tag] = {"vr": "CS", "Value": ["ONLINE"]}
        elif tag in hit.data:
            out[tag] = hit.data[tag]
        elif kw in LEVEL_OF:
            out[tag] = {"vr": str(dictionary_VR(kw))}
    return dict(sorted(out.items()))


def stored_instances(catalog: Catalog, study_uid: str, series_uid: str | None = None,
                     sop_uid: str | None = None) -> list[StoredInstance]:
    """The instances of a study, series or one instance, in series then instance order ([] if unknown)."""
    stmt = (select(Study.study_uid, Series.series_uid, Instance.sop_instance_uid, Instance.sop_class_uid,
                   Instance.path, Instance.transfer_syntax_uid, Instance.dicom)
            .join(Series, Series.id == Instance.series_id).join(Study, Study.id == Series.study_id)
            .where(Study.study_uid == study_uid).order_by(Series.id, Instance.id))
    if series_uid is not None:
        stmt = stmt.where(Series.series_uid == series_uid)
    if sop_uid is not None:
        stmt = stmt.where(Instance.sop_instance_uid == sop_uid)
    out = []
    with catalog.reading() as s:
        for st, se, sop, cls, path, ts, dicom in s.execute(stmt):
            frames_v = json_values((dicom or {}).get(tag_of("NumberOfFrames")))
            rows_v = json_values((dicom or {}).get(tag_of("Rows")))
            frames = int(frames_v[0]) if frames_v and frames_v[0].isdigit() else (1 if rows_v else 0)
            out.append(StoredInstance(st, se, sop, cls, path, ts, frames))
    return out

