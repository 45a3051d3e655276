"""Study completion: a study is ready ``study_quiet_seconds`` after its last instance, or earlier when it
says it is whole (early completion, :mod:`node.completion`: an announced size, or a peer that sends a
study per association).

The clock is injected so tests drive time explicitly. Late instances re-open a routed study in the
catalog (``Catalog.record_instance``); the next quiet period makes it ready again, with a new
generation whose jobs supersede the earlier results. The early-completion facts live in memory: after a
restart, a study being received waits for its quiet period.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from node.catalog import Catalog
from node.completion import CompletionTracker

log = logging.getLogger("node.assemble")


class Assembler:
    def __init__(self, catalog: Catalog, quiet_seconds: float, clock: Callable[[], float],
                 completion: CompletionTracker | None = None) -> None:
        """``completion``: the receiver-fed facts for early completion (None: the quiet period only)."""
        self.catalog = catalog
        self.quiet_seconds = quiet_seconds
        self.clock = clock
        self.completion = completion

    def tick(self) -> list[int]:
        """Mark every study that is complete (early) or has been quiet long enough as ready; return their ids."""
        now = self.clock()
        ready = self._early(now) if self.completion is not None else []
        quiet = self.catalog.mark_quiet_studies_ready(now - self.quiet_seconds, now=now)
        for study in quiet:
            log.info("study #%d ready (quiet for %.0f s)", study, self.quiet_seconds)
        return ready + quiet

    def _early(self, now: float) -> list[int]:
        """Studies :class:`CompletionTracker` finds complete, if the catalog holds exactly what it saw.

        Every candidate's facts are dropped, marked or not: one the catalog disagrees with (a restart,
        another receiver, an instance recorded meanwhile) or no longer receiving waits for its quiet period."""
        assert self.completion is not None
        candidates = self.completion.candidates(now)
        ready: dict[str, int] = {}
        if candidates:
            ready = self.catalog.mark_complete_studies_ready({c.study_uid: c.instances for c in candidates}, now)
            for c in candidates:
                if c.study_uid in ready:
                    log.info("study #%d ready early (%s)", ready[c.study_uid], c.reason)
            self.completion.forget(c.study_uid for c in candidates)
        # Facts older than the quiet period are no longer needed: that study is ready (or will be at once).
        self.completion.forget_idle(now - self.quiet_seconds - self.completion.settle_seconds)
        return list(ready.values())
