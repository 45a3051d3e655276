"""Studies in every lifecycle state, stored through the real Receiver (real DICOM files in the spool,
real catalog rows), and the consistency check of the purge tests: no row pointing at a missing file,
no file under ``instances/`` or ``results/`` without a row."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from node.catalog import Catalog, JobSpec, ResultFile
from node.config import Settings, parse_settings
from node.receive.scp import STATUS_SUCCESS, Receiver
from node.schema import Delivery, Instance, JobState, Result, Study, StudyState
from node.spool import Spool
from tests.dsfactory import ct_slice, encode

CT = "1.2.840.10008.5.1.4.1.1.2"
SEG = "1.2.840.10008.5.1.4.1.1.66.4"
ROOT = "1.2.826.0.1.4242"


def lifecycle_settings(storage: Path, node: dict[str, Any] | None = None, **storage_section: Any) -> Settings:
    return parse_settings({
        "node": {"storage_dir": str(storage), "min_free_mb": 0, **(node or {})},
        "http": {"enabled": False},
        "destinations": [{"name": "pacs", "type": "dimse", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}],
        "rules": [{"name": "ct", "match": {"Modality": "CT"}, "models": ["ct-hu-segmentation"], "send_to": ["pacs"]}],
        "storage": storage_section,
    })


def study_uid(n: int) -> str:
    return f"{ROOT}.{n}"


def add_study(receiver: Receiver, n: int, *, outcome: str = "delivered", now: float = 1000.0, instances: int = 3,
              patient: str | None = None, clock: list[float] | None = None) -> int:
    """Store study ``n`` (``instances`` CT slices in one series) and take it to ``outcome``: receiving,
    ready, unrouted, queued, failed, pending (results recorded, delivery pending), delivered (sent).
    Returns its catalog id. ``clock``: the receiver's clock list (set to ``now`` first)."""
    if clock is not None:
        clock[0] = now
    cat, spool = receiver.catalog, receiver.spool
    uid = study_uid(n)
    for i in range(instances):
        ds = ct_slice(uid, f"{uid}.1", f"{uid}.1.{i + 1}", z=float(i))
        ds.PatientID = patient or f"P-{n}"
        assert receiver.store(encode(ds), CT, f"{uid}.1.{i + 1}", "SCANNER") == STATUS_SUCCESS
    with cat.session() as s:
        study = s.scalars(select(Study).where(Study.study_uid == uid)).one()
        study_id = study.id
        if outcome != "receiving":
            study.state, study.ready_at = StudyState.READY, now
    if outcome in ("receiving", "ready"):
        return study_id
    [series] = cat.series_of_study(study_id)
    specs = [] if outcome == "unrouted" else [JobSpec(series.id, "ct-hu-segmentation", "ct", ("pacs",))]
    ids = cat.create_jobs(study_id, 1, specs, now)
    if outcome in ("unrouted", "queued"):
        return study_id
    [job_id] = ids
    if outcome == "failed":
        cat.finish_job(job_id, JobState.FAILED, now, "model failed")
        return study_id
    seg = encode(ct_slice(uid, f"{uid}.9", f"{uid}.9.1"))
    served = spool.write(spool.result_relpath(uid, f"{uid}.9.1"), seg)
    sent_only = spool.write(spool.result_relpath(uid, f"{uid}.9.2"), seg)
    cat.record_results(job_id, [
        ResultFile("SEG", f"{uid}.9.1", SEG, served.relative, series_uid=f"{uid}.9", size=served.size,
                   transfer_syntax_uid="1.2.840.10008.1.2.1"),
        ResultFile("SEG", f"{uid}.9.2", SEG, sent_only.relative, variant="labelmap"),
    ], ["pacs"], now)
    if outcome == "delivered":
        with cat.session() as s:
            s.execute(update(Delivery).where(Delivery.result_id.in_(
                select(Result.id).where(Result.sop_instance_uid.like(f"{uid}.9.%")))).values(
                state="sent", sent_at=now))
    return study_id


def node_parts(storage: Path, node: dict[str, Any] | None = None, catalog_url: str | None = None,
               **storage_section: Any) -> tuple[Settings, Catalog, Spool, Receiver, list[float]]:
    """``catalog_url``: a PostgreSQL catalog (the ``catalog_url`` fixture); default the SQLite file."""
    settings = lifecycle_settings(storage, node, **storage_section)
    catalog, spool = Catalog.for_storage(storage, catalog_url), Spool(storage)
    clock = [1000.0]
    return settings, catalog, spool, Receiver(settings, catalog, spool, lambda: clock[0]), clock


def files_on_disk(storage: Path) -> set[str]:
    return {p.relative_to(storage).as_posix() for area in ("instances", "results")
            for p in (storage / area).rglob("*") if p.is_file()}


def catalog_paths(catalog: Catalog) -> set[str]:
    with catalog.reading() as s:
        return set(s.scalars(select(Instance.path))) | set(s.scalars(select(Result.path)))


def inconsistencies(catalog: Catalog, storage: Path) -> tuple[set[str], set[str]]:
    """(paths in the catalog whose file is missing, files on disk without a row)."""
    disk, rows = files_on_disk(storage), catalog_paths(catalog)
    return rows - disk, disk - rows
