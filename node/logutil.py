"""Logging set-up and PHI-free references.

Above DEBUG the node never logs tag values: no names, IDs, dates, descriptions. Studies are
referred to by their catalog id and a short hash of the Study Instance UID (``ref``), which lets
an admin find the study in the catalog without putting identifiers in log files.
"""

from __future__ import annotations

import hashlib
import logging
import sys


def ref(uid: str) -> str:
    """A short, stable, non-identifying reference for a UID (first 10 hex digits of SHA-256)."""
    return hashlib.sha256(uid.encode("ascii", "replace")).hexdigest()[:10]


def setup_logging(level: str, process: str) -> None:
    """Log to stderr as ``time level process logger: message``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s %(levelname)s {process}[%(process)d] %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pynetdicom logs every PDU at INFO/DEBUG (and dataset summaries at DEBUG): keep it quiet.
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, logging.getLevelName(level)))
    # pydicom warns about malformed elements with their values (PHI): only errors above DEBUG.
    logging.getLogger("pydicom").setLevel(logging.DEBUG if level == "DEBUG" else logging.ERROR)
