"""``dicom-node rules test TARGET``: the rule dry run (:mod:`node.rules_check`) on DICOM files, a folder or
a catalog study: per series, every rule with the conditions that held or failed and why, then the jobs
and destinations routing would create. Nothing is written: no job, no spool file, no catalog row."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Annotated

import typer

from node.cli.common import PANEL_ACT, ConfigOption, console, settings, show, table

if TYPE_CHECKING:
    from node.catalog import Catalog
    from node.config import Settings
    from node.rules_check import RuleCheck, RuleReport

app = typer.Typer(help="Routing rules: dry-run them on files, a folder or a study (no job is created).",
                  no_args_is_help=True, rich_markup_mode="markdown")


def _catalog(s: Settings) -> Catalog | None:
    """The node's catalog when it exists (a dry run on files needs none and creates nothing)."""
    from node.catalog import Catalog

    if s.catalog.url is None and not (s.node.storage_dir / "catalog.sqlite3").exists():
        return None
    return Catalog.for_settings(s)


def _value(v: object) -> str:
    return "\\".join(map(str, v)) if isinstance(v, list) else str(v)


def _conditions(r: RuleCheck) -> str:
    if not r.conditions:
        return "no conditions: matches every series"
    return "\n".join(f"{'ok  ' if c.held else 'FAIL'} {c.reason}" for c in r.conditions)


def render(report: RuleReport) -> None:
    """The report as tables: per series its attributes and rules, then the jobs, models, skipped files, notes."""
    c = console()
    c.print(f"{report.rules} rule(s) configured; source: {report.source}"
            + (f" #{report.study_id} ({report.study_state})" if report.study_id is not None else ""))
    labels = {s.key: s.label for s in report.series}
    for s in report.series:
        c.print(f"\n[bold]{s.label}[/] {s.key}")
        c.print("  attributes: " + ", ".join(f"{k}={_value(v)}" for k, v in s.attributes.items()))
        for n in s.notes:
            c.print(f"  note: {n}")
        t = table("rule", "verdict", "conditions", "models", "send to")
        for r in s.rules:
            t.add_row(r.rule, "MATCH" if r.matched else "no match", _conditions(r), ", ".join(r.models),
                      ", ".join(r.send_to) or "-")
        show(c, t, "no rules configured")
    t = table("series", "model", "rule", "destinations", "awaits prior", "notes", title="jobs routing would create")
    for j in report.jobs:
        prior = {True: "yes", False: "no", None: "maybe"}[j.awaits_prior]
        t.add_row(labels.get(j.series, j.series), j.model, j.rule, ", ".join(j.destinations) or "none", prior,
                  "\n".join(j.notes) or "-")
    show(c, t, "none")
    t = table("model", "family", "modalities", "min slices", "queue", "missing here", title="models")
    for m in report.models:
        if m.known:
            t.add_row(m.name, m.family or "-", ", ".join(m.modalities) or "any", str(m.min_slices or "-"),
                      m.queue or "-", ", ".join(m.missing_modules) or "-")
        else:
            t.add_row(m.name, "UNKNOWN", "-", "-", "-", "-")
    if report.models:
        show(c, t)
    if report.skipped:
        t = table("file", "why", title=f"skipped ({len(report.skipped)})")
        for f in report.skipped:
            t.add_row(f.path, f.reason)
        show(c, t)
    for n in report.notes:
        c.print(f"note: {n}")
    c.print("\ndry run: no job was created.")


@app.command("test")
def test_rules(
    config: ConfigOption,
    target: Annotated[str, typer.Argument(
        metavar="FILE_OR_DIR_OR_STUDY_ID", help="a DICOM file, a folder (searched recursively) or a catalog "
        "study id (see dicom-node studies)")],
    calling_ae: Annotated[str | None, typer.Option(
        help="for files: the sender to assume (rules may match CallingAETitle)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="the report as JSON (the same as POST /api/v1/rules/test)")]
    = False,
) -> int:
    """Dry-run the routing rules: which match, which conditions failed and why, which jobs would result.

    For files, instances are grouped by series as the receiver records them; files the node would
    refuse are listed as skipped with the reason. For a study id, the series' recorded routing
    attributes are used and routing's own planner decides (awaiting a prior included). Nothing is
    written. Exit 1 for an unknown study, 2 for a path that does not exist.
    """
    from models.errors import InputError
    from node.rules_check import UnknownStudy, check_target

    s = settings(config)
    try:
        report = check_target(s, target, catalog=_catalog(s), calling_ae=calling_ae)
    except UnknownStudy as exc:
        print(f"dicom-node: {exc}", file=sys.stderr)
        return 1
    except InputError as exc:
        print(f"dicom-node: {exc}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        render(report)
    return 0


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="rules", rich_help_panel=PANEL_ACT)
