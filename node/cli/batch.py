"""``dicom-node batch``: retrospective batches over an archive (:mod:`node.batch`). ``create`` (also the
bare ``dicom-node batch --query ... --source ... --model ...``), ``list``, ``show ID``, ``cancel ID``.
They write and read the catalog; the running node's ``batch`` loop does the C-FIND, the throttled
retrievals and follows the jobs. ``--json`` prints the REST API's body (``/api/v1/batches``). Counts only:
no study UID or patient attribute is printed."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from node.cli.common import (
    CONFIG_ENV,
    PANEL_ACT,
    ConfigOption,
    checked_settings,
    console,
    counts,
    open_catalog,
    show,
    table,
    when,
)

if TYPE_CHECKING:
    from node.http.api_batch import BatchOut

QueryOption = Annotated[str | None, typer.Option(
    "--query", "-q", help="C-FIND keys, e.g. 'Modality=CT StudyDate=20260101-20260131' (STUDY-level DICOM "
    "keywords; dates and times as values or ranges)")]
SourceOption = Annotated[str | None, typer.Option(help="a dimse destination: the PACS queried and retrieved from")]
ModelOption = Annotated[str | None, typer.Option(help="the one model run on every retrieved study")]
SendToOption = Annotated[list[str] | None, typer.Option(
    "--send-to", help="a destination of the results (repeatable; default: the source)")]
RateOption = Annotated[float | None, typer.Option(
    "--rate", min=0.001, help="studies retrieved per hour, spread evenly (default: batch.rate_per_hour)")]
AnytimeOption = Annotated[bool, typer.Option(
    "--anytime", help="retrieve outside queue.offpeak_window too (the jobs stay at priority offpeak)")]
JsonOption = Annotated[bool, typer.Option("--json", help="the REST API's JSON")]

app = typer.Typer(help="Retrospective batches: C-FIND an archive, retrieve at a throttled rate, run one model "
                  "(priority offpeak), send the results back.", invoke_without_command=True,
                  rich_markup_mode="markdown")


def _outs(config: Path, ids: list[int] | None = None, limit: int = 50) -> list[BatchOut]:
    from node.batch_store import BatchStore
    from node.cli.common import settings
    from node.http.api_batch import batches_out

    s = settings(config)
    store = BatchStore(open_catalog(config))
    rows = store.page(limit)[1] if ids is None else [b for i in ids if (b := store.get(i)) is not None]
    return batches_out(store, rows, time.time(), s.queue.offpeak_window)


def _print(b: BatchOut) -> None:
    c = console()
    c.print(f"[bold]batch #{b.id}[/] {b.state}: {b.model} on '{b.query}' from {b.source}, results to "
            f"{', '.join(b.destinations)}")
    c.print(f"  {b.finished}/{b.total} studies finished ({counts(b.counts)})")
    c.print(f"  rate {b.rate_per_hour:g}/h, {'any time' if b.anytime else 'off-peak window only'}; created "
            f"{when(b.created_at)}, started {when(b.started_at)}, estimated finish {when(b.estimated_finish_at)}, "
            f"finished {when(b.finished_at)}")
    if b.note:
        c.print(f"  note: {b.note}")


def _create(config: Path, query: str, source: str, model: str, send_to: list[str] | None, rate: float | None,
            anytime: bool, as_json: bool) -> int:
    from node.batch_store import BatchError, BatchStore, make_spec
    from node.catalog import Catalog

    s = checked_settings(config)  # site models are known to the registry
    try:
        spec = make_spec(s, query=query, source=source, model=model, send_to=send_to, rate_per_hour=rate,
                         anytime=anytime)
    except BatchError as exc:
        print(f"dicom-node: {exc}", file=sys.stderr)
        return 2
    batch_id = BatchStore(Catalog.for_settings(s)).create(spec, time.time())
    out = _outs(config, [batch_id])[0]
    if as_json:
        print(out.model_dump_json(indent=2))
    else:
        _print(out)
        console().print("the running node asks the source within seconds (dicom-node batch show "
                        f"{batch_id} to follow it)")
    return 0


@app.callback()
def _bare(
    ctx: typer.Context,
    query: QueryOption = None,
    source: SourceOption = None,
    model: ModelOption = None,
    send_to: SendToOption = None,
    rate: RateOption = None,
    anytime: AnytimeOption = False,
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", envvar=CONFIG_ENV, metavar="FILE", help="YAML configuration file")] = None,
) -> int:
    """`dicom-node batch --query ... --source ... --model ...` creates a batch (as `batch create`)."""
    if ctx.invoked_subcommand is not None:
        if query or source or model:
            raise typer.BadParameter("give --query/--source/--model after 'create', or without a subcommand")
        return 0
    if not (query or source or model):
        console().print(ctx.get_help())
        raise typer.Exit(2)
    if not (query and source and model and config):
        raise typer.BadParameter("a batch needs --query, --source, --model and --config")
    return _create(config, query, source, model, send_to, rate, anytime, False)


@app.command()
def create(
    config: ConfigOption,
    query: QueryOption = None,
    source: SourceOption = None,
    model: ModelOption = None,
    send_to: SendToOption = None,
    rate: RateOption = None,
    anytime: AnytimeOption = False,
    as_json: JsonOption = False,
) -> int:
    """Create a batch: the node C-FINDs the source once, retrieves the studies one at a time at the rate
    (inside queue.offpeak_window unless --anytime), runs only --model on them at priority offpeak, sends the
    results to --send-to (default the source). Resumes after a restart. Exit 2 for an invalid batch."""
    if not (query and source and model):
        raise typer.BadParameter("a batch needs --query, --source and --model")
    return _create(config, query, source, model, send_to, rate, anytime, as_json)


@app.command("list")
def list_(config: ConfigOption,
          limit: Annotated[int, typer.Option("--limit", "-n", min=1, max=500, help="rows")] = 20,
          as_json: JsonOption = False) -> int:
    """Batches, newest first: state, model, source, studies finished of found, counts by state."""
    outs = _outs(config, limit=limit)
    if as_json:
        from node.http.api_batch import BatchOut
        from node.http.api_models import Page

        print(Page[BatchOut](items=outs, total=len(outs), limit=limit, offset=0).model_dump_json(indent=2))
        return 0
    t = table("id", "state", "model", "source", "finished", "studies", "rate/h", "created", "estimated finish",
              right=("finished", "rate/h"))
    for b in outs:
        t.add_row(str(b.id), str(b.state), b.model, b.source, f"{b.finished}/{b.total}", counts(b.counts),
                  f"{b.rate_per_hour:g}", when(b.created_at), when(b.estimated_finish_at))
    show(console(), t, "no batches")
    return 0


@app.command("show")
def show_(config: ConfigOption, batch_id: Annotated[int, typer.Argument(metavar="ID", help="the batch's id")],
          as_json: JsonOption = False) -> int:
    """One batch: its query, studies by state, started, estimated finish. Exit 1 for an unknown id."""
    outs = _outs(config, [batch_id])
    if not outs:
        print(f"dicom-node: no batch {batch_id}", file=sys.stderr)
        return 1
    if as_json:
        print(outs[0].model_dump_json(indent=2))
    else:
        _print(outs[0])
    return 0


@app.command()
def cancel(config: ConfigOption, batch_id: Annotated[int, typer.Argument(metavar="ID", help="the batch's id")]) -> int:
    """Stop retrieving: its pending studies are skipped; jobs already queued run. Exit 1 when there is no such
    running batch."""
    from node.batch_store import BatchError, BatchStore

    try:
        b = BatchStore(open_catalog(config)).cancel(batch_id, time.time())
    except BatchError as exc:
        print(f"dicom-node: {exc}", file=sys.stderr)
        return 1
    if b is None:
        print(f"dicom-node: no batch {batch_id}", file=sys.stderr)
        return 1
    print(f"batch #{batch_id} cancelled")
    return 0


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="batch", rich_help_panel=PANEL_ACT)
