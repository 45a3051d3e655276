"""``dicom-node send PATH... --to DEST`` and ``dicom-node push PATH...``: every DICOM file under the paths
to a configured destination (C-STORE, or STOW-RS for a dicomweb one), or to this node's own DICOM port,
with the node's own senders (:mod:`node.send`), a progress bar (instances, MB/s, ETA) and a summary.

Files go in batches (one association or HTTP connection each), so the bar moves as batches complete and
a large study never sits in memory whole. A destination that cannot be reached at all stops the run; a
refused instance is reported with its reason. Exit 0 when every instance was sent, 1 otherwise.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated
from urllib.parse import urlsplit, urlunsplit

import typer

from models.errors import ConfigError, SendError
from node.cli.common import PANEL_ACT, ConfigOption, clip, console, settings, show, table
from node.config import DicomwebDestination, DimseDestination, Settings
from node.humanize import size
from node.send.base import Sender

if TYPE_CHECKING:
    from rich.progress import Progress

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
"""DICOMDIR's SOP class: an index of files, not an instance to store."""
BATCH_BYTES = 128 * 1000 * 1000
"""A batch is also cut at this many bytes (the DIMSE sender holds a batch's data sets in memory)."""
FAILURES_SHOWN = 20
PUSH_AE_WHEN_UNKNOWN_ALLOWED = "DICOM-NODE-PUSH"
"""The calling AE of ``push`` when no peer may store and the node accepts unknown peers."""

PathsArgument = Annotated[list[Path], typer.Argument(
    exists=True, metavar="PATH...", help="DICOM files or folders (searched recursively; other files are skipped)")]
BatchOption = Annotated[int, typer.Option(
    min=1, max=1000, help="instances per association (DIMSE) or connection (STOW-RS)")]


@dataclass
class TransferResult:
    """What a run sent: ``sent`` of ``total`` instances (and bytes), ``failed`` file -> reason, ``seconds``."""

    total: int = 0
    total_bytes: int = 0
    sent: int = 0
    sent_bytes: int = 0
    failed: dict[Path, str] = field(default_factory=dict)
    seconds: float = 0.0


def dicom_files(paths: Sequence[Path]) -> tuple[list[tuple[Path, int]], dict[Path, str]]:
    """(DICOM Part 10 files with their sizes, in path order; skipped file -> reason) under ``paths``."""
    from pydicom.errors import InvalidDicomError
    from pydicom.filereader import read_file_meta_info

    found: list[tuple[Path, int]] = []
    skipped: dict[Path, str] = {}
    for path in _walk(paths):
        try:
            with path.open("rb") as f:
                head = f.read(132)
            if len(head) < 132 or head[128:] != b"DICM":
                skipped[path] = "not a DICOM Part 10 file"
                continue
            if str(read_file_meta_info(path).get("MediaStorageSOPClassUID", "")) == MEDIA_STORAGE_DIRECTORY:
                skipped[path] = "DICOMDIR (an index, not an instance)"
                continue
            found.append((path, path.stat().st_size))
        except (OSError, InvalidDicomError) as exc:
            skipped[path] = f"unreadable: {getattr(exc, 'strerror', None) or type(exc).__name__}"
    return found, skipped


def _walk(paths: Sequence[Path]) -> Iterator[Path]:
    for p in paths:
        if p.is_dir():
            for root, dirs, files in os.walk(p):
                dirs.sort()
                yield from (Path(root) / f for f in sorted(files))
        else:
            yield p


def batches(files: Sequence[tuple[Path, int]], max_files: int,
            max_bytes: int = BATCH_BYTES) -> Iterator[list[tuple[Path, int]]]:
    """Consecutive batches of at most ``max_files`` files and (unless one file is larger) ``max_bytes``."""
    batch: list[tuple[Path, int]] = []
    held = 0
    for item in files:
        if batch and (len(batch) >= max_files or held + item[1] > max_bytes):
            yield batch
            batch, held = [], 0
        batch.append(item)
        held += item[1]
    if batch:
        yield batch


def transfer(sender: Sender, files: Sequence[tuple[Path, int]], *, batch: int,
             progress: Callable[[int, int], None] = lambda n, b: None) -> TransferResult:
    """Send ``files`` batch by batch; ``progress(instances, bytes)`` after each batch (sent or not).
    A destination that cannot be reached stops the run: the rest is reported as not attempted."""
    out = TransferResult(total=len(files), total_bytes=sum(n for _, n in files))
    start = time.monotonic()
    done = 0
    for chunk in batches(files, batch):
        sizes = dict(chunk)
        try:
            report = sender.send(list(sizes))
        except SendError as exc:
            out.failed.update(dict.fromkeys(sizes, str(exc)))
            out.failed.update(dict.fromkeys((p for p, _ in files[done + len(chunk):]), f"not attempted: {exc}"))
            progress(len(chunk), sum(sizes.values()))
            break
        done += len(chunk)
        out.sent += len(report.sent)
        out.sent_bytes += sum(sizes[p] for p in report.sent)
        out.failed.update(report.failed)
        out.failed.update({p: "not sent" for p in sizes if p not in report.sent and p not in report.failed
                           and p not in report.not_needed})
        progress(len(chunk), sum(sizes.values()))
    out.seconds = time.monotonic() - start
    return out


# ---- the commands --------------------------------------------------------------------------------
def _progress_bar() -> Progress:
    """Instances, bytes, MB/s and ETA on stderr; nothing when stderr is not a terminal (logs, pipes)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    err = console(stderr=True)
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                    TextColumn("{task.fields[instances]}/{task.fields[of]} instances"), DownloadColumn(),
                    TransferSpeedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=err,
                    disable=not err.is_terminal)


def _run(sender: Sender, paths: Sequence[Path], *, batch: int, label: str, where: str) -> int:
    """Send with a progress bar, print the summary; the exit code."""
    files, skipped = dicom_files(paths)
    c = console()
    if skipped:
        first = next(iter(skipped.items()))
        c.print(f"skipped {len(skipped)} file(s): {first[0]} ({first[1]})" + (", ..." if len(skipped) > 1 else ""))
    if not files:
        console(stderr=True).print(f"dicom-node: no DICOM files under {', '.join(map(str, paths))}")
        return 1
    bar = _progress_bar()
    with bar:
        task = bar.add_task(label, total=sum(n for _, n in files), instances=0, of=len(files))
        count = 0

        def advance(n: int, nbytes: int) -> None:
            nonlocal count
            count += n
            bar.update(task, advance=nbytes, instances=count)

        result = transfer(sender, files, batch=batch, progress=advance)
    rate = result.sent_bytes / result.seconds if result.seconds else 0.0
    per_s = result.sent / result.seconds if result.seconds else 0.0
    c.print(f"sent {result.sent} of {result.total} instance(s) ({size(result.sent_bytes)}) to {where} in "
            f"{result.seconds:.1f} s: {size(rate)}/s, {per_s:.1f} instances/s")
    if result.failed:
        t = table("file", "reason", title=f"{len(result.failed)} not sent")
        for path, reason in list(result.failed.items())[:FAILURES_SHOWN]:
            t.add_row(str(path), clip(reason, 100))
        show(c, t)
        if len(result.failed) > FAILURES_SHOWN:
            c.print(f"... and {len(result.failed) - FAILURES_SHOWN} more")
    return 1 if result.failed else 0


def _describe(d: DimseDestination | DicomwebDestination) -> str:
    """A destination for the summary (never a password of its URL)."""
    if isinstance(d, DimseDestination):
        return f"{d.name} ({d.ae_title} at {d.host}:{d.port}{', DICOM TLS' if d.tls else ''})"
    url = urlsplit(d.url)
    return f"{d.name} (STOW-RS {urlunsplit(url._replace(netloc=url.netloc.rpartition('@')[2]))})"


def _with_calling_ae(d: DimseDestination, calling_ae: str) -> DimseDestination:
    from pydantic import ValidationError

    try:
        return DimseDestination.model_validate({**d.model_dump(), "calling_ae_title": calling_ae})
    except ValidationError:
        raise ConfigError(f"--calling-ae {calling_ae!r}: not an AE title (1-16 characters, no backslash)") from None


def send(
    config: ConfigOption,
    paths: PathsArgument,
    to: Annotated[str, typer.Option("--to", metavar="DEST", help="a destination's name (destinations: in the "
                                                                    "configuration)")],
    calling_ae: Annotated[str | None, typer.Option(
        help="calling AE title for a dimse destination (default: its calling_ae_title, else node.ae_title)")] = None,
    batch: BatchOption = 32,
) -> int:
    """Send DICOM files to a configured destination (C-STORE or STOW-RS).

    Uses the node's own senders: C-STORE for a dimse destination (over DICOM TLS when it has tls:),
    STOW-RS for a dicomweb one. Shows a progress bar (instances, MB/s, ETA) on a terminal, then a
    summary; exit 1 if any instance was not sent.
    """
    from node.send.deliver import default_sender_factory

    s = settings(config)
    names = [d.name for d in s.destinations]
    if to not in names:
        raise ConfigError(f"--to {to!r}: no such destination; configured: {', '.join(names) or 'none'}")
    d = s.destination(to)
    if calling_ae is not None:
        if not isinstance(d, DimseDestination):
            raise ConfigError(f"--calling-ae: {to!r} is a dicomweb destination (STOW-RS has no AE titles)")
        d = _with_calling_ae(d, calling_ae)
        s = s.model_copy(update={"destinations": [d if x.name == to else x for x in s.destinations]})
    return _run(default_sender_factory(s)(to), paths, batch=batch, label=f"→ {to}", where=_describe(d))


def push_calling_ae(s: Settings, address: str) -> str | None:
    """The first peer of ``node.peers`` that may store from ``address``; the push AE when the node accepts
    unknown peers; None when neither."""
    from node.peers import PeerTable

    peers = PeerTable.from_settings(s)
    for p in s.node.peers:
        granted = peers.admit(p.ae_title, address).allow
        if granted is not None and "store" in granted:
            return p.ae_title.strip()
    return PUSH_AE_WHEN_UNKNOWN_ALLOWED if s.node.accept_unknown_peers else None


def push(
    config: ConfigOption,
    paths: PathsArgument,
    calling_ae: Annotated[str | None, typer.Option(
        help="calling AE title (default: the first node.peers entry allowed to store from this machine)")] = None,
    batch: BatchOption = 32,
) -> int:
    """Push DICOM files into this node, as a scanner would.

    C-STORE to the node's own port (node.host, node.port, called AE node.ae_title): the files are
    received, assembled and routed like any study. The node refuses unknown peers, so the calling AE
    must be a peer allowed to store from this machine: by default the first such entry of node.peers
    (e.g. ae_title SCANNER, host 127.0.0.1, allow echo and store), or --calling-ae. Progress bar and
    summary as for send.
    """
    from node.peers import resolve
    from node.send.dimse import DimseSender

    s = settings(config)
    n = s.node
    if not n.plain:
        raise ConfigError("node.plain is false: the node's unencrypted port is closed; push over DICOM TLS "
                          f"(e.g. storescu +tls ... to port {n.tls.port if n.tls else '?'})")
    host = "127.0.0.1" if n.host in ("", "0.0.0.0", "::") else n.host
    address = next(iter(sorted(resolve(host))), host)
    calling = calling_ae or push_calling_ae(s, address)
    if calling is None:
        raise ConfigError(f"no entry of node.peers may store from {address}: add one (ae_title: PUSH, host: "
                          f"{address}, allow: [store]) or give --calling-ae")
    d = _with_calling_ae(DimseDestination.model_validate(
        {"name": "this-node", "type": "dimse", "ae_title": n.ae_title, "host": host, "port": n.port}), calling)
    sender = DimseSender(d, calling, s.send.association_timeout_seconds)
    return _run(sender, paths, batch=batch, label=f"→ {n.ae_title}",
                where=f"this node ({n.ae_title} at {host}:{n.port}, calling AE {calling})")


def register(app: typer.Typer) -> None:
    app.command(rich_help_panel=PANEL_ACT)(send)
    app.command(rich_help_panel=PANEL_ACT)(push)
