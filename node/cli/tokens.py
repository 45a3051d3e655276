"""``dicom-node token create|list|revoke``: API tokens of the HTTP service. ``create`` prints the token
alone on stdout, once (only its hash is stored); ``list`` shows names, roles and dates, never a token."""

from __future__ import annotations

import sys
import time
from typing import Annotated

import typer

from node.cli.common import PANEL_ADMIN, ConfigOption, console, open_catalog, show, table, when
from node.roles import Role

app = typer.Typer(help="API tokens of the HTTP service: create (printed once), list, revoke.",
                  no_args_is_help=True, rich_markup_mode="markdown")


@app.command()
def create(
    config: ConfigOption,
    name: Annotated[str, typer.Option(help="who or what uses it (1-64 letters, digits, _ . @ -)")],
    role: Annotated[Role, typer.Option(
        help="viewer (QIDO/WADO, API reads, metrics, docs), sender (STOW-RS), operator (viewer + "
        "retry/rerun/pause), admin (everything)")],
) -> int:
    """Create a token and print it, alone on stdout (only its hash is stored: keep it now)."""
    from node.tokens import create_token

    token = create_token(open_catalog(config), name, role, time.time())
    print(f"token {name!r} (role {role.value}) created; it is shown once, keep it now:", file=sys.stderr)
    print(token)
    return 0


@app.command("list")
def list_(config: ConfigOption) -> int:
    """Names, roles and dates (created, last used, revoked); never the tokens."""
    from node.tokens import list_tokens

    t = table("name", "role", "created", "last used", "revoked")
    for tok in list_tokens(open_catalog(config)):
        t.add_row(tok.name, tok.role.value, when(tok.created_at), when(tok.last_used_at), when(tok.revoked_at))
    show(console(), t, "no tokens")
    return 0


@app.command()
def revoke(config: ConfigOption,
           name: Annotated[str, typer.Argument(help="the token's name")]) -> int:
    """Revoke a token: it is refused (401) from the next request on."""
    from node.tokens import revoke_token

    if not revoke_token(open_catalog(config), name, time.time()):
        print(f"dicom-node: no active token named {name!r}", file=sys.stderr)
        return 1
    print(f"token {name!r} revoked")
    return 0


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="token", rich_help_panel=PANEL_ADMIN)
