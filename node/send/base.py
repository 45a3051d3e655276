"""The sender protocol and its exception tree (a transport seam: tests plug in a fake sender).

    SendError                 base class
    +-- DestinationUnreachable  no association (refused, timed out, aborted): retry the whole batch
    +-- Rejected                the destination refused one object (status != success/warning)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


class SendError(Exception):
    """Base class of everything a sender raises."""


class DestinationUnreachable(SendError):
    """Could not associate with / connect to the destination."""


class Rejected(SendError):
    """The destination answered a failure status for an object."""


LABELMAP_VARIANT = "labelmap"
"""Files only for a destination that accepts Label Map Segmentation Storage (with the SR citing it)."""
BINARY_VARIANT = "binary"
"""The same results encoded for a destination that does not (BINARY SEG, SR citing that SEG)."""


@dataclass
class SendReport:
    """Outcome per file: ``sent`` paths, ``failed`` path -> reason, and ``not_needed`` paths (the
    destination took the other variant of the same result)."""

    sent: list[Path] = field(default_factory=list)
    failed: dict[Path, str] = field(default_factory=dict)
    not_needed: list[Path] = field(default_factory=list)


class Sender(Protocol):
    def send(self, files: Sequence[Path], variants: Mapping[Path, str] | None = None) -> SendReport:
        """Send the files; raise DestinationUnreachable if nothing could be attempted.

        ``variants`` marks files as :data:`LABELMAP_VARIANT` or :data:`BINARY_VARIANT`; a sender
        sends one of the two sets, as the destination's capabilities allow, and reports the other
        as not needed. Unmarked files are always sent.
        """
