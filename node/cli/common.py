"""What every command shares: the ``--config`` option, settings loading, the rich consoles and tables,
time formatting. Output is plain (no colours, no cursor movement) when stdout is not a terminal."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from node.config import Settings, check_files, load_settings

if TYPE_CHECKING:
    from node.catalog import Catalog

CONFIG_ENV = "DICOM_NODE_CONFIG"
"""Environment variable naming the configuration file when ``--config`` is not given."""

ConfigOption = Annotated[Path, typer.Option(
    "--config", "-c", envvar=CONFIG_ENV, show_envvar=True, metavar="FILE",
    help="YAML configuration file (e.g. /etc/dicom-node.yaml)")]

PIPE_WIDTH = 200
"""Console width when the output goes to a pipe or a file (rich would wrap at 80 columns)."""

# Help panels of `dicom-node --help`.
PANEL_RUN = "Run the node"
PANEL_WATCH = "Look at the node"
PANEL_ACT = "Act on it"
PANEL_ADMIN = "Administration"


def settings(config: Path) -> Settings:
    """The configuration as read (no model registry check): for commands that only read the catalog."""
    return load_settings(config)


def open_catalog(config: Path) -> Catalog:
    """The configuration's catalog (``catalog.url``, default the file in ``node.storage_dir``; configuration
    read without the registry check)."""
    from node.catalog import Catalog

    return Catalog.for_settings(settings(config))


def checked_settings(config: Path, *, node_files: bool = False) -> Settings:
    """The configuration checked against the model registry (:mod:`node.checks`); ``node_files``: also
    the files the node process reads (TLS keys and certificates, secrets: :func:`node.config.check_files`)."""
    from node.checks import load_checked_settings  # the model registry: numpy, manifests

    s = load_checked_settings(config)
    if node_files:
        check_files(s)
    return s


def console(*, stderr: bool = False) -> Console:
    """A console on stdout (or stderr): colours on a terminal, plain text and a wide page otherwise.
    Made per call, so a redirected ``sys.stdout`` (tests, pipes) is honoured."""
    c = Console(stderr=stderr, highlight=False)
    if not c.is_terminal and "COLUMNS" not in os.environ:
        c = Console(stderr=stderr, highlight=False, width=PIPE_WIDTH)
    return c


def table(*columns: str, title: str | None = None, right: Iterable[str] = ()) -> Table:
    """A borderless table (like ``kubectl get`` or ``docker ps``): a header line, then one line per row,
    the first column flush left; ``right``: columns aligned right. :func:`show` prints it under ``title``."""
    aligned = set(right)
    t = Table(box=None, pad_edge=False, title=title, header_style="bold")
    for c in columns:
        t.add_column(c, justify="right" if c in aligned else "left", overflow="fold")
    return t


def when(t: float | None) -> str:
    """A catalog time (seconds since the epoch) as UTC ISO 8601, ``-`` for none."""
    return "-" if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def counts(by_state: dict[str, int]) -> str:
    """``done 3, failed 1`` (``-`` when empty)."""
    return ", ".join(f"{k} {v}" for k, v in sorted(by_state.items())) or "-"


def clip(text: str | None, width: int = 100) -> str:
    """One line of at most ``width`` characters (errors can be long tracebacks' last lines)."""
    if not text:
        return "-"
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


def json_default(value: Any) -> Any:
    """For :func:`json.dumps`: paths and enums as strings."""
    if isinstance(value, Path):
        return str(value)
    return str(value)


def show(c: Console, t: Table, empty: str = "none") -> None:
    """Print ``t`` under its bold title (after a blank line), or ``title: empty`` when it has no rows."""
    title, t.title = t.title, None
    if title:
        c.print()
    if not t.row_count:
        c.print(f"[bold]{title}[/]: {empty}" if title else empty)
        return
    if title:
        c.print(f"[bold]{title}[/]")
    c.print(t)
