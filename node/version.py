"""The installed version of the node, for the CLI, the logs and the result objects it writes."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

DISTRIBUTION = "dicom-ai-node"


def software_version() -> str:
    """``dicom-ai-node``'s installed version (``0+unknown`` when run from a tree that is not installed)."""
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "0+unknown"
