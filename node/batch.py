"""Retrospective batches over an archive (``dicom-node batch``, ``/api/v1/batches``).

A batch is a STUDY-level C-FIND at a configured PACS (``source``, a dimse ``destinations`` entry; the
query language is :mod:`node.batch_query`), one model and its destinations. It lives in the catalog
(``batches``, ``batch_studies``) so that it survives restarts; the node's ``batch`` loop
(:class:`BatchRunner`, one thread, one study at a time) moves it on:

    batch   pending --(C-FIND once: the study list is stored)--> running --> done   (or cancelled)
    study   pending -> retrieving -> retrieved -> queued -> done | failed           (or skipped)

Retrievals follow the throttle (``rate_per_hour``, spread evenly, inside ``queue.offpeak_window``
unless ``anytime``) and reuse the priors' DIMSE source (:func:`node.retrieve.dimse_source`): C-MOVE to
the node's AE title or C-GET through ``Receiver.store``, only the series of the query's modalities. A
study is marked ``retrieving`` (and the throttle's clock set) before its retrieval starts: after a crash
it is retrieved again (instances already stored are kept, not added twice); a study the catalog already
holds is skipped, never retrieved again. Once its retrieval started, routing plans the study's jobs
with :meth:`BatchRunner.plan_for` instead of the site's rules: the batch's model only, at priority
``offpeak``, to the batch's destinations, through the ordinary queue, workers and senders. The loop
follows those jobs in the catalog to count studies done or failed. Logs carry catalog ids and counts,
never UIDs or query values.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, Literal, Protocol

from pydicom.dataset import Dataset

from models import registry
from models.errors import RetrieveError
from node.batch_query import identifier, modalities, retrieval_due
from node.batch_store import BatchStore, rule_name
from node.catalog import Catalog, JobSpec
from node.config import Settings
from node.dispatch import OFFPEAK, OffpeakWindow
from node.retrieve import (
    SERIES_FIND_KEYS,
    PriorExchange,
    Retrieved,
    StoreFn,
    dimse_source,
    reported,
)
from node.route import HOLD, Hold
from node.schema import Batch, BatchState, BatchStudy, BatchStudyState

log = logging.getLogger("node.batch")


class BatchSource(Protocol):
    """What a batch needs of a PACS (:class:`node.retrieve.DimsePriorSource`; tests plug in a fake)."""

    def find_datasets(self, ident: Dataset, timeout: float) -> list[Dataset]: ...

    def find_series(self, study_uid: str, modality: str, timeout: float) -> list[str]: ...

    def retrieve(self, study_uid: str, series_uids: list[str], timeout: float) -> Retrieved: ...


class BatchRunner:
    """The node's ``batch`` loop: C-FINDs new batches, retrieves their studies at their rate, follows
    their jobs; and routing's plan for the studies it retrieved (:meth:`plan_for`)."""

    def __init__(self, settings: Settings, catalog: Catalog, source_for: Callable[[str], BatchSource],
                 clock: Callable[[], float], *, on_exchange: Callable[[PriorExchange], None] | None = None) -> None:
        """``source_for(name)``: the PACS of a batch's ``source``; ``on_exchange``: every C-FIND, C-MOVE and
        C-GET made (the audit trail)."""
        self.settings = settings
        self.store = BatchStore(catalog)
        self.catalog = catalog
        self.source_for = source_for
        self.clock = clock
        self.on_exchange = on_exchange
        self.window = OffpeakWindow.parse(settings.queue.offpeak_window)

    @classmethod
    def from_settings(cls, settings: Settings, catalog: Catalog, store: StoreFn, clock: Callable[[], float], *,
                      on_exchange: Callable[[PriorExchange], None] | None = None) -> BatchRunner:
        """``store``: the receiving door (``Receiver.store``) that C-GET sub-operations go through."""
        method = settings.batch.method
        return cls(settings, catalog, lambda name: dimse_source(settings, name, method, store), clock,
                   on_exchange=on_exchange)

    def plan_for(self, study_uid: str, series: list[tuple[int, dict[str, Any]]]) -> list[JobSpec] | Hold | None:
        """The jobs of a study a batch retrieved: its model on each series of the query's modalities that
        the model takes, ``offpeak``, to the batch's destinations. None: not a batch's study (the rules);
        :data:`node.route.HOLD` while a running batch retrieves it (also a retrieval a crash cut short:
        the study is routed once it is complete, never half)."""
        link = self.store.link(study_uid)
        if link is None:
            return None
        batch, state = link
        if state == BatchStudyState.RETRIEVING and batch.state == BatchState.RUNNING:
            return HOLD
        wanted = set(modalities(batch.query))
        takes = set(registry.manifest(batch.model).modalities) if batch.model in registry.available() else set()
        out = []
        for series_id, attrs in series:
            modality = str(attrs.get("Modality") or "")
            if (not wanted or modality in wanted) and (not takes or modality in takes):
                out.append(JobSpec(series_id, batch.model, rule_name(batch.id), tuple(batch.destinations),
                                   priority=OFFPEAK))
        return out

    def tick(self) -> None:
        if not self.store.active():
            return
        now = self.clock()
        self.store.follow_jobs(now)
        for batch in self.store.to_find(now):
            self.find(batch)
        self.retrieve_next()

    def _source(self, batch: Batch) -> BatchSource | None:
        try:
            return self.source_for(batch.source)
        except (KeyError, ValueError):  # the destination left the configuration, or is no longer dimse
            note = f"source {batch.source!r} is no longer a dimse destination"
            log.warning("batch #%d cancelled: %s", batch.id, note)
            self.store.cancel(batch.id, self.clock(), note)
            return None

    def _exchange(self, batch: Batch, call: Callable[[], Any], operation: Literal["find", "move", "get"],
                  **kwargs: Any) -> Any:
        return reported(call, self.on_exchange, operation, batch.source, **kwargs)

    def find(self, batch: Batch) -> None:
        """The batch's C-FIND, once: its study list is stored and the batch runs (tried again later on error)."""
        source = self._source(batch)
        if source is None:
            return
        timeout = self.settings.batch.timeout_seconds
        ident = identifier(batch.query)
        try:
            found = self._exchange(batch, lambda: source.find_datasets(ident, timeout), "find", level="STUDY",
                                   keys=tuple(ident.dir()))
        except RetrieveError as exc:
            now = self.clock()
            self.store.find_failed(batch.id, str(exc), now + self.settings.batch.find_retry_seconds, now)
            log.warning("batch #%d: C-FIND at %s failed (%s); asking again in %.0f s", batch.id, batch.source, exc,
                        self.settings.batch.find_retry_seconds)
            return
        uids = [str(m.get("StudyInstanceUID", "") or "").strip() for m in found]
        n = self.store.store_found(batch.id, [u for u in uids if u], self.clock())
        log.info("batch #%d: %d stud(ies) found at %s for %s", batch.id, n, batch.source, batch.model)

    def retrieve_next(self) -> bool:
        """Retrieve one study of the first batch whose throttle and window allow it; True if one was."""
        for batch in self.store.running():
            now = self.clock()
            if not retrieval_due(now, batch.last_retrieval_at, batch.rate_per_hour,
                                 None if batch.anytime else self.window):
                continue
            while (row := self.store.next_study(batch.id)) is not None:
                if row.state == BatchStudyState.PENDING and row.attempts == 0 \
                        and self.catalog.known_study_uids([row.study_uid]):
                    self.store.set_study(row.id, BatchStudyState.SKIPPED, now, error="already in the catalog")
                    log.info("batch #%d: entry %d skipped (already in the catalog)", batch.id, row.id)
                    continue
                source = self._source(batch)
                if source is None:
                    break
                return self.retrieve(batch, row, source) is not None
        return False

    def retrieve(self, batch: Batch, row: BatchStudy, source: BatchSource) -> BatchStudyState | None:
        """Retrieve one study (its series of the query's modalities); returns its new state (None: another
        node sharing the catalog claimed it, or the batch's slot, first)."""
        if not self.store.start_retrieval(row, batch.last_retrieval_at, self.clock()):
            return None
        timeout = self.settings.batch.timeout_seconds
        state, error, got = BatchStudyState.FAILED, None, Retrieved(0)
        try:
            series: list[str] = []
            for modality in modalities(batch.query) or [""]:
                series += self._exchange(batch, functools.partial(source.find_series, row.study_uid, modality,
                                                                  timeout),
                                         "find", level="SERIES", keys=SERIES_FIND_KEYS, study_uid=row.study_uid)
            series = list(dict.fromkeys(series))
            if not series:
                state, error = BatchStudyState.SKIPPED, "no series of the query's modalities at the source"
            else:
                method = self.settings.batch.method
                got = self._exchange(batch, lambda: source.retrieve(row.study_uid, series, timeout), method,
                                     study_uid=row.study_uid)
                if got.completed:
                    state = BatchStudyState.RETRIEVED
                    error = f"{got.failed} sub-operation(s) failed" if got.failed else None
                else:
                    error = f"nothing retrieved ({got.failed} sub-operation(s) failed)"
        except RetrieveError as exc:
            error = str(exc)
        except Exception as exc:  # a bug must not stop the batch loop
            error = type(exc).__name__
            log.debug("batch #%d: retrieval traceback", batch.id, exc_info=True)
        if state == BatchStudyState.FAILED and row.attempts + 1 < self.settings.batch.max_attempts:
            state = BatchStudyState.PENDING  # tried again at a later slot
        self.store.set_study(row.id, state, self.clock(), error=error, instances=got.completed)
        level = logging.INFO if state == BatchStudyState.RETRIEVED and not error else logging.WARNING
        log.log(level, "batch #%d: entry %d %s: %d instance(s)%s", batch.id, row.id, state, got.completed,
                f" ({error})" if error else "")
        return state
