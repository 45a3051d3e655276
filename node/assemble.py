"""Quiet-period study completion: a study is ready ``study_quiet_seconds`` after its last instance.

The clock is injected so tests drive time explicitly. Late instances re-open a routed study in the
catalog (``Catalog.record_instance``); the next quiet period makes it ready again, with a new
generation whose jobs supersede the earlier results.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from node.catalog import Catalog

log = logging.getLogger("node.assemble")


class Assembler:
    def __init__(self, catalog: Catalog, quiet_seconds: float, clock: Callable[[], float]) -> None:
        self.catalog = catalog
        self.quiet_seconds = quiet_seconds
        self.clock = clock

    def tick(self) -> list[int]:
        """Mark every study that has been quiet long enough as ready; return their ids."""
        now = self.clock()
        ready = self.catalog.mark_quiet_studies_ready(now - self.quiet_seconds, now=now)
        for study in ready:
            log.info("study #%d ready (quiet for %.0f s)", study, self.quiet_seconds)
        return ready
