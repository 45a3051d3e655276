"""``dicom-node``: run the node and its workers, look at it (status, studies, jobs), act on it (retry,
send, push, purge, rule dry-runs) and administer it (tokens, audit, models). A typer app; every command
takes ``--config/-c`` (or ``DICOM_NODE_CONFIG``). Exit codes: 0 done, 1 the command's own failure
(nothing matched, an instance not sent), 2 bad usage or configuration (``dicom-node: <message>`` on
stderr). Heavy modules are imported inside the commands: the node process never imports ``workers``
or torch (tests/unit/test_layering.py).
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from models.errors import ConfigError, ManifestError
from node.cli import audit, batch, browse, models_cmd, purge, rules, run, status, tokens, transfer
from node.version import software_version

__all__ = ["app", "main"]

app = typer.Typer(
    name="dicom-node",
    help="DICOM AI analysis node: receives studies (C-STORE, STOW-RS), runs AI models on them and sends "
    "the results (DICOM SEG, SR, ...) back to the PACS.",
    epilog="Start with dicom-node check-config -c /etc/dicom-node.yaml, then dicom-node run -c ... "
    "Set DICOM_NODE_CONFIG to leave out -c. Logs never contain patient data above DEBUG.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)


def _version(value: bool) -> None:
    if value:
        print(f"dicom-node {software_version()}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="print the version and exit")] = False,
) -> None:
    """DICOM AI analysis node: receives studies (C-STORE, STOW-RS), runs AI models on them and sends the
    results (DICOM SEG, SR, ...) back to the PACS."""


for module in (run, status, browse, transfer, rules, batch, purge, tokens, audit, models_cmd):
    module.register(app)


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``) and return its exit code. Usage errors
    exit 2 (SystemExit, as argparse did); configuration errors return 2 with ``dicom-node: <message>``."""
    command = typer.main.get_command(app)
    try:
        rv = command.main(args=argv, prog_name="dicom-node", standalone_mode=False)
    except typer.TyperException as exc:  # bad usage: the usage line and the error on stderr, exit 2
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            print(f"dicom-node: {exc.format_message()}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
    except typer.Abort:
        print("Aborted.", file=sys.stderr)
        return 130
    except (ConfigError, ManifestError) as exc:  # unknown models, options, missing extras, bad manifests
        print(f"dicom-node: {exc}", file=sys.stderr)
        return 2
    return int(rv or 0)


if __name__ == "__main__":
    sys.exit(main())
