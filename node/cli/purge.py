"""``dicom-node purge [--dry-run]``: what the storage lifecycle (:mod:`node.lifecycle`) would remove now,
and why (retention or the watermark); without ``--dry-run`` it removes it, files and catalog rows
together and crash-safely, but only while the node is stopped (the running node purges by itself)."""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING, Annotated

import typer

from node.cli.common import PANEL_ACT, ConfigOption, console, settings, show, table, when
from node.humanize import size

if TYPE_CHECKING:
    from node.lifecycle.purge import PurgePlan


def _print_plan(plan: PurgePlan) -> None:
    c = console()
    u = plan.usage
    if u is not None:
        c.print(f"disk: {u.used_percent:.1f} % used, {size(u.free)} free of {size(u.total)}"
                + (f"; the watermarks need {size(plan.target_bytes)} freed" if plan.target_bytes else
                   "; below the high watermark"))
    t = table("study", "what", "why", "settled", "files", "size", "rows", right=("files", "size", "rows"))
    for i in plan.items:
        t.add_row(f"#{i.study_id}", "instances only" if i.scope == "instances" else "whole study", str(i.reason),
                  when(i.settled_at or None), str(i.files), size(i.bytes), str(i.rows))
    show(c, t, "nothing is due")
    if plan.items:
        c.print(f"total: {len(plan.items)} study(ies), {plan.files} file(s), {size(plan.bytes)}, {plan.rows} "
                "catalog row(s)")
    if plan.kept:
        c.print("kept: " + ", ".join(f"{n} {why}" for why, n in sorted(plan.kept.items())))
    if plan.exhausted and plan.target_bytes and plan.bytes < plan.target_bytes:
        c.print("[bold red]nothing more is eligible[/]: the node refuses new instances until space is freed")


def purge(
    config: ConfigOption,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="only show what would go")] = False,
    watermarks: Annotated[bool, typer.Option(
        " /--retention-only", show_default=False,
        help="leave out the watermarks: only what retention makes due")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="the plan (and the outcome) as JSON")] = False,
) -> int:
    """Show or do the storage purge: retention (storage.retention) and watermarks.

    Never deletes what is not yet delivered. Above storage.high_watermark_percent the oldest settled
    studies go until usage is below storage.low_watermark_percent. Without --dry-run the files and
    catalog rows are removed together, crash-safely; refused (exit 1) while the node runs on this storage
    directory: it purges by itself every storage.check_seconds, or now with POST /api/v1/storage/purge.
    """
    from node.catalog import Catalog
    from node.lifecycle.guard import NodeRunningError, require_node_stopped
    from node.lifecycle.purge import execute_purge, finish_journal, plan_purge
    from node.spool import Spool

    s = settings(config)
    storage = s.node.storage_dir
    catalog = Catalog.for_settings(s)
    if dry_run:
        plan = plan_purge(s, catalog, time.time(), watermarks=watermarks)
        if as_json:
            print(json.dumps({"dry_run": True, "plan": plan.to_dict()}, indent=2))
        else:
            _print_plan(plan)
            console().print("dry run: nothing was removed.")
        return 0
    try:
        require_node_stopped(storage)  # execute_purge checks again
        finish_journal(catalog, storage)  # a purge a crash cut short
        now = time.time()
        plan = plan_purge(s, catalog, now, watermarks=watermarks)
        outcome = execute_purge(s, catalog, Spool(storage), plan, now)
    except NodeRunningError as exc:
        print(f"dicom-node: {exc}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps({"dry_run": False, "plan": plan.to_dict(), "outcome": outcome.to_dict()}, indent=2))
        return 0
    _print_plan(plan)
    console().print(f"purged {len(outcome.purged)} study(ies): {outcome.files} file(s), {size(outcome.bytes)}, "
                    f"{outcome.rows} catalog row(s)")
    for study_id, why in sorted(outcome.skipped.items()):
        console().print(f"  study #{study_id} left alone: {why}")
    return 0


def register(app: typer.Typer) -> None:
    app.command(rich_help_panel=PANEL_ACT)(purge)
