"""The sender protocol and its exception tree (a transport seam: tests plug in a fake sender).

    SendError                 base class
    +-- DestinationUnreachable  no association (refused, timed out, aborted): retry the whole batch
    +-- Rejected                the destination refused one object (status != success/warning)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


class SendError(Exception):
    """Base class of everything a sender raises."""


class DestinationUnreachable(SendError):
    """Could not associate with / connect to the destination."""


class Rejected(SendError):
    """The destination answered a failure status for an object."""


@dataclass
class SendReport:
    """Outcome per file: ``sent`` paths, and ``failed`` path -> reason."""

    sent: list[Path] = field(default_factory=list)
    failed: dict[Path, str] = field(default_factory=dict)


class Sender(Protocol):
    def send(self, files: Sequence[Path]) -> SendReport:
        """Send the files; raise DestinationUnreachable if nothing could be attempted."""
