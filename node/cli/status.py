"""``dicom-node check-config`` and ``dicom-node status`` (counts by state, deliveries by destination,
paused destinations, disk usage; ``--failed``: what needs attention; ``--json`` for scripts)."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from node.cli.common import (
    PANEL_RUN,
    PANEL_WATCH,
    ConfigOption,
    checked_settings,
    clip,
    console,
    settings,
    show,
    table,
    when,
)
from node.config import DicomwebDestination, Settings
from node.humanize import duration, size

if TYPE_CHECKING:
    from node.catalog import Catalog

FAILING_DELIVERIES_SHOWN = 200
"""At most this many failing deliveries are listed by ``status --failed``."""


def check_config(config: ConfigOption) -> int:
    """Validate the configuration and exit.

    Checks models, options, TLS and secret files: exit 0 when the node would start with it, 2 with the
    reason otherwise.
    """
    s = checked_settings(config, node_files=True)
    unreadable = [f"destinations[{d.name}].{key}: cannot read {path}"
                  for d in s.destinations if isinstance(d, DicomwebDestination)
                  for key, path in (("password_file", d.password_file), ("token_file", d.token_file),
                                    ("ca_file", d.ca_file))
                  if path is not None and not os.access(path, os.R_OK)]
    if unreadable:
        print("\n".join(unreadable), file=sys.stderr)
        return 2
    print(f"configuration OK: {len(s.rules)} rule(s), {len(s.destinations)} destination(s), "
          f"broker: {'embedded' if s.embedded_broker else 'external'}")
    return 0


def _disk(s: Settings, catalog: Catalog) -> dict[str, Any] | None:
    try:
        from node.lifecycle.usage import disk_usage

        u = disk_usage(s, catalog)
    except (ImportError, OSError):  # the storage directory may not exist yet
        return None
    return {"total": u.total, "used": u.used, "free": u.free, "used_percent": round(u.used_percent, 2),
            "high_watermark_percent": s.storage.high_watermark_percent,
            "low_watermark_percent": s.storage.low_watermark_percent, "areas": dict(u.areas)}


def _failed(catalog: Catalog) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(failed jobs, pending deliveries that failed at least once) as JSON-able dicts."""
    from node.schema import JobState

    jobs = [{"id": j.id, "study_id": j.study_id, "series_id": j.series_id, "model": j.model, "attempts": j.attempts,
             "worker": j.worker, "finished_at": j.finished_at, "error": j.error}
            for j in catalog.jobs_in_state(JobState.FAILED)]
    deliveries = [{"id": d.id, "study_id": study, "job_id": r.job_id, "kind": r.kind, "destination": d.destination,
                   "attempts": d.attempts, "first_attempt_at": d.first_attempt_at,
                   "next_attempt_at": d.next_attempt_at, "last_error": d.last_error}
                  for d, r, study in catalog.due_deliveries(float("inf"), limit=FAILING_DELIVERIES_SHOWN)
                  if d.attempts]
    return jobs, deliveries


def status_data(s: Settings, catalog: Catalog, *, failed: bool) -> dict[str, Any]:
    """What ``status --json`` prints: the catalog's counts by state (``studies``, ``jobs``, ``deliveries``,
    ``instances``, ``results``, as before), ``deliveries_by_destination``, ``paused_destinations``,
    ``disk`` and, with ``failed``, ``failed_jobs`` and ``failing_deliveries``."""
    from node.overview import delivery_counts

    out: dict[str, Any] = dict(catalog.counts())
    out["deliveries_by_destination"] = delivery_counts(catalog)
    out["paused_destinations"] = sorted(catalog.paused_destinations())
    out["disk"] = _disk(s, catalog)
    if failed:
        out["failed_jobs"], out["failing_deliveries"] = _failed(catalog)
    return out


def _print_tables(s: Settings, data: dict[str, Any]) -> None:
    c = console()
    c.print(f"[bold]{s.node.ae_title}[/] storage {s.node.storage_dir}: "
            f"{data['instances']['total']} instance(s) received, {data['results']['total']} result object(s)")
    for name in ("studies", "jobs"):
        t = table("state", "count", title=name, right=("count",))
        for state, n in sorted(data[name].items()):
            t.add_row(state, str(n))
        show(c, t)
    by_dest: dict[str, dict[str, int]] = data["deliveries_by_destination"]
    paused = set(data["paused_destinations"])
    states = sorted({st for v in by_dest.values() for st in v})
    names = sorted(set(by_dest) | {d.name for d in s.destinations} | paused)
    t = table("destination", *states, "paused", title="deliveries", right=states)
    for name in names:
        t.add_row(name, *(str(by_dest.get(name, {}).get(st, 0)) for st in states), "paused" if name in paused else "")
    show(c, t, "no destinations")
    disk = data["disk"]
    if disk is not None:
        areas = ", ".join(f"{k} {size(v)}" for k, v in disk["areas"].items())
        high = disk["used_percent"] >= disk["high_watermark_percent"]
        mark = " [bold red]above the high watermark[/]" if high else ""
        c.print(f"\n[bold]disk[/]: {disk['used_percent']:.1f} % used, {size(disk['free'])} free of "
                f"{size(disk['total'])} (purges above {disk['high_watermark_percent']:g} % down to "
                f"{disk['low_watermark_percent']:g} %){mark}\n  by area: {areas}")
    if "failed_jobs" in data:
        _print_failed(data["failed_jobs"], data["failing_deliveries"])


def _print_failed(jobs: list[dict[str, Any]], deliveries: list[dict[str, Any]]) -> None:
    c = console()
    t = table("job", "study", "model", "attempts", "finished", "error", title="failed jobs", right=("attempts",))
    for j in jobs:
        t.add_row(f"#{j['id']}", f"#{j['study_id']}", j["model"], str(j["attempts"]), when(j["finished_at"]),
                  clip(j["error"], 120))
    show(c, t)
    t = table("delivery", "study", "object", "destination", "attempts", "failing for", "next try", "last error",
              title="failing deliveries", right=("attempts",))
    now = time.time()
    for d in deliveries:
        since = d["first_attempt_at"]
        failing = duration(max(0.0, now - since)) if since else "-"
        t.add_row(f"#{d['id']}", f"#{d['study_id']}", d["kind"], d["destination"], str(d["attempts"]), failing,
                  when(d["next_attempt_at"]), clip(d["last_error"], 100))
    show(c, t)
    if jobs or deliveries:
        c.print("\nretry: dicom-node retry --job N, --all-failed or --delivery N (deliveries are also retried on "
                "their own, with backoff)")


def status(
    config: ConfigOption,
    failed: Annotated[bool, typer.Option("--failed", help="also list failed jobs and failing deliveries")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable JSON (the same facts)")] = False,
) -> int:
    """Counts by state, deliveries by destination, disk usage; --failed: what needs attention.

    Studies, jobs and deliveries by state, deliveries by destination, paused destinations and disk usage
    by area, read from the catalog (works whether the node runs or not). --json prints the same facts for
    scripts (the counts under studies, jobs, deliveries, instances, results as before).
    """
    s = settings(config)
    from node.catalog import Catalog

    catalog = Catalog.for_settings(s)
    data = status_data(s, catalog, failed=failed)
    if as_json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        _print_tables(s, data)
    return 0


def register(app: typer.Typer) -> None:
    app.command("check-config", rich_help_panel=PANEL_RUN)(check_config)
    app.command(rich_help_panel=PANEL_WATCH)(status)
