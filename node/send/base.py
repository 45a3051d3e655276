"""The sender protocol (a transport seam: tests plug in a fake sender) and what it raises.

Senders raise the ``SendError`` branch of the project's exception tree (:mod:`models.errors`)::

    SendError                   base class: the delivery stays pending and is retried
    +-- DestinationUnreachable  no association or connection: the whole batch is tried again

A destination that refuses single objects is not an exception: the sender reports each refused
file with its reason in :attr:`SendReport.failed`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


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

        ``variants`` marks files as :data:`node.schema.LABELMAP_VARIANT` or :data:`node.schema.BINARY_VARIANT`; a sender
        sends one of the two sets, as the destination's capabilities allow, and reports the other
        as not needed. Unmarked files are always sent.
        """
