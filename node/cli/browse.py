"""``dicom-node studies``, ``study ID``, ``jobs`` (paged tables of the catalog, as the REST API pages them;
``--json`` prints the API's own JSON) and ``retry``. No patient attributes are ever printed: studies are
shown by catalog id, state, counts and stage times; series by their routing attributes."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from node.cli.common import (
    PANEL_ACT,
    PANEL_WATCH,
    ConfigOption,
    clip,
    console,
    counts,
    open_catalog,
    show,
    table,
    when,
)
from node.humanize import duration
from node.schema import JobState, StudyState

if TYPE_CHECKING:
    from node.catalog import Catalog
    from node.overview import StudyFacts

LimitOption = Annotated[int, typer.Option("--limit", "-n", min=1, max=1000, help="rows per page")]
OffsetOption = Annotated[int, typer.Option(min=0, help="skip this many rows (the next page: --offset LIMIT)")]
JsonOption = Annotated[bool, typer.Option("--json", help="the REST API's JSON for the same page")]


def stage(f: StudyFacts) -> str:
    """How far the study got: receiving, ready, routed, queued, running, processed, delivered (or unrouted)."""
    st = f.study
    if st.state in (StudyState.RECEIVING, StudyState.PRIOR, StudyState.UNROUTED):
        return str(st.state)
    for reached, name in ((f.delivered_at, "delivered"), (f.jobs_finished_at, "processed"),
                          (f.jobs_started_at, "running"), (f.first_enqueued_at, "queued"),
                          (st.routed_at, "routed")):
        if reached is not None:
            return name
    return str(st.state)


def attributes(values: dict[str, Any]) -> str:
    """Routing attributes as ``Modality=CT, ImageType=ORIGINAL\\PRIMARY`` (multiple values joined as in DICOM)."""
    def one(v: Any) -> str:
        return "\\".join(map(str, v)) if isinstance(v, list) else str(v)

    return ", ".join(f"{k}={one(v)}" for k, v in values.items())


def _footer(shown: int, total: int, offset: int, limit: int) -> str:
    more = f"; next page: --offset {offset + limit}" if offset + shown < total else ""
    return f"{shown} of {total} shown (from {offset + 1 if shown else offset}){more}"


def _time(value: str | None, option: str) -> float | None:
    """An ISO 8601 date or date-time option (local time without a zone) as seconds since the epoch."""
    if value is None:
        return None
    from node.audit_read import parse_time

    try:
        return parse_time(value).timestamp()
    except ValueError as exc:
        raise typer.BadParameter(f"{exc} (ISO 8601, e.g. 2026-12-01 or 2026-12-01T08:00)", param_hint=option) from None


def studies(
    config: ConfigOption,
    state: Annotated[StudyState | None, typer.Option(help="only studies in this state")] = None,
    model: Annotated[str | None, typer.Option(help="only studies with a job of this model")] = None,
    destination: Annotated[str | None, typer.Option(help="only studies with results for this destination")] = None,
    since: Annotated[str | None, typer.Option(help="first instance received from this time on (ISO 8601)")] = None,
    until: Annotated[str | None, typer.Option(help="first instance received before this time (ISO 8601)")] = None,
    limit: LimitOption = 20,
    offset: OffsetOption = 0,
    as_json: JsonOption = False,
) -> int:
    """Studies, newest first, with how far each got.

    Per study: state, stage reached (receiving, ready, routed, queued, running, processed, delivered),
    counts, and the turnaround (last instance received to last result delivered). No patient attributes.
    """
    catalog = open_catalog(config)
    from node.overview import study_page

    total, rows = study_page(catalog, state=state, limit=limit, offset=offset, model=model, destination=destination,
                             since=_time(since, "--since"), until=_time(until, "--until"))
    if as_json:
        from node.http.api import study_summary
        from node.http.api_models import Page, StudySummary

        page = Page[StudySummary](items=[study_summary(f) for f in rows], total=total, limit=limit, offset=offset)
        print(page.model_dump_json(indent=2))
        return 0
    t = table("id", "state", "stage", "series", "instances", "jobs", "results", "deliveries", "received",
              "turnaround", "note", right=("series", "instances", "results"))
    for f in rows:
        st = f.study
        turnaround = f.delivered_at - st.last_received_at if f.delivered_at else None
        t.add_row(str(st.id), str(st.state), stage(f), str(f.series), str(st.instance_count), counts(f.jobs),
                  str(f.results), counts(f.deliveries), when(st.last_received_at), duration(turnaround),
                  clip(st.note, 60))
    c = console()
    if rows:
        c.print(t)
    c.print(_footer(len(rows), total, offset, limit))
    return 0


def _detail_json(catalog: Catalog, study_id: int) -> dict[str, Any] | None:
    """``GET /api/v1/studies/{id}``'s body."""
    from node.http.api import delivery_out, job_out, result_out, study_summary
    from node.http.api_models import SeriesOut, StudyDetail
    from node.overview import series_attributes, study_detail

    d = study_detail(catalog, study_id)
    if d is None:
        return None
    paused = catalog.paused_destinations()
    return StudyDetail(
        **study_summary(d.facts).model_dump(),
        series=[SeriesOut(id=s.id, series_uid=s.series_uid, instance_count=s.instance_count,
                          attributes=series_attributes(s)) for s in d.series],
        jobs=[job_out(j) for j in d.jobs], results=[result_out(r) for r in d.results],
        deliveries=[delivery_out(x, paused) for x in d.deliveries],
    ).model_dump(mode="json")


def study(
    config: ConfigOption,
    study_id: Annotated[int, typer.Argument(metavar="ID", help="the study's catalog id (see dicom-node studies)")],
    as_json: Annotated[bool, typer.Option("--json", help="the REST API's JSON (GET /api/v1/studies/ID)")] = False,
) -> int:
    """One study: timeline, series, jobs, deliveries.

    Its stage times, series (routing attributes only), jobs (attempts, worker, errors, durations) and
    deliveries (attempts, last error).
    """
    catalog = open_catalog(config)
    data = _detail_json(catalog, study_id)
    if data is None:
        console(stderr=True).print(f"dicom-node: no study {study_id}")
        return 1
    if as_json:
        print(json.dumps(data, indent=2))
        return 0
    c = console()
    tm = data["times"]
    c.print(f"[bold]study #{data['id']}[/] {data['study_uid']}: {data['state']}, generation {data['generation']}"
            + (f" ({data['note']})" if data["note"] else ""))
    start = tm["first_received_at"]
    stages = [("received", tm["first_received_at"]), ("last instance", tm["last_received_at"]),
              ("ready", tm["ready_at"]), ("routed", tm["routed_at"]), ("queued", tm["first_enqueued_at"]),
              ("running", tm["jobs_started_at"]), ("processed", tm["jobs_finished_at"]),
              ("delivered", tm["delivered_at"])]
    c.print("timeline: " + " → ".join(f"{name} +{duration(t - start)}" if t is not None else f"{name} -"
                                      for name, t in stages))
    t = table("series", "instances", "attributes", title="series", right=("instances",))
    for s in data["series"]:
        t.add_row(f"#{s['id']}", str(s["instance_count"]), attributes(s["attributes"]))
    show(c, t)
    _print_jobs(data["jobs"], title="jobs")
    t = table("delivery", "object", "destination", "state", "attempts", "sent", "last error", title="deliveries",
              right=("attempts",))
    for d in data["deliveries"]:
        t.add_row(f"#{d['id']}", d["kind"], d["destination"] + (" (paused)" if d["destination_paused"] else ""),
                  d["state"], str(d["attempts"]), when(d["sent_at"]), clip(d["last_error"], 80))
    show(c, t)
    return 0


def _print_jobs(jobs: list[dict[str, Any]], *, title: str | None = None) -> None:
    t = table("id", "study", "series", "model", "state", "attempts", "worker", "queued", "run time",
              "load/infer/encode", "error", title=title, right=("attempts",))
    for j in jobs:
        tm = j["times"]
        ran = tm["finished_at"] - tm["started_at"] if tm["finished_at"] and tm["started_at"] else None
        stages = [tm["load_seconds"], tm["infer_seconds"], tm["encode_seconds"]]
        t.add_row(str(j["id"]), f"#{j['study_id']}", f"#{j['series_id']}", j["model"], j["state"], str(j["attempts"]),
                  j["worker"] or "-", when(tm["first_enqueued_at"]), duration(ran),
                  " / ".join(duration(x) for x in stages) if any(x is not None for x in stages) else "-",
                  clip(j["error"], 80))
    show(console(), t)


def jobs(
    config: ConfigOption,
    state: Annotated[JobState | None, typer.Option(help="only jobs in this state")] = None,
    model: Annotated[str | None, typer.Option(help="only jobs of this model")] = None,
    study_id: Annotated[int | None, typer.Option("--study", help="only jobs of this study (catalog id)")] = None,
    limit: LimitOption = 20,
    offset: OffsetOption = 0,
    as_json: JsonOption = False,
) -> int:
    """Jobs, newest first: model, state, attempts, worker, durations, error."""
    catalog = open_catalog(config)
    from node.http.api import job_out
    from node.http.api_models import JobOut, Page
    from node.overview import job_page

    total, rows = job_page(catalog, state=state, model=model, study_id=study_id, limit=limit, offset=offset)
    page = Page[JobOut](items=[job_out(j) for j in rows], total=total, limit=limit, offset=offset)
    if as_json:
        print(page.model_dump_json(indent=2))
        return 0
    if rows:
        _print_jobs(page.model_dump(mode="json")["items"])
    console().print(_footer(len(rows), total, offset, limit))
    return 0


def retry(
    config: ConfigOption,
    job: Annotated[list[int] | None, typer.Option(help="a failed or skipped job's id (repeatable)")] = None,
    study_id: Annotated[int | None, typer.Option("--study", help="every failed or skipped job of this study")] = None,
    all_failed: Annotated[bool, typer.Option("--all-failed", help="every failed or skipped job")] = False,
    delivery: Annotated[list[int] | None, typer.Option(
        help="a pending delivery's id (repeatable): tried again now instead of after its backoff")] = None,
) -> int:
    """Queue failed jobs again, or make pending deliveries due now.

    Failed (or skipped) jobs get fresh attempts. Give exactly one of --job, --study, --all-failed,
    --delivery. Exit 1 when nothing matched.
    """
    given = [bool(job), study_id is not None, all_failed, bool(delivery)]
    if sum(given) != 1:
        raise typer.BadParameter("give exactly one of --job, --study, --all-failed, --delivery")
    catalog = open_catalog(config)
    if delivery:
        n = sum(catalog.retry_delivery(d, time.time()) for d in delivery)
        print(f"{n} delivery(ies) due now; the running node tries them within a second")
        return 0 if n else 1
    n = catalog.retry_jobs(job_ids=job or None, study_id=study_id, failed=all_failed)
    print(f"{n} job(s) queued again; the running node sends them within a second")
    return 0 if n else 1


def register(app: typer.Typer) -> None:
    app.command(rich_help_panel=PANEL_WATCH)(studies)
    app.command(rich_help_panel=PANEL_WATCH)(study)
    app.command(rich_help_panel=PANEL_WATCH)(jobs)
    app.command(rich_help_panel=PANEL_ACT)(retry)
