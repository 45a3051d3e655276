"""``dicom-node models [list|evaluate]``: the models this node knows (from their manifests), or their
accuracy on generated phantoms (held-out seeds; imports the test kit, inside the command only)."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from node.cli.common import CONFIG_ENV, PANEL_ADMIN, checked_settings


class Action(StrEnum):
    LIST = "list"
    EVALUATE = "evaluate"


def models(
    action: Annotated[Action, typer.Argument(help="list (default) or evaluate")] = Action.LIST,
    family: Annotated[list[str] | None, typer.Option(help="evaluate only this family (repeatable)")] = None,
    seed: Annotated[int, typer.Option(help="first phantom seed of the held-out set")] = 0,
    dl: Annotated[bool, typer.Option("--dl", help="also evaluate the deep-learning demo models (needs torch)")] = False,
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", envvar=CONFIG_ENV, show_envvar=True, metavar="FILE",
        help="also list the site models this configuration defines (entries with bundle:/torchscript:)")] = None,
) -> int:
    """List the models this node knows, or evaluate them on phantoms.

    The list shows version, family, modalities and missing extras (from the manifests; nothing is
    loaded); with --config, the site models it defines are listed beside the built-in ones (marked
    "site"). evaluate measures accuracy on generated phantoms (held-out seeds), not on patients.
    """
    from models import registry

    if config is not None and action is Action.LIST:
        checked_settings(config)  # resolves and registers the site models

    if action is Action.EVALUATE:
        from testkit.evaluate import evaluate, format_table

        try:
            rows = evaluate(family or None, seed=seed)
        except ValueError as exc:  # unknown families
            raise typer.BadParameter(str(exc), param_hint="--family") from None
        if dl:
            from testkit.dl_evaluate import evaluate_dl

            rows += evaluate_dl(seed=seed)
        print(format_table(rows))
        print("Accuracy on generated phantoms (held-out seeds), not on patients: see README.")
        return 0
    for name in registry.available():
        m = registry.manifest(name)
        missing = registry.missing_modules(name)
        needs = f"  (needs extra {registry.spec(name).extra}: missing {', '.join(missing)})" if missing else ""
        site = registry.spec(name).site
        origin = f"site ({site.kind} {site.source})" if site is not None else "built-in"
        print(f"{m.name}  {m.version}  {m.family:<14} {','.join(m.modalities):<6} {origin}  {m.description}{needs}")
    return 0


def register(app: typer.Typer) -> None:
    app.command(rich_help_panel=PANEL_ADMIN)(models)
