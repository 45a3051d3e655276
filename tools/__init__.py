"""Developer tools, run from the repository root: ``.venv/bin/python -m tools.<name> --help``."""
