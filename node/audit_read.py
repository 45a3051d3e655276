"""Reading the audit trail back (``dicom-node audit``): records from the current and rotated files,
filtered by time and event, as JSON lines or a table. The records and the files are :mod:`node.audit`'s."""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from node.audit import STUDY_UID, ActiveParticipant, AuditRecord, audit_files

log = logging.getLogger("node.audit")


def parse_time(value: str) -> dt.datetime:
    """An ISO 8601 date or date-time; without a zone it is local time."""
    when = dt.datetime.fromisoformat(value)
    return when.astimezone() if when.tzinfo is None else when


def matches_event(rec: AuditRecord, name: str) -> bool:
    """``name``: a short name (``query``), an EventID code (``110112``) or display text, or an
    EventTypeCode's code or display (``110120``, ``Application Start``, a local action name)."""
    wanted = name.strip().lower()
    codes = (rec.event_id, *rec.event_types)
    return wanted == rec.name or any(wanted in (c.code.lower(), c.display.lower()) for c in codes)


def read_records(directory: Path, *, since: dt.datetime | None = None, until: dt.datetime | None = None,
                 event: str | None = None) -> Iterator[AuditRecord]:
    """Records of every audit file (rotated ones first), oldest first, filtered; lines that do not
    parse (a line torn by a crash) are skipped with a warning."""
    bad: Counter[str] = Counter()
    for path in audit_files(directory):
        try:
            f = path.open(encoding="utf-8", errors="replace")
        except FileNotFoundError:  # rotated away while we read
            continue
        with f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    rec = AuditRecord.from_json(json.loads(line))
                except (ValueError, KeyError, TypeError):
                    bad[path.name] += 1
                    continue
                if since is not None and rec.date_time < since:
                    continue
                if until is not None and rec.date_time >= until:
                    continue
                if event is not None and not matches_event(rec, event):
                    continue
                yield rec
    for name, n in bad.items():
        log.warning("audit: %d unreadable line(s) in %s", n, name)


def _who(p: ActiveParticipant) -> str:
    return p.user_id + (f"@{p.network_access_point}" if p.network_access_point else "")


def table_row(rec: AuditRecord) -> list[str]:
    requestors = [p for p in rec.participants if p.is_requestor]
    others = [p for p in rec.participants if not p.is_requestor]
    studies = [o for o in rec.objects if o.id_type.code == STUDY_UID.code]
    objects = ", ".join(f"{o.object_id}" + (f" ({o.instances})" if o.instances is not None else "") for o in studies)
    kind = ",".join(c.display for c in rec.event_types)
    return [rec.date_time.astimezone().isoformat(timespec="seconds"), rec.name + (f" [{kind}]" if kind else ""),
            rec.action, str(rec.outcome), ", ".join(map(_who, requestors)) or "-", ", ".join(map(_who, others)) or "-",
            objects or "-", rec.outcome_description or ""]


def format_table(records: Iterable[AuditRecord]) -> str:
    header = ["time", "event", "action", "outcome", "requestor", "with", "studies", "detail"]
    rows = [header, *(table_row(r) for r in records)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(r, widths, strict=False)), r[-1]]).rstrip()
                     for r in rows)
