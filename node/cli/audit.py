"""``dicom-node audit``: the audit trail (``<storage_dir>/audit/audit.log`` and its rotated files), oldest first."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from node.cli.common import PANEL_ADMIN, ConfigOption, settings

EVENT_HELP = ("only this event: application-activity, user-authentication, security-alert, instances-transferred, "
              "instances-accessed, query, begin-transferring (or an EventID or EventTypeCode code or name, e.g. "
              "110120, 'Application Stop', study-rerun)")


def audit(
    config: ConfigOption,
    since: Annotated[str | None, typer.Option(
        help="from this time on (ISO 8601; local time without a zone), e.g. 2026-12-01T00:00")] = None,
    until: Annotated[str | None, typer.Option(help="before this time (ISO 8601)")] = None,
    event: Annotated[str | None, typer.Option(metavar="NAME", help=EVENT_HELP)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="the records as stored: one JSON object per line")] = False,
) -> int:
    """List audit records (rotated files included), oldest first."""
    s = settings(config)
    from node.audit import EVENT_NAMES, audit_dir
    from node.audit_read import format_table, parse_time, read_records

    try:
        start = parse_time(since) if since else None
        end = parse_time(until) if until else None
    except ValueError as exc:
        print(f"dicom-node: --since/--until: {exc} (ISO 8601, e.g. 2026-12-01T00:00)", file=sys.stderr)
        return 2
    rows = list(read_records(audit_dir(s), since=start, until=end, event=event))
    if rows or not as_json:
        print("\n".join(rec.line() for rec in rows) if as_json else format_table(rows))
    if not rows and event and event.lower() not in EVENT_NAMES.values() and not event.isdigit():
        print(f"no record of event {event!r}; events: {', '.join(sorted(EVENT_NAMES.values()))}", file=sys.stderr)
    return 0


def register(app: typer.Typer) -> None:
    app.command(rich_help_panel=PANEL_ADMIN)(audit)
