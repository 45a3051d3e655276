"""Recording a received instance in the catalog: the C-STORE and STOW-RS hot path of
:meth:`node.catalog.Catalog.record_instance`, one item of a group commit's transaction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.orm import Session

from node.dicomweb.attributes import IndexedAttributes, study_columns
from node.schema import Instance, Series, Study, StudyState


@dataclass(frozen=True)
class Recorded:
    """What ``Catalog.record_instance`` did."""

    new: bool
    """False: this SOP Instance was already recorded (a duplicate)."""
    study_id: int
    study_event: str | None = None
    """"new" for a study's first instance, "reopened" when a late instance re-opens a routed study."""


class NewInstance(NamedTuple):
    """What :meth:`Catalog.record_instance` records (one item of a group commit)."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: str
    size: int
    series_attributes: dict[str, Any]
    now: float
    patient_key: str | None
    study_datetime: str
    indexed: IndexedAttributes | None


_OPEN_SERIES = (
    select(Study.id, Study.dicom.is_(None), Series.id, Series.dicom.is_(None))
    .join(Series, Series.study_id == Study.id)
    .where(Study.study_uid == bindparam("study_uid"), Study.state == StudyState.RECEIVING,
           Series.series_uid == bindparam("series_uid"))
    .with_for_update(of=Study)
)
_STUDIES, _SERIES = Study.metadata.tables["studies"], Study.metadata.tables["series"]
_COUNT_IN_STUDY = (update(_STUDIES).where(_STUDIES.c.id == bindparam("row"))
                   .values(last_received_at=bindparam("now"), instance_count=_STUDIES.c.instance_count + 1))
_COUNT_IN_SERIES = (update(_SERIES).where(_SERIES.c.id == bindparam("row"))
                    .values(instance_count=_SERIES.c.instance_count + 1))
_ADD_INSTANCE = insert(Study.metadata.tables["instances"])
"""Statements of :func:`record` for the common case, built once (the C-STORE hot path)."""


def record(s: Session, item: NewInstance, *, fast: bool) -> Recorded:
    """Record ``item`` in the open transaction ``s``. ``fast``: the common case (the study is receiving,
    the series known with its indexed attributes) in four Core statements, a duplicate failing the
    insert with IntegrityError; otherwise, and when it does not apply, the instance is looked up first
    and the study and series rows created, re-opened or indexed as needed. The study row is locked
    first (PostgreSQL: several receivers may share the catalog; SQLite's BEGIN IMMEDIATE serialises
    writers already): its counts are read-modify-write."""
    indexed = item.indexed
    row = {"sop_instance_uid": item.sop_instance_uid, "sop_class_uid": item.sop_class_uid, "path": item.path,
           "size": item.size, "transfer_syntax_uid": item.transfer_syntax_uid, "received_at": item.now,
           "dicom": None if indexed is None else indexed.instance}
    conn = s.connection()
    if fast:
        found = conn.execute(_OPEN_SERIES, {"study_uid": item.study_uid, "series_uid": item.series_uid}).first()
        if found is not None and not (indexed is not None and (found[1] or found[3])):
            study_id, series_id = found[0], found[2]
            conn.execute(_COUNT_IN_STUDY, {"row": study_id, "now": item.now})
            conn.execute(_COUNT_IN_SERIES, {"row": series_id})
            conn.execute(_ADD_INSTANCE, {**row, "series_id": series_id})
            return Recorded(new=True, study_id=study_id)
    known = s.execute(
        select(Series.study_id).join(Instance, Instance.series_id == Series.id)
        .where(Instance.sop_instance_uid == item.sop_instance_uid)
    ).scalar()
    if known is not None:
        return Recorded(new=False, study_id=known)
    event: str | None = None
    study = s.scalar(select(Study).where(Study.study_uid == item.study_uid).with_for_update())
    if study is None:
        study = Study(study_uid=item.study_uid, first_received_at=item.now, last_received_at=item.now,
                      patient_key=item.patient_key, study_datetime=item.study_datetime)
        s.add(study)
        s.flush()
        event = "new"
    elif study.state != StudyState.RECEIVING:
        study.state = StudyState.RECEIVING
        study.generation += 1
        event = "reopened"
    study.last_received_at = item.now
    study.instance_count += 1
    if indexed is not None and study.dicom is None:
        study.dicom = indexed.study
        for column, value in study_columns(indexed.study).items():
            setattr(study, column, value)
    series = s.scalar(select(Series).where(Series.series_uid == item.series_uid).with_for_update())
    if series is None:
        series = Series(series_uid=item.series_uid, study_id=study.id, attributes=item.series_attributes)
        s.add(series)
        s.flush()
    series.instance_count += 1
    if indexed is not None and series.dicom is None:
        series.dicom = indexed.series
    s.flush()  # the ORM's changes are in before the next item's Core statements (a group commit's batch)
    conn.execute(_ADD_INSTANCE, {**row, "series_id": series.id})
    return Recorded(new=True, study_id=study.id, study_event=event)
